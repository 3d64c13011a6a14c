# ΔW′: the exact displacement of W on the bf16 lattice, in integer lattice steps.


rule lattice:
    input:
        "results/{experiment}/recording.h5",
    output:
        "results/{experiment}/delta_w_lattice.h5",
    log:
        "logs/{experiment}/lattice.log",
    conda:
        "../workflow/envs/thimble.yaml"
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "lattice", attempt),
        runtime=lambda w: stage_runtime_min(w.experiment, "lattice"),
    shell:
        "thimble lattice --recording {input} --output {output} --threads {threads} 2> {log}"
