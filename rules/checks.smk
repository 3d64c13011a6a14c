# Checks that stop a run before a job starts, each naming the config key or file and the fix. None imports
# torch or h5py or decodes a data file: the checks that need the data run in the jobs themselves (train
# checks training.device, rechunk its stream; docs/architecture.md). CFG, the validated config, is the
# Snakefile's global.

from pathlib import Path

from snakemake.exceptions import WorkflowError


def vocab_size_fits(dataset):
    """A local source's vocab_size against the texts it reads, which exist before anything runs: one larger
    than they support stops `-n` with the largest that fits (unless the tokenizer is built with that
    vocab_size; the check trains the BPE once per text and vocab_size, cached in .snakemake/thimble/)."""
    from thimble.data.corpus import CorpusError, local_tokenizer_text
    from thimble.data.tokenizer import built_vocab_size, supported_vocab_size, too_few_tokens

    settings = CFG["datasets"][dataset]
    built = Path(f"results/data/{dataset}/tokenizer.json")
    if built.exists() and built_vocab_size(built) == settings["vocab_size"]:
        return
    try:
        text = local_tokenizer_text(settings, dataset)
    except CorpusError as error:
        raise WorkflowError(str(error))
    supported = supported_vocab_size(text, settings["vocab_size"], Path(".snakemake/thimble"))
    if supported < settings["vocab_size"]:
        raise WorkflowError(too_few_tokens(f"config key datasets.{dataset}.vocab_size", supported,
                                           settings["vocab_size"]))


def batch_fits(experiment, tokens):
    """Once ``tokens`` exists, the experiment's batch against its windows: a larger batch stops `-n` (the
    token count comes from the .npy header, nothing decoded)."""
    import numpy as np

    from thimble.sizes import batch_problem

    if not tokens.exists():
        return
    try:
        n_tokens = np.load(tokens, mmap_mode="r", allow_pickle=False).shape[0]
    except (ValueError, OSError):
        return  # the train job itself says what is wrong with the file
    problem = batch_problem(n_tokens, CFG["experiments"][experiment])
    if problem:
        raise WorkflowError(f"{tokens}: {problem}")


def resume_state_free(wildcards):
    """A train job's resource ``resume_state``, evaluated for a check: no other trainer holds the
    experiment's resume state. Snakemake evaluates a job's resources while it plans (at `-n` too), before it
    removes the job's outputs and log, and a resource is the one place it runs a check then: a second
    snakemake with --nolock would otherwise remove the running trainer's log before the trainer's own lock
    refuses the job."""
    from thimble.training.resume_lock import lock_holder

    partial = Path(f"results/{wildcards.experiment}/.partial")
    holder = lock_holder(partial)
    if holder is not None:
        raise WorkflowError(f"another trainer (PID {holder}) is training {wildcards.experiment} in {partial} "
                            f"(a second snakemake with --nolock?): wait for it to finish, or stop it "
                            f"(kill {holder}) and run again")
    return "free"
