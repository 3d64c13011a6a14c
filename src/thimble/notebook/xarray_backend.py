"""The xarray engine ``thimble``: ``xr.open_dataset("results/thimble_small/recording.h5", engine="thimble")``
(the embedding) and ``xr.open_datatree(..., engine="thimble")`` (every recorded parameter).

Registered as the entry point ``xarray.backends: thimble`` (pyproject.toml). It opens the run the path
names (an experiment's ``recording.h5``, its ``stream/stream.h5`` or the results folder) and returns
``thimble.notebook.xarray_view.run_dataset`` of it (every recorded tensor of the embedding lazily over
(step, token, dim), with token text and group coordinates) or ``run_datatree`` (a node per recorded parameter),
exact float32 or (``dtype="bfloat16"``) ml_dtypes bfloat16.

xarray asks every engine whether it can open a file it was given without one (``guess_can_open``), so
that question is answered from the path and the file's first bytes, without h5py or the readers: they
are imported only when a run is opened.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from xarray.backends import BackendEntrypoint

from thimble.outputs import RECORDING_FILE, STREAM_DIR, STREAM_FILE
from thimble.util.workflow_dir import source_checkout

#: what every HDF5 file holds at its start, or after a user block at 512, 1024, 2048, ... bytes
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FIRST_USER_BLOCK = 512
NOTEBOOK_GUIDE = source_checkout() / "docs" / "notebook.md"


def run_of_path(path: str | Path, cache_bytes: int | None = None, allow_stale: bool = False):
    """The run a path names: results/{experiment}, its recording.h5 or its stream/stream.h5."""
    from thimble.errors import DataError
    from thimble.notebook.run import Run

    path = Path(path)
    if path.is_dir():
        return Run(path, "auto", cache_bytes, allow_stale)
    if path.name not in (RECORDING_FILE, STREAM_FILE) or not is_hdf5(path):
        # another file of the run (a table, ΔW′) is not the run's recording: never serve the one beside it
        raise DataError(f"{path} is not a thimble recording; engine='thimble' opens a results folder, its "
                        f"{RECORDING_FILE} or its {STREAM_DIR}/{STREAM_FILE}")
    if path.name == STREAM_FILE:
        return Run(path.parent.parent, "stream", cache_bytes, allow_stale)
    return Run(path.parent, "recording", cache_bytes, allow_stale)


def dropped(drop_variables) -> tuple[str, ...]:
    """xarray's ``drop_variables``: a name, names or None."""
    if drop_variables is None:
        return ()
    return (drop_variables,) if isinstance(drop_variables, str) else tuple(drop_variables)


def is_hdf5(path: Path) -> bool:
    """Whether the file carries HDF5's signature where the format allows it (offset 0, 512, 1024, ...)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                handle.seek(offset)
                if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = FIRST_USER_BLOCK if offset == 0 else 2 * offset
    except OSError:
        return False
    return False


class ThimbleBackendEntrypoint(BackendEntrypoint):
    """``engine="thimble"``: a thimble recording (recording.h5, stream/stream.h5 or the results folder)."""

    description = "thimble recordings: W and the optimizer state per step, bit for bit, read lazily"
    # the project has no public address: its notebook guide in a checkout (an installed copy carries no docs)
    url = NOTEBOOK_GUIDE.as_uri() if NOTEBOOK_GUIDE.is_file() else ""
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "dtype", "cache_bytes")
    #: open_datatree and open_groups_as_dict: a node per recorded parameter
    supports_groups = True

    def open_dataset(self, filename_or_obj, *, drop_variables=None, dtype: str = "float32",
                     cache_bytes: int | None = None) -> xr.Dataset:
        from thimble.notebook.xarray_view import run_dataset

        dataset = run_dataset(run_of_path(filename_or_obj, cache_bytes), dtype)
        return dataset.drop_vars(drop_variables or [], errors="ignore")

    def open_datatree(self, filename_or_obj, *, drop_variables=None, dtype: str = "float32",
                      cache_bytes: int | None = None) -> xr.DataTree:
        """Every recorded parameter as a node named as the parameter (``value``, ``grad``, the optimizer's state),
        the losses, token masks and token coordinates at the root; ``drop_variables`` are left out of every node."""
        from thimble.notebook.xarray_view import run_datatree

        return run_datatree(run_of_path(filename_or_obj, cache_bytes), dtype, dropped(drop_variables))

    def open_groups_as_dict(self, filename_or_obj, *, drop_variables=None, dtype: str = "float32",
                            cache_bytes: int | None = None) -> dict[str, xr.Dataset]:
        """``open_datatree``'s nodes as Datasets by path ("/" the root, "/<parameter>" each parameter); closing the
        root's closes the run."""
        from thimble.notebook.xarray_view import run_groups

        run = run_of_path(filename_or_obj, cache_bytes)
        groups = run_groups(run, dtype, dropped(drop_variables))
        groups["/"].set_close(run.close)
        return groups

    def guess_can_open(self, filename_or_obj) -> bool:
        """A results folder holding a recording, or an HDF5 file named as the run's files are (what
        ``run_of_path`` opens: another name would open the recording.h5 beside it)."""
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        if path.is_dir():
            return (path / RECORDING_FILE).is_file() or (path / STREAM_DIR / STREAM_FILE).is_file()
        return path.name in (RECORDING_FILE, STREAM_FILE) and path.is_file() and is_hdf5(path)
