# Training with streamed recording. The stream directory appears only when the
# run is complete; resume state lives in results/{experiment}/.partial/, outside
# the declared output, so a killed job resumes where it stopped on the next run.


rule train:
    input:
        tokens=lambda w: f"results/data/{CFG['experiments'][w.experiment]['dataset']}/tokens.npy",
        masks=lambda w: f"results/data/{CFG['experiments'][w.experiment]['dataset']}/live_dead_tokens.safetensors",
    output:
        directory("results/{experiment}/stream"),
    log:
        "logs/{experiment}/train.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=experiment_settings,
        partial="results/{experiment}/.partial",
    wildcard_constraints:
        experiment=experiment_pattern(keep_stream=True),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "train", attempt),
        runtime=lambda w: train_runtime_min(w.experiment),
    shell:
        "thimble train --settings {params.settings:q} --tokens {input.tokens} --masks {input.masks}"
        " --output {output} --partial {params.partial} --threads {threads} 2> {log}"


# rechunk.keep_stream: false -> the stream is removed once the rechunked file and replay exist
use rule train as train_temporary_stream with:
    output:
        temp(directory("results/{experiment}/stream")),
    wildcard_constraints:
        experiment=experiment_pattern(keep_stream=False),
