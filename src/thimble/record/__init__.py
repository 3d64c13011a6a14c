"""The recording: the chunk codec, the recording's layout, the streaming writer, the readers and rechunk.

The readers a user calls are named here (``docs/recording.md``); each is imported on first use, so that
importing the low-level modules (``thimble.record.codec``) does not load the others:

- ``open_stream(path)``: a finished stream opened as one file, every segment behind it checked;
- ``read_steps(dataset, steps)``: rows of any recorded tensor, each chunk's checksum verified;
- ``read_steps_torch(dataset, steps)``: the same as torch tensors of the recorded dtype;
- ``RecordedTensor(dataset)``: a recorded tensor's rows as stored bits, by steps, by chunks or in blocks of rows
  in order (the one way every stage reads them);
- ``verify_stream(path)``: a whole stream decoded, every checksum verified.
"""

_PUBLIC = {"open_stream": "stream_reader", "verify_stream": "stream_reader", "read_steps": "reader",
           "read_steps_torch": "reader", "RecordedTensor": "reader"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(f"thimble.record.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'thimble.record' has no attribute {name!r}")
