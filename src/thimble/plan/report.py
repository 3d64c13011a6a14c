"""The plan as text for the terminal."""

from __future__ import annotations

from thimble.plan import costs
from thimble.util.units import format_bytes


def human_bytes(count: float | None) -> str:
    return "not predicted" if count is None else format_bytes(count)


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


PROBE_SOURCES = {
    "probed now": "probed now",
    "cached": "cached",
    "shipped": "shipped with the workflow",
}


#: recorded parameters named one by one in the plan's text; of more, the largest (the JSON names every one)
NAMED_PARAMETERS = 4


def format_recorded(recorded: dict) -> str:
    """What an experiment records, in a line: how many of the model's parameters, their values and bytes a step."""
    def shape_of(name: str) -> str:
        return f"{name} {' x '.join(map(str, recorded['shapes'][name]))}"

    named = (", ".join(map(shape_of, recorded["shapes"])) if recorded["count"] <= NAMED_PARAMETERS
             else f"the largest {shape_of(recorded['largest'])} (--json lists each)")
    return (f"records {recorded['count']} of {recorded['model_parameters']} parameters (record.tensors "
            f"{recorded['patterns']}): {recorded['values_per_step']:,} values a step, "
            f"{human_bytes(recorded['step_bytes'])} uncompressed with {', '.join(recorded['datasets'])} of each; "
            f"{named}")


def format_outside_recording(recorded: dict) -> str:
    """What an outside recording holds, in a line (as ``format_recorded`` for an experiment that trains)."""
    def shape_of(name: str) -> str:
        return f"{name} {' x '.join(map(str, recorded['shapes'][name]))}"

    named = (", ".join(map(shape_of, recorded["shapes"])) if recorded["count"] <= NAMED_PARAMETERS
             else f"the largest {shape_of(recorded['largest'])} (--json lists each)")
    interrupted = " (closed after its loop stopped: close_partial)" if recorded["interrupted"] else ""
    return (f"holds {recorded['count']} parameters{interrupted}: {recorded['values_per_step']:,} values a step, "
            f"{human_bytes(recorded['step_bytes'])} uncompressed with {', '.join(recorded['datasets'])}; {named}")


def format_plan(plan: dict) -> str:
    lines = []
    for name, entry in plan["experiments"].items():
        lines.append(f"{name}: {entry['settings_summary']}")
        if entry.get("recording"):
            lines.append(f"  {format_outside_recording(entry['recorded'])}")
            lines.append(f"  sized by {entry['probe_note']} ({entry['probe_steps']} steps, "
                         f"{PROBE_SOURCES[entry['probe_source']]}: {entry['probe']}), its stages' time per step "
                         "scaled by the values recorded a step; no probe of its own (it has no model to train)")
        else:
            lines.append(f"  {format_recorded(entry['recorded'])}")
            lines.append(f"  probe: {entry['probe_steps']} steps on {entry['token_source']} tokens, "
                         f"{PROBE_SOURCES[entry['probe_source']]} ({entry['probe']}); `thimble plan --reprobe` probes "
                         "again")
        for file in entry["files"]:
            state = "to write" if file["pending"] else "exists"
            size = human_bytes(file["bytes"]) if file["predicted"] or not file["pending"] else \
                "not predicted (figure)"
            lines.append(f"  {file['stage']:<8} {file['path']:<52} {size:>22}  {state}")
        lines.append("  stage     peak RAM     job mem_mb   job runtime (min)   time")
        for stage in costs.STAGES:
            if stage not in entry["peak_ram_bytes"]:
                continue
            if stage == "train":
                timed = entry["training_seconds"]["cpu"]
                when = f"{human_seconds(timed['seconds'])} on CPU" if timed else "not measured"
            else:
                timed = entry["stage_seconds"].get(stage)
                when = "not measured" if timed is None else human_seconds(timed["seconds"]) + \
                    (" (at most: the probe's steps are too few to time it per step)" if timed["upper_bound"] else "") + \
                    (f" (as {timed['stand_in']}'s: the probe predates this stage)" if "stand_in" in timed else "")
            runtime = entry["runtime_min"].get(stage, "-")
            lines.append(f"  {stage:<8} {human_bytes(entry['peak_ram_bytes'][stage]):>10} "
                         f"{entry['mem_mb'][stage]:>12}   {runtime:>17}   {when}")
        if entry.get("trained_by"):
            lines.append(f"  training: none; its recording.h5 is the float16 view of {entry['trained_by']}'s "
                         "recording (thimble float16-view, docs/float16.md)")
        if entry.get("recording"):
            lines.append(f"  training: none; it analyses the recording in {entry['recording']}")
        trains = not entry.get("trained_by") and not entry.get("recording")
        for device_kind, label in (("cpu", "CPU"), ("cuda", "GPU")) if trains else ():
            timed = entry["training_seconds"][device_kind]
            if timed is None:
                hint = "run `thimble plan --probe-device cuda ...` on a GPU machine" if device_kind == "cuda" \
                    else "no CPU calibration"
                lines.append(f"  training on {label}: not measured ({hint})")
                continue
            how = f"; {timed['note']}" if timed["note"] else ""
            lines.append(f"  training on {label}: {human_seconds(timed['seconds'])} "
                         f"({timed['seconds_per_step']:.3g} s/step on {timed['device_name']}, "
                         f"host {timed['host']}{how}); a job on it asks runtime={timed['runtime_min']} "
                         f"(minutes, as `snakemake -n` prints it without a unit)")
    others = [file for file in plan["other_files"] if file["pending"]]
    if others:
        lines.append(f"data stages: {len(others)} files to write (sizes depend on the corpus; not predicted)")
    lines.append(f"to write: {human_bytes(plan['bytes_to_write'])} predicted; free in {plan['disk']}: "
                 f"{human_bytes(plan['free_bytes'])}")
    memory, largest = plan["memory"], plan["largest_peak"]
    if largest:
        lines.append(f"largest peak RAM: {human_bytes(largest['bytes'])} ({largest['experiment']} {largest['stage']}); "
                     f"this machine: {human_bytes(memory['total'])}, {human_bytes(memory['available'])} available now")
    if not plan["fits_disk"]:
        lines.append(f"WARNING: the plan needs {human_bytes(plan['bytes_to_write'])} but only "
                     f"{human_bytes(plan['free_bytes'])} are free in {plan['disk']}: free space, plan fewer "
                     "experiments at a time, or leave rechunk.keep_stream false (each stream is deleted once "
                     "rechunked)")
    if largest and not plan["fits_memory"]:
        lines.append(f"WARNING: {largest['experiment']}'s {largest['stage']} stage needs about "
                     f"{human_bytes(largest['bytes'])} of RAM, more than this machine's {human_bytes(memory['total'])}: "
                     "run it on a larger machine (the cluster profile asks for it) or shrink the experiment")
    elif largest and largest["bytes"] > memory["available"]:
        lines.append(f"note: {largest['experiment']}'s {largest['stage']} stage needs about "
                     f"{human_bytes(largest['bytes'])} of RAM, more than the {human_bytes(memory['available'])} "
                     "available now: close other programs before it runs")
    return "\n".join(lines)
