"""What the seed's float16 storage did, per tensor and per result: the exact bf16 run against its float16 view.

Two parts, each pure at the core:

- **The cast, per tensor and step.** Every bf16 bit pattern is classified once (``cast_classes``) by the
  recorder's cast (``thimble.analysis.float16_view.float16_table``): whether float16 storage changed its value
  (NaN stays NaN, ±0 and ±inf stay), zeroed it (a nonzero value stored as ±0: |x| ≤ 2^-25), or overflowed it
  (a finite value stored as ±inf: |x| > 65504), and its binary exponent floor(log2|x|). A block of recorded
  rows is then a histogram of bit patterns per row (``row_histograms``), and every count is that histogram
  against the classes (``step_effect``, ``exponent_bands``). Bits are compared as integers, never as
  rounded floats.
- **The analysis, side by side.** The exact run's and the float16 view's ``summary.json`` and tables
  (frozen shares, onsets, cycles, phases, the verdicts, the drivers) compared leaf by leaf
  (``json_differences``, ``table_differences``), and the lab's question answered from them
  (``lab_answer``): would its variance curve (exp_avg_sq.csv) and its claim about the onset have come out
  differently from the exact data?

File I/O stays in ``write_float16_effect`` (and the figure in ``draw_effect``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from thimble.outputs import DRIVERS_OUTPUTS, FREEZE_OUTPUTS
from thimble.update_rules import recorded_tensors

log = logging.getLogger(__name__)

#: the recorded tensors the effect is measured on (the bf16 rule's, as the view stores them)
TENSORS = tuple(recorded_tensors("bf16", "float16"))
#: bits of a class code (``cast_classes``): what float16 storage did to a bf16 value
CHANGED, ZEROED, OVERFLOWED = 1, 2, 4
#: exponent bands: floor(log2|x|) of finite nonzero bf16 values spans -133 (smallest subnormal) .. 127
MIN_EXPONENT, MAX_EXPONENT = -133, 127
#: rows histogrammed at a time
BLOCK_ROWS = 16
#: the tables compared between the runs, by their file names under results/{experiment}/
COMPARED_TABLES = (*(FREEZE_OUTPUTS[key] for key in ("freeze", "cycles", "classes", "lattice_positions", "variance")),
                   DRIVERS_OUTPUTS["table"])
#: the summary and the variance table, read for the lab's question
SUMMARY, VARIANCE_TABLE = FREEZE_OUTPUTS["summary"], FREEZE_OUTPUTS["variance"]
#: summary keys that name the run rather than describe it: not differences of the analysis
IGNORED_KEYS = ("experiment", "provenance")
#: the variance curve the lab looked at: exp_avg_sq.csv's per-group statistics over the tokens
VARIANCE_STATISTICS = ("mean", "median", "p10", "p90")


# -- the cast, per bit pattern ----------------------------------------------------------------------

def cast_classes() -> dict[str, np.ndarray]:
    """Per bf16 bit pattern (index 0..65535): ``float16_bits`` (what the recorder stores), ``code``
    (CHANGED | ZEROED | OVERFLOWED bits), ``exponent`` (floor(log2|x|) for finite nonzero x, else 0),
    ``finite_nonzero`` and ``magnitude`` (|x| as float64, exact)."""
    from thimble.analysis.float16_view import float16_table
    from thimble.numerics.bf16 import all_bfloat16

    stored_bits, altered = float16_table()
    with np.errstate(invalid="ignore"):  # NaN patterns stay NaN
        exact = all_bfloat16().astype(np.float64)  # bf16 -> float64 is exact
        stored = stored_bits.view(np.float16).astype(np.float64)  # float16 -> float64 is exact
    zeroed = (exact != 0) & (stored == 0)
    overflowed = np.isfinite(exact) & np.isinf(stored)
    code = (np.where(altered, CHANGED, 0) | np.where(zeroed, ZEROED, 0) | np.where(overflowed, OVERFLOWED, 0))
    finite_nonzero = np.isfinite(exact) & (exact != 0)
    _, exponent = np.frexp(np.where(finite_nonzero, exact, 1.0))
    return {"float16_bits": stored_bits, "code": code.astype(np.uint8),
            "exponent": np.where(finite_nonzero, exponent - 1, 0).astype(np.int16),
            "finite_nonzero": finite_nonzero, "magnitude": np.abs(exact)}


def row_histograms(bits: np.ndarray) -> np.ndarray:
    """(rows, 65536) counts of each bf16 bit pattern in each row of ``bits`` (uint16, rows first)."""
    rows = bits.shape[0]
    offsets = (np.arange(rows, dtype=np.int64) << 16).reshape(rows, *([1] * (bits.ndim - 1)))
    return np.bincount((bits.astype(np.int64) + offsets).ravel(), minlength=rows << 16).reshape(rows, 1 << 16)


def step_effect(histograms: np.ndarray, classes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row of ``histograms``: the values, how many float16 changed, zeroed, overflowed, and the largest
    |value| it changed and zeroed (0 where none)."""
    code = classes["code"]
    present = histograms > 0
    effect = {"values": histograms.sum(axis=1)}
    for name, bit in (("changed", CHANGED), ("zeroed", ZEROED), ("overflowed", OVERFLOWED)):
        effect[name] = histograms[:, (code & bit) != 0].sum(axis=1)
    for name, bit in (("max_abs_changed", CHANGED), ("max_abs_zeroed", ZEROED)):
        hit = present & ((code & bit) != 0)
        effect[name] = np.where(hit, classes["magnitude"], 0.0).max(axis=1)
    return effect


