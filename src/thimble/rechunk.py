"""Rechunking of recorded tensors into large time chunks.

HDF5 refuses chunks of 4 GiB or more, so the number of steps per chunk is
bounded by the bytes one step of a tensor takes.
"""

from __future__ import annotations

import math

#: HDF5's hard limit on the size of one chunk: strictly under 4 GiB
HDF5_MAX_CHUNK_BYTES = 2**32 - 1


def steps_per_chunk(n_rows: int, row_bytes: int, setting: int | str, max_chunk_bytes: int) -> int:
    """Rows (time steps) per chunk for a dataset of ``n_rows`` rows of ``row_bytes`` each.

    ``setting`` is an explicit count (clamped to ``n_rows``: a chunk cannot
    exceed a fixed-size dataset) or ``"auto"``: the fewest equal chunks whose
    bytes stay within ``max_chunk_bytes``.
    """
    if setting == "auto":
        rows_fit = max_chunk_bytes // row_bytes
        if rows_fit < 1:
            raise ValueError(f"one row of {row_bytes} bytes exceeds the chunk cap of {max_chunk_bytes} bytes")
        n_chunks = math.ceil(n_rows / rows_fit)
        return math.ceil(n_rows / n_chunks)
    return min(int(setting), n_rows)
