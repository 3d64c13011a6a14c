"""Update-rule benchmark: training steps/s of one experiment under each ``training.update_rule``,
recording included (``thimble train`` as the rule runs it), measured side by side in interleaved
rounds so that load on a shared machine falls on every rule alike. Prints a markdown table.

    python bench/update_rules_bench.py --experiment thimble_small --steps 600 --rounds 3 \\
        --tokens results/data/shakespeare_1k/tokens.npy --masks results/data/shakespeare_1k/live_dead_tokens.safetensors
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import REPO, thimble, train_args  # noqa: E402  (the same stage runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--experiment", default="thimble_small")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the train job's threads (compression)")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--masks", required=True)
    args = parser.parse_args()

    from thimble.config import load_config
    from thimble.update_rules import UPDATE_RULES

    base = load_config(args.config)["experiments"][args.experiment]
    rates: dict[str, list[float]] = {rule: [] for rule in UPDATE_RULES}
    workdir = Path(tempfile.mkdtemp(prefix="update-rules-bench-"))
    try:
        for round_ in range(args.rounds):
            for rule in UPDATE_RULES:
                settings = {**base, "training": {**base["training"], "update_rule": rule, "steps": args.steps}}
                stream = workdir / f"{rule}-{round_}"
                thimble("train", *train_args(settings, Path(args.tokens), Path(args.masks), stream, args.threads),
                        log=workdir / f"{rule}-{round_}.log")
                with h5py.File(stream / "stream.h5") as handle:  # the trainer's own clock, start-up excluded
                    rates[rule].append(handle.attrs["session_trained_steps"] / handle.attrs["session_training_seconds"])
                shutil.rmtree(stream)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    reference = statistics.median(rates["bf16"])
    print(f"| update_rule | steps/s (median of {args.rounds}) | rounds | vs bf16 |")
    print("| --- | --- | --- | --- |")
    for rule, values in rates.items():
        median = statistics.median(values)
        print(f"| {rule} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
