"""Training stage: the seed notebook's tiny GPT-2 in pure bfloat16, recorded at every step.

Semantics follow the Thimble 6 notebook exactly: the same model, init,
optimizer, data order and order of operations (forward, backward, read the
gradient, optimizer step, zero_grad, read W and the moments), so the seed's own
code on the same tokens gives the same trajectory bit for bit. (As in the seed,
``labels`` are the inputs shifted by one and GPT2LMHeadModel shifts them once
more, so the loss targets the token two ahead; kept for fidelity.)

Crash safety: steps go to closed segment files in ``partial_dir``, and after
every segment a checkpoint (model, optimizer, data-order state) is saved once
that segment is durable. A rerun resumes from the last checkpoint of the same
run (``thimble.training.checkpoint``) and the result is bitwise identical to an
uninterrupted run. Only when training is complete is ``partial_dir`` renamed to
the output directory. An exclusive lock (``<partial_dir>.lock``, held by the
live process, released by the kernel when it dies) refuses a second trainer on
the same ``partial_dir``.

The trajectory depends on the config alone: torch's intra-op threads are
``training.math_threads``, whatever cores the scheduler gave the job (those
run the recorder's compression), and on CUDA and MPS torch's deterministic
algorithms are switched on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from thimble.config import settings_hash, without_untracked
from thimble.data.tokenizer import load_token_ids
from thimble.errors import ThimbleError, TrainingError
from thimble.record.format import RecordLayout
from thimble.record.optimizer_tables import STEP_TABLES, OptimizerTables
from thimble.record.writer import StreamRecorder, write_stream_file
from thimble.sizes import batch_problem, select_parameters, training_footprint
from thimble.training.adamw import UpdateRule
from thimble.training.checkpoint import (
    load_resume_state,
    remove_checkpoints,
    restore_state,
    resume_key,
    resume_state,
    save_checkpoint,
    state_copy,
)
from thimble.training.data_order import BatchStream, shuffled_batches
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
from thimble.training.model import (
    CUBLAS_WORKSPACE_CONFIG,
    build_model,
    build_optimizer,
    deterministic_math,
    loss_path,
    select_device,
)
from thimble.training.resume_lock import PartialLock
from thimble.update_rules import STATE_KEYS, recorded_keys
from thimble.util.cpu import this_cpu
from thimble.util.units import format_bytes

log = logging.getLogger(__name__)


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


def _train(settings: dict, tokens_path: str, masks_path: str, output_dir: Path, partial_dir: Path,
           threads: int, determinism_check_steps: int) -> None:
    """One training session, phase by phase: set up and seed, resume (or hold step 0), open the recorder, run
    the loop (its steps held until the determinism check has passed, then recorded), write the stream."""
    session = set_up(settings, tokens_path, masks_path, partial_dir)
    resume = load_resume_state(partial_dir, session.key)
    recorder, compression_threads = open_recorder(session, partial_dir, threads)
    start, earlier_checks, step_zero = start_or_resume(session, resume, recorder)
    steps = settings["training"]["steps"]
    session.model.train()
    copies = HostCopies(session.device)
    check = DeterminismCheck(str(session.device), start + 1, min(determinism_check_steps, steps - start),
                             determinism_check_steps)
    held = HeldSteps(recorder, partial_dir, check, earlier_checks, trains=steps > start)
    if step_zero is not None:
        held.hold(*step_zero)
    elapsed, first_step_seconds = train_steps(session, recorder, check, start, held, copies)
    log_session(session, recorder, check, start, elapsed)
    attrs = stream_attrs(session, compression_threads, held.checks(), check, start, elapsed, first_step_seconds)
    finish_stream(session, partial_dir, output_dir, attrs)


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
    #: the recorded parameters by name (``record.tensors``), in the model's order
    recorded: dict[str, torch.nn.Parameter]
    layout: RecordLayout
    lookup: str
    #: the per-step tables of the optimizer's hyperparameters and step counts
    tables: OptimizerTables


def set_up(settings: dict, tokens_path: str, masks_path: str, partial_dir: Path) -> Session:
    """The device and its deterministic math, the inputs checked (tokens, masks, free disk), then seeds,
    data, model and optimizer in the seed's order."""
    model_settings, training, record = settings["model"], settings["training"], settings["record"]
    torch.set_num_threads(training["math_threads"])
    # before anything can initialise CUDA (it reads this when it creates the cuBLAS handle)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    device = select_device(training["device"])
    determinism = deterministic_math(device)

    tokens, masks = read_inputs(settings, tokens_path, masks_path)
    key = resume_key(settings, tokens_path, masks_path)
    plan = training_footprint(settings, len(tokens))
    partial_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(plan, partial_dir.parent)

    # the seed's order: seeds, data (its own generator), model (global generator), optimizer
    torch.manual_seed(training["seed"])
    np.random.seed(training["seed"])
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(training["seed"])
    batches = shuffled_batches(tokens, model_settings["max_seq_len"], training["batch_size"], training["seed"])
    model = build_model(model_settings, device)
    lookup = lookup_backward(device)
    use_lookup_backward(model, lookup)
    # explicit, so that the recording names the kernels that produced it (the replay rebuilds them)
    optimizer = build_optimizer(model, training, device)
    recorded = recorded_parameters(model, record["tensors"])
    layout = RecordLayout.of_parameters({name: tuple(param.shape) for name, param in recorded.items()},
                                        recorded_keys(training["update_rule"], record["dtype"]))
    tables = OptimizerTables(optimizer.optimizer, {name: optimizer.stepped_tensor(param)
                                                   for name, param in recorded.items()})
    return Session(settings, device, determinism, masks, key, model, optimizer, batches, recorded, layout, lookup,
                   tables)


