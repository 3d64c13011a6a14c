# Replay AdamW from the recording and compare bit for bit; test the freeze criterion.


rule replay:
    input:
        "results/{experiment}/stream",
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
        "thimble replay --stream {input} --table {output.table} --summary {output.summary}"
        " --ratio-table {output.ratio} --threads {threads} 2> {log}"