def exponent_bands(histogram: np.ndarray, classes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts per binary exponent band floor(log2|x|) = MIN_EXPONENT..MAX_EXPONENT of one histogram
    (65536 counts): finite nonzero values, and those float16 changed and zeroed."""
    finite = classes["finite_nonzero"]
    index = classes["exponent"][finite].astype(np.int64) - MIN_EXPONENT
    counts = histogram[finite]
    code = classes["code"][finite]
    length = MAX_EXPONENT - MIN_EXPONENT + 1
    return {"exponent": np.arange(MIN_EXPONENT, MAX_EXPONENT + 1),
            "values": np.bincount(index, weights=counts, minlength=length).astype(np.int64),
            "changed": np.bincount(index, weights=counts * ((code & CHANGED) != 0), minlength=length).astype(np.int64),
            "zeroed": np.bincount(index, weights=counts * ((code & ZEROED) != 0), minlength=length).astype(np.int64)}


def tensor_effect(blocks, classes: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The per-step effect (``step_effect``, with ``step``) over ``blocks`` of (first step, uint16 rows), and
    the tensor's histogram over all its steps."""
    parts, total = [], np.zeros(1 << 16, dtype=np.int64)
    for first, bits in blocks:
        histograms = row_histograms(bits)
        part = step_effect(histograms, classes)
        part["step"] = np.arange(first, first + bits.shape[0])
        parts.append(part)
        total += histograms.sum(axis=0)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}, total


# -- the analysis, side by side --------------------------------------------------------------------

def json_differences(exact, view, path: str = "") -> list[dict]:
    """Every leaf where two JSON values differ, as {"key": dotted path, "exact": ..., "float16": ...}; a list
    of scalars is one leaf, a list of objects is compared item by item; a key only one side has differs."""
    if isinstance(exact, dict) and isinstance(view, dict):
        found = []
        for key in sorted(set(exact) | set(view)):
            if not path and key in IGNORED_KEYS:
                continue
            where = f"{path}.{key}" if path else key
            if key not in exact or key not in view:
                found.append({"key": where, "exact": exact.get(key), "float16": view.get(key)})
            else:
                found += json_differences(exact[key], view[key], where)
        return found
    if (isinstance(exact, list) and isinstance(view, list) and len(exact) == len(view)
            and any(isinstance(item, (dict, list)) for item in exact + view)):
        return [found for index, (a, b) in enumerate(zip(exact, view))
                for found in json_differences(a, b, f"{path}[{index}]")]
    return [] if _same(exact, view) else [{"key": path, "exact": exact, "float16": view}]