def recorded_parameters(model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters ``record.tensors`` selects, by name, in the model's order (a tied parameter once, under its
    first name, as ``named_parameters`` gives it)."""
    params = dict(model.named_parameters())
    try:
        names = select_parameters(patterns, params)
    except ThimbleError as error:
        raise TrainingError(str(error)) from None
    return {name: params[name] for name in names}


def read_inputs(settings: dict, tokens_path: str, masks_path: str) -> tuple[torch.Tensor, dict]:
    """The tokens (int64) and the live and dead masks, checked against the model's vocabulary and batches."""
    vocab = settings["model"]["vocab_size"]
    token_ids = load_token_ids(tokens_path, vocab)
    problem = batch_problem(len(token_ids), settings)
    if problem:
        raise TrainingError(f"{tokens_path}: {problem}")
    tokens = torch.from_numpy(token_ids.astype(np.int64))
    masks = load_file(masks_path)
    if masks["live_mask"].numel() != vocab:
        raise TrainingError(f"{masks_path} has {masks['live_mask'].numel()} tokens, the model {vocab}")
    return tokens, masks


def check_disk(plan: dict, directory: Path) -> None:
    """Refuse a run whose stream, uncompressed, may not fit in ``directory``'s free space."""
    free = shutil.disk_usage(directory).free
    need = plan["stream_bytes_uncompressed"]
    log.info("safety check: the stream needs at most %s on disk (uncompressed bound; compression typically "
             "halves it), %s free in %s", format_bytes(need), format_bytes(free), directory)
    if need > free:
        raise TrainingError(f"not enough free disk in {directory}: the run may need {format_bytes(need)} "
                            f"(uncompressed bound) and {format_bytes(free)} are free; free space or "
                            "reduce training.steps")


def open_recorder(session: Session, partial_dir: Path, threads: int) -> tuple[StreamRecorder, int]:
    """The stream's recorder in ``partial_dir``, and its compression threads."""
    settings, device = session.settings, session.device
    training, record = settings["training"], settings["record"]
    # on a GPU the loop keeps a core busy launching kernels: the recorder compresses on the others
    compression_threads = max(1, threads - 1) if device.type == "cuda" else max(1, threads)
    recorder = StreamRecorder(partial_dir, session.layout, training["steps"], storage=record["dtype"],
                              segment_steps=record["segment_steps"], queue_steps=record["queue_steps"],
                              level=record["compression_level"], threads=compression_threads,
                              step_tables=session.tables.specs())
    log.info("math on %d torch threads (training.math_threads), recorder compression on %d threads; lookups' "
             "backward on the %s; %s", training["math_threads"], compression_threads, session.lookup,
             session.determinism)
    return recorder, compression_threads


