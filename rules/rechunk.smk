# Rechunk the stream (one step per chunk) into rechunk.steps_per_chunk-step chunks, verified.


rule rechunk:
    input:
        "results/{experiment}/stream",
    output:
        "results/{experiment}/recording.h5",
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
        # checked first: the stream decodes whole while the recording.h5 a rerun replaces is still there
        mem_mb=checked_before_start(stream_intact_before_rechunk,
                                    lambda w, attempt: stage_mem_mb(w.experiment, "rechunk", attempt)),
        runtime=lambda w: stage_runtime_min(w.experiment, "rechunk"),
    shell:
        "thimble rechunk --settings {params.settings:q} --stream {input} --output {output}"
        " --threads {threads} 2> {log}"
