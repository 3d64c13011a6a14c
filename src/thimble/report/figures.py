"""Figures of one experiment and of a series (PNG, matplotlib, headless).

Every figure of ``thimble.outputs.FIGURES`` is drawn for every experiment, thimble's own and a loop recorded by
``thimble.Recorder``: where a measure does not apply to the question tensor (no token groups, no exp_avg_sq, no
loss logged, a split the optimizer does not have), the figure says so in its own text instead of drawing an
empty plot. A tensor without token groups is drawn as one group, all its rows."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from thimble.analysis.freeze import GROUPS, MEASURES, PHASES, VERDICTS, WINDOW_SHARES  # noqa: E402
from thimble.record.format import RECORDER as RECORDER_SOURCE  # noqa: E402
from thimble.sizes import EMBEDDING  # noqa: E402
from thimble.update_rules import recorded_tensors, rule_of  # noqa: E402
from thimble.util.files import atomic_output, write_text  # noqa: E402

GROUP_COLORS = {"dead": "tab:blue", "live": "tab:orange", "all": "tab:gray"}
#: each driver's colour, in the drivers' figure and the tensors' onsets (learning_rate: a recorder's recording,
#: where lr changes from step to step)
DRIVER_COLORS = {"spacing": "tab:blue", "statistics": "tab:orange", "v_stall": "tab:red",
                 "learning_rate": "tab:green"}
PHASE_COLORS = {"frozen": "#9ecae1", "solid": "#3182bd", "cold": "#fdae6b", "hot": "#e6550d"}
#: tokens drawn as individual lines per group (the mean and std use every token)
SAMPLE_TOKENS = 150


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _message(text: str, path: str, figsize: tuple[float, float], fontsize: int) -> None:
    """A figure that says in words why there is nothing to draw."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=fontsize)
    _save(fig, path)


def split_groups(frame: pd.DataFrame, column: str) -> tuple[str, ...]:
    """The groups a figure draws apart from a question tensor's table rows ``frame``: its dead and live tokens
    that have values in the column ``{group}_{column}``, else all its rows."""
    split = tuple(group for group in ("dead", "live")
                  if f"{group}_{column}" in frame and frame[f"{group}_{column}"].notna().any())
    return split or ("all",)


def group_title(group: str) -> str:
    """How a figure names a group of the question tensor's rows."""
    return "all rows" if group == "all" else f"{group} tokens"


def loss(freeze: pd.DataFrame, experiment: str, path: str) -> None:
    if freeze["loss"].isna().all():  # a recorder's loop that never called rec.log(loss=...)
        _message(f"{experiment}: no training loss was recorded\n(the loop never handed the recorder a loss: "
                 "rec.log(loss=...))", path, figsize=(8, 4), fontsize=11)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    logged = freeze["loss"].notna()
    ax.plot(freeze["step"][logged], freeze["loss"][logged], lw=0.8, marker="." if (~logged).any() else None)
    ax.set(title=f"{experiment}: training loss" + ("" if logged.all() else " (at the steps the loop logged one)"),
           xlabel="step", ylabel="cross-entropy loss (nats)" if logged.all() else "loss")
    ax.grid(alpha=0.3)
    _save(fig, path)


def displacement(norm: np.ndarray, dead_mask: np.ndarray, experiment: str, path: str, note: str | None = None) -> None:
    """|ΔW′| per token over time, all tokens superimposed (a sample drawn), mean ± 1 std; log scale. Without
    tokens (no tensor with token groups recorded) the figure says why: ``note``, token_displacement.h5's."""
    if norm.shape[1] == 0:
        why = "\n".join(textwrap.wrap(note or "no recorded tensor's rows are tokens", 80))
        _message(f"{experiment}: no token displacement to draw\n{why}", path, figsize=(9, 3), fontsize=10)
        return
    steps = np.arange(1, norm.shape[0])
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    for ax, group in zip(axes, ("dead", "live")):
        mask = dead_mask if group == "dead" else ~dead_mask
        values = norm[1:, mask].astype(np.float64)
        if values.shape[1] == 0:
            ax.set_title(f"{group} tokens: none")
            continue
        sample = rng.choice(values.shape[1], size=min(SAMPLE_TOKENS, values.shape[1]), replace=False)
        shown = np.where(values[:, sample] > 0, values[:, sample], np.nan)  # log scale: a frozen step is a gap
        ax.plot(steps, shown, color=GROUP_COLORS[group], lw=0.3, alpha=0.25)
        mean, std = values.mean(axis=1), values.std(axis=1)
        ax.plot(steps, np.where(mean > 0, mean, np.nan), color="black", lw=1.2, label="mean over tokens")
        # the smallest move is one lattice step: the band's floor sits just below it
        ax.fill_between(steps, np.clip(mean - std, 0.5, None), mean + std, color="black", alpha=0.15,
                        label="mean ± 1 std")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set(title=f"{group} tokens ({values.shape[1]}; {len(sample)} drawn)",
               ylabel="|ΔW′| per token (lattice steps, L2)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{experiment}: lattice displacement per token; frozen steps (|ΔW′| = 0) leave gaps")
    _save(fig, path)