def segment_end_state(session: Session, recorder: StreamRecorder, step: int) -> dict | None:
    """A copy of the resume state after ``step`` when ``step`` ends a segment (its checkpoint's), else None."""
    if not recorder.is_segment_end(step):
        return None
    return resume_state(step, session.model, session.optimizer, session.batches, session.key)


def start_or_resume(session: Session, resume: dict | None, recorder: StreamRecorder
                    ) -> tuple[int, list[dict], tuple[StepBits, dict | None] | None]:
    """The last step already recorded, the earlier sessions' determinism checks and step 0 to hold (with its
    resume state when it ends a segment): a fresh run records step 0 (W as initialised, empty optimizer
    state); a resumed one takes the model, optimizer and data order of its checkpoint and holds nothing."""
    settings, optimizer = session.settings, session.optimizer
    if resume is None:
        step_zero = StepBits(0, initial_tensors(session.layout, session.recorded), float("nan"),
                             session.tables.rows(session.tables.hyperparameters(), np.zeros(len(session.recorded))))
        zero_state = segment_end_state(session, recorder, 0)
        training, layout = settings["training"], session.layout
        keys = next(iter(layout.params.values())).dtypes
        log.info("recording %s: steps 0..%d, %d parameters (%d values: %s), update rule %s (%s), each with %s, "
                 "on %s", settings["name"], training["steps"], len(layout.params),
                 sum(param.numel() for param in session.recorded.values()),
                 ", ".join(f"{name} {tuple(param.shape)}" for name, param in list(session.recorded.items())[:4])
                 + (", ..." if len(layout.params) > 4 else ""), training["update_rule"], optimizer.implementation,
                 ", ".join(f"{key} as {dtype}" for key, dtype in keys.items()), session.device)
        return 0, [], (step_zero, zero_state)
    restore_state(resume, session.model, optimizer, session.batches)
    log.info("resuming %s after step %d of %d", settings["name"], resume["step"], settings["training"]["steps"])
    return resume["step"], resume.get("determinism_checks", []), None


class HeldSteps:
    """A session's steps held back until the determinism check has passed, then handed to the recorder in
    order; a step that ends a segment carries the resume state after it, saved as the checkpoint once the
    segment is durable."""

    def __init__(self, recorder: StreamRecorder, partial_dir: Path, check: DeterminismCheck,
                 earlier_checks: list[dict], trains: bool):
        self.recorder, self.partial_dir, self.check = recorder, partial_dir, check
        self.earlier_checks, self.trains = earlier_checks, trains
        self._held: list[tuple[StepBits, dict | None]] = []

    def hold(self, bits: StepBits, state: dict | None) -> None:
        self._held.append((bits, state))

    def record(self) -> None:
        """Record every held step, in order (the check has passed, or the session trains no more)."""
        for bits, state in self._held:
            self.recorder.record(bits.step, bits.tensors, bits.loss, bits.tables)
            if state is not None:
                state["determinism_checks"] = self.checks()
                self.recorder.checkpoint(bits.step, lambda step, state=state: save_checkpoint(self.partial_dir, state))
        self._held.clear()

    def checks(self) -> list[dict]:
        """The determinism checks of the earlier sessions, and this one's when it trains a step."""
        return self.earlier_checks + [self.check.result()] if self.trains else self.earlier_checks


