# Checks that stop a run before a job starts, each naming the config key or file and the fix. Planning
# (building the DAG, -n, --lint) imports neither torch nor h5py and reads no recorded file: the stream is
# verified by the rechunk job itself, and training.device is asked of torch (in a subprocess) only right
# before a train job really runs here (docs/architecture.md). CFG, the validated config, is the Snakefile's
# global.

import functools
import json
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
    from thimble.outputs import RESUME_DIR
    from thimble.training.resume_lock import lock_holder

    partial = Path(f"results/{wildcards.experiment}/{RESUME_DIR}")
    holder = lock_holder(partial)
    if holder is not None:
        raise WorkflowError(f"another trainer (PID {holder}) is training {wildcards.experiment} in {partial} "
                            f"(a second snakemake with --nolock?): wait for it to finish, or stop it "
                            f"(kill {holder}) and run again")
    return "free"


def device_available(wildcards):
    """A train job's resource ``device``: its training.device, checked to be one torch sees on this machine
    when the job is about to run here (not at -n, nor for a cluster, where the job runs elsewhere and checks
    it itself). Evaluated before Snakemake removes the stream the job replaces, so a device that is not here
    stops the run with the stream kept."""
    device = CFG["experiments"][wildcards.experiment]["training"]["device"]
    if device in ("cuda", "mps") and workflow.local_exec and not workflow.dryrun:
        available = local_accelerators()
        if available is not None and not available[device]:
            raise WorkflowError(f"config key experiments.{wildcards.experiment}.training.device: {device}, but "
                                f"torch sees no {device.upper()} device on this machine, where the job would "
                                "run; set it to auto or cpu, or run on a machine (or cluster profile) with one")
    return device


@functools.cache
def local_accelerators():
    """{"cuda": bool, "mps": bool}: what torch sees on this machine, asked once in a subprocess (Snakemake's
    own process never imports torch); None where this interpreter has no torch (the job's environment decides)."""
    import subprocess
    import sys

    code = ("import json, torch; print(json.dumps({'cuda': torch.cuda.is_available(), "
            "'mps': torch.backends.mps.is_available()}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])