def phases(freeze: pd.DataFrame, thresholds: dict, experiment: str, path: str) -> None:
    groups = split_groups(freeze, "phase_frozen")
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3 * len(groups)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    labels = {"frozen": "frozen (ΔW′ = 0)", "solid": f"solid (motion ≤ {thresholds['solid_max']})",
              "cold": f"cold (≤ {thresholds['cold_max']})", "hot": f"hot (> {thresholds['cold_max']})"}
    for ax, group in zip(axes, groups):
        stacks = [freeze[f"{group}_phase_{phase}"] for phase in PHASES]
        ax.stackplot(freeze["step"], stacks, labels=[labels[p] for p in PHASES],
                     colors=[PHASE_COLORS[p] for p in PHASES], linewidth=0)
        ax.set(title=f"{group_title(group)} by largest motion (|ΔW| in steps of the coarser endpoint spacing)",
               ylabel="tokens" if group != "all" else "rows")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{experiment}: phase populations")
    _save(fig, path)


def global_freeze(freeze: pd.DataFrame, summary: dict, experiment: str, path: str) -> None:
    """Per measure: windowed frozen share per group with its verdict; below, the raster of global freeze."""
    fig, axes = plt.subplots(len(MEASURES) + 1, 1, figsize=(9, 10), sharex=True,
                             gridspec_kw={"height_ratios": [2] * len(MEASURES) + [1]})
    width = summary["verdict_rule"]["window_steps"]
    groups = [group for group in GROUPS if group in summary["cooling"]]
    for ax, measure in zip(axes, MEASURES):
        label = MEASURES[measure].label
        for group in groups:
            series_ = summary["cooling"][group][measure]
            ax.plot(series_["window_centers"], series_["fractions"], marker="o", ms=2.5, lw=1,
                    color=GROUP_COLORS[group], label=f"{group}: {series_['verdict']}")
        ax.axvline(summary["steps"] / 2, color="black", lw=0.6, ls=":")
        ax.set(ylabel=label, ylim=(-0.02, 1.02), title=f"{label}, windows of {width} steps "
               "(verdict from the trend right of the dotted line)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    raster = axes[-1]
    image = np.array([freeze[f"{group}_globally_frozen"].to_numpy(dtype=float) for group in groups])
    steps = freeze["step"].to_numpy()
    raster.imshow(image, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                  extent=(steps[0] - 0.5, steps[-1] + 0.5, len(groups) - 0.5, -0.5))
    raster.set_yticks(range(len(groups)), groups)
    raster.set(xlabel="step", title="globally frozen steps (dark: every "
               f"{'token' if groups != ['all'] else 'row'} of the group has ΔW′ = 0)")
    fig.suptitle(f"{experiment}: freezing by group and measure")
    _save(fig, path)


def variance(exp_avg_sq: pd.DataFrame, experiment: str, path: str, stored: str = "bfloat16",
             missing: str | None = None) -> None:
    """exp_avg_sq per token (median, 10-90%), the share of its elements that change per step, and the
    bias corrections AdamW divides by. ``stored``: the dtype the update rule keeps exp_avg_sq in. Without rows
    (the optimizer keeps no exp_avg_sq) the figure says so: ``missing``, what the optimizer is."""
    if exp_avg_sq.empty:
        _message(f"{experiment}: no exp_avg_sq to draw\n{missing or 'the optimizer'} keeps no exp_avg_sq "
                 "(Adam's second moment) of the question tensor", path, figsize=(9, 3), fontsize=10)
        return
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    steps = exp_avg_sq["step"][1:]
    for group in split_groups(exp_avg_sq, "mean"):
        top.plot(steps, exp_avg_sq[f"{group}_median"][1:], color=GROUP_COLORS[group], lw=1.2, label=f"{group} median")
        top.fill_between(steps, exp_avg_sq[f"{group}_p10"][1:], exp_avg_sq[f"{group}_p90"][1:],
                         color=GROUP_COLORS[group], alpha=0.2, label=f"{group} 10–90%")
        middle.plot(steps, exp_avg_sq[f"{group}_changed_share"][1:], color=GROUP_COLORS[group], lw=0.6,
                    label=group)
    top.set_yscale("log")
    top.set(title=f"{experiment}: AdamW exp_avg_sq per token (mean over its coordinates)",
            ylabel="exp_avg_sq (squared gradient units)")
    if stored == "bfloat16":  # a float32 v (fp32_master, a recorder's float32 moments) does decay
        top.text(0.01, 0.02, "exp_avg_sq.mul_(0.999) cannot change a normal bf16 value: it never decays",
                 transform=top.transAxes, fontsize=8)
    middle.set(ylabel="share of elements changed", ylim=(-0.02, 1.02),
               title=f"share of exp_avg_sq elements whose {'bf16' if stored == 'bfloat16' else stored} "
                     "value changed at the step")
    bottom.plot(steps, exp_avg_sq["bias_correction1"][1:], label="1 − β1^t (divides the step size)")
    bottom.plot(steps, exp_avg_sq["bias_correction2"][1:], label="1 − β2^t (its square root divides sqrt(v))")
    bottom.set(xlabel="step", ylabel="bias correction", ylim=(-0.02, 1.02), title="AdamW's bias corrections")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(fig, path)


def lattice_positions(table: pd.DataFrame, experiment: str, path: str) -> None:
    """Share of frozen elements sitting exactly at ±2^k, in all and for the most common k, per group."""
    groups = split_groups(table, "frozen_elements")
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.5 * len(groups)), sharex=True, sharey=True,
                             squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        ax.plot(table["step"], table[f"{group}_at_power_of_two_share"], color="black", lw=1.2, label="any k")
        by_k = [c for c in table.columns if c.startswith(f"{group}_at_2^")]
        top = sorted(by_k, key=lambda c: -np.nan_to_num(table[c].to_numpy()).sum())[:5]
        for column in top:
            ax.plot(table["step"], table[column], lw=0.8, label=column.removeprefix(f"{group}_at_").removesuffix("_share"))
        ax.set(title=f"{group_title(group)}: frozen elements exactly at ±2^k", ylabel="share of frozen elements",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{experiment}: where frozen weights sit on the lattice (the spacing doubles just above 2^k)")
    _save(fig, path)


def update_ratio(histogram: pd.DataFrame, windows: dict, experiment: str, path: str,
                 update_rule: str = "bf16", tensor: str | None = None) -> None:
    """Distribution of |update| / half the lattice spacing per window, against the threshold 1.

    The ratio is the bf16 rule's (round to nearest from the addcdiv_ sum); the replay of another rule
    writes no rows, and the figure says why instead of drawing an empty plot. ``tensor``: the question tensor of
    a recorder's recording (whose replay may write rows for some tensors and not for others).
    """
    if histogram.empty:
        if tensor is not None:
            _message(f"{experiment} ({update_rule}):\nthe replay wrote no update ratio of {tensor}: the ratio (round "
                     "to nearest from AdamW's float32 sum)\nis defined for bf16 AdamW; replay.json says what was "
                     "replayed", path, figsize=(9, 4.5), fontsize=10)
            return
        _message(f"{experiment} trains with update rule {update_rule}:\nthe update ratio (round to nearest from "
                 "AdamW's float32 sum)\nis defined for the bf16 rule only; see replay.json", path, figsize=(9, 4.5),
                 fontsize=11)
        return
    edges = np.array([float(c.split("_")[1]) for c in histogram.columns if c.startswith("log2ratio_")])
    columns = [c for c in histogram.columns if c.startswith("log2ratio_")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, window in windows.items():
        inside = (histogram["step"] >= window["start"]) & (histogram["step"] <= window["end"])
        counts = histogram.loc[inside, columns].sum().to_numpy(dtype=float)
        if counts.sum() == 0:
            continue
        ax.step(edges, counts / counts.sum(), where="post", label=f"{name} (t={window['start']}–{window['end']})")
    ax.axvline(0, color="black", ls="--", lw=1, label="threshold: |u| = half spacing")
    ax.set(title=f"{experiment}: AdamW update before rounding, relative to half the bf16 spacing",
           xlabel="log2(|u| / half spacing) (below 0: the element cannot move)", ylabel="fraction of elements")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def drivers(table: pd.DataFrame, summary: dict, experiment: str, path: str) -> None:
    """Per group: the mean log2(|u|/h) and the frozen share (top), and below, from the peak on, the three terms
    the ratio's drop splits into (spacing, statistics, v_stall) beside the drop itself; onset and peak marked.

    Outside the bf16 rule the decomposition does not apply: the figure says why instead (summary.json).
    """
    answer = summary.get("drivers", {})
    groups = [group for group in GROUPS if group in set(table.get("group", []))]
    question = summary.get("question_tensor", EMBEDDING)
    skipped = (answer.get("not_applicable") or {}).get(question)
    if answer.get("applies", False) and skipped is not None:  # a recorder's: it applies to other tensors
        why = "\n".join(textwrap.wrap(skipped, 90))
        _message(f"{experiment} ({rule_of(summary)}):\nthe freeze drivers do not apply to {question}:\n{why}\n"
                 "(freeze_drivers.json has the tensors they apply to)", path, figsize=(9, 3), fontsize=9)
        return
    if not answer.get("applies", False) or not groups:
        why = "\n".join(textwrap.wrap(answer.get("why", "no freeze_drivers rows"), 90))
        _message(f"{experiment} trains with update rule {rule_of(summary)}:\nthe freeze drivers do not apply:\n{why}",
                 path, figsize=(9, 3), fontsize=9)
        return
    # a tensor of one group (all its rows) as wide as the title above it needs
    fig, axes = plt.subplots(2, len(groups), figsize=(max(5.2 * len(groups), 10), 7.5), sharex=True, squeeze=False)
    for column, group in enumerate(groups):
        _driver_panels(axes[0, column], axes[1, column], table[table["group"] == group], group, answer[group])
    fig.suptitle(f"{experiment}: what drives the freeze (dotted: the peak; dashed: the onset, more than half frozen)")
    _save(fig, path)


def _driver_panels(top, bottom, rows: pd.DataFrame, group: str, result: dict) -> None:
    """One group's column of the drivers figure from its freeze_drivers.csv ``rows`` and its answer ``result``:
    ``top`` the mean ratio and the frozen share, ``bottom`` the terms of the ratio's drop since the peak."""
    steps = rows["step"].to_numpy()
    top.plot(steps, rows["mean_log2_ratio"], color="black", lw=1, label="mean log2(|u| / h)")
    top.axhline(0, color="black", ls="--", lw=0.6)
    share = top.twinx()
    share.plot(steps, rows["frozen_share"], color=GROUP_COLORS[group], lw=0.8, label="frozen share")
    share.set(ylim=(-0.02, 1.02), ylabel="frozen share of elements")
    top.set(title=f"{group}: driver {result['driver'] or '–'}", ylabel="bits (below 0: cannot move)")
    if result["peak_step"] is not None:
        peak = int(np.searchsorted(steps, result["peak_step"]))
        at = lambda values: values - values[peak]  # noqa: E731  (bits gained since the peak)
        statistics = rows["mean_log2_abs_m_hat"].to_numpy() - rows["mean_log2_exact_denominator"].to_numpy()
        ratio = rows["mean_log2_ratio"].to_numpy()
        bottom.plot(steps, -at(ratio), color="black", lw=3, alpha=0.35, label="drop of the mean ratio")
        bottom.plot(steps, at(rows["mean_log2_half_spacing"].to_numpy()), lw=1, color=DRIVER_COLORS["spacing"],
                    label="spacing (coarser binades)")
        bottom.plot(steps, -at(statistics), lw=1, color=DRIVER_COLORS["statistics"],
                    label="statistics (exact AdamW's |m̂|/denominator)")
        bottom.plot(steps, at(rows["v_stall_bits"].to_numpy()), lw=1, color=DRIVER_COLORS["v_stall"],
                    label="v_stall (stored exp_avg_sq above exact)")
        if "log2_lr" in rows:  # a recorder's lr, step by step
            bottom.plot(steps, -at(rows["log2_lr"].to_numpy()), lw=1, color=DRIVER_COLORS["learning_rate"],
                        label="learning_rate (the fall of log2 lr)")
        for ax in (top, bottom):
            ax.axvline(result["peak_step"], color="gray", lw=0.6, ls=":")
    if result["onset_step"] is not None:
        for ax in (top, bottom):
            ax.axvline(result["onset_step"], color="red", lw=0.8, ls="--")
        top.text(result["onset_step"], 0.02, " onset", color="red", fontsize=8, transform=top.get_xaxis_transform())
    bottom.set(xlabel="step", ylabel="bits since the peak (sum of the terms = the drop)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper right")
    share.legend(fontsize=7, loc="center right")
    bottom.legend(fontsize=7, loc="best")


def drivers_html(answer: dict) -> list[str]:
    """summary.html's part on the freeze drivers: per group, which term drove the onset and the numbers."""
    if not answer:
        return []
    if not answer.get("applies", False):
        return [f"<p>Freeze drivers: not computed: {answer.get('why', '')}</p>"]
    question = answer.get("question_tensor")
    skipped = (answer.get("not_applicable") or {}).get(question)
    if skipped is not None:  # a recorder's recording: they apply to other tensors, not to the question tensor
        return [f"<p>Freeze drivers of {question}: not computed: {skipped} (freeze_drivers.json has the tensors "
                "they apply to)</p>"]
    keys = ("onset_step", "peak_step", "drop_bits", "spacing_bits", "statistics_bits", "v_stall_bits", "driver",
            "claim_supported", "v_stall_bits_last")
    rows = [{"group": group, **{key: answer[group][key] for key in keys},
             **({"learning_rate_bits": answer[group]["learning_rate_bits"]}
                if "learning_rate_bits" in answer[group] else {})}
            for group in GROUPS if group in answer]
    return ["<p>What drives the freeze (the lab: \"it's really the variance term\"): from the peak of the mean "
            "log2(|u|/h) to the onset (more than half of the group frozen), its drop splits into the weights' "
            "coarser spacing, the gradient statistics as exact AdamW sees them, and bf16's stalled exp_avg_sq "
            "(v_stall); bits, freeze_drivers.csv, docs/outputs.md.</p><ul>"
            + "".join(f"<li>{answer[row['group']]['answer']}</li>" for row in rows) + "</ul>",
            _html_table(rows, digits=3)]


def experiment_label(summary: dict) -> str:
    """An experiment's name, with its update rule where that is not the seed's."""
    rule = rule_of(summary)
    return summary["experiment"] if rule == "bf16" else f"{summary['experiment']} [{rule}]"


def series(summaries: list[dict], name: str, path: str) -> None:
    """Per measure (rows) and group (columns: dead and live tokens, or all tokens where none is dead),
    each experiment's windowed frozen share, labelled with its update rule and verdict."""
    groups = ["dead", "live"] if any(s["windows"]["all"].get("dead", {}).get("tokens") for s in summaries) else []
    # an experiment without token groups (a recording of a loop given none) has the group all alone
    if not groups or any("dead" not in s["cooling"] for s in summaries):
        groups.append("all")
    fig, axes = plt.subplots(len(MEASURES), len(groups), figsize=(7 * len(groups), 9), sharex=True, squeeze=False)
    for row, measure in enumerate(MEASURES):
        label = MEASURES[measure].label
        for column, group in enumerate(groups):
            ax = axes[row, column]
            for summary in summaries:
                if group not in summary["cooling"]:
                    continue
                series_ = summary["cooling"][group][measure]
                ax.plot(series_["window_centers"], series_["fractions"], marker="o", ms=2.5, lw=1,
                        label=f"{experiment_label(summary)}: {series_['verdict']}")
            ax.set(title=f"{group} tokens: {label}", ylabel="share", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"series {name}: frozen shares per experiment")
    _save(fig, path)


def lattice_position_summary(experiment: str, update_rule: str, table: pd.DataFrame) -> list[dict]:
    """One row per group of an experiment's lattice_positions.csv: frozen elements at the last step and
    the share of them at exactly ±2^k (in all, and by k), at the last step and over the last half."""
    last, last_half = table.iloc[-1], table[table["step"] > table["step"].iloc[-1] / 2]
    rows = []
    for group in GROUPS:
        if f"{group}_frozen_elements" not in table:
            continue
        row = {"experiment": experiment, "update_rule": update_rule, "group": group, "step": int(last["step"]),
               "frozen_elements": int(last[f"{group}_frozen_elements"]),
               "at_power_of_two_share": last[f"{group}_at_power_of_two_share"],
               "at_power_of_two_share_last_half_mean": last_half[f"{group}_at_power_of_two_share"].mean()}
        prefix = f"{group}_at_2^"
        row.update({column[len(group) + 1:]: last[column] for column in table.columns if column.startswith(prefix)})
        rows.append(row)
    return rows


HTML_STYLE = ("<style>body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse;margin:8px 0}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}</style>")


def _html_table(rows: list[dict], digits: int = 4) -> str:
    return pd.DataFrame(rows).to_html(index=False, float_format=lambda x: f"{x:.{digits}f}", na_rep="–")


def _html_page(title: str, parts: list[str]) -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>{HTML_STYLE}</head><body>" \
           f"<h3>{title}</h3>{''.join(parts)}</body></html>\n"


def summary_html(summary: dict) -> str:
    """The summary's answers as HTML tables: verdicts per group and measure, then the windows' statistics."""
    verdict_rows = []
    for group, measures in summary["cooling"].items():
        for measure, series_ in measures.items():
            fit = series_["trend_last_half"]
            verdict_rows.append({"group": group, "measure": measure, "verdict": series_["verdict"],
                                 "slope per 1000 steps": fit["slope_per_1000_steps"],
                                 "95% CI": None if fit["ci95"] is None else
                                 f"[{fit['ci95'][0]:.4f}, {fit['ci95'][1]:.4f}]",
                                 "windows in the last half": fit["windows"]})
    window_rows = [{"window": f"{name} (t={window['start']}–{window['end']})", "group": group,
                    **stats}
                   for name, window in summary["windows"].items()
                   for group, stats in window.items() if isinstance(stats, dict)]
    rule = summary["verdict_rule"]
    if summary.get("recorded_by") != RECORDER_SOURCE:
        question = "The lab's question (dead tokens, global freeze)"
    else:
        group = "dead tokens" if "dead" in summary["cooling"] else "all"
        question = f"The question ({summary['question_tensor']}, {group}, global freeze; {rule_of(summary)})"
    parts = [f"<p>{question}: <b>{summary['verdict']}</b>. "
             f"{summary['steps']} steps; ΔW′ exact: {summary['delta_w_exact']}. Shares are fractions 0–1.</p>",
             _html_table(verdict_rows),
             "<p>Verdict rule: " + "; ".join(f"<i>{key}</i>: {rule[key]}" for key in VERDICTS)
             + f". {rule['windows'][0].upper()}{rule['windows'][1:]}.</p>",
             _html_table(window_rows),
             *drivers_html(summary.get("drivers", {})),
             *(["<p>Every recorded tensor (docs/tensors.md): its verdict (global freeze of its question group), "
                "the share of steps it is globally frozen, its first such step, the share of its elements "
                "unmoved over the last window, and its freeze onset with what drove it.</p>",
                _html_table([{key: value for key, value in row.items() if key != "experiment"}
                             for row in tensor_rows(summary)])]
               if summary.get("tensors") else [])]
    return _html_page(f"{summary['experiment']}: verdicts and summary", parts)


def question_rows(table: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """The rows of a per-tensor table (its ``tensor`` column) that describe the tensor the summary's top level
    answers for (``question_tensor``: the embedding when it is recorded), without that column; a table of
    one tensor as it is."""
    if "tensor" not in table.columns:
        return table
    rows = table[table["tensor"] == summary.get("question_tensor", EMBEDDING)]
    return rows.drop(columns="tensor").reset_index(drop=True)


def short_name(name: str) -> str:
    """A parameter's name as the figures label it (``transformer.`` left out)."""
    return name.removeprefix("transformer.")


def tensor_freeze(freeze: pd.DataFrame, experiment: str, path: str, window: int) -> None:
    """One picture of every recorded tensor over the steps: the share of its elements that did not move
    (ΔW′ = 0), averaged over windows of ``window`` steps; below, each tensor's globally frozen steps."""
    if "tensor" not in freeze.columns:
        freeze = freeze.assign(tensor=EMBEDDING)
    names = list(dict.fromkeys(freeze["tensor"]))
    steps = freeze.loc[freeze["tensor"] == names[0], "step"].to_numpy()
    edges = np.arange(steps[0], steps[-1] + window, window)
    shares, frozen = [], []
    for name in names:
        rows = freeze[freeze["tensor"] == name]
        share = rows["all_frozen_element_share"].to_numpy(dtype=float)
        shares.append([share[(steps >= a) & (steps < a + window)].mean() for a in edges[:-1]] or [share.mean()])
        frozen.append(rows["all_globally_frozen"].to_numpy(dtype=float))
    height = 1.2 + 0.22 * len(names)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2 * height), sharex=True)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5)
    image = top.imshow(np.array(shares), aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                       extent=extent)
    top.set_yticks(range(len(names)), [short_name(name) for name in names], fontsize=7)
    top.set(title=f"share of each tensor's elements unmoved (ΔW′ = 0), mean over windows of {window} steps")
    fig.colorbar(image, ax=top, fraction=0.025, pad=0.01)
    bottom.imshow(np.array(frozen), aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                  extent=extent)
    bottom.set_yticks(range(len(names)), [short_name(name) for name in names], fontsize=7)
    bottom.set(xlabel="step", title="globally frozen steps (dark: every element of the tensor unmoved)")
    fig.suptitle(f"{experiment}: which tensors freeze, and when")
    _save(fig, path)


