"""Measuring a probe's outputs: how each file grows with the steps (read by ``costs.predict_size``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from thimble.outputs import DELTA_W_DATASET, DELTA_W_FILE, DRIVERS_OUTPUTS, STREAM_DIR

#: steps compressed together when measuring ΔW′'s trend: a chunk holds many steps, and much of what
#: zstd finds is repeated across steps, which one step alone would miss
TREND_BLOCK_STEPS = 4


def per_step_storage(path: Path, rows: int | None) -> int:
    """Stored bytes of the datasets with ``rows`` rows (every per-step dataset when None)."""
    import h5py

    stored = 0
    with h5py.File(path, "r") as handle:
        def visit(name, node):
            nonlocal stored
            if isinstance(node, h5py.Dataset) and node.shape and not node.is_virtual:
                if rows is None or node.shape[0] == rows:
                    stored += node.id.get_storage_size()
        handle.visititems(visit)
    return stored


def decay_exponent(steps: np.ndarray, step_bytes: np.ndarray) -> float:
    """Power-law exponent of per-step compressed bytes over the second half of the probe (at most 0).

    ΔW′ is the one array whose content shrinks as training cools (smaller
    moves, more zeros), so the early steps a probe sees overstate it.
    """
    later = steps >= steps.max() / 2
    if later.sum() < 2:
        return 0.0
    slope = np.polyfit(np.log(steps[later]), np.log(step_bytes[later]), 1)[0]
    return float(min(0.0, slope))


def delta_w_block_bytes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ΔW′ bytes per step, compressed in blocks of steps with the writer's zstd level: (mid steps, bytes)."""
    from thimble.record.codec import window_log_for, zstd_compressor, zstd_level
    from thimble.record.format import open_h5
    from thimble.record.reader import read_steps

    with open_h5(path) as handle:
        dataset = handle[DELTA_W_DATASET]
        level = zstd_level(dataset)
        values = read_steps(dataset)  # checksums verified
    # the lattice stage's window, which reaches the step before
    compressor = zstd_compressor(level, window_log=window_log_for(int(np.prod(values.shape[1:])) * values.itemsize, level))
    starts = np.arange(1, len(values) - TREND_BLOCK_STEPS + 1, TREND_BLOCK_STEPS)  # row 0 is all zero
    step_bytes = [len(compressor.compress(values[start:start + TREND_BLOCK_STEPS].tobytes())) / TREND_BLOCK_STEPS
                  for start in starts]
    return starts + (TREND_BLOCK_STEPS - 1) / 2, np.array(step_bytes, dtype=np.float64)


#: tables with more than one row per step: freeze_drivers.csv has one per group (dead, live, all)
ROWS_PER_STEP = {DRIVERS_OUTPUTS["table"]: 3}


def measure_file(path: Path, probe_steps: int) -> dict:
    """How a probe output grows with steps: per-step arrays and rows, and a fixed rest."""
    if path.is_dir():  # the stream: segment files of per-step arrays, and stream.h5
        files = sorted(p for p in path.iterdir() if p.suffix == ".h5")
        total = sum(p.stat().st_size for p in files)
        stored = sum(per_step_storage(p, None) for p in files if p.name.startswith("segment_"))
        per_row = stored / (probe_steps + 1)
        return {"kind": "stream", "per_row": per_row, "per_file": (total - stored) / len(files),
                "probe_bytes": total}
    size = path.stat().st_size
    if path.name == DELTA_W_FILE:
        stored = per_step_storage(path, probe_steps + 1)
        return {"kind": "decaying", "fixed": size - stored, "probe_stored": stored, "probe_steps": probe_steps,
                "exponent": decay_exponent(*delta_w_block_bytes(path)), "probe_bytes": size}
    if path.suffix == ".h5":
        stored = per_step_storage(path, probe_steps + 1)
        return {"kind": "per_step", "fixed": size - stored, "per_row": stored / (probe_steps + 1),
                "row_offset": 1, "probe_bytes": size}
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            lines = handle.read().splitlines()
        rows = len(lines) - 1
        per_step = ROWS_PER_STEP.get(path.name, 1)
        if rows in (probe_steps * per_step, (probe_steps + 1) * per_step):  # rows for each t = 1..T or 0..T
            header = len(lines[0].encode()) + 1
            return {"kind": "per_step", "fixed": header, "per_row": (size - header) / (rows // per_step),
                    "row_offset": rows // per_step - probe_steps, "probe_bytes": size}
        return {"kind": "constant", "bytes": size, "probe_bytes": size}
    if path.suffix in (".json", ".html"):  # the probe keeps the run's windows: the same shape
        return {"kind": "constant", "bytes": size, "probe_bytes": size}
    return {"kind": "not_predicted", "probe_bytes": size}


def experiment_outputs(directory: Path) -> dict[str, Path]:
    """Every output of an experiment's folder ``results/{experiment}``, by its path under it: the stream
    folder as one, the figures one by one (resume state and lock files excluded)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if relative.parts[0].startswith(".") or (path.is_file() and relative.parts[0] == STREAM_DIR):
            continue
        if path.is_file() or path.name == STREAM_DIR:
            found[relative.as_posix()] = path
    return found
