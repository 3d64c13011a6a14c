"""Sizes that follow from an experiment's settings alone: parameters, bytes per step, rows per chunk.

Pure arithmetic with no torch, h5py or numpy: config validation and the Snakefile (building the DAG,
`snakemake -n`) use it, as do training, the rechunk stage and ``thimble plan``, so that each formula
exists once.
"""

from __future__ import annotations

import fnmatch
import math

from thimble.errors import ThimbleError
from thimble.update_rules import rule_of, widest_element_bytes
from thimble.update_rules import step_bytes as recorded_step_bytes

#: HDF5's hard limit on the size of one chunk: strictly under 4 GiB
HDF5_MAX_CHUNK_BYTES = 2**32 - 1
#: steps the replay holds and replays at once (its memory grows with them; the plan's model counts them)
REPLAY_BLOCK_STEPS = 32
#: steps the freeze_drivers stage decodes and analyses at once (as REPLAY_BLOCK_STEPS)
DRIVERS_BLOCK_STEPS = 16


#: the token embedding (tied with the LM head): the seed's W, recorded by default
EMBEDDING = "transformer.wte.weight"
#: the second names of tied parameters, each with the first name it is recorded under
TIED_NAMES = {"lm_head.weight": EMBEDDING}


def parameter_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each parameter of the GPT-2 that training builds, by its name in
    ``model.named_parameters()`` and in that order (the tied LM head is the embedding, named once).
    GPT-2's Conv1D stores its weight as (in, out). tests/test_train_record.py checks it against the model."""
    vocab, hidden = model["vocab_size"], model["hidden_dim"]
    shapes = {EMBEDDING: (vocab, hidden), "transformer.wpe.weight": (model["max_seq_len"], hidden)}
    for layer in range(model["n_layers"]):
        block = f"transformer.h.{layer}"
        shapes.update({
            f"{block}.ln_1.weight": (hidden,), f"{block}.ln_1.bias": (hidden,),
            f"{block}.attn.c_attn.weight": (hidden, 3 * hidden), f"{block}.attn.c_attn.bias": (3 * hidden,),
            f"{block}.attn.c_proj.weight": (hidden, hidden), f"{block}.attn.c_proj.bias": (hidden,),
            f"{block}.ln_2.weight": (hidden,), f"{block}.ln_2.bias": (hidden,),
            f"{block}.mlp.c_fc.weight": (hidden, 4 * hidden), f"{block}.mlp.c_fc.bias": (4 * hidden,),
            f"{block}.mlp.c_proj.weight": (4 * hidden, hidden), f"{block}.mlp.c_proj.bias": (hidden,),
        })
    shapes.update({"transformer.ln_f.weight": (hidden,), "transformer.ln_f.bias": (hidden,)})
    return shapes


