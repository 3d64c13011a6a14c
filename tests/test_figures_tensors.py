"""The report's per-tensor parts: the question tensor's rows of a per-tensor table, the tensors x steps picture,
the onsets, the summary page and the series' tensor table."""

import matplotlib.image
import numpy as np
import pandas as pd

from thimble.report import figures
from thimble.sizes import EMBEDDING

STEPS = np.arange(1, 41)


def freeze_frame(names_frozen_from: dict[str, int]) -> pd.DataFrame:
    """freeze.csv's per-tensor rows: each tensor globally frozen from its step on, half its elements unmoved
    before."""
    parts = []
    for name, first in names_frozen_from.items():
        frozen = STEPS >= first
        parts.append(pd.DataFrame({"tensor": name, "step": STEPS, "loss": 1.0 / STEPS,
                                   "all_frozen_element_share": np.where(frozen, 1.0, 0.5),
                                   "all_globally_frozen": frozen}))
    return pd.concat(parts, ignore_index=True)


def summary_of(names_frozen_from: dict[str, int]) -> dict:
    return {"experiment": "synthetic", "steps": int(STEPS[-1]), "question_tensor": EMBEDDING,
            "verdict_rule": {"window_steps": 10},
            "tensors": {name: {"rows": 4, "columns": 2, "verdict": "stabilised", "global_freeze_share":
                               float((STEPS >= first).mean()), "first_global_freeze_step": first,
                               "frozen_element_share_last_window": 1.0, "onset_step": first - 1,
                               "driver": "spacing"} for name, first in names_frozen_from.items()}}


def test_the_question_tensors_rows_of_a_per_tensor_table():
    frame = freeze_frame({EMBEDDING: 30, "transformer.ln_f.weight": 1})
    rows = figures.question_rows(frame, {"question_tensor": EMBEDDING})
    assert "tensor" not in rows.columns and len(rows) == len(STEPS)
    assert rows["all_globally_frozen"].sum() == len(STEPS) - 29
    other = figures.question_rows(frame, {"question_tensor": "transformer.ln_f.weight"})
    assert other["all_globally_frozen"].all()
    # a table made before the tensor column: as it is
    assert figures.question_rows(rows, {}) is rows


def test_the_tensor_figures_draw_a_row_per_tensor(tmp_path):
    few = {EMBEDDING: 30, "transformer.ln_f.weight": 1}
    many = {**few, **{f"transformer.h.0.x{i}.bias": 5 + i for i in range(8)}}
    heights = {}
    for label, tensors in (("few", few), ("many", many)):
        for draw in ("freeze", "onsets"):
            path = tmp_path / f"{label}_{draw}.png"
            if draw == "freeze":
                figures.tensor_freeze(freeze_frame(tensors), "synthetic", str(path), 10)
            else:
                figures.tensor_onsets(summary_of(tensors), "synthetic", str(path))
            heights[label, draw] = matplotlib.image.imread(path).shape[0]
    assert heights["many", "freeze"] > heights["few", "freeze"]
    assert heights["many", "onsets"] > heights["few", "onsets"]


def test_the_tensor_rows_of_the_summary_page_and_the_series_table():
    tensors = {EMBEDDING: 30, "transformer.ln_f.weight": 1}
    rows = figures.tensor_rows(summary_of(tensors))
    assert [row["tensor"] for row in rows] == list(tensors)
    assert [row["first_global_freeze_step"] for row in rows] == [30, 1]
    assert rows[1]["driver"] == "spacing" and rows[1]["experiment"] == "synthetic"
    assert figures.tensor_rows({"experiment": "embedding only, made before"}) == []