def train_steps(session: Session, recorder: StreamRecorder, check: DeterminismCheck, start: int, held: HeldSteps,
                copies: HostCopies) -> tuple[float, float]:
    """The determinism check's first pass, then steps ``start + 1``.. recorded, each once the check has
    passed; the recorder closed (aborted on any failure). Returns the loop's seconds and its first step's."""
    settings, model, optimizer, batches, device = (session.settings, session.model, session.optimizer,
                                                   session.batches, session.device)
    steps = settings["training"]["steps"]
    try:
        if check.steps:  # before the clock starts: the session's step rate stays the recorded run's own
            first_pass(check, session, copies)
        started = time.perf_counter()
        first_step_seconds = 0.0
        progress = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=settings["name"],
                        unit="step", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 10.0,
                        ascii=not sys.stderr.isatty())
        for step in progress:
            bits = train_step(step, model, optimizer, batches, device, copies, session.layout, session.recorded,
                              wait=check.covers(step), tables=session.tables)
            held.hold(bits, segment_end_state(session, recorder, step))
            if check.covers(step):
                check.compare_step(bits)
                if step == check.last_step:
                    check.compare_state(step, state_copy(model, optimizer))
            if step >= check.last_step:
                held.record()
            if isinstance(bits.loss, float):  # on a GPU, only a loss already on the host: reading must not wait
                progress.set_postfix(loss=f"{bits.loss:.4f}", refresh=False)
            if step == start + 1:
                first_step_seconds = time.perf_counter() - started  # warm-up: allocations, kernel choice
        held.record()  # a session that trained no step: step 0 alone, or nothing
        recorder.close()
    except BaseException:
        recorder.abort()
        raise
    return time.perf_counter() - started, first_step_seconds


def train_step(step: int, model, optimizer: UpdateRule, batches: BatchStream, device: torch.device,
               copies: HostCopies, layout: RecordLayout, recorded: dict[str, torch.nn.Parameter],
               wait: bool = True, tables: OptimizerTables | None = None) -> StepBits:
    """One optimizer step in the seed's order; what it records (host copies of every recorded parameter's
    gradient, value and optimizer state, by dataset path), its loss and its rows of ``tables``. With ``wait``
    False, on a GPU, the copies may still be running: the loss is then the ``HostStep`` the recorder waits for
    in its own thread (``thimble.training.host_copy``), so that this loop never waits for the device."""
    batch = batches.next()
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    # before the step, which may change the gradient
    host = copies.copy({layout.params[name].paths["grad"]: param.grad for name, param in recorded.items()})
    hyperparameters = tables.hyperparameters() if tables is not None else None
    optimizer.step(step)
    optimizer.zero_grad()
    after = {}
    for name, param in recorded.items():
        paths = layout.params[name].paths
        after[paths["value"]] = param
        after.update({paths[STATE_KEYS[role]]: tensor for role, tensor in optimizer.device_state(param).items()})
    host = copies.copy(after, into=host, loss=loss)
    # every rule steps every recorded parameter once a step, so its count is the step: read from the state, it
    # would wait for a device that keeps it (fused kernels), which this loop never does
    rows = tables.rows(hyperparameters, np.ones(len(recorded)), np.full(len(recorded), float(step))) \
        if tables is not None else {}
    return StepBits(step, host.tensors, host.loss if wait or host.ready else host, rows)


def first_pass(check: DeterminismCheck, session: Session, copies: HostCopies) -> None:
    """Run the check's steps once, keep what they record and the state after them, and put everything back
    (model, optimizer, data order, torch's generators) as it was, for the recorded run to do them again."""
    model, optimizer, batches, device = session.model, session.optimizer, session.batches, session.device
    started = time.perf_counter()
    before = {**state_copy(model, optimizer), "data": batches.state()}
    generators = generator_states(device)
    try:
        for step in range(check.first_step, check.last_step + 1):
            check.reference.append(train_step(step, model, optimizer, batches, device, copies, session.layout,
                                              session.recorded, tables=session.tables))
    except RuntimeError as error:
        # torch under use_deterministic_algorithms: an op without a deterministic kernel on this device raises
        if "determinis" not in str(error):
            raise
        raise DeterminismError(f"training is not deterministic on {device}: torch has no deterministic kernel "
                               f"for an operation of the first step ({str(error).splitlines()[0][:300]}); "
                               "nothing was recorded. Train on another device (training.device: cpu) or "
                               "another torch version") from error
    check.reference_state = state_copy(model, optimizer)
    restore_state(before, model, optimizer, batches)
    set_generator_states(generators)
    check.seconds = time.perf_counter() - started


