# Freeze/thaw tables, the cooling verdict, figures, and the series comparison.

from thimble.outputs import FIGURES, FREEZE_OUTPUTS


rule freeze_drivers:
    input:
        recording="results/{experiment}/recording.h5",
    output:
        table=report("results/{experiment}/freeze_drivers.csv", caption="../workflow/report/freeze_drivers.rst",
                     category="{experiment}", subcategory="tables"),
        summary="results/{experiment}/freeze_drivers.json",
    log:
        "logs/{experiment}/freeze_drivers.log",
    conda:
        "../workflow/envs/thimble.yaml"
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "freeze_drivers", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "freeze_drivers"),
    shell:
        "thimble freeze-drivers --threads {threads} --recording {input.recording} --table {output.table}"
        " --summary {output.summary} 2> {log}"


# The freeze rule's outputs are thimble.outputs.FREEZE_OUTPUTS, each under its key but the variance table, which
# the command passes as {output.exp_avg_sq} (the command's text is what Snakemake's code trigger compares)
FREEZE_RULE_OUTPUT = {"variance": "exp_avg_sq"}


# the command's options naming the freeze rule's outputs
FREEZE_OUTPUT_OPTIONS = " ".join(f"--{key.replace('_', '-')} {{output.{FREEZE_RULE_OUTPUT.get(key, key)}}}"
                                 for key in FREEZE_OUTPUTS)


rule freeze:
    input:
        delta="results/{experiment}/delta_w_lattice.h5",
        recording="results/{experiment}/recording.h5",
        drivers="results/{experiment}/freeze_drivers.json",
        # token_freeze.csv's token_text column
        tokenizer=lambda w: f"results/data/{CFG['experiments'][w.experiment]['dataset']}/tokenizer.json",
    output:
        **{FREEZE_RULE_OUTPUT.get(key, key): freeze_output(key, file) for key, file in FREEZE_OUTPUTS.items()},
    log:
        "logs/{experiment}/freeze.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=stage_settings_of("freeze"),
    wildcard_constraints:
        experiment=recording_pattern(outside=False),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "freeze", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "freeze"),
    shell:
        "thimble freeze --threads {threads} --settings {params.settings:q} --delta {input.delta} --recording {input.recording}"
        " --tokenizer {input.tokenizer} "
        + FREEZE_OUTPUT_OPTIONS
        + " --drivers {input.drivers} 2> {log}"


# An experiment whose source is a recording has no dataset, so no tokenizer: token_freeze.csv's token_text column
# stays empty (tokens are named by their row). The rule otherwise is freeze's (a rule's command cannot be
# changed by `use rule`).
rule freeze_recording:
    input:
        delta="results/{experiment}/delta_w_lattice.h5",
        recording="results/{experiment}/recording.h5",
        drivers="results/{experiment}/freeze_drivers.json",
    output:
        **{FREEZE_RULE_OUTPUT.get(key, key): freeze_output(key, file) for key, file in FREEZE_OUTPUTS.items()},
    log:
        "logs/{experiment}/freeze.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=stage_settings_of("freeze"),
    wildcard_constraints:
        experiment=recording_pattern(),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "freeze", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "freeze"),
    shell:
        "thimble freeze --threads {threads} --settings {params.settings:q} --delta {input.delta} --recording {input.recording} "
        + FREEZE_OUTPUT_OPTIONS
        + " --drivers {input.drivers} 2> {log}"


rule figures:
    input:
        freeze="results/{experiment}/freeze.csv",
        summary="results/{experiment}/summary.json",
        token_steps="results/{experiment}/token_displacement.h5",
        exp_avg_sq="results/{experiment}/exp_avg_sq.csv",
        ratio="results/{experiment}/update_ratio.csv",
        lattice_positions="results/{experiment}/lattice_positions.csv",
        drivers="results/{experiment}/freeze_drivers.csv",
    output:
        **{name: report(f"results/{{experiment}}/figures/{name}.png", caption=f"../workflow/report/{name}.rst",
                        category="{experiment}", subcategory="figures")
           for name in FIGURES},
        summary_page=report("results/{experiment}/summary.html", caption="../workflow/report/summary_page.rst",
                            category="{experiment}", subcategory="verdicts"),
    log:
        "logs/{experiment}/figures.log",
    conda:
        "../workflow/envs/thimble.yaml"
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "figures", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "figures"),
    shell:
        "thimble figures --freeze {input.freeze} --summary {input.summary} --token-steps {input.token_steps}"
        " --exp-avg-sq {input.exp_avg_sq} --ratio {input.ratio} --lattice-positions {input.lattice_positions}"
        " --drivers {input.drivers} --outdir results/{wildcards.experiment}/figures --summary-html {output.summary_page} 2> {log}"


rule series:
    input:
        summaries=lambda w: expand("results/{experiment}/summary.json", experiment=CFG["series"][w.series]),
        figures=lambda w: expand("results/{experiment}/figures/loss.png", experiment=CFG["series"][w.series]),
        lattice_positions=lambda w: expand("results/{experiment}/lattice_positions.csv",
                                           experiment=CFG["series"][w.series]),
    output:
        figure=report("results/series/{series}/global_freeze.png", caption="../workflow/report/series.rst",
                      category="series {series}"),
        table=report("results/series/{series}/verdicts.csv", caption="../workflow/report/series_table.rst",
                     category="series {series}"),
        page=report("results/series/{series}/verdicts.html", caption="../workflow/report/series_table.rst",
                    category="series {series}"),
        lattice_positions=report("results/series/{series}/lattice_positions.csv",
                                 caption="../workflow/report/series_lattice_positions.rst", category="series {series}"),
        tensors=report("results/series/{series}/tensors.csv", caption="../workflow/report/series_tensors.rst",
                       category="series {series}"),
    log:
        "logs/series/{series}.log",
    conda:
        "../workflow/envs/thimble.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "thimble series --name {wildcards.series} --summaries {input.summaries} --figure {output.figure}"
        " --table {output.table} --page {output.page} --lattice-positions {input.lattice_positions}"
        " --lattice-table {output.lattice_positions} --tensor-table {output.tensors} 2> {log}"
