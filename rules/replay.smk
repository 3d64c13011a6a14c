# Replay the optimizer's steps of every recorded tensor from the recording, one tensor at a time, and compare bit
# for bit; test the freeze criterion.


rule replay:
    input:
        # recording.h5, not the stream: the stream is temporary by default (rechunk.keep_stream), and a replay
        # run again (a new thimble) must not need training again
        "results/{experiment}/recording.h5",
    output:
        table="results/{experiment}/replay.csv",
        summary="results/{experiment}/replay.json",
        ratio="results/{experiment}/update_ratio.csv",
    log:
        "logs/{experiment}/replay.log",
    conda:
        "../workflow/envs/thimble.yaml"
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "replay", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "replay"),
    shell:
        "thimble replay --recording {input} --table {output.table} --summary {output.summary}"
        " --ratio-table {output.ratio} --threads {threads} 2> {log}"
