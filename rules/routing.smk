# Routing: the wildcard patterns that choose, of the rules sharing an output, the one that makes an
# experiment's (train or train_temporary_stream; rechunk, float16_view or rechunk_recording; freeze or
# freeze_recording), the float16 view's training twin, and where an experiment whose source is a recording finds
# it. CFG, the validated config, is the Snakefile's global.

import re


def experiment_pattern(keep_stream):
    """A wildcard pattern matching the experiments that train and whose rechunk.keep_stream is ``keep_stream``
    (train keeps their stream, train_temporary_stream deletes it once rechunk ran)."""
    from thimble.config import recording_source

    names = [name for name, exp in CFG["experiments"].items()
             if recording_source(exp) is None and exp["rechunk"]["keep_stream"] == keep_stream]
    return "|".join(map(re.escape, names)) or "(?!)"


def float16_view_pattern(view):
    """A wildcard pattern matching the experiments whose recording.h5 is the float16 view of a training twin
    (``view`` true: the float16_view rule) or is rechunked from their own training (false: rechunk), by
    ``thimble.config.training_twin``. With ``recording_pattern`` they are disjoint, so one rule makes each
    recording."""
    from thimble.config import float16_views, recording_source

    views = float16_views(CFG["experiments"])
    names = [name for name, exp in CFG["experiments"].items()
             if recording_source(exp) is None and (name in views) == view]
    return "|".join(map(re.escape, names)) or "(?!)"


def float16_twin(wildcards):
    """The training twin of a float16 view experiment."""
    from thimble.config import training_twin

    return training_twin(CFG["experiments"], wildcards.experiment)


def exact_with_view_pattern():
    """A wildcard pattern matching the bf16 experiments that some float16 view derives from (float16_effect)."""
    from thimble.config import float16_views

    twins = set(float16_views(CFG["experiments"]).values())
    return "|".join(re.escape(name) for name in CFG["experiments"] if name in twins) or "(?!)"


def float16_view_of_twin(wildcards):
    """The float16 view experiment derived from the bf16 experiment of ``wildcards`` (the first, in config order)."""
    from thimble.config import float16_view_of

    return float16_view_of(CFG["experiments"], wildcards.experiment)


def recording_pattern(outside=True):
    """A wildcard pattern matching the experiments whose source is a recording made by thimble.Recorder
    (rechunk_recording makes their recording.h5, freeze_recording their tables: no dataset, no tokenizer), or
    with ``outside`` false those that train (freeze)."""
    from thimble.config import recording_source

    names = [name for name, exp in CFG["experiments"].items() if (recording_source(exp) is not None) == outside]
    return "|".join(map(re.escape, names)) or "(?!)"


def outside_recording(wildcards):
    """The recording folder an experiment analyses (its config's source.recording, relative to the working
    directory or absolute)."""
    from thimble.config import recording_path

    return recording_path(CFG["experiments"][wildcards.experiment])