def select_parameters(patterns: list[str], names, key: str = "record.tensors") -> list[str]:
    """The parameter names (of ``names``, in their order) that the names or shell-style patterns of
    ``record.tensors`` select (a tied parameter's second name, such as ``lm_head.weight``, selects it under its
    first name); a ThimbleError naming ``key`` for a pattern that selects none."""
    names = list(names)
    tied = {second: first for second, first in TIED_NAMES.items() if first in names}
    unmatched = [pattern for pattern in patterns if not fnmatch.filter([*names, *tied], pattern)]
    if unmatched:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ThimbleError(f"config key {key}: {', '.join(map(repr, unmatched))} names no parameter of the model "
                           f"({len(names)} parameters: {shown}); use names of model.named_parameters() or "
                           "shell-style patterns such as 'transformer.h.*.ln_1.*', or '*' for all")
    chosen = {tied.get(name, name) for name in [*names, *tied]
              if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    return [name for name in names if name in chosen]


def recorded_shapes(settings: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of the parameters an experiment records (``record.tensors``; settings saved before the setting
    existed, such as a calibration's probe, recorded the embedding alone)."""
    shapes = parameter_shapes(settings["model"])
    return {name: shapes[name] for name in select_parameters(settings["record"].get("tensors", [EMBEDDING]), shapes)}


def recorded_elements(settings: dict) -> int:
    """Values of the parameters an experiment records at each step."""
    return sum(math.prod(shape) for shape in recorded_shapes(settings).values())


def largest_recorded_elements(settings: dict) -> int:
    """Values of the largest recorded parameter at one step: what a stage that works tensor by tensor holds of
    one step at once."""
    return max(math.prod(shape) for shape in recorded_shapes(settings).values())


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a parameter as the analyses view it (``thimble.analysis.tensors``): its first axis, a 1-D
    parameter's values each a row, a scalar one row."""
    return shape[0] if shape else 1


def largest_recorded_rows(settings: dict) -> int:
    """Rows of the recorded parameter with the most rows: what a stage's per-row summaries of one tensor hold
    per step."""
    return max(rows_of(shape) for shape in recorded_shapes(settings).values())


def n_parameters(model: dict) -> int:
    """Parameters of the GPT-2 that training builds (tied embeddings, so wte is counted once): wte and
    wpe; per layer two layer norms (2 x 2h), attention c_attn (3h^2 + 3h) and c_proj (h^2 + h), the MLP
    c_fc (4h^2 + 4h) and c_proj (4h^2 + h); the final layer norm (2h). tests/test_train_record.py checks
    it against the model's own count."""
    vocab, hidden, layers = model["vocab_size"], model["hidden_dim"], model["n_layers"]
    return vocab * hidden + model["max_seq_len"] * hidden + layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden


def step_flops(settings: dict) -> float:
    """Training FLOPs of one step: 6 per token and weight (the lm head included), plus attention scores."""
    model, training = settings["model"], settings["training"]
    tokens = training["batch_size"] * model["max_seq_len"]
    attention = 12 * model["n_layers"] * model["max_seq_len"] * model["hidden_dim"]
    return 6.0 * tokens * n_parameters(model) + tokens * attention


def row_bytes(settings: dict) -> int:
    """Stored bytes of one step of the largest recorded tensor in its widest stored dtype: what sizes a chunk
    (every recorded tensor has the same steps per chunk)."""
    return largest_recorded_elements(settings) * widest_element_bytes(rule_of(settings["training"]),
                                                                      settings["record"]["dtype"])


def steps_per_chunk(n_rows: int, row_bytes: int, setting: int | str, max_chunk_bytes: int) -> int:
    """Rows (time steps) per chunk for a dataset of ``n_rows`` rows of ``row_bytes`` each.

    ``setting`` is an explicit count (clamped to ``n_rows``: a chunk cannot
    exceed a fixed-size dataset) or ``"auto"``: the fewest equal chunks whose
    bytes stay within ``max_chunk_bytes``.
    """
    if setting == "auto":
        rows_fit = max_chunk_bytes // row_bytes
        if rows_fit < 1:
            raise ThimbleError(f"one row of {row_bytes} bytes exceeds the chunk cap of {max_chunk_bytes} bytes; "
                               "raise rechunk.max_chunk_bytes")
        n_chunks = math.ceil(n_rows / rows_fit)
        return math.ceil(n_rows / n_chunks)
    return min(int(setting), n_rows)


def chunk_rows(settings: dict) -> int:
    """Steps per chunk of the experiment's recording.h5 (and ΔW′)."""
    rechunk = settings["rechunk"]
    return steps_per_chunk(settings["training"]["steps"] + 1, row_bytes(settings),
                           rechunk["steps_per_chunk"], rechunk["max_chunk_bytes"])


def training_footprint(settings: dict, n_tokens: int) -> dict:
    """Training's bytes on disk (uncompressed bound) and its large arrays in RAM (the seed's safety check)."""
    model, training, record = settings["model"], settings["training"], settings["record"]
    vocab, steps = model["vocab_size"], training["steps"]
    tokens_per_batch = training["batch_size"] * model["max_seq_len"]
    step_bytes = recorded_step_bytes(rule_of(training), record["dtype"], recorded_elements(settings))
    return {
        "stream_bytes_uncompressed": (steps + 1) * step_bytes,
        # bf16 weights and AdamW's two bf16 moments
        "ram_model_optimizer": 3 * n_parameters(model) * 2,
        # logits in bf16 plus their float32 upcast and gradient in the loss
        "ram_logits": tokens_per_batch * vocab * (2 + 4 + 4),
        "ram_corpus": n_tokens * 8,
        "ram_queue": record["queue_steps"] * step_bytes,
    }


def batch_problem(n_tokens: int, settings: dict) -> str | None:
    """Why a corpus of ``n_tokens`` tokens cannot fill one batch of ``settings``, or None (torch-free: the
    workflow asks it while it plans)."""
    windows = max(0, n_tokens - settings["model"]["max_seq_len"])
    batch = settings["training"]["batch_size"]
    if windows < 1:
        return (f"the corpus has {n_tokens} tokens, fewer than model.max_seq_len + 1; use a larger corpus or a "
                "shorter max_seq_len")
    if batch > windows:
        return (f"config key experiments.{settings['name']}.training.batch_size: {batch} is more than the corpus's "
                f"{windows} windows of max_seq_len + 1 tokens; lower it to at most {windows}")
    return None
