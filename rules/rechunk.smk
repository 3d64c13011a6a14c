# Rechunk the stream (one step per chunk) into rechunk.steps_per_chunk-step chunks, verified.


rule rechunk:
    input:
        "results/{experiment}/stream",
    output:
        # update: Snakemake keeps the recording.h5 a rerun replaces (a copy in .snakemake/backups/, put back if
        # the job fails) instead of removing it first: it may be the last intact copy of steps the stream has
        # lost since. The job verifies every chunk it reads and writes its output whole, or says it kept it.
        update("results/{experiment}/recording.h5"),
    log:
        "logs/{experiment}/rechunk.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=stage_settings_of("rechunk"),
    # a float16 experiment with a bf16 training twin gets its recording from rules/float16.smk instead
    wildcard_constraints:
        experiment=float16_view_pattern(view=False),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "rechunk", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "rechunk"),
    shell:
        "thimble rechunk --settings {params.settings:q} --stream {input} --output {output}"
        " --threads {threads} 2> {log}"
