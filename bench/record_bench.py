"""Recorder benchmark: thimble-size steps through four recorders, and training with/without recording.

Prints, side by side, on the same real data:
- the seed notebook's recorder (float16, gzip level 1, one synchronous write per tensor per step);
- plain uncompressed h5py writes of the bf16 bits (one synchronous write per tensor per step);
- thimble's StreamRecorder (background thread, shuffle+zstd in worker threads, direct chunk writes),
  with zstd's frame checksums (as shipped) and without them, alternating, to give their ratio;
- what the disk takes (raw bytes written and fsynced);
then the ratio of training speed with recording to without, at the experiment's size.

The data are real: the first ``--real-steps`` steps of the experiment's model trained on its
tokens (at ``--data-batch-size``, so that they take a minute on a CPU), cycled to ``--steps``.

    python bench/record_bench.py --config config.yaml --experiment thimble_7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zstandard

import thimble.record.codec
from thimble.config import load_config
from thimble.numerics.bf16 import torch_to_bits
from thimble.record.codec import unshuffle_into
from thimble.record.format import TENSORS, list_segments
from thimble.record.writer import StreamRecorder
from thimble.training.model import build_model, build_optimizer, select_device
from thimble.util.cpu import this_cpu


class Trainer:
    """The experiment's model and optimizer, stepping on random windows of the tokens."""

    def __init__(self, settings: dict, tokens: np.ndarray, batch_size: int, device, seed: int):
        torch.manual_seed(settings["training"]["seed"])
        self.model = build_model(settings["model"], device)
        self.optimizer = build_optimizer(self.model, settings["training"], device)
        self.wte = self.model.transformer.wte.weight
        self.tokens, self.batch_size, self.device = tokens, batch_size, device
        self.seq = settings["model"]["max_seq_len"]
        self.rng = np.random.default_rng(seed)

    def step(self, capture: bool) -> dict | None:
        """One training step; with ``capture``, CPU copies of what the recorder takes."""
        starts = self.rng.integers(0, len(self.tokens) - self.seq - 1, size=self.batch_size)
        windows = np.stack([self.tokens[s: s + self.seq + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows).to(self.device)
        loss = self.model(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
        loss.backward()
        grad = self.wte.grad.detach().to("cpu", copy=True)
        self.optimizer.step(0)  # step numbers matter only to stochastic rounding's seeds
        self.optimizer.zero_grad()
        captured = None
        if capture:
            captured = {"W": self.wte.detach().to("cpu", copy=True), "grad_W": grad,
                        **self.optimizer.recorded_state(self.wte), "loss": loss.item()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return captured


def real_steps(settings: dict, tokens: np.ndarray, n_steps: int, batch_size: int, device) -> list[dict]:
    """The first ``n_steps`` recorded tensors of real training (CPU copies)."""
    trainer = Trainer(settings, tokens, batch_size, device, seed=0)
    return [trainer.step(capture=True) for _ in range(n_steps)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def seed_recorder(data: list[dict], n_steps: int, path: Path) -> tuple[float, int]:
    """The notebook's recorder, as written there."""
    vocab, hidden = data[0]["W"].shape
    start = time.perf_counter()
    with h5py.File(path, "w") as h5file:
        dsets = {name: h5file.create_dataset(name, shape=(n_steps, vocab, hidden), dtype="float16",
                                             chunks=(1, vocab, hidden), compression="gzip", compression_opts=1)
                 for name in TENSORS}
        losses = h5file.create_dataset("losses", shape=(n_steps,), dtype="float32", chunks=(min(1000, n_steps),),
                                       compression="gzip", compression_opts=1)
        for step in range(n_steps):
            item = data[step % len(data)]
            for name in TENSORS:
                dsets[name][step] = item[name].float().numpy()
            losses[step] = item["loss"]
    return n_steps / (time.perf_counter() - start), path.stat().st_size


def plain_h5py(data: list[dict], n_steps: int, path: Path) -> tuple[float, int]:
    vocab, hidden = data[0]["W"].shape
    start = time.perf_counter()
    with h5py.File(path, "w") as h5file:
        dsets = {name: h5file.create_dataset(name, shape=(n_steps, vocab, hidden), dtype="uint16",
                                             chunks=(1, vocab, hidden)) for name in TENSORS}
        for step in range(n_steps):
            item = data[step % len(data)]
            for name in TENSORS:
                dsets[name][step] = torch_to_bits(item[name])
    return n_steps / (time.perf_counter() - start), path.stat().st_size


def stored_bits(dataset: h5py.Dataset) -> np.ndarray:
    """The uint16 rows of a one-step-per-chunk shuffle+zstd dataset, decoded chunk by chunk."""
    out = np.empty(dataset.shape, dtype=np.uint16)
    for step in range(dataset.shape[0]):
        _, raw = dataset.id.read_direct_chunk((step, 0, 0))
        unshuffle_into(np.frombuffer(zstandard.ZstdDecompressor().decompress(raw), dtype=np.uint8), out[step])
    return out


def thimble_recorder(data: list[dict], n_steps: int, directory: Path, threads: int, level: int) -> tuple[float, int]:
    vocab, hidden = data[0]["W"].shape
    start = time.perf_counter()
    recorder = StreamRecorder(directory, (vocab, hidden), n_steps - 1, segment_steps=100, queue_steps=64,
                              level=level, threads=threads)
    for step in range(n_steps):
        item = data[step % len(data)]
        recorder.record(step, {name: item[name] for name in TENSORS}, item["loss"])
    recorder.close()
    rate = n_steps / (time.perf_counter() - start)
    # lossless: every stored bit equals the input (decoded here without the readers' checksum demand,
    # so that the checksums-off rounds can be checked too)
    for first, last, path in list_segments(directory):
        with h5py.File(path, "r") as segment:
            for name in TENSORS:
                stored = stored_bits(segment[name])
                for row, step in enumerate(range(first, last + 1)):
                    if not np.array_equal(stored[row], torch_to_bits(data[step % len(data)][name])):
                        raise AssertionError(f"step {step} {name} differs after recording")
    return rate, dir_bytes(directory)


@contextlib.contextmanager
def checksums(enabled: bool):
    """The recorder's compressor with or without zstd's frame checksum (thimble always writes it; off is
    only for this comparison: thimble's readers refuse such frames)."""
    shipped = thimble.record.codec.zstd_compressor
    if not enabled:
        thimble.record.codec.zstd_compressor = lambda level, threads=0: zstandard.ZstdCompressor(level=level,
                                                                                          threads=threads)
    try:
        yield
    finally:
        thimble.record.codec.zstd_compressor = shipped


def disk_rate(data: list[dict], n_steps: int, path: Path) -> float:
    payload = b"".join(torch_to_bits(data[0][name]).tobytes() for name in TENSORS)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(n_steps):
            handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return n_steps / (time.perf_counter() - start)


def training_ratio(settings: dict, tokens: np.ndarray, steps: int, rounds: int, threads: int, device,
                   directory: Path) -> tuple[float, float, float]:
    """Seconds per step without and with recording (alternating rounds), and their speed ratio."""
    trainer = Trainer(settings, tokens, settings["training"]["batch_size"], device, seed=1)
    vocab, hidden = trainer.wte.shape
    trainer.step(capture=False)  # warm-up
    without, with_recording = [], []
    for round_index in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step(capture=False)
        without.append((time.perf_counter() - start) / steps)
        target = directory / f"round{round_index}"
        recorder = StreamRecorder(target, (vocab, hidden), steps - 1, segment_steps=steps,
                                  level=settings["record"]["compression_level"], threads=threads)
        start = time.perf_counter()
        for step in range(steps):
            captured = trainer.step(capture=True)
            recorder.record(step, {name: captured[name] for name in TENSORS}, captured["loss"])
        recorder.close()
        with_recording.append((time.perf_counter() - start) / steps)
        shutil.rmtree(target)
    plain, recorded = statistics.median(without), statistics.median(with_recording)
    return plain, recorded, plain / recorded


def measure_training(args, settings, tokens, device, workdir) -> tuple[float, float, float]:
    print(f"\ntraining {args.experiment} at batch {settings['training']['batch_size']} on {device}: "
          f"{args.train_rounds} alternating rounds of {args.train_steps} steps")
    plain_s, recorded_s, ratio = training_ratio(settings, tokens, args.train_steps, args.train_rounds,
                                                args.threads, device, workdir)
    print(f"without recording {plain_s:.3f} s/step, with recording {recorded_s:.3f} s/step: "
          f"speed ratio {ratio:.3f} (target >= 0.95)")
    return plain_s, recorded_s, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--tokens", help="token ids (.npy); default results/data/<dataset>/tokens.npy")
    parser.add_argument("--steps", type=int, default=300, help="steps through each fast recorder")
    parser.add_argument("--seed-steps", type=int, default=60, help="steps through the (slow) seed recorder")
    parser.add_argument("--real-steps", type=int, default=24, help="distinct real training steps to cycle")
    parser.add_argument("--data-batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=2, help="steps per timed training round")
    parser.add_argument("--train-rounds", type=int, default=3, help="alternating rounds without/with recording")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--checksum-rounds", type=int, default=2,
                        help="alternating rounds of the StreamRecorder with checksums on and off")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    settings = load_config(args.config)["experiments"][args.experiment]
    tokens_path = args.tokens or f"results/data/{settings['dataset']}/tokens.npy"
    tokens = np.load(tokens_path)
    torch.set_num_threads(args.threads)
    device = select_device(settings["training"]["device"])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="thimble-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vocab, hidden = settings["model"]["vocab_size"], settings["model"]["hidden_dim"]
    cpu = this_cpu()
    print(f"machine: {cpu['device_name']} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cpu capability {cpu['cpu_capability']}, device {device}, threads {args.threads}")
    print(f"experiment {args.experiment}: {len(TENSORS)} tensors of {vocab} x {hidden} bf16 per step "
          f"({len(TENSORS) * vocab * hidden * 2 / 1e6:.2f} MB)")

    start = time.perf_counter()
    cache = workdir / f"real_steps_{args.experiment}_{args.real_steps}x{args.data_batch_size}.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        data = real_steps(settings, tokens, args.real_steps, args.data_batch_size, device)
        torch.save(data, cache)
    print(f"generated {len(data)} real steps in {time.perf_counter() - start:.0f} s "
          f"(batch {args.data_batch_size}); cycled to {args.steps} steps")

    results = {}
    os.sync()  # each recorder starts with no dirty pages of the one before
    seed_rate, seed_size = seed_recorder(data, args.seed_steps, workdir / "seed.h5")
    results["seed recorder (float16, gzip-1, sync)"] = (seed_rate, seed_size / args.seed_steps)
    os.sync()
    plain_rate, plain_size = plain_h5py(data, args.steps, workdir / "plain.h5")
    results["plain h5py, uncompressed bf16, sync"] = (plain_rate, plain_size / args.steps)
    rates: dict[bool, list[float]] = {True: [], False: []}
    sizes: dict[bool, int] = {}
    for _ in range(max(1, args.checksum_rounds)):
        for enabled in (True, False):
            shutil.rmtree(workdir / "stream", ignore_errors=True)
            os.sync()
            with checksums(enabled):
                rate, sizes[enabled] = thimble_recorder(data, args.steps, workdir / "stream", args.threads,
                                                        settings["record"]["compression_level"])
            rates[enabled].append(rate)
    ours_rate, ours_size = statistics.median(rates[True]), sizes[True]
    results["thimble StreamRecorder (bf16, shuffle+zstd)"] = (ours_rate, ours_size / args.steps)
    results["  the same, zstd checksums off"] = (statistics.median(rates[False]), sizes[False] / args.steps)
    os.sync()
    results["disk (raw bytes + fsync)"] = (disk_rate(data, args.steps, workdir / "raw.bin"), None)

    print(f"\n{'recorder':<46} {'steps/s':>9} {'MB/step':>9}")
    for name, (rate, per_step) in results.items():
        size = f"{per_step / 1e6:9.3f}" if per_step is not None else f"{'-':>9}"
        print(f"{name:<46} {rate:9.1f} {size}")
    print(f"StreamRecorder with checksums, per round: {', '.join(f'{r:.1f}' for r in rates[True])} steps/s; "
          f"without: {', '.join(f'{r:.1f}' for r in rates[False])}; median ratio on/off "
          f"{ours_rate / statistics.median(rates[False]):.3f}")
    size_ratio = (ours_size / args.steps) / (seed_size / args.seed_steps)
    print(f"thimble vs seed: {ours_rate / seed_rate:.1f}x the steps/s, file {size_ratio:.3f} of the seed's size "
          f"(lossless vs lossy float16)")

    plain_s = recorded_s = ratio = None
    if args.train_rounds > 0:
        plain_s, recorded_s, ratio = measure_training(args, settings, tokens, device, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "recorders": {name: {"steps_per_s": rate, "bytes_per_step": size} for name, (rate, size) in results.items()},
            "size_ratio_vs_seed": size_ratio,
            "checksum_rounds": {"on": rates[True], "off": rates[False]},
            "training": {"seconds_per_step_without": plain_s, "seconds_per_step_with": recorded_s, "ratio": ratio},
        }, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
