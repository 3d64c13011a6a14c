"""Device benchmark: an experiment's whole chain of stages on one device, timed stage by stage, plus
reproducibility checked bit for bit. Prints one table (markdown) and writes it as JSON.

- the main run: ``thimble train`` for ``--steps`` steps, then rechunk, lattice, replay (on the
  recording's device) and freeze, each as the rules run it (``python -m thimble <stage>``);
- the recorder against the training step: the run's steps/s, and the same model stepped with no
  recording at all (``--rate-steps`` steps);
- reproducibility: two runs of ``--repro-steps`` steps compared bit for bit (W, grad_W, both
  moments, losses), and a third one killed with SIGKILL halfway and resumed, compared with them;
  and the trainer's own determinism check (``training.determinism_check_steps``) on the main run.

On a GPU, run it for each optimizer implementation: once with ``--optimizer-impl foreach``, once with ``--optimizer-impl fused``.

    python bench/gpu_bench.py --device cuda --tokens results/data/shakespeare/tokens.npy \\
        --masks results/data/shakespeare/live_dead_tokens.safetensors --workdir /tmp/gpu-bench
    python bench/gpu_bench.py --device cpu --experiment thimble_mini --steps 40 ...   # tested on the CPU

Without ``--tokens``/``--masks`` it trains on random tokens of the vocabulary (every token live).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def thimble(stage: str, *args: str, log: Path) -> float:
    """Run one stage as the rules do; seconds it took. A failure quotes its log."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "thimble", stage, *args], stderr=handle, env=stage_env())
    if result.returncode != 0:
        raise SystemExit(f"thimble {stage} failed ({result.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def stage_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))


def random_data(settings: dict, directory: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from thimble.data.masks import live_dead_masks

    vocab = settings["model"]["vocab_size"]
    tokens = np.random.default_rng(0).integers(0, vocab, size=200_000).astype(np.int32)
    np.save(directory / "tokens.npy", tokens)
    save_file(live_dead_masks(tokens, vocab), str(directory / "masks.safetensors"))
    return directory / "tokens.npy", directory / "masks.safetensors"


def train_args(settings: dict, tokens: Path, masks: Path, stream: Path, threads: int) -> list[str]:
    return ["--settings", json.dumps(settings), "--tokens", str(tokens), "--masks", str(masks), "--output",
            str(stream), "--partial", f"{stream}.partial", "--threads", str(threads)]


def same_bits(a: Path, b: Path) -> dict:
    """Elements that differ between two streams, per tensor (0 everywhere: bitwise identical)."""
    from thimble.record.format import TENSORS
    from thimble.record.reader import read_steps
    from thimble.record.stream_reader import open_stream

    out = {}
    with open_stream(a) as first, open_stream(b) as second:
        for name in TENSORS:
            out[name] = int((read_steps(first[name]).view(np.uint16) != read_steps(second[name]).view(np.uint16)).sum())
        losses_a, losses_b = first["losses"][...], second["losses"][...]
        out["losses"] = int((losses_a.view(np.uint32) != losses_b.view(np.uint32)).sum())
    return out


def killed_and_resumed(settings: dict, tokens: Path, masks: Path, stream: Path, threads: int, log: Path) -> float:
    """Train, SIGKILL once the partial directory holds half the run's segments, train again; seconds."""
    from thimble.record.format import list_segments

    args = [sys.executable, "-m", "thimble", "train", *train_args(settings, tokens, masks, stream, threads)]
    partial = Path(f"{stream}.partial")
    segments = (settings["training"]["steps"] + 1) // settings["record"]["segment_steps"]
    with open(log, "w") as handle:
        process = subprocess.Popen(args, stderr=handle, env=stage_env())
        while process.poll() is None:
            if partial.exists() and len(list_segments(partial)) >= max(1, segments // 2):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        process.wait()
    if stream.exists():
        raise SystemExit("the run finished before it could be killed: use more --repro-steps")
    return thimble("train", *train_args(settings, tokens, masks, stream, threads), log=log.with_suffix(".resume.log"))


def training_rate_without_recording(settings: dict, tokens: Path, steps: int) -> float:
    """Steps/s of the same model and optimizer with no recording (the seed's loop, nothing copied)."""
    import torch

    from thimble.training.model import build_model, build_optimizer, select_device

    device = select_device(settings["training"]["device"])
    torch.manual_seed(settings["training"]["seed"])
    model = build_model(settings["model"], device)
    optimizer = build_optimizer(model, settings["training"], device)
    data = torch.from_numpy(np.load(tokens).astype(np.int64))
    seq, batch = settings["model"]["max_seq_len"], settings["training"]["batch_size"]
    rng = np.random.default_rng(0)

    def step() -> None:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        windows = torch.stack([data[s: s + seq + 1] for s in starts]).to(device)
        loss = model(input_ids=windows[:, :-1], labels=windows[:, 1:]).loss
        loss.backward()
        optimizer.step(0)  # step numbers matter only to stochastic rounding's seeds
        optimizer.zero_grad()
        loss.item()  # the training loop reads the loss every step

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--steps", type=int, default=6000, help="steps of the main run (the experiment's: 6000)")
    parser.add_argument("--optimizer-impl", choices=("auto", "single_tensor", "foreach", "fused"),
                        help="training.optimizer_impl (default: the experiment's)")
    parser.add_argument("--repro-steps", type=int, default=600)
    parser.add_argument("--rate-steps", type=int, default=300)
    parser.add_argument("--tokens")
    parser.add_argument("--masks")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="recorder and stage threads")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json", help="also write the table's rows here")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from thimble.config import load_config

    settings = load_config(args.config)["experiments"][args.experiment]
    settings["training"]["device"] = args.device
    if args.optimizer_impl:
        settings["training"]["optimizer_impl"] = args.optimizer_impl
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tokens:
        tokens, masks = Path(args.tokens), Path(args.masks)
    else:
        tokens, masks = random_data(settings, workdir)

    rows: list[tuple[str, str]] = []
    main_run = json.loads(json.dumps(settings))
    main_run["training"]["steps"] = args.steps
    stream = workdir / "main" / "stream"
    stream.parent.mkdir(exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    seconds = {"train": thimble("train", *train_args(main_run, tokens, masks, stream, args.threads), log=logs / "train.log")}
    out = stream.parent
    main_text = json.dumps(main_run)
    seconds["rechunk"] = thimble("rechunk", "--settings", main_text, "--stream", str(stream), "--output",
                                 str(out / "recording.h5"), "--threads", str(args.threads), log=logs / "rechunk.log")
    seconds["lattice"] = thimble("lattice", "--recording", str(out / "recording.h5"), "--output",
                                 str(out / "delta_w_lattice.h5"), "--threads", str(args.threads), log=logs / "lattice.log")
    seconds["replay"] = thimble("replay", "--recording", str(out / "recording.h5"), "--table", str(out / "replay.csv"), "--summary",
                                str(out / "replay.json"), "--ratio-table", str(out / "update_ratio.csv"),
                                "--threads", str(args.threads), log=logs / "replay.log")
    seconds["freeze"] = thimble("freeze", "--settings", main_text, "--recording", str(out / "recording.h5"),
                                "--delta", str(out / "delta_w_lattice.h5"),
                                *[arg for name in ("freeze", "cycles", "tokens", "classes", "lattice-positions",
                                                   "variance", "token-steps", "summary")
                                  for arg in (f"--{name}", str(out / f"{name}.out"))],
                                "--threads", str(args.threads), log=logs / "freeze.log")

    import h5py

    from thimble.record.stream_reader import open_stream

    with open_stream(stream) as handle:
        attrs = {key: (v.decode() if isinstance(v, bytes) else v) for key, v in handle.attrs.items()}
    replay = json.loads((out / "replay.json").read_text())
    with h5py.File(out / "recording.h5", "r") as handle:
        shape = handle["W"].shape
    recorded_rate = args.steps / attrs["session_training_seconds"]
    bare_rate = training_rate_without_recording(main_run, tokens, args.rate_steps)

    rows.append(("device", f"{attrs['device']} ({attrs['device_name']}), torch {attrs['torch_version']}"))
    rows.append(("shape", f"{args.experiment}: W {shape[0]} x {shape[1]} x {shape[2]}, "
                          f"AdamW {attrs['optimizer_impl']}, {args.threads} CPU threads"))
    for stage, value in seconds.items():
        rows.append((f"{stage} (s)", f"{value:.1f}"))
    rows.append(("training with recording (steps/s)", f"{recorded_rate:.1f}"))
    rows.append(("training without recording (steps/s)", f"{bare_rate:.1f}"))
    rows.append(("recording / no recording", f"{recorded_rate / bare_rate:.2f}"))
    rows.append(("replay", f"{'bitwise' if replay['bitwise_match'] else replay['total_mismatches']} on "
                           f"{replay['replayed_on']['device']}; freeze criterion disagreements "
                           f"{replay['freeze_criterion']['disagreements']} of {replay['freeze_criterion']['elements']}"))
    check = json.loads(attrs["determinism_check"])
    rows.append(("determinism check", f"{check['result']}: steps {check['steps_compared']}, "
                                      f"{check['elements_compared']} elements, "
                                      f"{attrs['session_determinism_check_seconds']:.1f} s"))
    rows.append(("deterministic settings", ", ".join(f"{key}={attrs.get(key)!s}" for key in (
        "deterministic_algorithms", "cudnn_deterministic", "cublas_workspace_config", "math_threads",
        "compression_threads"))))

    repro = json.loads(json.dumps(settings))
    repro["training"]["steps"] = args.repro_steps
    repro["record"]["segment_steps"] = max(1, args.repro_steps // 6)
    streams = []
    for name in ("repro_a", "repro_b"):
        path = workdir / name / "stream"
        path.parent.mkdir(exist_ok=True)
        thimble("train", *train_args(repro, tokens, masks, path, args.threads), log=logs / f"{name}.log")
        streams.append(path)
    resumed = workdir / "repro_killed" / "stream"
    resumed.parent.mkdir(exist_ok=True)
    killed_and_resumed(repro, tokens, masks, resumed, args.threads, logs / "repro_killed.log")
    rows.append((f"two runs of {args.repro_steps} steps: differing elements", str(same_bits(*streams))))
    rows.append(("killed halfway and resumed vs uninterrupted", str(same_bits(streams[0], resumed))))

    width = max(len(key) for key, _ in rows)
    print(f"| {'what'.ljust(width)} | measured |\n| {'-' * width} | --- |")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
