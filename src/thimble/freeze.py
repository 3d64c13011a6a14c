"""Freeze/thaw analysis of ΔW′: tables, windows, and the series verdict.

A token is frozen at step t when ΔW′[t] is 0 in all D coordinates; a group
(dead, live, all) is globally frozen at t when every token in it is. A token's
phase at t follows its largest |ΔW′|: frozen (0), solid (1..solid_max), cold
(solid_max+1..cold_max), hot (above).

The core works on per-step, per-token summaries (``TokenSteps``), which one
streaming pass over ΔW′ produces; everything else is pure functions of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GROUPS = ("dead", "live", "all")
PHASES = ("frozen", "solid", "cold", "hot")


@dataclasses.dataclass
class TokenSteps:
    """Per-step summaries of ΔW′, rows t = 0..T (row 0 is the start: nothing moved)."""

    max_abs: np.ndarray        # (T+1, V) int32: largest |ΔW′| of each token
    norm: np.ndarray           # (T+1, V) float32: L2 norm of each token's ΔW′ (lattice steps)
    oscillatory: np.ndarray    # (T+1, V) int32: coordinates with ΔW′[t] = -ΔW′[t-1] != 0 (an exact undo)
    quantum: np.ndarray        # (T+1, V) int32: other coordinates with |ΔW′| = 1 (one lattice step)
    moved: np.ndarray          # (T+1, V) int32: coordinates with ΔW′ != 0


def summarise_block(delta: np.ndarray, previous: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-row, per-token summaries of a block of ΔW′ rows (rows, V, D); ``previous`` is the row before."""
    magnitude = np.abs(delta.astype(np.int32))
    before = np.concatenate([previous[None], delta[:-1]]) if previous is not None else \
        np.concatenate([np.zeros_like(delta[:1]), delta[:-1]])
    nonzero = delta != 0
    undo = nonzero & (delta == -before)
    return {
        "max_abs": magnitude.max(axis=2),
        "norm": np.sqrt((magnitude.astype(np.float32) ** 2).sum(axis=2)),
        "oscillatory": np.count_nonzero(undo, axis=2).astype(np.int32),
        "quantum": np.count_nonzero((magnitude == 1) & ~undo, axis=2).astype(np.int32),
        "moved": np.count_nonzero(nonzero, axis=2).astype(np.int32),
    }


def token_steps_from_array(delta: np.ndarray) -> TokenSteps:
    """TokenSteps of a whole in-memory ΔW′ (T+1, V, D) array."""
    parts = summarise_block(delta, None)
    return TokenSteps(**parts)


def group_masks(dead_mask: np.ndarray) -> dict[str, np.ndarray]:
    dead = np.asarray(dead_mask, dtype=bool)
    return {"dead": dead, "live": ~dead, "all": np.ones_like(dead)}


def phase_of(max_abs: np.ndarray, solid_max: int, cold_max: int) -> np.ndarray:
    """Phase index (0 frozen, 1 solid, 2 cold, 3 hot) of each largest |ΔW′|."""
    return np.digitize(max_abs, [1, solid_max + 1, cold_max + 1])


