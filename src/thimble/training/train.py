"""Training stage: the seed notebook's tiny GPT-2 in pure bfloat16, recorded at every step.

Semantics follow the Thimble 6 notebook exactly: the same model, init,
optimizer, data order and order of operations (forward, backward, read the
gradient, optimizer step, zero_grad, read W and the moments), so the seed's own
code on the same tokens gives the same trajectory bit for bit. (As in the seed,
``labels`` are the inputs shifted by one and GPT2LMHeadModel shifts them once
more, so the loss targets the token two ahead; kept for fidelity.)

Crash safety: steps go to closed segment files in ``partial_dir``, and after
every segment a checkpoint (model, optimizer, data-order state) is saved once
that segment is durable. A rerun resumes from the last checkpoint and the
result is bitwise identical to an uninterrupted run. Only when training is
complete is ``partial_dir`` renamed to the output directory.

A checkpoint is resumed only when it is provably the same run: its resume key
(the settings that shape the trajectory, ``training.math_threads`` among them,
and the sha256 of the tokens and masks) must equal this run's; otherwise
``partial_dir`` is discarded with one log line naming what changed. An
exclusive lock (``<partial_dir>.lock``, held by the live process, released by
the kernel when it dies) refuses a second trainer on the same ``partial_dir``.

The trajectory depends on the config alone: torch's intra-op threads are
``training.math_threads``, whatever cores the scheduler gave the job (those
run the recorder's compression), and on CUDA and MPS torch's deterministic
algorithms are switched on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from thimble.config import settings_hash, trajectory_settings, without_untracked
from thimble.data.tokenizer import load_token_ids
from thimble.record.format import list_segments
from thimble.record.writer import StreamRecorder, write_stream_file
from thimble.sizes import batch_problem, training_footprint
from thimble.training.adamw import UpdateRule
from thimble.training.determinism import (
    DeterminismCheck,
    DeterminismError,
    StepBits,
    determinism_attr,
    lookup_backward,
    use_lookup_backward,
)
from thimble.training.host_copy import HostCopies
from thimble.training.host_memory import host_allocator
from thimble.training.model import (  # noqa: F401
    CUBLAS_WORKSPACE_CONFIG,
    TrainingError,
    build_model,
    build_optimizer,
    deterministic_math,
    loss_path,
    select_device,
)
from thimble.training.resume_lock import PartialLock
from thimble.update_rules import recorded_tensors
from thimble.util.cpu import this_cpu
from thimble.util.files import sha256_file

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: the checkpoint before the newest: what a resume falls back to when the newest fails its checksum
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"
#: the sha256 of each checkpoint, written once the checkpoint is durable, verified before it is loaded
CHECKPOINT_SHA256 = "checkpoint.sha256"
class TokenWindows(Dataset):
    """Every window of ``seq_len + 1`` tokens (the seed's TokenDataset)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.tokens[index: index + self.seq_len + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


class BatchStream:
    """Endless batches in the seed's order, with a resumable position.

    The seed re-creates the DataLoader iterator at each epoch end; creating it
    draws from the shuffle generator, so the generator state at the start of the
    epoch plus the number of batches consumed pins the position exactly.
    """

    def __init__(self, loader: DataLoader, generator: torch.Generator):
        self.loader, self.generator = loader, generator
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_generator_state = self.generator.get_state()
        self.iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._start_epoch()
            batch = next(self.iterator)
        self.consumed += 1
        return batch

    def state(self) -> dict:
        return {"epoch_generator_state": self.epoch_generator_state.clone(), "consumed": self.consumed}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["epoch_generator_state"])
        self._start_epoch()
        for _ in range(state["consumed"]):
            next(self.iterator)
        self.consumed = state["consumed"]


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device, math_threads: int, compression_threads: int) -> dict:
    import h5py
    import transformers

    from thimble.version import __version__

    return {
        "thimble_version": __version__,
        "torch_version": str(torch.__version__),  # a str subclass h5py cannot store
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
        "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else this_cpu()["device_name"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": math_threads,  # training.math_threads: torch's intra-op threads
        "compression_threads": compression_threads,
        "git_commit": git_commit(),
    }


