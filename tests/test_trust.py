"""Trust what you are handed: no file thimble reads runs code."""

import hashlib
import json

import pytest
import torch

from conftest import run_train, tiny_settings
from thimble.errors import TrainingError
from thimble.training.checkpoint import CHECKPOINT, CHECKPOINT_SHA256


class RunsCode:
    """A pickle payload: unpickling it calls a function with an argument (here, writing a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path):
    with open(path, "w") as out:
        out.write("this ran while a checkpoint was loaded")


def test_a_checkpoint_whose_pickle_runs_code_is_refused_unrun_even_with_a_matching_checksum(data, tmp_path):
    marker = tmp_path / "ran"
    partial = tmp_path / "stream.partial"
    partial.mkdir()
    state = {"step": 7, "resume_key": {}, "payload": RunsCode(marker)}
    torch.save(state, partial / CHECKPOINT)
    # whoever writes the checkpoint writes its checksum too: it vouches for the bytes, not for their intent
    digest = hashlib.sha256((partial / CHECKPOINT).read_bytes()).hexdigest()
    (partial / CHECKPOINT_SHA256).write_text(json.dumps({"sha256": {CHECKPOINT: digest}, "step": 7}))
    with pytest.raises(TrainingError, match=rf"{partial / CHECKPOINT} holds more than tensors and plain data.*"
                                            r"GLOBAL .*_touch.*nothing in it was run"):
        run_train(data, tmp_path / "stream", tiny_settings())
    assert not marker.exists()
    # nothing handed over is deleted: the folder stays for whoever looks into it
    assert (partial / CHECKPOINT).exists()
    assert not (tmp_path / "stream").exists()