def runs(flags: np.ndarray, steps: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in ``flags`` as (value, first step, last step)."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges - 1, [flags.size - 1]])
    return [(bool(flags[s]), int(steps[s]), int(steps[e])) for s, e in zip(starts, ends)]


def longest_true_run(flags: np.ndarray, steps: np.ndarray) -> tuple[int, int | None]:
    """(length, last step) of the longest run of True; the latest one on ties; (0, None) if none."""
    best = (0, None)
    for value, first, last in runs(flags, steps):
        if value and last - first + 1 >= best[0]:
            best = (last - first + 1, last)
    return best


def freeze_table(steps: TokenSteps, groups: dict[str, np.ndarray], losses: np.ndarray, solid_max: int,
                 cold_max: int) -> dict[str, np.ndarray]:
    """Columns of freeze.csv, rows t = 1..T."""
    t = np.arange(1, steps.max_abs.shape[0])
    max_abs = steps.max_abs[1:]
    phase = phase_of(max_abs, solid_max, cold_max)
    columns: dict[str, np.ndarray] = {"step": t, "loss": losses[1:]}
    for group in GROUPS:
        mask = groups[group]
        size = int(mask.sum())
        moved = (max_abs[:, mask] > 0).sum(axis=1)
        columns[f"{group}_moved_tokens"] = moved
        columns[f"{group}_frozen_fraction"] = 1 - moved / size if size else np.full(t.size, np.nan)
        columns[f"{group}_globally_frozen"] = moved == 0
        for index, name in enumerate(PHASES):
            columns[f"{group}_{name}"] = (phase[:, mask] == index).sum(axis=1)
    return columns


def cycles_table(columns: dict[str, np.ndarray]) -> list[dict]:
    """freeze_cycles.csv: maximal runs of globally frozen steps ('freeze') and the thaws between them."""
    rows = []
    for group in GROUPS:
        for frozen, first, last in runs(columns[f"{group}_globally_frozen"], columns["step"]):
            rows.append({"group": group, "kind": "freeze" if frozen else "thaw", "start": first, "end": last,
                         "length": last - first + 1})
    return rows


def default_windows(last_step: int, extra: list[list[int]]) -> dict[str, tuple[int, int]]:
    """Named inclusive windows: the whole run, its last half, its last third, and the config's."""
    windows = {
        "all": (1, last_step),
        "last_half": (last_step - last_step // 2 + 1, last_step),
        "last_third": (last_step - last_step // 3 + 1, last_step),
    }
    for start, end in extra:
        windows[f"t{start}-{end}"] = (start, end)
    return {name: (a, b) for name, (a, b) in windows.items() if a <= b}


def window_stats(columns: dict[str, np.ndarray], steps: TokenSteps, groups: dict[str, np.ndarray],
                 window: tuple[int, int]) -> dict[str, dict]:
    """The seed's statistics for one window, per group."""
    start, end = window
    t = columns["step"]
    inside = (t >= start) & (t <= end)
    out = {}
    for group in GROUPS:
        mask = groups[group]
        frozen_tokens = steps.max_abs[start:end + 1][:, mask] == 0
        globally = columns[f"{group}_globally_frozen"][inside]
        window_runs = [r for r in runs(globally, t[inside]) if r[0]]
        length, ended = longest_true_run(globally, t[inside])
        out[group] = {
            "tokens": int(mask.sum()),
            "token_frozen_percent": float(100 * frozen_tokens.mean()) if frozen_tokens.size else None,
            "global_freeze_percent": float(100 * globally.mean()) if globally.size else None,
            "global_freeze_steps": int(globally.sum()),
            "steps": int(globally.size),
            "freeze_thaw_cycles": len(window_runs),
            "longest_frozen_run": length,
            "longest_frozen_run_ended_at": ended,
        }
    return out


def token_table(steps: TokenSteps, groups: dict[str, np.ndarray], windows: dict[str, tuple[int, int]]) -> dict:
    """token_freeze.csv columns: one row per token."""
    vocab = steps.max_abs.shape[1]
    frozen = steps.max_abs == 0
    t = np.arange(steps.max_abs.shape[0])
    moved_any = ~frozen[1:]
    last_moved = np.where(moved_any.any(axis=0), moved_any.shape[0] - np.argmax(moved_any[::-1], axis=0), 0)
    longest = np.empty(vocab, dtype=np.int64)
    for token in range(vocab):
        longest[token] = longest_true_run(frozen[1:, token], t[1:])[0]
    columns = {"token": np.arange(vocab), "group": np.where(groups["dead"], "dead", "live")}
    for name, (start, end) in windows.items():
        columns[f"frozen_fraction_{name}"] = frozen[start:end + 1].mean(axis=0)
    columns["last_moved_step"] = last_moved
    columns["longest_frozen_run"] = longest
    return columns


def displacement_table(steps: TokenSteps, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """displacement_classes.csv: per step and group, coordinate moves that exactly undo the previous
    move ('oscillatory'), the other single lattice steps ('quantum'), and the rest ('other')."""
    columns: dict[str, np.ndarray] = {"step": np.arange(1, steps.max_abs.shape[0])}
    for group in GROUPS:
        mask = groups[group]
        moved = steps.moved[1:, mask].sum(axis=1)
        oscillatory = steps.oscillatory[1:, mask].sum(axis=1)
        quantum = steps.quantum[1:, mask].sum(axis=1)
        columns[f"{group}_moves"] = moved
        columns[f"{group}_oscillatory"] = oscillatory
        columns[f"{group}_quantum"] = quantum
        columns[f"{group}_other"] = moved - oscillatory - quantum
    return columns


def trend(fractions: np.ndarray, centers: np.ndarray) -> dict:
    """Least-squares slope of fractions vs step with a 95% confidence interval (t distribution)."""
    from scipy import stats

    n = fractions.size
    if n < 3:
        return {"windows": int(n), "slope_per_1000_steps": None, "ci95": None}
    fit = stats.linregress(centers, fractions)
    t_crit = stats.t.ppf(0.975, n - 2)
    # a perfect fit (all windows equal, say) has no spread: its interval is the slope itself
    half = t_crit * fit.stderr if np.isfinite(fit.stderr) else 0.0
    return {"windows": int(n), "slope_per_1000_steps": 1000 * fit.slope,
            "ci95": [1000 * (fit.slope - half), 1000 * (fit.slope + half)], "intercept": fit.intercept}


def verdict(trend_fit: dict, last_half_fraction: float | None, tolerance_per_1000: float = 0.01) -> str:
    """'still cooling' when the global-freeze trend is surely rising, 'stabilised' when it is surely
    flat (CI within ±tolerance per 1000 steps) or fully frozen, else 'inconclusive'."""
    if last_half_fraction is not None and last_half_fraction >= 1.0:
        return "stabilised"
    if trend_fit["ci95"] is None:
        return "inconclusive"
    low, high = trend_fit["ci95"]
    if low > 0:
        return "still cooling"
    if -tolerance_per_1000 <= low and high <= tolerance_per_1000:
        return "stabilised"
    return "inconclusive"


def windowed_global_freeze(globally: np.ndarray, steps: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of globally frozen steps in consecutive windows of ``width`` steps; (centers, fractions)."""
    n = globally.size // width
    if n == 0:
        return np.array([]), np.array([])
    fractions = globally[: n * width].reshape(n, width).mean(axis=1)
    centers = steps[: n * width].reshape(n, width).mean(axis=1)
    return centers, fractions


# -- file I/O edge -------------------------------------------------------------------------------

def zstd_rows(reader, row_elements: int, dtype: np.dtype, valid_rows: int, block_rows: int):
    """Row blocks of a stored zstd-only chunk (``reader``: ``record.open_chunk``; no shuffle: rows
    come out in order)."""
    with reader:
        yield from _zstd_rows(reader, row_elements, dtype, valid_rows, block_rows)


def _zstd_rows(reader, row_elements: int, dtype: np.dtype, valid_rows: int, block_rows: int):
    buffer = np.empty(block_rows * row_elements, dtype=dtype)
    for start in range(0, valid_rows, block_rows):
        rows = min(block_rows, valid_rows - start)
        view = memoryview(buffer[: rows * row_elements]).cast("B")
        got = 0
        while got < len(view):
            read = reader.readinto(view[got:])
            if read == 0:
                raise ValueError("a stored ΔW′ chunk ended early")
            got += read
        yield start, buffer[: rows * row_elements].reshape(rows, row_elements)


def read_token_steps(delta_path: str, block_rows: int = 16, threads: int = 1) -> TokenSteps:
    """One streaming pass over ΔW′ (T+1, V, D): TokenSteps, in memory O(T x V).

    Tokens are split across ``threads`` (numpy releases the GIL in its loops)."""
    from concurrent.futures import ThreadPoolExecutor

    import h5py
    import hdf5plugin  # noqa: F401
    from tqdm.auto import tqdm

    from thimble.rechunk import time_chunks
    from thimble.record import open_chunk, open_h5

    with open_h5(delta_path) as handle:
        dataset = handle["delta_w_lattice"]
        n_steps, vocab, hidden = dataset.shape
        rows = dataset.chunks[0]
        fields = {name: np.zeros((n_steps, vocab), dtype=np.float32 if name == "norm" else np.int32)
                  for name in ("max_abs", "norm", "oscillatory", "quantum", "moved")}
        previous = None
        parts = np.array_split(np.arange(vocab), threads)
        bounds = [(int(part[0]), int(part[-1]) + 1) for part in parts if part.size]
        with ThreadPoolExecutor(threads) as pool:
            for start, stop in tqdm(time_chunks(n_steps, rows), desc="freeze", unit="chunk", mininterval=5):
                chunk = open_chunk(dataset, (start, 0, 0))
                for offset, block in zstd_rows(chunk, vocab * hidden, dataset.dtype, stop - start, block_rows):
                    block = block.reshape(-1, vocab, hidden)
                    step = start + offset
                    futures = {(a, b): pool.submit(summarise_block, block[:, a:b],
                                                   None if previous is None else previous[a:b])
                               for a, b in bounds}
                    for (a, b), future in futures.items():
                        for name, values in future.result().items():
                            fields[name][step:step + len(block), a:b] = values
                    previous = block[-1].copy()
    return TokenSteps(**fields)


def variance_by_group(recording: str, groups: dict[str, np.ndarray], block_rows: int = 16) -> dict[str, np.ndarray]:
    """exp_avg_sq per step: mean, median, 10th and 90th percentile over each group's token means."""
    import h5py
    import hdf5plugin  # noqa: F401

    from thimble.bf16 import BFLOAT16
    from thimble.rechunk import time_chunks
    from thimble.record import has_shuffle_zstd, open_chunk, open_h5, stored_rows

    with open_h5(recording) as handle:
        dataset = handle["variance_W"]
        if dataset.id.get_type().get_size() != 2 or not has_shuffle_zstd(dataset):
            raise ValueError(f"{recording}: variance_W is not a shuffle+zstd 2-byte dataset")
        n_steps, vocab, hidden = dataset.shape
        token_mean = np.zeros((n_steps, vocab), dtype=np.float64)
        for start, stop in time_chunks(n_steps, dataset.chunks[0]):
            chunk = open_chunk(dataset, (start, 0, 0))
            for offset, block in stored_rows(chunk, dataset.chunks[0], vocab * hidden, stop - start, block_rows):
                if handle.attrs.get("storage_dtype") == "float16":
                    values = block.view(np.float16).astype(np.float64)
                else:
                    values = block.view(BFLOAT16).astype(np.float64)
                token_mean[start + offset: start + offset + len(block)] = values.reshape(-1, vocab, hidden).mean(axis=2)
    columns = {"step": np.arange(n_steps)}
    for group in ("dead", "live"):
        values = token_mean[:, groups[group]]
        if values.shape[1] == 0:
            continue
        columns[f"{group}_mean"] = values.mean(axis=1)
        columns[f"{group}_median"] = np.median(values, axis=1)
        columns[f"{group}_p10"] = np.percentile(values, 10, axis=1)
        columns[f"{group}_p90"] = np.percentile(values, 90, axis=1)
    return columns


def write_csv(path: str, columns: dict[str, np.ndarray] | list[dict]) -> None:
    import pandas as pd

    from thimble.files import atomic_output

    frame = pd.DataFrame(columns)
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


def analyse(delta_path: str, recording: str, settings: dict, outputs: dict[str, str], threads: int = 1) -> dict:
    """Write every freeze table and the summary of one experiment; return the summary."""
    import h5py

    from thimble.files import atomic_output
    from thimble.record import open_h5, read_checked

    analysis = settings["analysis"]
    with open_h5(recording) as handle:
        losses = read_checked(handle["losses"])
        dead_mask = read_checked(handle["dead_mask"])
    with open_h5(delta_path) as handle:
        exact = bool(handle["delta_w_lattice"].attrs.get("exact", True))
    groups = group_masks(dead_mask)
    steps = read_token_steps(delta_path, threads=threads)
    last_step = steps.max_abs.shape[0] - 1
    columns = freeze_table(steps, groups, losses, analysis["solid_max"], analysis["cold_max"])
    windows = default_windows(last_step, analysis["windows"])
    write_csv(outputs["freeze"], columns)
    write_csv(outputs["cycles"], cycles_table(columns))
    write_csv(outputs["tokens"], token_table(steps, groups, windows))
    write_csv(outputs["classes"], displacement_table(steps, groups))
    write_csv(outputs["variance"], variance_by_group(recording, groups))
    with atomic_output(outputs["token_steps"]) as tmp:
        with h5py.File(tmp, "w") as out:
            # Fletcher32: HDF5 verifies every chunk as the figures read it
            out.create_dataset("max_abs", data=steps.max_abs, compression="gzip", compression_opts=1, fletcher32=True)
            out.create_dataset("norm", data=steps.norm, compression="gzip", compression_opts=1, fletcher32=True)
            out.create_dataset("dead_mask", data=dead_mask, fletcher32=True)

    series = {}
    width = analysis["trend_window_steps"]
    for group in GROUPS:
        globally = columns[f"{group}_globally_frozen"]
        centers, fractions = windowed_global_freeze(globally, columns["step"], width)
        half = centers > last_step / 2
        fit = trend(fractions[half], centers[half])
        last_half = windows["last_half"]
        inside = (columns["step"] >= last_half[0]) & (columns["step"] <= last_half[1])
        series[group] = {
            "window_steps": width,
            "window_centers": centers.tolist(),
            "global_freeze_fraction": fractions.tolist(),
            "trend_last_half": fit,
            "verdict": verdict(fit, float(globally[inside].mean()) if inside.any() else None),
        }
    summary = {
        "experiment": settings["name"],
        "steps": last_step,
        # false for a float16 recording: ΔW′ of its stored values, not of what training held
        "delta_w_exact": exact,
        "thresholds": {"solid_max": analysis["solid_max"], "cold_max": analysis["cold_max"]},
        "windows": {name: {"start": a, "end": b, **window_stats(columns, steps, groups, (a, b))}
                    for name, (a, b) in windows.items()},
        "cooling": series,
        "verdict": series["dead"]["verdict"] if groups["dead"].any() else series["all"]["verdict"],
    }
    with atomic_output(outputs["summary"]) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    whole = summary["windows"]["all"]
    for group in GROUPS:
        log.info("%s: globally frozen %.1f%% of steps (%d/%d), %d freeze/thaw cycles, longest run %d ending at %s",
                 group, whole[group]["global_freeze_percent"] or 0, whole[group]["global_freeze_steps"],
                 whole[group]["steps"], whole[group]["freeze_thaw_cycles"], whole[group]["longest_frozen_run"],
                 whole[group]["longest_frozen_run_ended_at"])
    log.info("verdict: %s", summary["verdict"])
    return summary