def tensor_onsets(summary: dict, experiment: str, path: str) -> None:
    """Each tensor's freeze onset (the first step more than half its elements are unmoved), coloured by what
    drove it, and its first globally frozen step; its verdict and the frozen share of its last window beside."""
    tensors = summary.get("tensors") or {}
    if not tensors:
        _message(f"{experiment}: no per-tensor summary", path, (8, 2), 11)
        return
    names = list(tensors)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.3 * len(names)))
    for row, name in enumerate(names):
        entry = tensors[name]
        onset, first = entry.get("onset_step"), entry.get("first_global_freeze_step")
        if onset is not None:
            ax.scatter(onset, row, marker="o", s=36, color=DRIVER_COLORS.get(entry.get("driver"), "tab:gray"),
                       zorder=3)
        if first is not None:
            ax.scatter(first, row, marker="|", s=120, color="black", zorder=2)
        share = entry.get("frozen_element_share_last_window")
        ax.annotate(f"{entry.get('verdict')}; {share:.2f} unmoved at the end" if share is not None
                    else f"{entry.get('verdict')}", (1.01, row), xycoords=("axes fraction", "data"), va="center",
                    fontsize=7)
    drivers = {entry.get("driver") for entry in tensors.values()}
    for driver, color in DRIVER_COLORS.items():
        if driver == "learning_rate" and driver not in drivers:  # a term only where lr changes from step to step
            continue
        ax.scatter([], [], marker="o", color=color, label=f"onset driven by {driver}")
    ax.scatter([], [], marker="o", color="tab:gray", label="onset with no drop to split (frozen from its peak)")
    ax.scatter([], [], marker="|", s=120, color="black", label="first globally frozen step")
    ax.set_yticks(range(len(names)), [short_name(name) for name in names], fontsize=7)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, summary["steps"])
    ax.set(xlabel="step", title=f"{experiment}: each tensor's freeze onset, its driver and its verdict")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


