"""Each analysis stage's time and peak RAM against the tensors an experiment records.

    python bench/stage_costs.py thimble_small thimble_small_all thimble_wide thimble_wide_all [--cores 2]

For each experiment, one after another, Snakemake runs its analysis stages again (``--forcerun`` lattice, replay,
freeze_drivers, freeze and figures; its recording.h5 must exist) with ``THIMBLE_PEAK_RSS_DIR`` set to a folder of
its own, where each stage writes its peak RSS and wall seconds (``thimble.util.usage``). Prints, per stage, each
experiment's seconds and peak RSS beside its recorded tensors and values a step, and each ``*_all`` experiment's
ratio to the experiment of the same name without the suffix. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("lattice", "replay", "freeze_drivers", "freeze", "figures")


def run_stages(experiment: str, cores: int, usage_dir: Path) -> None:
    usage_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--forcerun", *STAGES, "--nolock",
               f"results/{experiment}/summary.html"]
    subprocess.run(command, check=True, env={**os.environ, "THIMBLE_PEAK_RSS_DIR": str(usage_dir)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_usage(usage_dir: Path) -> dict[str, tuple[float, int]]:
    return {stage: (float((usage_dir / f"{stage}.seconds").read_text()),
                    int((usage_dir / f"{stage}.peak_rss").read_text()))
            for stage in STAGES if (usage_dir / f"{stage}.seconds").exists()}


def recorded(experiment: str) -> tuple[int, int]:
    """(parameters, values a step) of the experiment's recording."""
    import h5py

    from thimble.record.format import RecordLayout

    with h5py.File(f"results/{experiment}/recording.h5") as handle:
        params = RecordLayout.of_file(handle).params
    values = sum(math.prod(param.shape) for param in params.values())
    return len(params), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stage_costs_"))
    measured = {}
    for experiment in args.experiments:
        run_stages(experiment, args.cores, scratch / experiment)
        measured[experiment] = {"recorded": recorded(experiment), "stages": read_usage(scratch / experiment)}
    print("| stage | " + " | ".join(f"{name} ({tensors} tensors, {values:,} values)" for name, entry in
                                     measured.items() for tensors, values in [entry["recorded"]]) + " |")
    print("| --- |" + " ---: |" * len(measured))
    for stage in STAGES:
        cells = []
        for name, entry in measured.items():
            seconds, peak = entry["stages"].get(stage, (float("nan"), 0))
            base = measured.get(name.removesuffix("_all")) if name.endswith("_all") else None
            ratio = ""
            if base and stage in base["stages"]:
                base_seconds, base_peak = base["stages"][stage]
                ratio = f" ({seconds / base_seconds:.2f}x, {peak / base_peak:.2f}x)"
            cells.append(f"{seconds:.1f} s, {peak / 1e6:.0f} MB{ratio}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
