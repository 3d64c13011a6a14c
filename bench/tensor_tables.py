"""docs/tensors.md's tables, printed as Markdown from experiments' results (nothing typed in by hand).

    python bench/tensor_tables.py thimble_small_all thimble_wide_all thimble_7_all [--results results]

Per experiment: every recorded tensor's shape, verdict, globally frozen share of steps and first such step,
the share of its elements unmoved over the last trend window, its onset and driver (summary.json), its replay
mismatches (replay.json) and moves in all (delta_w_lattice.h5); then the whole model's share of unmoved
element-steps (replay.json's freeze criterion), over the run and over its last tenth (replay.csv).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import pandas as pd


def tensor_table(directory: Path) -> list[str]:
    summary = json.loads((directory / "summary.json").read_text())
    replay = json.loads((directory / "replay.json").read_text())
    lines = [f"**{summary['experiment']}** ({summary['steps']} steps; replay bitwise match: "
             f"{replay['bitwise_match']}, freeze-criterion disagreements: "
             f"{replay['freeze_criterion']['disagreements']} of {replay['freeze_criterion']['elements']:,} "
             "element-steps)", "",
             "| tensor | shape | verdict | globally frozen (share of steps) | first globally frozen step | "
             "unmoved, last window | onset | driver | element moves | replay mismatches |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    with h5py.File(directory / "delta_w_lattice.h5") as delta:
        for name, entry in summary["tensors"].items():
            replayed = replay["tensors"].get(name, {})
            mismatches = sum(replayed.get("total_mismatches", {}).values()) if replayed else "not replayed"
            moves = int(delta[f"params/{name}/moves_per_step"][...].sum())
            first = entry["first_global_freeze_step"]
            lines.append(
                f"| {name.removeprefix('transformer.')} | {' x '.join(map(str, replayed.get('shape', [])))} | "
                f"{entry['verdict']} | {entry['global_freeze_share']:.3f} | {'–' if first is None else first} | "
                f"{entry['frozen_element_share_last_window']:.2f} | "
                f"{'–' if entry['onset_step'] is None else entry['onset_step']} | {entry['driver'] or '–'} | "
                f"{moves:,} | {mismatches} |")
    return lines


def vanished_updates(directory: Path) -> str:
    replay = json.loads((directory / "replay.json").read_text())
    tensors = replay["tensors"]
    elements = sum(entry["freeze_criterion"]["elements"] for entry in tensors.values())
    unmoved = sum(entry["freeze_criterion"]["observed_frozen"] for entry in tensors.values())
    steps = pd.read_csv(directory / "replay.csv", usecols=["tensor", "step", "observed_frozen", "elements"])
    last = steps[steps["step"] > 0.9 * steps["step"].max()]
    embedding = tensors.get("transformer.wte.weight", {}).get("freeze_criterion")
    parts = [f"whole model {unmoved / elements:.3f} of {elements:,} element-steps unmoved, "
             f"{last['observed_frozen'].sum() / last['elements'].sum():.3f} over the last tenth"]
    if embedding:
        rest = (unmoved - embedding["observed_frozen"]) / (elements - embedding["elements"])
        parts.append(f"the embedding {embedding['observed_frozen'] / embedding['elements']:.3f}, the other "
                     f"{len(tensors) - 1} tensors {rest:.3f}")
    return f"{directory.name}: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    for experiment in args.experiments:
        print("\n".join(tensor_table(Path(args.results) / experiment)), end="\n\n")
    for experiment in args.experiments:
        print(vanished_updates(Path(args.results) / experiment))


if __name__ == "__main__":
    main()
