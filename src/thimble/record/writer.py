"""The recording's writer: ``StreamRecorder`` absorbs the training loop's steps and writes the stream's
segments in the background, ``write_stream_file`` writes ``stream.h5`` over them once every step is on disk
(the layout: ``thimble.record.format``).

Chunks are encoded in worker threads by ``thimble.record.codec`` and written with direct chunk writes.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from thimble.numerics.bf16 import to_float16_counting, torch_to_bits
from thimble.outputs import STREAM_FILE
from thimble.record.codec import CHUNK_CHECKSUM, encode_chunk
from thimble.record.format import (
    NATIVE_STORAGE,
    STORAGE_DTYPES,
    TENSOR_DTYPES,
    RecordLayout,
    covering_segments,
    create_checked_array,
    create_tensor_dataset,
    open_h5,
    read_checked,
    segment_name,
    storage_h5type,
)
from thimble.record.h5_datasets import create_dataset
from thimble.util.files import fsync_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class _Segment:
    """One open segment file, steps first..last, written under a .tmp name."""

    def __init__(self, directory: Path, first: int, last: int, layout: RecordLayout, storage: str, level: int,
                 step_tables: dict[str, tuple[np.dtype, tuple[int, ...]]], open_ended: bool = False):
        self.first, self.last = first, last
        self.final = directory / segment_name(first, last)
        self.tmp = self.final.with_suffix(".h5.tmp")
        self.file = h5py.File(self.tmp, "w")
        rows = last - first + 1
        # a run of unknown length ends inside its last segment, whose datasets are then cut to the steps written
        self.datasets = {path: create_tensor_dataset(self.file, path, (rows, *shape), 1, dtype, level,
                                                     resizable=open_ended)
                         for path, (dtype, shape) in layout.datasets().items()}
        self.origins = {path: (0,) * (len(shape) + 1) for path, (_, shape) in layout.datasets().items()}
        layout.link_aliases(self.file)
        # written whole at close: one Fletcher32-guarded chunk each
        self.losses = np.full(rows, np.nan, dtype=np.float32)
        self.tables = {name: np.zeros((rows, *shape), dtype=dtype) for name, (dtype, shape) in step_tables.items()}
        self.file.attrs.update(first_step=first, last_step=last, storage_dtype=storage, **layout.attrs(),
                               chunk_checksum=CHUNK_CHECKSUM)
        self.written = 0

    def write(self, step: int, chunks: dict[str, bytes], loss: float, tables: dict[str, np.ndarray]) -> None:
        row = step - self.first
        for path, chunk in chunks.items():
            self.datasets[path].id.write_direct_chunk((row, *self.origins[path][1:]), chunk, 0)
        self.losses[row] = loss
        for name, values in tables.items():
            self.tables[name][row] = values
        self.written += 1

    def cut(self) -> None:
        """End the segment at the last step written (a run of unknown length stopped inside it)."""
        self.last = self.first + self.written - 1
        self.final = self.final.with_name(segment_name(self.first, self.last))
        for dataset in self.datasets.values():
            dataset.resize(self.written, axis=0)
        self.losses = self.losses[:self.written]
        self.tables = {name: values[:self.written] for name, values in self.tables.items()}
        self.file.attrs["last_step"] = self.last

    def close(self) -> None:
        if self.written != self.last - self.first + 1:
            raise RuntimeError(f"segment {self.first}-{self.last} got {self.written} steps")
        create_checked_array(self.file, "losses", self.losses)
        for name, values in self.tables.items():
            create_checked_array(self.file, name, values)
        self.file.close()

    def commit(self) -> Path:
        """Make the closed segment durable, then give it its final name."""
        fsync_path(self.tmp)
        os.replace(self.tmp, self.final)
        return self.final


class StreamRecorder:
    """Absorbs steps from the training loop and writes them in the background.

    ``layout`` (``thimble.record.format.RecordLayout``) names the recorded parameters, their shapes and each
    dataset's stored dtype; ``storage`` is record.dtype (``native``: every tensor in its own dtype). ``record``
    hands over CPU copies of the datasets' tensors (by path, or the embedding's by the seed's names); it blocks
    only when ``queue_steps`` steps are already waiting, which bounds memory whatever T is. ``checkpoint`` closes
    the current segment and then calls ``on_durable`` (in the writer thread) once everything up to that step is on
    disk. ``last_step`` None: a run of unknown length, whose last segment ends where ``close`` finds it.
    ``step_tables``: small per-step arrays (name: (dtype, shape of a step's row)) each step hands over beside its
    tensors, stored in each segment like the losses.
    """

    def __init__(self, directory: str | Path, layout: RecordLayout, last_step: int | None, storage: str = "bfloat16",
                 segment_steps: int = 100, queue_steps: int = 64, level: int = 1, threads: int = 2,
                 step_tables: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None):
        if storage not in (*STORAGE_DTYPES, NATIVE_STORAGE):
            raise ValueError(f"unknown record.dtype {storage!r}; use one of {STORAGE_DTYPES}")
        self.layout = layout
        self.tensors = {path: dtype for path, (dtype, _) in layout.datasets().items()}
        for name, dtype in self.tensors.items():
            if dtype not in TENSOR_DTYPES:
                raise ValueError(f"unknown stored dtype {dtype!r} for {name}; use one of {TENSOR_DTYPES}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.last_step, self.storage = last_step, storage
        self.step_tables = dict(step_tables or {})
        #: the last step on disk once ``close`` returned
        self.last_written: int | None = None
        self.segment_steps, self.level = segment_steps, level
        self.float16_altered = dict.fromkeys(self.tensors, 0)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_steps)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="thimble-compress")
        # fsync, rename and checkpoints run in order on their own thread, so that compression
        # goes on while the disk catches up
        self._durable = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thimble-durable")
        self._durable_futures: list[Future] = []
        self._error: BaseException | None = None
        self._segment: _Segment | None = None
        self._thread = threading.Thread(target=self._run, name="thimble-writer", daemon=True)
        self._thread.start()

    # -- training side -------------------------------------------------------
    def segment_bounds(self, step: int) -> tuple[int, int]:
        first = step - step % self.segment_steps
        last = first + self.segment_steps - 1
        return first, last if self.last_step is None else min(last, self.last_step)

    def is_segment_end(self, step: int) -> bool:
        return step == self.segment_bounds(step)[1]

    def record(self, step: int, tensors: dict[str, torch.Tensor], loss, tables: dict[str, np.ndarray] | None = None
               ) -> None:
        """Queue a step: its host tensors and its loss, a float or the ``thimble.training.host_copy.HostStep`` whose
        copies (still running on a GPU) fill ``tensors``; the writer thread waits for them. ``tables``: the step's
        row of each of ``step_tables``."""
        self._put(("step", step, tensors, loss, tables or {}))

    def checkpoint(self, step: int, on_durable) -> None:
        self._put(("checkpoint", step, on_durable))

    def close(self) -> None:
        """Wait for every queued step to be written; re-raise a writer error."""
        self._put(None)
        self._thread.join()
        self._pool.shutdown()
        self._durable.shutdown()
        for future in self._durable_futures:
            if future.exception() is not None and self._error is None:
                self._error = future.exception()
        if self._error is not None:
            raise RuntimeError("the HDF5 writer failed") from self._error

    def abort(self) -> None:
        """Stop without finishing the open segment (it stays a .tmp file)."""
        self._error = self._error or RuntimeError("aborted")
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=60)
        self._pool.shutdown(cancel_futures=True)
        self._durable.shutdown(cancel_futures=True)

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise RuntimeError("the HDF5 writer failed") from self._error
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    # -- writer thread ---------------------------------------------------------
    def _encode(self, tensor: torch.Tensor, storage: str) -> tuple[bytes, int]:
        """(compressed chunk, number of values the storage dtype altered)."""
        if storage == "bfloat16":
            return encode_chunk(torch_to_bits(tensor), self.level), 0
        if storage == "float32":
            if tensor.element_size() != 4:
                raise TypeError(f"float32 storage got a {tensor.dtype} tensor")
            return encode_chunk(tensor.contiguous().numpy(), self.level), 0
        if str(tensor.dtype) == "torch.float16":  # a float16 tensor in its own dtype: its bits as they are
            return encode_chunk(tensor.contiguous().numpy(), self.level), 0
        if self.storage == NATIVE_STORAGE:  # every tensor in its own dtype: nothing may be converted
            raise TypeError(f"float16 storage got a {tensor.dtype} tensor")
        values, altered = to_float16_counting(tensor)
        return encode_chunk(values, self.level), altered

    def _run(self) -> None:
        pending: collections.deque[tuple[int, dict[str, Future], float]] = collections.deque()
        try:
            while True:
                item = self._queue.get()
                if item is None or self._error is not None:
                    break
                if item[0] == "step":
                    _, step, tensors, loss, tables = item
                    if hasattr(loss, "wait"):  # a thimble.training.host_copy.HostStep: its device copies end here
                        loss.wait()
                        loss = loss.loss
                    tensors = {self.layout.canonical(name): tensor for name, tensor in tensors.items()}
                    futures = {name: self._pool.submit(self._encode, tensors[name], storage)
                               for name, storage in self.tensors.items()}
                    pending.append((step, futures, loss, tables))
                    self._drain(pending, keep=2)
                else:
                    _, step, on_durable = item
                    self._drain(pending, keep=0)
                    self._after_durable(on_durable, step)
            if self._error is None:
                self._drain(pending, keep=0)
                if self._segment is not None and self.last_step is None and self._segment.written:
                    self._segment.cut()
                    self._segment.close()
                    self._after_durable(self._segment.commit)
                    self.last_written = self._segment.last
                    self._segment = None
        except BaseException as error:  # surfaced to the training thread by record()/close()
            self._error = error
            log.exception("HDF5 writer failed")

    def _drain(self, pending, keep: int) -> None:
        while len(pending) > keep:
            step, futures, loss, tables = pending.popleft()
            chunks = {}
            for name, future in futures.items():
                chunks[name], altered = future.result()
                self.float16_altered[name] += altered
            if self._segment is None:
                first, last = self.segment_bounds(step)
                self._segment = _Segment(self.directory, first, last, self.layout, self.storage, self.level,
                                         self.step_tables, open_ended=self.last_step is None)
            self._segment.write(step, chunks, loss, tables)
            self.last_written = step
            if step == self._segment.last:
                self._segment.close()
                self._after_durable(self._segment.commit)
                self._segment = None

    def _after_durable(self, function, *args) -> None:
        """Run ``function`` once everything handed over before it is durable."""
        for future in self._durable_futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        self._durable_futures = [f for f in self._durable_futures if not f.done()]
        self._durable_futures.append(self._durable.submit(function, *args))


def write_stream_file(directory: str | Path, layout: RecordLayout, last_step: int, storage: str,
                      masks: dict[str, np.ndarray], attrs: dict, step_tables: tuple[str, ...] = ()) -> Path:
    """Write ``stream.h5``: virtual (T+1, *shape) datasets over the segments, losses, ``step_tables`` (each
    segment's rows joined), masks, attributes.

    Fails if the segments do not cover steps 0..last_step exactly.
    """
    directory = Path(directory)
    segments = covering_segments(directory, 0, last_step + 1)
    losses = np.empty(last_step + 1, dtype=np.float32)
    tables: dict[str, list[np.ndarray]] = {name: [] for name in step_tables}
    final = directory / STREAM_FILE
    tmp = final.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as out:
        for name, (dtype, shape) in layout.datasets().items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            virtual_space = h5py.h5s.create_simple((last_step + 1, *shape))
            for first, last, path in segments:
                rows = (last - first + 1, *shape)
                virtual_space.select_hyperslab((first, *(0,) * len(shape)), rows)
                dcpl.set_virtual(virtual_space, path.name.encode(), name.encode(), h5py.h5s.create_simple(rows))
            create_dataset(out, name, storage_h5type(dtype), virtual_space, dcpl)
        layout.link_aliases(out)
        for first, last, path in segments:
            with open_h5(path) as segment:
                losses[first:last + 1] = read_checked(segment["losses"])
                for name, parts in tables.items():
                    parts.append(read_checked(segment[name]))
        create_checked_array(out, "losses", losses)
        for name, parts in tables.items():
            create_checked_array(out, name, np.concatenate(parts))
        for key, values in masks.items():
            create_checked_array(out, key, values)
        out.attrs.update(attrs)
        out.attrs["storage_dtype"] = storage
        out.attrs.update(layout.attrs())
        out.attrs["chunk_checksum"] = CHUNK_CHECKSUM
        out.attrs["complete"] = True
    fsync_path(tmp)
    os.replace(tmp, final)
    return final