def generator_states(device: torch.device) -> dict:
    """The states of torch's generators: the CPU's, and on CUDA or MPS the device's."""
    states = {"cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        states["mps_rng"] = torch.mps.get_rng_state()
    return states


def set_generator_states(states: dict) -> None:
    """Put torch's generators back to ``generator_states``."""
    torch.set_rng_state(states["cpu_rng"])
    if "cuda_rng" in states:
        torch.cuda.set_rng_state_all(states["cuda_rng"])
    if "mps_rng" in states:
        torch.mps.set_rng_state(states["mps_rng"])


def log_session(session: Session, recorder: StreamRecorder, check: DeterminismCheck, start: int,
                elapsed: float) -> None:
    """The session's step rate, its determinism check and what float16 storage altered."""
    training, record = session.settings["training"], session.settings["record"]
    steps = training["steps"]
    log.info("trained steps %d..%d in %.1f s (%.2f steps/s)", start + 1, steps, elapsed,
             (steps - start) / elapsed if elapsed > 0 else math.inf)
    if check.steps:
        log.info("determinism check on %s: steps %d..%d ran twice and agree bit for bit (%d elements; %.1f s)",
                 session.device, check.first_step, check.last_step, check.elements_compared, check.seconds)
    elif steps > start:
        log.info("determinism check off (training.determinism_check_steps: 0)")
    if record["dtype"] == "float16":
        elements = {path: math.prod(shape) for path, (_, shape) in session.layout.datasets().items()}
        seed_names = {path: name for name, path in session.layout.aliases().items()}
        for path, altered in recorder.float16_altered.items():
            total = elements[path] * steps
            name = f"{seed_names[path]} ({path})" if path in seed_names else path
            log.warning("record.dtype float16 altered %d of %d %s values (%.2f%%) in steps %d..%d",
                        altered, total, name, 100 * altered / total, start + 1, steps)


def stream_attrs(session: Session, compression_threads: int, checks: list[dict], check: DeterminismCheck,
                 start: int, elapsed: float, first_step_seconds: float) -> dict:
    """The stream's attributes: settings, environment, determinism, this session's step rate, the masks' counts."""
    settings, device, masks = session.settings, session.device, session.masks
    training = settings["training"]
    steps = training["steps"]
    attrs = {**hyperparameter_attrs(settings),
             **session.tables.attrs({name: str(param.dtype).removeprefix("torch.")
                                     for name, param in session.recorded.items()}),
             **environment_attrs(device, training["math_threads"], compression_threads), **session.determinism,
             # the rule's name for its implementation (torchao's, optimi's included), not torch's flags'
             "optimizer_impl": session.optimizer.implementation, "update_rule": training["update_rule"],
             "lookup_backward": session.lookup, "loss_path": loss_path(device),
             "host_allocator": json.dumps(host_allocator(), sort_keys=True)}
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
    record, masks = session.settings["record"], session.masks
    mask_arrays = {"live_mask": masks["live_mask"].numpy(), "dead_mask": masks["dead_mask"].numpy(),
                   "live_ids": masks["live_indices"].numpy(), "dead_ids": masks["dead_indices"].numpy()}
    write_stream_file(partial_dir, session.layout, session.settings["training"]["steps"], record["dtype"],
                      mask_arrays, attrs, STEP_TABLES)
    remove_checkpoints(partial_dir)
    os.replace(partial_dir, output_dir)
    log.info("recorded stream -> %s", output_dir)


def initial_tensors(layout: RecordLayout, recorded: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """What step 0 records of each parameter: its value as initialised, no gradient and empty optimizer state
    (zeros), and under fp32_master the float32 master it starts from (the value widened, exactly)."""
    tensors = {}
    for name, param in recorded.items():
        entry = layout.params[name]
        for key, dtype in entry.dtypes.items():
            if key == "value":
                tensors[entry.paths[key]] = param.detach().to("cpu", copy=True)
            elif key == "master":
                tensors[entry.paths[key]] = param.detach().to("cpu", torch.float32, copy=True)
            else:
                tensors[entry.paths[key]] = torch.zeros(param.shape, dtype=torch.float32 if dtype == "float32"
                                                        else torch.bfloat16)
    return tensors


def git_commit() -> str:
    """The checkout's commit, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_attrs(device: torch.device, math_threads: int, compression_threads: int) -> dict:
    """What the recording was made with: the libraries' versions, the device, the threads, the git commit."""
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
