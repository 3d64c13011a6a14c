"""The recording's names, as they were before the recording's format, writer and readers became modules of
their own: ``thimble.recording_format`` (the layout: names, dtypes, creating and opening datasets, the
segments), ``thimble.stream_writer`` (``StreamRecorder``, ``stream.h5``), ``thimble.stream_reader`` (a
stream's rows) and ``thimble.recording_reader`` (``read_steps`` of any recorded tensor, the rechunked
file's in-order rows). Every name stays importable from here.
"""

from thimble.outputs import STREAM_FILE  # noqa: F401
from thimble.recording_format import (STORAGE_DTYPES, TENSOR_DTYPES, TENSORS,  # noqa: F401
                                      covering_segments, create_checked_array, create_tensor_dataset, is_bfloat16,
                                      list_segments, open_h5, read_checked, segment_name, storage_h5type,
                                      stream_tensors, tensors_attr)
from thimble.recording_reader import (RecordingRows, _stored_in, read_steps, read_steps_torch,  # noqa: F401
                                      recorded_blocks)
from thimble.stream_reader import (check_virtual_sources, open_stream, read_stream_rows, verify_stream,  # noqa: F401
                                   virtual_rows)
from thimble.stream_writer import StreamRecorder, _Segment, fsync_path, log, write_stream_file  # noqa: F401

_virtual_rows = virtual_rows
