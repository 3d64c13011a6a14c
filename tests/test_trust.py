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


# -- a recording that is not what its attributes say ----------------------------------------------------------

def recording_with(tmp_path, replace_w):
    """A thimble recording (tests/conftest.py write_recording) whose W is replaced by ``replace_w(file)``."""
    import h5py
    import numpy as np

    from conftest import write_recording

    bits = np.zeros((5, 4, 3), np.uint16)
    path = write_recording(tmp_path / "recording.h5", {name: bits for name in ("W", "grad_W", "momentum_W",
                                                                               "variance_W")}, np.zeros(4, bool))
    with h5py.File(path, "r+") as handle:
        handle.attrs["recorded_tensors"] = json.dumps(dict.fromkeys(("W", "grad_W", "momentum_W", "variance_W"),
                                                                    "bfloat16"))
        handle.attrs.update(vocab_size=4, hidden_dim=3)  # as thimble train writes them
        del handle["W"]
        replace_w(handle)
    return path


@pytest.mark.parametrize("replace_w, message", [
    (lambda f: f.create_dataset("W", shape=(10**7, 10**6, 1024), dtype="float64"),
     r"recording.h5:/W holds float64 elements of 8 bytes; the recording's attributes say bfloat16"),
    (lambda f: f.create_dataset("W", shape=(5, 4, 3, 2), dtype="float16"),
     r"recording.h5:/W holds float16 elements|recording.h5:/W has shape"),
    (lambda f: f.create_group("W"), r"recording.h5:/W: .* the file holds a group there"),
])
def test_a_foreign_dataset_is_named_with_what_it_holds_and_what_was_expected(tmp_path, replace_w, message):
    import h5py

    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    path = recording_with(tmp_path, replace_w)
    with h5py.File(path) as handle, pytest.raises(DataError, match=message):
        RecordedTensor.of_recording(handle, "W")


def test_a_dataset_whose_bytes_are_outside_the_run_is_refused_unread(tmp_path):
    import h5py

    from thimble.errors import DataError
    from thimble.record.reader import RecordedTensor

    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"\x00" * 120)

    def virtual_over_a_foreign_file(handle):
        layout = h5py.VirtualLayout(shape=(5, 4, 3), dtype="float16")
        layout[...] = h5py.VirtualSource(str(secret), "data", shape=(5, 4, 3))
        handle.create_virtual_dataset("W", layout)

    def external_raw_file(handle):
        handle.create_dataset("W", shape=(5, 4, 3), dtype="<f2", external=[(str(secret), 0, 120)])

    for replace_w, message in ((virtual_over_a_foreign_file, r"a virtual dataset over .*outside.txt, outside"),
                               (external_raw_file, r"its bytes are in an external file .*outside.txt")):
        (tmp_path / replace_w.__name__).mkdir()
        path = recording_with(tmp_path / replace_w.__name__, replace_w)
        with h5py.File(path) as handle, pytest.raises(DataError, match=message):
            RecordedTensor.of_recording(handle, "W")