def hyperparameter_attrs(settings: dict) -> dict:
    """The seed's attribute names, plus the rest of the settings."""
    model, training = settings["model"], settings["training"]
    return {
        "experiment": settings["name"],
        "dataset": settings["dataset"],
        "vocab_size": model["vocab_size"],
        "hidden_dim": model["hidden_dim"],
        "n_layers": model["n_layers"],
        "n_heads": model["n_heads"],
        "max_seq_len": model["max_seq_len"],
        "init_scale": model["init_scale"],
        "num_steps": training["steps"],
        "batch_size": training["batch_size"],
        "learning_rate": training["learning_rate"],
        "weight_decay": training["weight_decay"],
        "adam_beta1": training["adam_beta1"],
        "adam_beta2": training["adam_beta2"],
        "adam_epsilon": training["adam_epsilon"],
        "seed": training["seed"],
        "math_threads": training["math_threads"],
        "config_hash": settings_hash(settings),
    }


def check_disk(plan: dict, directory: Path) -> None:
    free = shutil.disk_usage(directory).free
    need = plan["stream_bytes_uncompressed"]
    log.info("safety check: the stream needs at most %.2f GB on disk (uncompressed bound; compression "
             "typically halves it), %.2f GB free in %s", need / 1e9, free / 1e9, directory)
    if need > free:
        raise TrainingError(f"not enough free disk in {directory}: the run may need {need / 1e9:.2f} GB "
                            f"(uncompressed bound) and {free / 1e9:.2f} GB are free; free space or "
                            "reduce training.steps")


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (the files' own bytes are synced before)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_synced(directory: Path, name: str, write) -> str:
    """Write a file under a unique temporary name (``write(handle)``), sync it; return the temporary path."""
    handle, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(handle, "wb") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())
    return tmp