def _same(a, b) -> bool:
    """Equal JSON values, NaN equal to NaN (a float compares exactly: the values are the stage's own)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def table_differences(exact, view) -> dict:
    """Two tables (pandas DataFrames) compared column by column: the rows each has, and per column that
    differs the rows that differ, the first of them (its ``step`` where the table has one), the largest
    absolute and relative difference of numeric columns."""
    import pandas as pd

    result = {"rows": {"exact": int(len(exact)), "float16": int(len(view))}, "columns_only_in_exact":
              sorted(set(exact.columns) - set(view.columns)), "columns_only_in_float16":
              sorted(set(view.columns) - set(exact.columns)), "differing_columns": {}}
    rows = min(len(exact), len(view))
    for column in [c for c in exact.columns if c in view.columns]:
        a, b = exact[column].iloc[:rows].reset_index(drop=True), view[column].iloc[:rows].reset_index(drop=True)
        differs = ~((a == b) | (a.isna() & b.isna()))
        if not differs.any():
            continue
        first = int(np.flatnonzero(differs.to_numpy())[0])
        entry = {"rows_differing": int(differs.sum()), "first_row": first}
        if "step" in exact.columns:
            entry["first_step"] = int(exact["step"].iloc[first])
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            x, y = a.to_numpy(np.float64), b.to_numpy(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                absolute = np.abs(x - y)
                relative = absolute / np.maximum(np.abs(x), np.abs(y))
            entry["max_abs_difference"] = _finite_max(absolute)
            entry["max_relative_difference"] = _finite_max(relative)
        else:
            entry["exact"], entry["float16"] = str(a.iloc[first]), str(b.iloc[first])
        result["differing_columns"][column] = entry
    return result


def _finite_max(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def variance_curve(exact, view, groups: list[str]) -> dict:
    """The lab's variance curve (exp_avg_sq.csv's per-token statistics of each group) exact against float16:
    per group and statistic, the steps that differ, those the float16 curve has at 0 where the exact one is
    not, and the largest relative difference."""
    curves = {}
    for group in groups:
        for statistic in VARIANCE_STATISTICS:
            column = f"{group}_{statistic}"
            if column not in exact.columns or column not in view.columns:
                continue
            x, y = exact[column].to_numpy(np.float64), view[column].to_numpy(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                relative = np.abs(x - y) / np.maximum(np.abs(x), np.abs(y))
            differs = ~((x == y) | (np.isnan(x) & np.isnan(y)))
            curves[column] = {"steps": int(x.size), "steps_differing": int(differs.sum()),
                              "steps_float16_zero_exact_not": int(((y == 0) & (x != 0)).sum()),
                              "max_relative_difference": _finite_max(relative),
                              "exact_last": float(x[-1]), "float16_last": float(y[-1])}
    return curves


def drivers_by_group(summary: dict) -> dict:
    """The drivers' per-group answers of a summary.json: onset, peak, driver, claim_supported."""
    drivers = summary.get("drivers") or {}
    return {group: {key: value.get(key) for key in ("onset_step", "peak_step", "driver", "claim_supported")}
            for group, value in drivers.items() if isinstance(value, dict) and "onset_step" in value}


