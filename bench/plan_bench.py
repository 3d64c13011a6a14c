"""How close `thimble plan` comes to a real run: every predicted file size and stage peak RAM.

    python bench/plan_bench.py --workdir /tmp/thimble-plan-bench [--experiment thimble_mini]

Builds the experiment's data stages, plans the experiment (probing it), runs it through
Snakemake with each stage reporting its own peak RSS (THIMBLE_PEAK_RSS_DIR), and prints
predicted against actual as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from thimble.plan import existing_bytes, human_bytes
from thimble.record.stream_reader import open_stream

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--experiment", default="thimble_mini")
    parser.add_argument("--probe-steps", type=int, default=24)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    workdir, name = args.workdir, args.experiment
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                 str(workdir), "--cores", str(args.cores)]
    config = json.loads(subprocess.run([sys.executable, "-c", (
        "import json, sys; from thimble.config import load_config; "
        f"print(json.dumps(load_config(sys.argv[1])['experiments']['{name}']))"), str(workdir / "config.yaml")],
        check=True, capture_output=True, text=True).stdout)
    run([*snakemake, f"results/data/{config['dataset']}/live_dead_tokens.safetensors"])

    targets = [f"results/{name}/freeze.csv", f"results/{name}/replay.csv", f"results/{name}/figures/loss.png"]
    plan_seconds = run([sys.executable, "-m", "thimble", "plan", "--directory", str(workdir), "--probe-steps",
                        str(args.probe_steps), "--json", str(workdir / "plan.json"), *targets])
    plan = json.loads((workdir / "plan.json").read_text())["experiments"][name]
    peaks = workdir / "peaks"
    peaks.mkdir()
    run_seconds = run([*snakemake, *targets], env=dict(os.environ, THIMBLE_PEAK_RSS_DIR=str(peaks)))

    print(f"\n{name}: plan (probe {plan['probe_steps']} steps, {plan['token_source']} tokens) "
          f"{plan_seconds:.1f} s; the run {run_seconds:.1f} s\n")
    print("| file | predicted | actual | predicted / actual |")
    print("| --- | ---: | ---: | ---: |")
    for file in plan["files"]:
        if file["predicted"]:
            actual = existing_bytes(workdir / file["path"])
            print(f"| `{file['relative']}` | {human_bytes(file['bytes'])} | {human_bytes(actual)} | "
                  f"{file['bytes'] / actual:.3f} |")
    print("\n| stage | predicted peak RAM | measured peak RSS | predicted / measured |")
    print("| --- | ---: | ---: | ---: |")
    for stage, predicted in plan["peak_ram_bytes"].items():
        measured = int((peaks / f"{stage}.peak_rss").read_text())
        print(f"| {stage} | {human_bytes(predicted)} | {human_bytes(measured)} | {predicted / measured:.3f} |")
    timed = plan["training_seconds"]["cpu"]
    with open_stream(workdir / f"results/{name}/stream") as stream:
        seconds, steps = float(stream.attrs["session_training_seconds"]), int(stream.attrs["session_trained_steps"])
    print(f"\ntraining on CPU: predicted {timed['seconds']:.2f} s ({timed['seconds_per_step']:.4f} s/step), "
          f"measured {seconds:.2f} s ({seconds / steps:.4f} s/step): {timed['seconds'] / seconds:.3f}")


if __name__ == "__main__":
    main()