def save_checkpoint(partial_dir: Path, state: dict) -> None:
    """Save the resume state after ``state["step"]``, keeping the one it replaces as ``PREVIOUS_CHECKPOINT``.

    The new file is written under a unique temporary name and synced, the current one becomes the
    previous, the new one is renamed into place, and only once those renames are durable does
    ``CHECKPOINT_SHA256`` list the sha256 of both files: a resume uses a checkpoint only when its bytes
    match a listed checksum, so a crash at any point, or damage after the fact, never resumes wrong bits.
    """
    checkpoint, previous = partial_dir / CHECKPOINT, partial_dir / PREVIOUS_CHECKPOINT
    tmp = _write_synced(partial_dir, CHECKPOINT, lambda out: torch.save(state, out))
    try:
        digest = sha256_file(tmp)
        # by content, not name: after a crash mid-save a listed sum can sit under the other file's name
        listed = set(read_checkpoint_checksums(partial_dir).values())
        kept = {}
        if checkpoint.exists() and (current := sha256_file(checkpoint)) in listed:
            os.replace(checkpoint, previous)  # its sum stays listed until the new list replaces the old
            kept = {PREVIOUS_CHECKPOINT: current}
        elif previous.exists() and (earlier := sha256_file(previous)) in listed:
            kept = {PREVIOUS_CHECKPOINT: earlier}
        os.replace(tmp, checkpoint)
        _fsync_directory(partial_dir)
        checksums = json.dumps({"sha256": {CHECKPOINT: digest, **kept}, "step": state.get("step")}, sort_keys=True)
        listing = _write_synced(partial_dir, CHECKPOINT_SHA256, lambda out: out.write(checksums.encode()))
        os.replace(listing, partial_dir / CHECKPOINT_SHA256)
        _fsync_directory(partial_dir)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_checkpoint_checksums(partial_dir: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the checkpoints ``CHECKPOINT_SHA256`` vouches for; {} if it is missing or unreadable."""
    try:
        listed = json.loads((partial_dir / CHECKPOINT_SHA256).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(name): str(digest) for name, digest in listed.items()} if isinstance(listed, dict) else {}


def resume_key(settings: dict, tokens_path: str, masks_path: str) -> dict:
    """What a checkpoint must match to be resumed: the trajectory's settings and its inputs' content."""
    return {"settings": trajectory_settings(settings),
            "inputs": {"tokens_sha256": sha256_file(tokens_path), "masks_sha256": sha256_file(masks_path)}}


def key_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The leaves where two resume keys differ, as 'key: recorded -> current'."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += key_differences(old, new, f"{prefix}{name}.")
        elif old != new:
            changes.append(f"{prefix}{name}: {old!r} -> {new!r}")
    return changes


def _discard(partial_dir: Path, why: str) -> None:
    log.warning("discarding %s and training from step 0: %s", partial_dir, why)
    shutil.rmtree(partial_dir)


def verified_checkpoint(partial_dir: Path) -> dict | None:
    """The newest checkpoint in ``partial_dir`` whose bytes match a checksum of ``CHECKPOINT_SHA256`` and
    that loads; None if there is none. Each one that fails is deleted, with a log line saying why."""
    listed = set(read_checkpoint_checksums(partial_dir).values())
    states = []
    for path in (partial_dir / CHECKPOINT, partial_dir / PREVIOUS_CHECKPOINT):
        if not path.exists():
            continue
        if sha256_file(path) not in listed:
            why = (f"its sha256 matches no checksum in {CHECKPOINT_SHA256} (damaged after it was written, or "
                   "cut short before its checksum was)" if listed else
                   f"{CHECKPOINT_SHA256} is missing or unreadable (no checksum vouches for it)")
            log.warning("discarding the checkpoint %s: %s", path, why)
            path.unlink()
            continue
        try:
            state = torch.load(path, weights_only=False)
        except Exception as error:  # noqa: BLE001  (any unreadable checkpoint: torch raises many kinds)
            log.warning("discarding the checkpoint %s: it cannot be read (%s: %s)", path, type(error).__name__,
                        str(error)[:200])
            path.unlink()
            continue
        if not isinstance(state, dict) or "resume_key" not in state:
            log.warning("discarding the checkpoint %s: it has no resume key (written by an older thimble)", path)
            path.unlink()
            continue
        states.append(state)
    return max(states, key=lambda state: state["step"], default=None)


def load_resume_state(partial_dir: Path, key: dict) -> dict | None:
    """The checkpoint to resume from (the newest that passes its checksum), after removing whatever came
    after it; None to start afresh (``partial_dir`` removed).

    The caller holds the lock on ``partial_dir``.
    """
    for stale in partial_dir.glob("*.tmp"):
        stale.unlink()
    if not partial_dir.exists():
        return None
    had_checkpoint = any((partial_dir / name).exists() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))
    state = verified_checkpoint(partial_dir)
    if state is None:
        if had_checkpoint:
            _discard(partial_dir, "none of its checkpoints passes its checksum and loads (each is named above)")
        else:
            shutil.rmtree(partial_dir)  # killed before its first checkpoint: nothing to resume from
        return None
    changes = key_differences(state["resume_key"], key)
    if changes:
        _discard(partial_dir, f"it is not the same run ({'; '.join(changes)})")
        return None
    for first, last, path in list_segments(partial_dir):
        if last > state["step"]:
            path.unlink()  # written after the checkpoint; will be recorded again
    covered = sum(last - first + 1 for first, last, _ in list_segments(partial_dir))
    if covered != state["step"] + 1:
        _discard(partial_dir, f"its segments do not cover steps 0..{state['step']}")
        return None
    return state


def train(settings: dict, tokens_path: str, masks_path: str, output_dir: str, partial_dir: str,
          threads: int = 1, determinism_check_steps: int | None = None) -> None:
    """Train one experiment and record its stream into ``output_dir`` (resuming from ``partial_dir``).

    ``threads`` compress the recording; the model's math runs on ``training.math_threads``.
    ``determinism_check_steps`` overrides ``training.determinism_check_steps`` (the workflow passes it
    beside the settings: ``config.UNTRACKED_SETTINGS``).
    """
    output_dir, partial_dir = Path(output_dir), Path(partial_dir)
    if determinism_check_steps is None:
        determinism_check_steps = settings["training"].get("determinism_check_steps")
    if not isinstance(determinism_check_steps, int) or determinism_check_steps < 0:
        raise TrainingError(f"training.determinism_check_steps must be an integer >= 0, got "
                            f"{determinism_check_steps!r}; pass --determinism-check-steps or set it in the settings")
    if output_dir.exists():
        raise TrainingError(f"{output_dir} already exists; remove it to record again")
    with PartialLock(partial_dir) as lock:
        if output_dir.exists():  # a trainer that held the lock before us finished the run
            raise TrainingError(f"{output_dir} already exists; remove it to record again")
        _train(without_untracked(settings, "train"), tokens_path, masks_path, output_dir, partial_dir, threads,
               determinism_check_steps)
        # done: no resume state is left to guard (a trainer that opened the file before this finds the output)
        lock.path.unlink(missing_ok=True)


def train_step(step: int, model, optimizer: UpdateRule, batches: BatchStream, device: torch.device,
               copies: HostCopies, wait: bool = True) -> StepBits:
    """One optimizer step in the seed's order; what it records (host copies) and its loss. With ``wait``
    False, on a GPU, the copies may still be running: the loss is then the ``HostStep`` the recorder waits
    for in its own thread (``thimble.training.host_copy``), so that this loop never waits for the device."""
    wte = model.transformer.wte.weight
    batch = batches.next()
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    host = copies.copy({"grad_W": wte.grad})  # before the step, which may change the gradient
    optimizer.step(step)
    optimizer.zero_grad()
    host = copies.copy({"W": wte, **optimizer.device_state(wte)}, into=host, loss=loss)
    return StepBits(step, host.tensors, host.loss if wait or host.ready else host)


def whole_state(model, optimizer: UpdateRule) -> dict:
    """Copies of every parameter and all the optimizer's state, for the determinism check."""
    return {"model": {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict())}


def first_pass(check: DeterminismCheck, model, optimizer: UpdateRule, batches: BatchStream,
               device: torch.device, copies: HostCopies) -> None:
    """Run the check's steps once, keep what they record and the state after them, and put everything back
    (model, optimizer, data order, torch's generators) as it was, for the recorded run to do them again."""
    started = time.perf_counter()
    before = {**whole_state(model, optimizer), "data": batches.state(), "cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        before["cuda_rng"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        before["mps_rng"] = torch.mps.get_rng_state()
    try:
        for step in range(check.first_step, check.last_step + 1):
            check.reference.append(train_step(step, model, optimizer, batches, device, copies))
    except RuntimeError as error:
        # torch under use_deterministic_algorithms: an op without a deterministic kernel on this device raises
        if "determinis" not in str(error):
            raise
        raise DeterminismError(f"training is not deterministic on {device}: torch has no deterministic kernel "
                               f"for an operation of the first step ({str(error).splitlines()[0][:300]}); "
                               "nothing was recorded. Train on another device (training.device: cpu) or "
                               "another torch version") from error
    check.reference_state = whole_state(model, optimizer)
    model.load_state_dict(before["model"])
    optimizer.load_state_dict(before["optimizer"])
    batches.restore(before["data"])
    torch.set_rng_state(before["cpu_rng"])
    if "cuda_rng" in before:
        torch.cuda.set_rng_state_all(before["cuda_rng"])
    if "mps_rng" in before:
        torch.mps.set_rng_state(before["mps_rng"])
    check.seconds = time.perf_counter() - started


@dataclass
class Session:
    """One training session's device, inputs, model and optimizer, as ``set_up`` makes them."""

    settings: dict
    device: torch.device
    #: what deterministic math set (recorded as the stream's attributes)
    determinism: dict
    masks: dict
    key: dict
    model: torch.nn.Module
    optimizer: UpdateRule
    batches: BatchStream
    wte: torch.nn.Parameter
    lookup: str
    tensors: dict[str, str]


#: what a step records and its checkpoint's state (or None), held back until the determinism check has passed
HeldSteps = list[tuple[StepBits, "dict | None"]]


def _train(settings: dict, tokens_path: str, masks_path: str, output_dir: Path, partial_dir: Path,
           threads: int, determinism_check_steps: int) -> None:
    """One training session, phase by phase: set up and seed, resume (or hold step 0), open the recorder, run
    the loop (its steps held until the determinism check has passed, then committed), write the stream."""
    session = set_up(settings, tokens_path, masks_path, partial_dir)
    resume = load_resume_state(partial_dir, session.key)
    recorder, compression_threads = open_recorder(session, partial_dir, threads)
    start, earlier_checks, held = start_or_resume(session, resume, recorder)
    steps = settings["training"]["steps"]
    session.model.train()
    copies = HostCopies(session.device)
    check = DeterminismCheck(str(session.device), start + 1, min(determinism_check_steps, steps - start),
                             determinism_check_steps)

    def session_checks() -> list[dict]:
        return earlier_checks + [check.result()] if steps > start else earlier_checks

    # a held step is recorded (and its checkpoint written once durable) only after the check has passed
    def commit(bits: StepBits, checkpoint_state: dict | None) -> None:
        recorder.record(bits.step, bits.tensors, bits.loss)
        if checkpoint_state is not None:
            checkpoint_state["determinism_checks"] = session_checks()
            recorder.checkpoint(bits.step, lambda s, state=checkpoint_state: save_checkpoint(partial_dir, state))

    elapsed, first_step_seconds = train_steps(session, recorder, check, start, held, commit, copies)
    log_session(session, recorder, check, start, elapsed)
    attrs = stream_attrs(session, compression_threads, session_checks(), check, start, elapsed, first_step_seconds)
    finish_stream(session, partial_dir, output_dir, attrs)


def set_up(settings: dict, tokens_path: str, masks_path: str, partial_dir: Path) -> Session:
    """The device and its deterministic math, the inputs checked (tokens, masks, free disk), then seeds,
    data, model and optimizer in the seed's order."""
    model_settings, training, record = settings["model"], settings["training"], settings["record"]
    vocab = model_settings["vocab_size"]
    torch.set_num_threads(training["math_threads"])
    # before anything can initialise CUDA (it reads this when it creates the cuBLAS handle)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    device = select_device(training["device"], f"experiments.{settings['name']}.training.device")
    determinism = deterministic_math(device)

    token_ids = load_token_ids(tokens_path, vocab)
    problem = batch_problem(len(token_ids), settings)
    if problem:
        raise TrainingError(f"{tokens_path}: {problem}")
    tokens = torch.from_numpy(token_ids.astype(np.int64))
    masks = load_file(masks_path)
    if masks["live_mask"].numel() != vocab:
        raise TrainingError(f"{masks_path} has {masks['live_mask'].numel()} tokens, the model {vocab}")
    key = resume_key(settings, tokens_path, masks_path)
    plan = training_footprint(settings, len(tokens))
    partial_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(plan, partial_dir.parent)

    # the seed's order: seeds, data, loader (its generator), model (global generator), optimizer
    torch.manual_seed(training["seed"])
    np.random.seed(training["seed"])
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(training["seed"])
    dataset = TokenWindows(tokens, model_settings["max_seq_len"])
    generator = torch.Generator()
    generator.manual_seed(training["seed"])
    loader = DataLoader(dataset, batch_size=training["batch_size"], shuffle=True, generator=generator,
                        num_workers=0)
    model = build_model(model_settings, device)
    lookup = lookup_backward(device)
    use_lookup_backward(model, lookup)
    # explicit, so that the recording names the kernels that produced it (the replay rebuilds them)
    optimizer = build_optimizer(model, training, device)
    return Session(settings, device, determinism, masks, key, model, optimizer, BatchStream(loader, generator),
                   model.transformer.wte.weight, lookup, recorded_tensors(training["update_rule"], record["dtype"]))


def open_recorder(session: Session, partial_dir: Path, threads: int) -> tuple[StreamRecorder, int]:
    """The stream's recorder in ``partial_dir``, and its compression threads."""
    settings, device = session.settings, session.device
    model_settings, training, record = settings["model"], settings["training"], settings["record"]
    # on a GPU the loop keeps a core busy launching kernels: the recorder compresses on the others
    compression_threads = max(1, threads - 1) if device.type == "cuda" else max(1, threads)
    recorder = StreamRecorder(partial_dir, (model_settings["vocab_size"], model_settings["hidden_dim"]),
                              training["steps"], storage=record["dtype"], tensors=session.tensors,
                              segment_steps=record["segment_steps"], queue_steps=record["queue_steps"],
                              level=record["compression_level"], threads=compression_threads)
    log.info("math on %d torch threads (training.math_threads), recorder compression on %d threads; lookups' "
             "backward on the %s; %s", training["math_threads"], compression_threads, session.lookup,
             session.determinism)
    return recorder, compression_threads


def start_or_resume(session: Session, resume: dict | None,
                    recorder: StreamRecorder) -> tuple[int, list[dict], HeldSteps]:
    """The last step already recorded, the earlier sessions' determinism checks and the steps held back:
    a fresh run holds step 0 (W as initialised, empty optimizer state); a resumed one takes the model,
    optimizer and data order of its checkpoint."""
    settings, model, optimizer, batches = session.settings, session.model, session.optimizer, session.batches
    held: HeldSteps = []
    if resume is None:
        wte, tensors = session.wte, session.tensors
        step_zero = StepBits(0, {"W": wte.detach().to("cpu", copy=True), **initial_state(tensors, wte)}, float("nan"))
        held.append((step_zero, snapshot(0, model, optimizer, batches, session.key)
                     if recorder.is_segment_end(0) else None))
        model_settings, training = settings["model"], settings["training"]
        log.info("recording %s: steps 0..%d, %d x %d, update rule %s (%s), tensors %s, on %s", settings["name"],
                 training["steps"], model_settings["vocab_size"], model_settings["hidden_dim"],
                 training["update_rule"], optimizer.implementation,
                 ", ".join(f"{name} as {dtype}" for name, dtype in tensors.items()), session.device)
        return 0, [], held
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    batches.restore(resume["data"])
    log.info("resuming %s after step %d of %d", settings["name"], resume["step"], settings["training"]["steps"])
    return resume["step"], resume.get("determinism_checks", []), held


def train_steps(session: Session, recorder: StreamRecorder, check: DeterminismCheck, start: int, held: HeldSteps,
                commit, copies: HostCopies) -> tuple[float, float]:
    """The determinism check's first pass, then steps ``start + 1``.. recorded, each ``commit``-ted once
    the check has passed; the recorder closed (aborted on any failure). Returns the loop's seconds and
    its first step's."""
    settings, model, optimizer, batches, device = (session.settings, session.model, session.optimizer,
                                                   session.batches, session.device)
    steps = settings["training"]["steps"]
    try:
        if check.steps:  # before the clock starts: the session's step rate stays the recorded run's own
            first_pass(check, model, optimizer, batches, device, copies)
        started = time.perf_counter()
        first_step_seconds = 0.0
        progress = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=settings["name"],
                        unit="step", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 10.0,
                        ascii=not sys.stderr.isatty())
        for step in progress:
            bits = train_step(step, model, optimizer, batches, device, copies, wait=check.covers(step))
            held.append((bits, snapshot(step, model, optimizer, batches, session.key)
                         if recorder.is_segment_end(step) else None))
            if check.covers(step):
                check.compare_step(bits)
                if step == check.last_step:
                    check.compare_state(step, whole_state(model, optimizer))
            if step >= check.last_step:
                for held_bits, held_state in held:
                    commit(held_bits, held_state)
                held.clear()
            if isinstance(bits.loss, float):  # on a GPU, only a loss already on the host: reading must not wait
                progress.set_postfix(loss=f"{bits.loss:.4f}", refresh=False)
            if step == start + 1:
                first_step_seconds = time.perf_counter() - started  # warm-up: allocations, kernel choice
        for held_bits, held_state in held:  # a session that trained no step: step 0 alone, or nothing
            commit(held_bits, held_state)
        recorder.close()
    except BaseException:
        recorder.abort()
        raise
    return time.perf_counter() - started, first_step_seconds


def log_session(session: Session, recorder: StreamRecorder, check: DeterminismCheck, start: int,
                elapsed: float) -> None:
    """The session's step rate, its determinism check and what float16 storage altered."""
    model_settings, training, record = (session.settings["model"], session.settings["training"],
                                        session.settings["record"])
    steps = training["steps"]
    log.info("trained steps %d..%d in %.1f s (%.2f steps/s)", start + 1, steps, elapsed,
             (steps - start) / elapsed if elapsed > 0 else math.inf)
    if check.steps:
        log.info("determinism check on %s: steps %d..%d ran twice and agree bit for bit (%d elements; %.1f s)",
                 session.device, check.first_step, check.last_step, check.elements_compared, check.seconds)
    elif steps > start:
        log.info("determinism check off (training.determinism_check_steps: 0)")
    if record["dtype"] == "float16":
        total = model_settings["vocab_size"] * model_settings["hidden_dim"] * steps
        for name, altered in recorder.float16_altered.items():
            log.warning("record.dtype float16 altered %d of %d %s values (%.2f%%) in steps %d..%d",
                        altered, total, name, 100 * altered / total, start + 1, steps)


def stream_attrs(session: Session, compression_threads: int, checks: list[dict], check: DeterminismCheck,
                 start: int, elapsed: float, first_step_seconds: float) -> dict:
    """The stream's attributes: settings, provenance, determinism, this session's step rate, the masks' counts."""
    settings, device, masks = session.settings, session.device, session.masks
    training = settings["training"]
    steps = training["steps"]
    attrs = {**hyperparameter_attrs(settings), **provenance(device, training["math_threads"], compression_threads),
             **session.determinism, "optimizer_impl": session.optimizer.implementation,
             "update_rule": training["update_rule"], "lookup_backward": session.lookup,
             "loss_path": loss_path(device), "host_allocator": json.dumps(host_allocator(), sort_keys=True)}
    attrs["resume_key"] = json.dumps(session.key, sort_keys=True)
    attrs["determinism_check"] = determinism_attr(checks)
    # the measured step rate of this (last) session, which `thimble plan` uses to predict run times
    attrs["session_trained_steps"] = steps - start
    attrs["session_training_seconds"] = elapsed
    attrs["session_first_step_seconds"] = first_step_seconds if steps > start else 0.0
    attrs["session_determinism_check_seconds"] = check.seconds
    attrs["n_live"] = int(masks["live_mask"].sum())
    attrs["n_dead"] = int(masks["dead_mask"].sum())
    return attrs


def finish_stream(session: Session, partial_dir: Path, output_dir: Path, attrs: dict) -> None:
    """The stream's file (masks, attributes) written, the resume state removed, the stream moved into place."""
    model_settings, record, masks = session.settings["model"], session.settings["record"], session.masks
    mask_arrays = {"live_mask": masks["live_mask"].numpy(), "dead_mask": masks["dead_mask"].numpy(),
                   "live_ids": masks["live_indices"].numpy(), "dead_ids": masks["dead_indices"].numpy()}
    write_stream_file(partial_dir, (model_settings["vocab_size"], model_settings["hidden_dim"]),
                      session.settings["training"]["steps"], record["dtype"], mask_arrays, attrs, session.tensors)
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, CHECKPOINT_SHA256):
        (partial_dir / name).unlink(missing_ok=True)
    os.replace(partial_dir, output_dir)
    log.info("recorded stream -> %s", output_dir)


def initial_state(tensors: dict[str, str], wte: torch.Tensor) -> dict[str, torch.Tensor]:
    """What step 0 records beside W: no gradient and empty optimizer state (zeros), and under
    fp32_master the float32 master W starts from (W widened, exactly)."""
    state = {name: torch.zeros(wte.shape, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
             for name, dtype in tensors.items() if name != "W"}
    if "master_W" in state:
        state["master_W"] = wte.detach().to("cpu", torch.float32, copy=True)
    return state


def snapshot(step: int, model, optimizer, batches: BatchStream, key: dict) -> dict:
    """A copy of everything needed to resume after ``step`` (the originals keep training)."""
    return {
        "step": step,
        "resume_key": key,
        "model": {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "data": batches.state(),
    }