TENSOR_COLUMNS = ("rows", "columns", "verdict", "global_freeze_share", "first_global_freeze_step",
                  "frozen_element_share_last_window", "onset_step", "driver")


def tensor_rows(summary: dict) -> list[dict]:
    """Per recorded tensor: its verdict, global freeze, onset and driver (summary.json's ``tensors``)."""
    return [{"experiment": summary["experiment"], "tensor": name,
             **{column: entry.get(column) for column in TENSOR_COLUMNS}}
            for name, entry in (summary.get("tensors") or {}).items()]


def experiment_figures(freeze_csv: str, summary_json: str, token_steps: str, exp_avg_sq_csv: str,
                       ratio_csv: str, lattice_positions_csv: str, outdir: str, summary_page: str | None = None,
                       drivers_csv: str | None = None) -> None:
    """Every figure of thimble.outputs.FIGURES, as {outdir}/{name}.png, and the summary as an HTML page."""
    import h5py

    from thimble.outputs import FIGURES

    summary = json.loads(Path(summary_json).read_text())
    every_tensor = pd.read_csv(freeze_csv)
    frame = question_rows(every_tensor, summary)
    name = summary["experiment"]
    out = {figure: str(Path(outdir) / f"{figure}.png") for figure in FIGURES}
    loss(frame, name, out["loss"])
    with h5py.File(token_steps, "r") as handle:
        displacement(handle["norm"][...], handle["dead_mask"][...], name, out["displacement"],
                     handle.attrs.get("note"))
    phases(frame, summary["thresholds"], name, out["phases"])
    global_freeze(frame, summary, name, out["global_freeze"])
    recorder = summary.get("recorded_by") == RECORDER_SOURCE
    question = summary.get("question_tensor", EMBEDDING)
    # a recorder's summary says the dtype of each tensor it recorded; the seed's rules say theirs
    entry = summary["tensors"][question] if recorder else {}
    stored = (entry.get("dtypes", {}).get("exp_avg_sq", entry.get("dtype")) if recorder
              else recorded_tensors(rule_of(summary))["variance_W"])
    variance(question_rows(pd.read_csv(exp_avg_sq_csv), summary), name, out["variance"], stored, rule_of(summary))
    update_ratio(question_rows(pd.read_csv(ratio_csv), summary), summary["windows"], name, out["update_ratio"],
                 rule_of(summary), question if recorder else None)
    lattice_positions(question_rows(pd.read_csv(lattice_positions_csv), summary), name, out["lattice_positions"])
    drivers(question_rows(pd.read_csv(drivers_csv), summary) if drivers_csv else pd.DataFrame(), summary, name,
            out["drivers"])
    tensor_freeze(every_tensor, name, out["tensor_freeze"], summary["verdict_rule"]["window_steps"])
    tensor_onsets(summary, name, out["tensor_onsets"])
    if summary_page:
        write_text(summary_page, summary_html(summary))


