"""The stored-chunk codec: thread split, round trips of 2- and 4-byte chunks, and ΔW′'s int32 pass."""

import h5py
import numpy as np
import pytest

from conftest import rewrite_steps, run_train, tiny_settings
from thimble.errors import DataError
from thimble.record.codec import chunk_row_blocks, compress_shuffled, decode_chunk, encode_chunk, write_chunk, zstd_dcpl
from thimble.record.reader import RecordedTensor
from thimble.util.workers import WorkerPool, thread_spans


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64, 384])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_thread_spans_are_numpys_array_split(n, threads):
    expected = [(int(part[0]), int(part[-1]) + 1) for part in np.array_split(np.arange(n), threads) if part.size]
    assert thread_spans(n, threads) == expected


def test_the_worker_pool_says_its_threads():
    with WorkerPool(3) as pool:
        assert pool.threads == 3 and pool.submit(sum, [1, 2]).result() == 3


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_chunks_round_trip_whole_and_in_blocks(tmp_path, dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, np.iinfo(dtype).max, size=(11, 6, 5), dtype=dtype)
    out = np.empty_like(values[:4])
    decode_chunk(encode_chunk(values[:4], 1), out)
    np.testing.assert_array_equal(out, values[:4])
    with h5py.File(tmp_path / "t.h5", "w") as handle:
        h5py.h5d.create(handle.id, b"x", h5py.h5t.py_create(np.dtype(dtype)), h5py.h5s.create_simple(values.shape),
                        dcpl=zstd_dcpl((4, 6, 5), 1))
        dataset = handle["x"]
        for start in range(0, 11, 4):  # an edge chunk of 3 rows, stored full size
            chunk = np.zeros((4, 6, 5), dtype)
            chunk[:min(4, 11 - start)] = values[start:start + 4]
            write_chunk(dataset, start, b"".join(compress_shuffled(chunk, 1, 2)))
        handle.flush()
        np.testing.assert_array_equal(RecordedTensor(dataset).bits(2, 10), values[2:10])
        np.testing.assert_array_equal(dataset[...], values)  # HDF5's own filters read the same chunks
        blocks = list(chunk_row_blocks(dataset, 8, 2))
        assert [first for first, _ in blocks] == [8, 10]
        np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), values[8:])


def test_a_flipped_byte_names_file_dataset_and_steps(tmp_path):
    values = np.arange(8 * 30, dtype=np.uint16).reshape(8, 30)
    with h5py.File(tmp_path / "t.h5", "w") as handle:
        h5py.h5d.create(handle.id, b"x", h5py.h5t.py_create(np.dtype(np.uint16)), h5py.h5s.create_simple(values.shape),
                        dcpl=zstd_dcpl((4, 30), 1))
        for start in (0, 4):
            frame = bytearray(b"".join(compress_shuffled(values[start:start + 4], 1, 1)))
            if start == 4:
                frame[-6] ^= 0x10
            write_chunk(handle["x"], start, bytes(frame))
        with pytest.raises(DataError, match=r"t\.h5:/x steps 4\.\.7"):
            RecordedTensor(handle["x"]).bits(0, 8)


def test_delta_w_takes_int32_when_a_step_count_passes_int16(data, tmp_path):
    """A sign flip of a huge weight walks more than 32767 lattice points: ΔW′ is written again as int32,
    and only the finished file is left."""
    from thimble.analysis.delta_w import write_delta_w_lattice
    from thimble.numerics.lattice import ordinal
    from thimble.record.rechunk import rechunk_stream

    recording = tmp_path / "recording.h5"
    rechunk_stream(run_train(data, tmp_path / "stream", tiny_settings()), recording, 8, 2**31)
    huge, minus_huge = 0x7F00, 0xFF00  # ±2^127: ordinals ±32512
    with h5py.File(recording, "r+") as handle:
        steps = np.full((2, *handle["W"].shape[1:]), huge, np.uint16)
        steps[1, 0, 0] = minus_huge  # step 9 flips element (0, 0) from 2^127 to -2^127
        rewrite_steps(handle["W"], 8, steps)
    summary = write_delta_w_lattice(str(recording), str(tmp_path / "delta.h5"), threads=2)
    with h5py.File(tmp_path / "delta.h5", "r") as out:
        delta = out["delta_w_lattice"]
        assert summary["dtype"] == "int32" and delta.dtype == np.int32
        flip = ordinal(np.array([minus_huge], np.uint16)) - ordinal(np.array([huge], np.uint16))
        assert delta[9, 0, 0] == flip[0] == -65024 and delta[9, 0, 1] == 0
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("delta")) == ["delta.h5"]


def test_the_window_reaches_the_previous_step_at_full_width():
    import zstandard

    from thimble.record.codec import ZSTD_MAX_WINDOW_LOG, window_log_for

    own = zstandard.ZstdCompressionParameters.from_level(1, source_size=1 << 30).window_log
    assert window_log_for(16 * 1024, 1) == own  # thimble_small: the level's own window already reaches
    full = window_log_for(10000 * 64, 1)  # thimble_7: one byte plane of a step is 640,000 bytes
    assert 2 ** full >= 8 * 10000 * 64 and full <= ZSTD_MAX_WINDOW_LOG
    assert window_log_for(10**9, 1) == ZSTD_MAX_WINDOW_LOG  # frames every decoder reads


def zstandard_window(frame: bytes) -> int:
    import zstandard

    return zstandard.get_frame_parameters(frame).window_size


def test_a_frozen_step_at_full_width_costs_almost_nothing_and_h5py_reads_it(tmp_path):
    """Eight steps of thimble_7's width where W does not move after step 0: with the window reaching the
    previous step (and level 2's larger hash table, which finds it) the chunk is about one step's size; with zstd
    level 1's own window it is eight. Stock
    h5py + hdf5plugin decode the frame (HDF5's own filter), as thimble's checked reader does."""
    from thimble.record.codec import FrameEncoder

    rng = np.random.default_rng(7)
    step = rng.normal(0, 0.02, size=(10000, 64)).astype(np.float32).view(np.uint32) >> 16
    chunk = np.broadcast_to(step.astype(np.uint16), (8, 10000, 64)).copy()
    widened = b"".join(compress_shuffled(chunk, 2, 2))  # recording.h5's level (rechunk.compression_level)
    encoder = FrameEncoder(chunk.nbytes, 1)  # the stream's level with its own window
    encoder.add_shuffled(chunk)
    own = b"".join(encoder.finish())
    one_step = len(encode_chunk(chunk[:1], 1))
    assert len(widened) < 1.2 * one_step < len(own) / 5
    path = tmp_path / "frozen.h5"
    with h5py.File(path, "w") as out:
        h5py.h5d.create(out.id, b"W", h5py.h5t.STD_U16LE, h5py.h5s.create_simple(chunk.shape),
                        dcpl=zstd_dcpl(chunk.shape, 1))
        write_chunk(out["W"], 0, widened)
    assert zstandard_window(widened) <= 2 ** 27
    with h5py.File(path, "r") as stored:
        assert np.array_equal(stored["W"][...], chunk)
        assert np.array_equal(RecordedTensor(stored["W"]).bits(0, 8), chunk)
