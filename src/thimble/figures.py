"""Figures of one experiment and of a series (PNG, matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from thimble.freeze import PHASES  # noqa: E402

GROUP_COLORS = {"dead": "tab:blue", "live": "tab:orange", "all": "tab:gray"}
PHASE_COLORS = {"frozen": "#9ecae1", "solid": "#3182bd", "cold": "#fdae6b", "hot": "#e6550d"}
#: tokens drawn as individual lines per group (the mean and std use every token)
SAMPLE_TOKENS = 150


def _save(fig, path: str) -> None:
    from thimble.files import atomic_output

    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def loss(freeze: pd.DataFrame, experiment: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(freeze["step"], freeze["loss"], lw=0.8)
    ax.set(title=f"{experiment}: training loss", xlabel="step", ylabel="cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def displacement(norm: np.ndarray, dead_mask: np.ndarray, experiment: str, path: str) -> None:
    """|ΔW′| per token over time, all tokens superimposed (a sample drawn), mean ± 1 std; log scale."""
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
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    labels = {"frozen": "frozen (0)", "solid": f"solid (1–{thresholds['solid_max']})",
              "cold": f"cold ({thresholds['solid_max'] + 1}–{thresholds['cold_max']})",
              "hot": f"hot (> {thresholds['cold_max']})"}
    for ax, group in zip(axes, ("dead", "live")):
        stacks = [freeze[f"{group}_{phase}"] for phase in PHASES]
        ax.stackplot(freeze["step"], stacks, labels=[labels[p] for p in PHASES],
                     colors=[PHASE_COLORS[p] for p in PHASES], linewidth=0)
        ax.set(title=f"{group} tokens by largest |ΔW′| (lattice steps)", ylabel="tokens")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{experiment}: phase populations")
    _save(fig, path)


def global_freeze(freeze: pd.DataFrame, summary: dict, experiment: str, path: str) -> None:
    groups = ("dead", "live", "all")
    fig, (top, raster) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for group in groups:
        cooling = summary["cooling"][group]
        top.plot(cooling["window_centers"], cooling["global_freeze_fraction"], marker="o", ms=3,
                 color=GROUP_COLORS[group], label=f"{group}: {cooling['verdict']}")
    top.set(ylabel="globally frozen fraction", ylim=(-0.02, 1.02),
            title=f"windows of {summary['cooling']['all']['window_steps']} steps; verdict from the last half's trend")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    image = np.array([freeze[f"{group}_globally_frozen"].to_numpy(dtype=float) for group in groups])
    steps = freeze["step"].to_numpy()
    raster.imshow(image, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                  extent=(steps[0] - 0.5, steps[-1] + 0.5, len(groups) - 0.5, -0.5))
    raster.set_yticks(range(len(groups)), groups)
    raster.set(xlabel="step", title="globally frozen steps (dark: every token of the group has ΔW′ = 0)")
    fig.suptitle(f"{experiment}: global freeze")
    _save(fig, path)


def variance(exp_avg_sq: pd.DataFrame, experiment: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for group in ("dead", "live"):
        if f"{group}_mean" not in exp_avg_sq:
            continue
        steps = exp_avg_sq["step"][1:]
        ax.plot(steps, exp_avg_sq[f"{group}_median"][1:], color=GROUP_COLORS[group], lw=1.2, label=f"{group} median")
        ax.fill_between(steps, exp_avg_sq[f"{group}_p10"][1:], exp_avg_sq[f"{group}_p90"][1:],
                        color=GROUP_COLORS[group], alpha=0.2, label=f"{group} 10–90%")
    ax.set_yscale("log")
    ax.set(title=f"{experiment}: AdamW exp_avg_sq per token (mean over its coordinates)", xlabel="step",
           ylabel="exp_avg_sq (squared gradient units)")
    ax.text(0.01, 0.02, "exp_avg_sq.mul_(0.999) cannot change a normal bf16 value: it never decays",
            transform=ax.transAxes, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def update_ratio(histogram: pd.DataFrame, windows: dict, experiment: str, path: str) -> None:
    """Distribution of |update| / half the lattice spacing per window, against the threshold 1."""
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


def series(summaries: list[dict], name: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for summary in summaries:
        group = "dead" if summary["windows"]["all"]["dead"]["tokens"] else "all"
        cooling = summary["cooling"][group]
        ax.plot(cooling["window_centers"], cooling["global_freeze_fraction"], marker="o", ms=3,
                label=f"{summary['experiment']} ({group}): {cooling['verdict']}")
    ax.set(title=f"series {name}: globally frozen fraction of dead tokens per window", xlabel="step",
           ylabel="globally frozen fraction", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def experiment_figures(freeze_csv: str, summary_json: str, token_steps: str, exp_avg_sq_csv: str,
                       ratio_csv: str, outputs: dict[str, str]) -> None:
    import h5py

    summary = json.loads(Path(summary_json).read_text())
    frame = pd.read_csv(freeze_csv)
    name = summary["experiment"]
    loss(frame, name, outputs["loss"])
    with h5py.File(token_steps, "r") as handle:
        displacement(handle["norm"][...], handle["dead_mask"][...], name, outputs["displacement"])
    phases(frame, summary["thresholds"], name, outputs["phases"])
    global_freeze(frame, summary, name, outputs["global_freeze"])
    variance(pd.read_csv(exp_avg_sq_csv), name, outputs["variance"])
    update_ratio(pd.read_csv(ratio_csv), summary["windows"], name, outputs["update_ratio"])


def series_outputs(name: str, summary_paths: list[str], figure: str, table: str) -> None:
    """The series figure and a table of each experiment's verdict and the numbers behind it."""
    from thimble.freeze import write_csv

    summaries = [json.loads(Path(path).read_text()) for path in summary_paths]
    series(summaries, name, figure)
    rows = []
    for summary in summaries:
        for group, cooling in summary["cooling"].items():
            fit = cooling["trend_last_half"]
            last_half = summary["windows"]["last_half"][group]
            rows.append({"experiment": summary["experiment"], "group": group, "steps": summary["steps"],
                         "delta_w_exact": summary["delta_w_exact"],
                         "global_freeze_percent_last_half": last_half["global_freeze_percent"],
                         "slope_per_1000_steps": fit["slope_per_1000_steps"],
                         "ci95_low": fit["ci95"][0] if fit["ci95"] else None,
                         "ci95_high": fit["ci95"][1] if fit["ci95"] else None,
                         "verdict": cooling["verdict"]})
    write_csv(table, rows)
