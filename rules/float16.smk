# The seed's float16 storage without training again, and what it did (docs/float16.md).

from thimble.outputs import FLOAT16_EFFECT_FILES


# A float16 experiment whose training settings equal a bf16 experiment's (thimble.config.training_twin) takes
# its recording.h5 from the twin's: the same bits cast as the float16 recorder casts them, written as rechunk
# writes a float16 recording. The twin trains once; the view's later stages run on it unchanged.
rule float16_view:
    input:
        lambda w: f"results/{float16_twin(w)}/recording.h5",
    output:
        "results/{experiment}/recording.h5",
    log:
        "logs/{experiment}/float16_view.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=float16_view_settings,
        twin=float16_twin,
    wildcard_constraints:
        experiment=float16_view_pattern(view=True),
    threads: 2
    resources:
        # the work of a rechunk (one destination chunk decoded, cast, encoded and verified at a time)
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "rechunk", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "rechunk"),
    shell:
        "thimble float16-view --settings {params.settings:q} --twin {params.twin} --twin-recording {input}"
        " --output {output} --threads {threads} 2> {log}"


# For a bf16 experiment with a float16 view: per tensor and step, what float16 changed and zeroed, and the two
# analyses side by side, with the lab's question answered.
rule float16_effect:
    input:
        unpack(float16_effect_inputs),
    output:
        **{name: report(f"results/{{experiment}}/{filename}", caption=f"../workflow/report/float16_effect_{name}.rst",
                        category="{experiment}", subcategory="float16 storage")
           for name, filename in FLOAT16_EFFECT_FILES.items()},
    log:
        "logs/{experiment}/float16_effect.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        view=float16_view_of_twin,
    wildcard_constraints:
        experiment=exact_with_view_pattern(),
    resources:
        # decoded blocks of 16 steps and their histograms; the tables of both runs
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "freeze_drivers", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "freeze_drivers"),
    shell:
        "thimble float16-effect --recording {input.recording} --exact-dir results/{wildcards.experiment}"
        " --view-dir results/{params.view} --table {output.table} --bands {output.bands} --summary {output.summary}"
        " --figure {output.figure} 2> {log}"