def lab_answer(exact_summary: dict, view_summary: dict, curves: dict) -> dict:
    """The lab's question answered from both analyses: would its variance curve and its claim about the
    onset ("the variance term drives the onset of fimbulwinter") have come out differently?"""
    exact_drivers, view_drivers = drivers_by_group(exact_summary), drivers_by_group(view_summary)
    curve_differs = any(curve["steps_differing"] for curve in curves.values())
    largest = max((curve["max_relative_difference"] or 0.0 for curve in curves.values()), default=0.0)
    groups = {}
    for group in sorted(set(exact_drivers) | set(view_drivers)):
        a, b = exact_drivers.get(group, {}), view_drivers.get(group, {})
        groups[group] = {"exact": a, "float16": b, "onset_differs": a.get("onset_step") != b.get("onset_step"),
                         "driver_differs": a.get("driver") != b.get("driver"),
                         "claim_differs": a.get("claim_supported") != b.get("claim_supported")}
    claim_differs = any(entry["claim_differs"] or entry["driver_differs"] for entry in groups.values())
    onset_differs = any(entry["onset_differs"] for entry in groups.values())
    verdict_a, verdict_b = exact_summary.get("verdict"), view_summary.get("verdict")
    parts = [f"variance curve (exp_avg_sq.csv): {'differs' if curve_differs else 'identical'}"
             + (f", largest relative difference {largest:.3g}" if curve_differs else "")]
    for group, entry in groups.items():
        parts.append(f"{group}: onset {entry['exact'].get('onset_step')} exact vs "
                     f"{entry['float16'].get('onset_step')} float16, driver {entry['exact'].get('driver')} vs "
                     f"{entry['float16'].get('driver')}, claim supported {entry['exact'].get('claim_supported')} "
                     f"vs {entry['float16'].get('claim_supported')}")
    parts.append(f"verdict {verdict_a!r} exact vs {verdict_b!r} float16")
    return {"variance_curve_differs": curve_differs, "variance_curve_max_relative_difference": largest,
            "onset_differs": onset_differs, "claim_differs": claim_differs,
            "verdict_differs": verdict_a != verdict_b, "by_group": groups,
            "answer": "; ".join(parts) + "."}


# -- files -----------------------------------------------------------------------------------------

def write_float16_effect(recording: str | Path, exact_dir: str | Path, view_dir: str | Path, table: str | Path,
                         bands: str | Path, summary: str | Path, figure: str | Path) -> dict:
    """Write the per-step table, the exponent bands, the JSON summary and the figure of what float16 storage
    did to the exact bf16 ``recording``, with the analyses of ``exact_dir`` (that run's results/) and
    ``view_dir`` (its float16 view's) side by side. Returns the summary."""
    import pandas as pd

    from thimble.provenance import computed_from
    from thimble.record.format import open_h5
    from thimble.record.reader import RecordedTensor
    from thimble.util.files import write_json
    from thimble.util.tables import write_csv

    classes = cast_classes()
    per_step, band_rows, totals = [], [], {}
    with open_h5(recording) as handle:
        if str(handle.attrs.get("storage_dtype")) != "bfloat16":
            from thimble.errors import DataError

            raise DataError(f"{recording} stores {handle.attrs.get('storage_dtype')}: the effect of float16 is "
                            "measured on an exact bf16 recording (the float16 view's training twin)")
        source = computed_from(recording, handle.attrs)
        for name in TENSORS:
            effect, histogram = tensor_effect(RecordedTensor.of_recording(handle, name).blocks(BLOCK_ROWS), classes)
            per_step.append(pd.DataFrame({"tensor": name, "step": effect["step"], "values": effect["values"],
                                          "changed": effect["changed"], "zeroed": effect["zeroed"],
                                          "overflowed": effect["overflowed"],
                                          "changed_share": effect["changed"] / effect["values"],
                                          "zeroed_share": effect["zeroed"] / effect["values"],
                                          "max_abs_changed": effect["max_abs_changed"],
                                          "max_abs_zeroed": effect["max_abs_zeroed"]}))
            band = exponent_bands(histogram, classes)
            occupied = band["values"] > 0
            band_rows.append(pd.DataFrame({"tensor": name, **{key: value[occupied] for key, value in band.items()}}))
            totals[name] = {"values": int(histogram.sum()), "changed": int(effect["changed"].sum()),
                            "zeroed": int(effect["zeroed"].sum()), "overflowed": int(effect["overflowed"].sum()),
                            "max_abs_changed": float(effect["max_abs_changed"].max()),
                            "max_abs_zeroed": float(effect["max_abs_zeroed"].max())}
            totals[name]["changed_share"] = totals[name]["changed"] / totals[name]["values"]
            totals[name]["zeroed_share"] = totals[name]["zeroed"] / totals[name]["values"]
            log.info("%s: float16 changed %d and zeroed %d of %d values", name, totals[name]["changed"],
                     totals[name]["zeroed"], totals[name]["values"])
    steps_table = pd.concat(per_step, ignore_index=True)
    write_csv(str(table), steps_table)
    write_csv(str(bands), pd.concat(band_rows, ignore_index=True))

    exact_dir, view_dir = Path(exact_dir), Path(view_dir)
    exact_summary = _read_json(exact_dir / SUMMARY)
    view_summary = _read_json(view_dir / SUMMARY)
    tables = {}
    for name in COMPARED_TABLES:
        tables[name] = table_differences(_read_csv(exact_dir / name), _read_csv(view_dir / name))
    exact_variance, view_variance = _read_csv(exact_dir / VARIANCE_TABLE), _read_csv(view_dir / VARIANCE_TABLE)
    groups = sorted({column.rsplit("_", 1)[0] for column in exact_variance.columns if column.endswith("_median")})
    curves = variance_curve(exact_variance, view_variance, groups)
    result = {"experiment": exact_summary.get("experiment"), "float16_view": view_summary.get("experiment"),
              "computed_from": source, "shares": "fractions 0-1",
              "definition": "changed: the float16 value read back differs from the bf16 value (NaN stays NaN); "
                            "zeroed: a nonzero value stored as 0 (|x| <= 2^-25); overflowed: a finite value stored "
                            "as inf (|x| > 65504); exponent bands: floor(log2|x|) of the bf16 value",
              "tensors": totals, "lab_question": lab_answer(exact_summary, view_summary, curves),
              "variance_curve": curves,
              "summary_differences": json_differences(exact_summary, view_summary), "table_differences": tables}
    write_json(summary, _plain(result), indent=1)
    draw_effect(steps_table, exact_variance, view_variance, groups, result, figure)
    return result


