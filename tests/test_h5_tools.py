"""The recordings read with the standard HDF5 tools: the filter path, a named error without it, the bf16 type."""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from thimble import cli
from thimble.numerics.bf16 import BFLOAT16, bfloat16_h5type
from thimble.record.codec import encode_chunk
from thimble.record.format import create_tensor_dataset


@pytest.fixture
def compressed(tmp_path):
    """A file with one shuffle+zstd bf16 tensor as the recorder writes it, and its values."""
    values = (np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 8 - 1).astype(BFLOAT16)
    path = tmp_path / "stream.h5"
    with h5py.File(path, "w") as handle:
        dataset = create_tensor_dataset(handle, "W", values.shape, 1, "bfloat16", 3)
        for step in range(len(values)):
            dataset.id.write_direct_chunk((step, 0, 0), encode_chunk(values[step].view(np.uint16), 3), 0)
        handle.attrs["complete"] = True
    return path, values


def test_h5_env_exports_the_plugin_folder_that_lets_plain_h5py_decode(compressed, capsys):
    path, values = compressed
    assert cli.main(["h5-env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export HDF5_PLUGIN_PATH=")
    # a fresh interpreter that never imports hdf5plugin: only the exported path can make it decode
    script = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r'); assert 'hdf5plugin' not in sys.modules;"
              " print(f['W'][...].ravel().tolist())")
    env = dict(os.environ, HDF5_PLUGIN_PATH=line.split("=", 1)[1].strip("'"))
    read = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env)
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() and eval(read.stdout) == values.astype(np.float32).ravel().tolist()
    without = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                             env=dict(env, HDF5_PLUGIN_PATH=str(path.parent)))
    assert without.returncode != 0, "the check above has teeth: no filter, no data"


def test_thimble_readers_without_the_zstd_filter_name_hdf5plugin(compressed):
    path, _ = compressed
    (path.parent / "experiment").mkdir()
    os.link(path, path.parent / "experiment" / "recording.h5")
    script = """
import sys, h5py
from thimble.record.codec import ZSTD_FILTER
from thimble.record.reader import read_steps
from thimble.record.stream_reader import open_stream
from thimble.notebook.run import open_run
h5py.h5z.unregister_filter(ZSTD_FILTER)  # as if hdf5plugin had not registered it
messages = []
for read in (lambda: read_steps(h5py.File(sys.argv[1], "r")["W"]), lambda: open_stream(sys.argv[2]),
             lambda: open_run(sys.argv[3]).W[0]):
    try:
        read()
        messages.append("no error")
    except OSError as error:
        messages.append(str(error))
print("\\n".join(messages))
"""
    result = subprocess.run([sys.executable, "-c", script, str(path), str(path.parent),
                             str(path.parent / "experiment")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    messages = result.stdout.strip().splitlines()
    assert len(messages) == 3
    for message in messages:
        assert "import hdf5plugin" in message and "thimble h5-env" in message, message


# HDF5 2.0's predefined H5T_FLOAT_BFLOAT16LE (H5Tinit_float.c): 2 bytes, precision 16 at offset 0, sign bit 15,
# exponent bits 7..14 with bias 127, mantissa bits 0..6 with an implied leading 1, little-endian, zero padding
HDF5_2_BFLOAT16LE = {"size": 2, "precision": 16, "offset": 0, "fields": (15, 7, 8, 0, 7), "ebias": 127,
                     "norm": h5py.h5t.NORM_IMPLIED, "inpad": h5py.h5t.PAD_ZERO, "pad": (h5py.h5t.PAD_ZERO,) * 2,
                     "order": h5py.h5t.ORDER_LE}


def float_type_fields(h5type) -> dict:
    return {"size": h5type.get_size(), "precision": h5type.get_precision(), "offset": h5type.get_offset(),
            "fields": h5type.get_fields(), "ebias": h5type.get_ebias(), "norm": h5type.get_norm(),
            "inpad": h5type.get_inpad(), "pad": h5type.get_pad(), "order": h5type.get_order()}


def test_the_stored_bf16_type_has_hdf5_2s_bfloat16_layout_field_by_field():
    assert float_type_fields(bfloat16_h5type()) == HDF5_2_BFLOAT16LE


def linked_hdf5_bfloat16():
    """HDF5's own H5T_FLOAT_BFLOAT16LE from the library h5py links (h5py does not expose it), or None."""
    if h5py.version.hdf5_version_tuple < (2, 0, 0):
        return None
    libraries = sorted((Path(h5py.__file__).parent.parent / "h5py.libs").glob("libhdf5-*"))
    try:
        library = ctypes.CDLL(str(libraries[0])) if libraries else ctypes.CDLL(None)
        type_id = ctypes.c_int64.in_dll(library, "H5T_FLOAT_BFLOAT16LE_g").value
    except (OSError, ValueError):
        return None
    library.H5Tcopy.restype, library.H5Tcopy.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return h5py.h5t.TypeFloatID(library.H5Tcopy(type_id))


def test_the_stored_bf16_type_equals_hdf5_2s_predefined_bfloat16():
    predefined = linked_hdf5_bfloat16()
    if predefined is None:
        pytest.skip(f"h5py links HDF5 {h5py.version.hdf5_version} without a reachable H5T_FLOAT_BFLOAT16LE")
    assert float_type_fields(predefined) == HDF5_2_BFLOAT16LE
    assert predefined == bfloat16_h5type()  # H5Tequal


def test_h5dump_decodes_with_the_h5_env_export(compressed, capsys):
    path, values = compressed
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump is not installed (Debian: hdf5-tools)")
    cli.main(["h5-env"])
    plugin_path = capsys.readouterr().out.strip().split("=", 1)[1].strip("'")
    command = ["h5dump", "-d", "/W", "-c", "1,1,4", str(path)]
    bare = subprocess.run(command, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"})
    assert "(0,0,0)" not in bare.stdout, "without the filter h5dump prints no data (and exits 0)"
    dumped = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HDF5_PLUGIN_PATH=plugin_path))
    assert dumped.returncode == 0, dumped.stderr
    expected = ", ".join(f"{value:g}" for value in values[0, 0].astype(np.float32))
    assert f"(0,0,0): {expected}" in dumped.stdout, dumped.stdout
