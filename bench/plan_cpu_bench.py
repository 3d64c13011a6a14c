"""The plan on a CPU unlike the probe's: its rescaled step time against a measured training step.

For each CPU kernel set asked for (``ATEN_CPU_CAPABILITY``, which torch honours: on an AVX-512 machine
``avx2`` runs the AVX2 kernels, the ~8x slower bf16 path of the shipped probe's machine), in a fresh
process with that setting:

1. the plan's step time: what ``thimble plan`` predicts with the experiment's calibration (cached or
   shipped), rescaled by the local timing of its model when the calibration is of another CPU
   (``thimble.plan.machine``; the timing is done here, as the plan would, in a scratch workdir);
2. a measured step: ``thimble train`` of the experiment for ``--steps`` steps on random tokens (recording
   included), its steady seconds per step (the first, warm-up step apart).

    python bench/plan_cpu_bench.py --experiment thimble_7 --capabilities avx2 avx512 --steps 4 --workdir /tmp/pcb
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PREDICT = r"""
import json, logging, sys
from pathlib import Path
from thimble.config import load_config
from thimble.plan import calibration, machine
settings = load_config(sys.argv[1])["experiments"][sys.argv[2]]
workdir = Path(sys.argv[3])
own = calibration.own_calibration(settings, "random", "cpu", workdir)
found = calibration.training_seconds(settings, "cpu", workdir, own)
assert found is not None, "no CPU calibration"
_, timed = found
if timed.foreign:
    machine.ensure_step_time(workdir, timed.record, settings, logging.getLogger("bench"))
    _, timed = calibration.training_seconds(settings, "cpu", workdir, own)
print(json.dumps({"calibration": str(timed.path), "probe_cpu": machine.probe_cpu(timed.record),
                  "this_cpu": machine.this_cpu(), "probe_seconds_per_step": timed.record["seconds_per_step"],
                  "predicted_seconds_per_step": timed.record["seconds_per_step"] * timed.scale, "note": timed.note}))
"""


def environment(capability: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return env


def measured_step(settings: dict, capability: str, steps: int, workdir: Path) -> dict:
    import h5py
    import numpy as np
    from safetensors.torch import save_file

    from thimble.data.masks import live_dead_masks

    vocab = settings["model"]["vocab_size"]
    tokens = np.random.default_rng(0).integers(0, vocab, size=200_000).astype(np.int32)
    np.save(workdir / "tokens.npy", tokens)
    save_file(live_dead_masks(tokens, vocab), str(workdir / "masks.safetensors"))
    run = json.loads(json.dumps(settings))
    run["training"].update(steps=steps, device="cpu")
    stream = workdir / f"stream-{capability}"
    subprocess.run([sys.executable, "-m", "thimble", "train", "--settings", json.dumps(run), "--tokens",
                    str(workdir / "tokens.npy"), "--masks", str(workdir / "masks.safetensors"), "--output",
                    str(stream), "--partial", f"{stream}.partial", "--threads", "2",
                    "--determinism-check-steps", "0"], check=True,
                   env=environment(capability), stderr=subprocess.DEVNULL)
    with h5py.File(stream / "stream.h5", "r") as handle:
        attrs = dict(handle.attrs)
    first = float(attrs["session_first_step_seconds"])
    return {"cpu_capability": str(attrs["cpu_capability"]),
            "seconds_per_step": (float(attrs["session_training_seconds"]) - first) / (steps - 1),
            "first_step_seconds": first}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--experiment", default="thimble_7")
    parser.add_argument("--capabilities", nargs="+", default=["avx2", "avx512"])
    parser.add_argument("--steps", type=int, default=4, help="steps of the measured training run")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from thimble.config import load_config

    settings = load_config(args.config)["experiments"][args.experiment]
    rows = []
    for capability in args.capabilities:
        workdir = args.workdir / capability
        workdir.mkdir(parents=True, exist_ok=True)
        predicted = json.loads(subprocess.run([sys.executable, "-c", PREDICT, args.config, args.experiment,
                                               str(workdir)], check=True, capture_output=True, text=True,
                                              env=environment(capability), cwd=REPO).stdout.splitlines()[-1])
        measured = measured_step(settings, capability, args.steps, workdir)
        rows.append({"ATEN_CPU_CAPABILITY": capability, **predicted, "measured": measured,
                     "predicted_over_measured": predicted["predicted_seconds_per_step"] / measured["seconds_per_step"]})
    print(f"| ATEN_CPU_CAPABILITY | probe's CPU | probe s/step | plan s/step | measured s/step | plan / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        probe = row["probe_cpu"]
        print(f"| {row['ATEN_CPU_CAPABILITY']} ({row['this_cpu']['device_name']}) | {probe['device_name']}, "
              f"{probe['cpu_capability']} | {row['probe_seconds_per_step']:.2f} | {row['predicted_seconds_per_step']:.2f} "
              f"| {row['measured']['seconds_per_step']:.2f} | {row['predicted_over_measured']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
