"""The tables of docs/float16.md, printed as Markdown from the float16_effect outputs of each experiment.

    python bench/float16_tables.py thimble_small thimble_wide thimble_7 [--results results]

Per experiment: what float16 storage did to each recorded tensor (float16_effect.json's ``tensors``), where
in magnitude it acted on exp_avg_sq (float16_effect_bands.csv), and the drivers of the freeze onset per group
from the exact recording and from its float16 view (both freeze_drivers.json), with the verdicts. Nothing is
computed here that the stages did not write; the CPU is the one that trained the exact recording.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

#: exp_avg_sq's magnitude bands, by floor(log2|x|): float16 keeps no bit below 2^-25, fewer than its 11
#: below 2^-14 (subnormal), all of bf16's 8 from 2^-14 up
BANDS = (("below 2^-25 (float16: 0)", None, -26), ("2^-25 to 2^-14 (float16 subnormal)", -25, -15),
         ("2^-14 and up (float16 normal)", -14, None))


def tensor_rows(effect: dict) -> list[str]:
    rows = ["| tensor | values | changed | changed share | zeroed | zeroed share |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, entry in effect["tensors"].items():
        rows.append(f"| {name} | {entry['values']:,} | {entry['changed']:,} | {entry['changed_share']:.4%} | "
                    f"{entry['zeroed']:,} | {entry['zeroed_share']:.4%} |")
    return rows


def band_rows(bands_csv: Path) -> list[str]:
    with bands_csv.open() as handle:
        variance = [row for row in csv.DictReader(handle) if row["tensor"] == "variance_W"]
    total = sum(int(row["values"]) for row in variance)
    rows = ["| exp_avg_sq band | share of values | of which changed | of which zeroed |", "| --- | ---: | ---: | ---: |"]
    for label, low, high in BANDS:
        inside = [row for row in variance if (low is None or int(row["exponent"]) >= low)
                  and (high is None or int(row["exponent"]) <= high)]
        values = sum(int(row["values"]) for row in inside)
        changed = sum(int(row["changed"]) for row in inside)
        zeroed = sum(int(row["zeroed"]) for row in inside)
        rows.append(f"| {label} | {values / total:.1%} | {changed / max(values, 1):.1%} | "
                    f"{zeroed / max(values, 1):.1%} |")
    return rows


def driver_rows(exact: dict, view: dict) -> list[str]:
    rows = ["| group | data | onset | drop (bits) | spacing | statistics | v_stall | driver | lab's claim |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for group in ("dead", "live", "all"):
        for label, drivers in (("exact bf16", exact), ("float16 view", view)):
            entry = drivers[group]
            if entry.get("onset_step") is None:
                rows.append(f"| {group} | {label} | none | | | | | | |")
                continue
            claim = {True: "supported", False: "not supported", None: "-"}[entry["claim_supported"]]
            rows.append(f"| {group} | {label} | {entry['onset_step']} | {entry['drop_bits']:.2f} | "
                        f"{entry['spacing_bits']:.2f} | {entry['statistics_bits']:.2f} | {entry['v_stall_bits']:.2f} | "
                        f"{entry['driver']} | {claim} |")
    return rows


def verdict_rows(exact: dict, view: dict) -> list[str]:
    rows = ["| group | measure | exact bf16 | float16 view |", "| --- | --- | --- | --- |"]
    for group, measures in exact["verdicts"].items():
        for measure, verdict in measures.items():
            rows.append(f"| {group} | {measure} | {verdict} | {view['verdicts'][group][measure]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="bf16 experiments with a float16 view")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    for name in args.experiments:
        directory = args.results / name
        effect = json.loads((directory / "float16_effect.json").read_text())
        view = effect["float16_view"]
        exact_summary = json.loads((directory / "summary.json").read_text())
        view_summary = json.loads((args.results / view / "summary.json").read_text())
        print(f"### {name} (float16 view: {view}; CPU {effect['computed_from'].get('cpu_capability', '?')})\n")
        print("\n".join(tensor_rows(effect)) + "\n")
        print("\n".join(band_rows(directory / "float16_effect_bands.csv")) + "\n")
        print("\n".join(driver_rows(exact_summary["drivers"], view_summary["drivers"])) + "\n")
        print("\n".join(verdict_rows(exact_summary, view_summary)) + "\n")
        print(f"lab_question.answer: {effect['lab_question']['answer']}\n")


if __name__ == "__main__":
    main()
