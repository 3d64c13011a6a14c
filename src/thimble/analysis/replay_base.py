"""What every replay shares: a recorded tensor's rows read a block of steps at a time, the per-tensor replay
and its account, replay.json's totals and where the replay ran, and the writing of replay.csv,
update_ratio.csv and replay.json.

The replay of thimble's own update rules (``thimble.analysis.replay``) and the replay of a recording made by
``thimble.Recorder`` in any torch loop (``thimble.analysis.torch_replay``) are both built on it.
"""

from __future__ import annotations

import abc
import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from thimble.analysis.replay_kernel import RATIO_HIGH, RATIO_LOW
from thimble.analysis.tensors import row_shape
from thimble.errors import DataError
from thimble.numerics.bf16 import bits_to_torch
from thimble.numerics.lattice import MAGNITUDE_BITS
from thimble.util.workers import WorkerPool

if TYPE_CHECKING:
    from thimble.record.format import RecordedParam
    from thimble.record.reader import RowsInOrder

log = logging.getLogger(__name__)

#: bin edges of log2(|u| / half spacing); the first bin also takes u = 0, the last everything above
RATIO_EDGES = np.arange(RATIO_LOW + 1, RATIO_HIGH + 1)
RATIO_COLUMNS = [f"log2ratio_{edge}" for edge in (RATIO_EDGES[0] - 1, *RATIO_EDGES)]
#: disagreements listed one by one in replay.json (all are counted)
LISTED_DISAGREEMENTS = 50
#: the recorded tensor that holds the gradient each step applied (the others hold the state it leaves)
GRADIENT = "grad_W"


def same_lattice_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns equal, or both zero (±0 are one lattice point)."""
    return (a == b) | (((a | b) & MAGNITUDE_BITS) == 0)


def replay_device(setting: str, recorded: str) -> torch.device:
    """``auto``: the recording's device type where this machine has it, else the CPU."""
    if setting != "auto":
        return torch.device(setting)
    kind = torch.device(recorded).type
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return torch.device(kind if available.get(kind) else "cpu")