def _plain(value):
    """JSON-able: numpy scalars unwrapped, NaN and inf as null (strict JSON)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_json(path: Path) -> dict:
    from thimble.errors import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist; build it first (snakemake --cores 2 {path})")
    return json.loads(path.read_text())


def _read_csv(path: Path):
    import pandas as pd

    from thimble.errors import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist; build it first (snakemake --cores 2 {path})")
    return pd.read_csv(path)


def draw_effect(steps_table, exact_variance, view_variance, groups: list[str], result: dict,
                figure: str | Path) -> None:
    """The figure: per tensor, the share of values float16 changed and zeroed per step; the lab's variance
    curve (each group's median exp_avg_sq per token) exact and from the float16 view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thimble.util.files import atomic_output

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in TENSORS:
        rows = steps_table[steps_table["tensor"] == name]
        axes[0].plot(rows["step"], rows["changed_share"], label=name, lw=1)
        axes[1].plot(rows["step"], rows["zeroed_share"], label=name, lw=1)
    axes[0].set(title="share of values float16 changed", xlabel="step t", ylabel="share", ylim=(-0.02, 1.02))
    axes[1].set(title="share of values float16 zeroed", xlabel="step t", ylabel="share", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    for group in groups:
        column = f"{group}_median"
        line, = axes[2].plot(exact_variance["step"], exact_variance[column], lw=1.5, label=f"{group} exact (bf16)")
        axes[2].plot(view_variance["step"], view_variance[column], lw=1, ls="--", color=line.get_color(),
                     label=f"{group} float16 view")
    axes[2].set(title="the lab's variance curve: median exp_avg_sq", xlabel="step t",
                ylabel="exp_avg_sq")
    if (exact_variance[[f"{g}_median" for g in groups]] > 0).any().any():
        axes[2].set_yscale("symlog", linthresh=1e-12)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{result['experiment']}: what float16 storage ({result['float16_view']}) did", fontsize=11)
    fig.tight_layout()
    with atomic_output(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
