# Training with streamed recording. The stream directory appears only when the
# run is complete; resume state lives in results/{experiment}/.partial/, outside
# the declared output, so a killed job resumes where it stopped on the next run.

from thimble.outputs import RESUME_DIR


rule train:
    input:
        unpack(training_inputs),
    output:
        directory("results/{experiment}/stream"),
    log:
        "logs/{experiment}/train.log",
    conda:
        "../workflow/envs/thimble.yaml"
    params:
        settings=stage_settings_of("train"),
        partial=f"results/{{experiment}}/{RESUME_DIR}",
        # not in settings (thimble.config.UNTRACKED_SETTINGS): the check changes no recorded bit, so an edit
        # of it reruns nothing. Snakemake's rerun trigger skips a param whose function reads the job's threads
        # (a derived param), which is why this one names them; tests/test_workflow.py holds that.
        determinism_check_steps=lambda w, threads: CFG["experiments"][w.experiment]["training"][
            "determinism_check_steps"],
    wildcard_constraints:
        experiment=experiment_pattern(keep_stream=True),
    # the cores the job gets compress the recording; the model's math runs on training.math_threads,
    # so the trajectory does not depend on --cores or on what a scheduler grants
    threads: train_threads
    resources:
        mem_mb=lambda w, attempt: stage_mem_mb(w.experiment, "train", attempt),
        runtime=lambda w: train_runtime_min(w.experiment),
        gpu=lambda w: train_gpus(w.experiment),
        # checks before the job removes the stream and log it replaces (rules/checks.smk): no other trainer
        # holds the resume state; training.device is one torch sees, when the job is about to run here; the
        # batch fits the dataset's tokens, once encoded
        resume_state=resume_state_free,
        device=device_available,
        batch_size=batch_fits,
    shell:
        "thimble train --settings {params.settings:q} --tokens {input.tokens} --masks {input.masks}"
        " --output {output} --partial {params.partial} --threads {threads}"
        " --determinism-check-steps {params.determinism_check_steps} 2> {log}"


# rechunk.keep_stream: false (the default) -> the stream is removed once recording.h5 exists (rechunk is its
# only reader). Editing a rechunk.* setting afterwards needs the stream again: it trains the run again.
use rule train as train_temporary_stream with:
    output:
        temp(directory("results/{experiment}/stream")),
    wildcard_constraints:
        experiment=experiment_pattern(keep_stream=False),