def replay_environments(attrs: dict, target: torch.device, implementation: str) -> dict:
    """Where the run was recorded and where it is replayed, and whether the kernels can be the same."""
    replayed = {"device": str(target), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch_version": str(torch.__version__), "optimizer_impl": implementation}
    recorded = {key: str(attrs.get(key)) for key in ("device", "cpu_capability", "torch_version")}
    recorded["optimizer_impl"] = implementation
    same_device = torch.device(str(attrs.get("device", "cpu"))).type == target.type
    return {"replayed_on": replayed, "recorded_on": recorded, "same_device": same_device,
            "same_kernel": same_device and replayed["torch_version"] == recorded["torch_version"] and (
                target.type != "cpu" or replayed["cpu_capability"] == recorded["cpu_capability"])}


def explain(replay_differs: bool, storage: str, implementation: str) -> str:
    if replay_differs:
        return "the replay differs from the recording at this element (another device or kernel), so the " \
               "criterion's inputs are not what trained the run"
    if storage == "float16":
        return "float16 storage altered a recorded value"
    if implementation == "fused":
        return "the fused kernel keeps m, v and the update in float32 registers; the criterion follows the " \
               "single-tensor arithmetic (bf16 m, v and denom)"
    return "the criterion's float32 arithmetic differs from the kernel's here (e.g. a fused multiply-add)"


def mismatch_account(rows: list[dict], mismatch_columns) -> tuple[dict, list[int]]:
    """The mismatch totals of ``rows`` (a tensor's or several tensors' steps), the count of steps with any
    mismatch, whether every element matched; and those steps, in order."""
    totals = {column: int(sum(row[column] for row in rows)) for column in mismatch_columns}
    steps = sorted({row["step"] for row in rows if any(row[column] for column in mismatch_columns)})
    return {"total_mismatches": totals, "steps_with_mismatches": len(steps),
            "bitwise_match": not any(totals.values())}, steps


def replay_summary(head: dict, where: dict, replays: list, not_replayed: dict[str, str], freeze_criterion: dict,
                   tail: dict | None = None) -> dict:
    """replay.json: ``head`` (steps, rule, storage), where it ran, the mismatch totals over every replayed tensor
    (``bitwise_match`` only if each matches), the freeze criterion's account, ``tail``, each tensor's summary
    (``tensors``), the tensors that could not be replayed and why (``not_replayed``), and a note on a
    cross-device replay. For a recording of the embedding alone, the totals are the embedding's."""
    rows = [row for replay in replays for row in replay.rows]
    account, _ = mismatch_account(rows, replays[0].mismatch_columns)
    summary = {**head, **where, **account, "freeze_criterion": freeze_criterion, **(tail or {}),
               "tensors": {replay.name: replay.tensor_summary() for replay in replays}, "not_replayed": not_replayed}
    if not where["same_device"]:
        summary["note"] = (f"recorded on {where['recorded_on']['device']}, replayed on "
                           f"{where['replayed_on']['device']}: a cross-device replay; mismatches are expected "
                           "where the kernels round differently")
    return summary


@dataclass
class ReplayResult:
    """What a replay writes: replay.csv's columns and rows (a row per tensor and step), update_ratio.csv's rows
    (tensor, step, the bins' counts), replay.json; and how its result is logged."""

    columns: list[str] | tuple[str, ...]
    rows: list[dict]
    ratio_rows: list[list]
    summary: dict
    log_result: Callable[[dict], None]


def write_replay_outputs(output_csv: str, columns, rows: list[dict], ratio_csv: str, ratio_rows: list[list],
                         output_json: str, summary: dict, read_file: Path, attrs: dict) -> None:
    """replay.csv (a row per tensor and step from 1), update_ratio.csv (``ratio_rows``: tensor, step and the
    bins' counts) and replay.json, each written whole or not at all; replay.json's ``provenance`` names the file
    read (its ``attrs``) and the tables' sha256 (thimble.provenance)."""
    from thimble.provenance import PROVENANCE_KEY, stage_provenance
    from thimble.util.files import atomic_output, write_json

    with atomic_output(output_csv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_output(ratio_csv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tensor", "step", *RATIO_COLUMNS])
        writer.writerows(ratio_rows)
    # the replay reads no settings: its hyperparameters are the recording's
    summary[PROVENANCE_KEY] = stage_provenance(read_file, attrs, None, [output_csv, ratio_csv])
    write_json(output_json, summary, indent=2)


def recorded_block(rows: dict[str, RowsInOrder], buffers: dict[str, np.ndarray], first: int,
                   stop: int) -> dict[str, np.ndarray]:
    """The recorded bits that steps first..stop-1 replay from: each state tensor's rows first-1..stop-1 (the
    state before each step, then after it), grad_W's rows first..stop-1 (the gradient each step applied), read
    into ``buffers`` (reused by every block: fresh ones would cost more in page faults than the copies)."""
    block = {}
    for name, tensor_rows in rows.items():
        start = first if name == GRADIENT else first - 1
        block[name] = tensor_rows.read(start, stop, buffers[name][:stop - start])
    return block


def tensor_of_bits(bits: np.ndarray) -> torch.Tensor:
    """Stored bits as the torch tensor they hold, without copying: bf16 (uint16) or float32 (uint32)."""
    if bits.dtype.itemsize == 2:
        return bits_to_torch(bits)
    return torch.from_numpy(bits.view(np.float32))


#: what the bf16 rule's freeze criterion predicts
CRITERION_RULE = ("an element stays put when the float32 weight that addcdiv_ forms before rounding rounds "
                  "(to nearest, ties to even) back onto W[t-1]: update below half the spacing towards the "
                  "move, or exactly half with an even last mantissa bit")


class TensorReplay(abc.ABC):
    """What the replays of every rule share: one recorded parameter, its rows of replay.csv, its summary."""

    #: replay.csv's columns that count mismatching elements
    mismatch_columns: tuple[str, ...] | list[str] = ()

    def __init__(self, param: RecordedParam):
        self.name, self.shape = param.name, tuple(param.shape)
        self.elements = math.prod(self.shape)
        self.rows: list[dict] = []

    @abc.abstractmethod
    def block(self, first: int, recorded: dict[str, np.ndarray]) -> None:
        """Replay steps first.. of ``recorded_block`` and add their rows."""

    @abc.abstractmethod
    def criterion(self) -> dict:
        """The freeze criterion's account of the tensor (replay.json's ``tensors``)."""

    @abc.abstractmethod
    def ratio_rows(self) -> list[list]:
        """update_ratio.csv's rows of the tensor."""

    def finish(self) -> None:
        """Let go of the buffers the tensor's blocks were replayed in (the next tensor has its own)."""

    def tensor_summary(self) -> dict:
        """The tensor's entry of replay.json's ``tensors``: its shape as rows x columns
        (``thimble.analysis.tensors.row_shape``), its mismatches, the first step with any, the freeze criterion."""
        account, steps = mismatch_account(self.rows, self.mismatch_columns)
        rows, columns = row_shape(self.shape)
        return {"shape": list(self.shape), "rows": rows, "columns": columns, "elements": self.elements,
                "steps": len(self.rows), **account, "first_mismatch_step": steps[0] if steps else None,
                "freeze_criterion": self.criterion()}


def log_mismatches(summary: dict) -> None:
    """Name each tensor that differs from the recording and the first step where it does."""
    for name, tensor in summary["tensors"].items():
        if not tensor["bitwise_match"]:
            log.warning("replay of %s differs from the recording from step %d on: %s over %d steps with mismatches",
                        name, tensor["first_mismatch_step"], tensor["total_mismatches"],
                        tensor["steps_with_mismatches"])
    for name, why in summary["not_replayed"].items():
        log.warning("%s is not replayed: %s", name, why)


def bits_view(tensor: torch.Tensor) -> torch.dtype:
    """The integer dtype of ``tensor``'s width: compare bits, not values (NaNs, ±0)."""
    return {2: torch.int16, 4: torch.int32}[tensor.element_size()]


def replay_tensor(handle, param: RecordedParam, replay: TensorReplay, steps: int, block_steps: int,
                  pool: WorkerPool, bar: tqdm) -> None:
    """Replay every step of one recorded parameter: each of its datasets read in order, a block of steps at a
    time, into buffers of the block's size that go with it."""
    from thimble.record.reader import RecordedTensor

    rows = {}
    for role, path in param.roles().items():
        tensor = RecordedTensor.of_recording(handle, path)
        if tensor.shape != (steps + 1, *param.shape):
            raise DataError(f"{tensor.where} has shape {tensor.shape}, not {(steps + 1, *param.shape)} as the "
                            f"recording's recorded_params and steps say; record and rechunk it again")
        rows[role] = tensor.in_order(block_steps, pool)
    buffers = {role: np.empty((block_steps + 1, *param.shape), dtype=tensor_rows.tensor.bits_dtype)
               for role, tensor_rows in rows.items()}
    for first in range(1, steps + 1, block_steps):
        stop = min(first + block_steps, steps + 1)
        replay.block(first, recorded_block(rows, buffers, first, stop))
        bar.update(stop - first)
    for tensor_rows in rows.values():  # the last chunks' checksums are checked at their frames' ends
        tensor_rows.finish()
    replay.finish()