def verdict_rows(summaries: list[dict]) -> list[dict]:
    """A series' verdicts.csv: per experiment, group and measure, the share over the last half, its trend per 1000
    steps with a 95% CI, and the verdict."""
    rows = []
    for summary in summaries:
        for group, measures in summary["cooling"].items():
            last_half = summary["windows"]["last_half"][group]
            for measure, series_ in measures.items():
                fit = series_["trend_last_half"]
                rows.append({"experiment": summary["experiment"],
                             "update_rule": rule_of(summary), "group": group, "measure": measure,
                             "steps": summary["steps"], "delta_w_exact": summary["delta_w_exact"],
                             "share_last_half": last_half[WINDOW_SHARES[measure]],
                             "slope_per_1000_steps": fit["slope_per_1000_steps"],
                             "ci95_low": fit["ci95"][0] if fit["ci95"] else None,
                             "ci95_high": fit["ci95"][1] if fit["ci95"] else None,
                             "verdict": series_["verdict"]})
    return rows


def series_outputs(name: str, summary_paths: list[str], figure: str, table: str, page: str | None = None,
                   lattice_paths: list[str] | None = None, lattice_table: str | None = None,
                   tensor_table: str | None = None) -> None:
    """The series figure, a table of each experiment's verdict and the numbers behind it, (with
    ``lattice_paths``, in the order of the summaries) each experiment's frozen elements at ±2^k, and (with
    ``tensor_table``) every recorded tensor's verdict, global freeze, onset and driver per experiment."""
    from thimble.util.tables import write_csv

    summaries = [json.loads(Path(path).read_text()) for path in summary_paths]
    series(summaries, name, figure)
    rows = verdict_rows(summaries)
    write_csv(table, rows)
    lattice_rows = []
    if lattice_table:
        for summary, path in zip(summaries, lattice_paths, strict=True):
            lattice_rows += lattice_position_summary(summary["experiment"], rule_of(summary),
                                                     question_rows(pd.read_csv(path), summary))
        write_csv(lattice_table, lattice_rows)
    per_tensor = [row for summary in summaries for row in tensor_rows(summary)]
    if tensor_table:
        write_csv(tensor_table, pd.DataFrame(per_tensor, columns=["experiment", "tensor", *TENSOR_COLUMNS]))
    if page:
        write_text(page, _html_page(f"series {name}: verdicts", [
            "<p>Per experiment, group and measure: the share over the last half (0–1), its trend per 1000 steps "
            "with a 95% CI, and the verdict (rule: docs/outputs.md).</p>",
            _html_table(rows),
            *(["<p>Frozen elements sitting exactly at ±2^k, per experiment and group: at the last step, and the "
               "share at a power of two averaged over the last half (lattice_positions.csv).</p>",
               _html_table(lattice_rows)]
              if lattice_rows else []),
            *(["<p>Every recorded tensor per experiment (docs/tensors.md): verdict, globally frozen share of steps, "
               "first globally frozen step, share of elements unmoved over the last window, onset and driver.</p>",
               _html_table(per_tensor)]
              if per_tensor else [])]))
