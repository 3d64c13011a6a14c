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
    # a float16 experiment with a bf16 training twin gets its recording from rules/float16.smk instead, and one
    # whose source is a recording from rechunk_recording below
    wildcard_constraints:
        experiment=float16_view_pattern(view=False),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "rechunk", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "rechunk"),
    shell:
        "thimble rechunk --settings {params.settings:q} --stream {input} --output {output}"
        " --threads {threads} 2> {log}"


# An experiment whose source is a recording made by thimble.Recorder: its recording.h5 is rechunked from that
# recording's stream, which stays where the loop wrote it (never deleted). The recording.h5 is the experiment's:
# its attribute experiment is the experiment's name (the stages check it against the folder), and it says which
# recording it was made from (source_recording, source_stream_sha256, source_tensors_sha256).
rule rechunk_recording:
    input:
        unpack(recording_inputs),
    output:
        update("results/{experiment}/recording.h5"),
    log:
        "logs/{experiment}/rechunk.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=stage_settings_of("rechunk"),
        stream=recording_stream,
        expects=recording_expects,
        recording_files=recording_files,
    wildcard_constraints:
        experiment=recording_pattern(),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "rechunk", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "rechunk"),
        # the recording is there and is what the config says (rules/checks.smk)
        recording=recording_matches,
    shell:
        "thimble rechunk --settings {params.settings:q} --stream {params.stream:q} --output {output}"
        " --source-expects {params.expects:q} --threads {threads} 2> {log}"
