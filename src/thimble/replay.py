"""Replay AdamW from the recording, bit for bit, and test the freeze criterion.

From W[t-1], exp_avg[t-1], exp_avg_sq[t-1], grad_W[t] and t, one AdamW step is
recomputed with the operations, order and dtype of torch's single-tensor AdamW
(the path torch takes on the CPU): ``lerp_`` for exp_avg; ``mul_`` then
``addcmul_`` for exp_avg_sq; ``sqrt``, divide by sqrt of the bias correction,
add eps; ``addcdiv_`` on the weight; every result rounded to bf16. The result is
compared with the recorded W[t], exp_avg[t], exp_avg_sq[t] element by element.

Alongside, per element, the update before rounding u = -lr/bc1 * m/denom and
the ratio of |u| to half the lattice spacing in the direction of the move:
below 1 the rounded weight cannot move (the freeze criterion). The predicted
frozen elements are compared with the observed ones (ΔW′ = 0).

CPU results depend on the kernel torch dispatches to (ATEN_CPU_CAPABILITY:
the default, AVX2 and AVX512 kernels differ in fused multiply-adds), so the
replay reports what it ran on beside what the run recorded.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from thimble.bf16 import BFLOAT16
from thimble.lattice import ordinal, spacing_toward

log = logging.getLogger(__name__)

#: bin edges of log2(|u| / half spacing); the first bin also takes u = 0, the last everything above
RATIO_EDGES = np.arange(-24, 9)
RATIO_COLUMNS = [f"log2ratio_{edge}" for edge in (RATIO_EDGES[0] - 1, *RATIO_EDGES)]

COLUMNS = ("step", "W_mismatches", "momentum_mismatches", "variance_mismatches", "predicted_frozen",
           "observed_frozen", "freeze_agreement", "elements")


def adamw_step(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, step: int, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float):
    """One step of torch's single-tensor AdamW on copies; returns (w, m, v, denom, step_size)."""
    w, m, v = w.clone(), m.clone(), v.clone()
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(step)  # torch keeps the step count in a float32 tensor and reads it with .item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)
    return w, m, v, denom, step_size


def update_ratio(w_before: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float) -> np.ndarray:
    """|u| / (half the lattice spacing toward the move), u = -step_size * m / denom before rounding."""
    update = -step_size * m.double().numpy() / denom.double().numpy()
    before = w_before.contiguous().view(torch.int16).numpy().view(BFLOAT16)
    half_spacing = spacing_toward(before, np.sign(update)) / 2
    return np.abs(update) / half_spacing


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


def ratio_histogram(ratio: np.ndarray) -> np.ndarray:
    """Counts of log2(ratio) in RATIO_COLUMNS' bins."""
    with np.errstate(divide="ignore"):
        bins = np.digitize(np.log2(ratio.reshape(-1)), RATIO_EDGES)
    return np.bincount(bins, minlength=len(RATIO_COLUMNS))


def replay_stream(stream_dir: str, output_csv: str, output_json: str, ratio_csv: str) -> dict:
    """Replay every step of a recorded stream; write the per-step table, the update-ratio histograms
    and a summary."""
    from thimble.files import atomic_output
    from thimble.record import open_stream, read_steps_torch

    with open_stream(stream_dir) as stream:
        attrs = dict(stream.attrs)
        storage = attrs.get("storage_dtype")
        if storage == "float16":
            log.warning("%s stores float16 (record.dtype float16): the replay reads the stored values back as "
                        "bf16, so it reports mismatches wherever float16 altered them", stream_dir)
        hyper = {"lr": float(attrs["learning_rate"]), "beta1": float(attrs["adam_beta1"]),
                 "beta2": float(attrs["adam_beta2"]), "eps": float(attrs["adam_epsilon"]),
                 "weight_decay": float(attrs["weight_decay"])}
        last = stream["W"].shape[0] - 1
        rows, histograms = [], []
        # float16 storage is read back as torch casts it to bf16 (round to nearest even)
        read = lambda name, t: read_steps_torch(stream[name], t, t + 1)[0].to(torch.bfloat16)  # noqa: E731
        w_before, m_before, v_before = read("W", 0), read("momentum_W", 0), read("variance_W", 0)
        for step in tqdm(range(1, last + 1), desc="replay", unit="step", mininterval=5):
            w_after, m_after, v_after = read("W", step), read("momentum_W", step), read("variance_W", step)
            w, m, v, denom, step_size = adamw_step(w_before, m_before, v_before, read("grad_W", step), step, **hyper)
            ratio = update_ratio(w_before, m, denom, step_size)
            predicted = ratio < 1
            histograms.append(ratio_histogram(ratio))
            w_bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
            observed = ordinal(w_bits(w_after)) == ordinal(w_bits(w_before))
            rows.append({
                "step": step,
                "W_mismatches": mismatches(w, w_after),
                "momentum_mismatches": mismatches(m, m_after),
                "variance_mismatches": mismatches(v, v_after),
                "predicted_frozen": int(predicted.sum()),
                "observed_frozen": int(observed.sum()),
                "freeze_agreement": float((predicted == observed).mean()),
                "elements": int(observed.size),
            })
            w_before, m_before, v_before = w_after, m_after, v_after

    replay_env = {"device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "torch_version": str(torch.__version__)}
    recorded_env = {key: attrs.get(key) for key in ("device", "cpu_capability", "torch_version")}
    recorded_env = {key: (value.decode() if isinstance(value, bytes) else str(value)) for key, value in recorded_env.items()}
    totals = {column: int(sum(row[column] for row in rows)) for column in COLUMNS[1:4]}
    summary = {
        "steps": last,
        "storage_dtype": storage,
        "replayed_on": replay_env,
        "recorded_on": recorded_env,
        "same_kernel": replay_env == recorded_env,
        "total_mismatches": totals,
        "steps_with_mismatches": sum(1 for row in rows if row["W_mismatches"] or row["momentum_mismatches"]
                                     or row["variance_mismatches"]),
        "bitwise_match": not any(totals.values()),
        "mean_freeze_agreement": float(np.mean([row["freeze_agreement"] for row in rows])) if rows else None,
        "min_freeze_agreement": float(min(row["freeze_agreement"] for row in rows)) if rows else None,
    }
    with atomic_output(output_csv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_output(ratio_csv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *RATIO_COLUMNS])
        for step, counts in enumerate(histograms, start=1):
            writer.writerow([step, *counts.tolist()])
    with atomic_output(output_json) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["bitwise_match"]:
        log.info("replay matches the recording bit for bit at all %d steps (%s)", last, replay_env)
    else:
        log.warning("replay differs from the recording: %s over %d steps with mismatches (replayed on %s, "
                    "recorded on %s)", totals, summary["steps_with_mismatches"], replay_env, recorded_env)
    log.info("freeze criterion vs observed ΔW′ = 0: mean agreement %.6f, min %.6f",
             summary["mean_freeze_agreement"] or 0, summary["min_freeze_agreement"] or 0)
    return summary
