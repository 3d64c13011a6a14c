"""Tables written as CSV, whole or not at all: the freeze, drivers and series stages' output tables."""

from __future__ import annotations


def write_csv(path: str, columns, quote_text: bool = False) -> None:
    """A table as CSV; ``quote_text`` quotes every text field, so that token texts holding a carriage return,
    a NUL or a quote read back exactly. ``columns``: what ``pandas.DataFrame`` takes (columns by name, rows
    as dicts, or a frame)."""
    import csv

    import pandas as pd

    from thimble.util.files import atomic_output

    frame = pd.DataFrame(columns)
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC if quote_text else csv.QUOTE_MINIMAL)
