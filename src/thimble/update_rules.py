"""The update rules an experiment can train with, and what each one records (no torch, no h5py here).

``training.update_rule`` names how AdamW's update reaches the bf16 weights:

- ``bf16``: torch's AdamW on bf16 parameters and bf16 moments; the update is rounded to
  nearest (the seed's rule, the one that freezes).
- ``stochastic_rounding``: torchao's AdamW with ``bf16_stochastic_round=True``: moments
  in bf16, the update formed in float32 and rounded to bf16 up or down at random, with
  the probability of its distance (unbiased in expectation).
- ``kahan``: torch-optimi's AdamW with ``kahan_sum=True``: bf16 weights and moments plus a
  bf16 compensation buffer that carries what rounding threw away into the next step.
- ``fp32_master``: torch's AdamW on float32 master weights and float32 moments; the
  model computes with their bf16 copy (round to nearest), as mixed-precision training does.

Every rule records the bf16 W the forward pass saw and its bf16 gradient; the optimizer's
state is recorded as the optimizer stores it (bf16, or float32 losslessly), together with
what a rule keeps beside the moments (the Kahan buffer, the float32 master weights), so
each step can be replayed through the rule's own ``step()``.
"""

from __future__ import annotations

import hashlib

UPDATE_RULES = ("bf16", "stochastic_rounding", "kahan", "fp32_master")

#: bytes of one stored element, by storage dtype
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def rule_of(mapping) -> str:
    """``update_rule`` of a recording's attributes, a summary or the training settings: ``bf16`` for those
    made before the setting existed, which trained with it."""
    return str(mapping.get("update_rule", "bf16"))


def hyperparameters(attrs) -> dict:
    """AdamW's settings from a recording's attributes (the seed's names), as torch's AdamW takes them."""
    return {"lr": float(attrs["learning_rate"]), "betas": (float(attrs["adam_beta1"]), float(attrs["adam_beta2"])),
            "eps": float(attrs["adam_epsilon"]), "weight_decay": float(attrs["weight_decay"])}


#: the state key, in a parameter's ``params/<name>/`` group, of each of the embedding's seed names: the recorded
#: value and gradient, and the update rule's state under the optimizer's own key
STATE_KEYS = {"W": "value", "grad_W": "grad", "momentum_W": "exp_avg", "variance_W": "exp_avg_sq",
              "master_W": "master", "kahan_compensation_W": "kahan_comp"}
#: the seed's name of each state key (the embedding's root names, and the analyses' names for any tensor's roles)
SEED_NAMES = {key: name for name, key in STATE_KEYS.items()}


def recorded_keys(update_rule: str, storage: str = "bfloat16") -> dict[str, str]:
    """What each recorded parameter keeps at every step under ``update_rule``, by state key (``value``,
    ``grad``, ``exp_avg``, ...), each with its stored dtype."""
    return {STATE_KEYS[name]: dtype for name, dtype in recorded_tensors(update_rule, storage).items()}


def recorded_tensors(update_rule: str, storage: str = "bfloat16") -> dict[str, str]:
    """The (V, D) tensors recorded at every step under ``update_rule``, each with its storage dtype.

    ``storage`` (record.dtype) is how the bf16 tensors are stored; float32 state is stored as float32.
    """
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"unknown training.update_rule {update_rule!r}; use one of {UPDATE_RULES}")
    tensors = {"W": storage, "grad_W": storage}
    if update_rule == "fp32_master":
        tensors.update(momentum_W="float32", variance_W="float32", master_W="float32")
    else:
        tensors.update(momentum_W=storage, variance_W=storage)
    if update_rule == "kahan":
        tensors["kahan_compensation_W"] = storage
    return tensors


def step_bytes(update_rule: str, storage: str, elements: int) -> int:
    """Bytes one recorded step takes, uncompressed, over all its tensors (``elements``: the recorded
    parameters' values)."""
    return elements * sum(ELEMENT_BYTES[dtype] for dtype in recorded_tensors(update_rule, storage).values())


def widest_element_bytes(update_rule: str, storage: str) -> int:
    """Bytes of the widest stored element: what sizes the largest chunk of a rechunked tensor."""
    return max(ELEMENT_BYTES[dtype] for dtype in recorded_tensors(update_rule, storage).values())


def stochastic_rounding_seed(seed: int, step: int) -> int:
    """The torch seed set just before optimizer step ``step`` under stochastic rounding.

    A function of (training.seed, step) and nothing else, so a replay or a resume draws the
    same random bits for that step without storing the generator's state.
    """
    digest = hashlib.sha256(f"thimble stochastic rounding {seed} {step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rule_problems(key: str, training: dict, record: dict) -> list[str]:
    """Config problems of an experiment's update rule (``key``: the experiment's config key)."""
    rule, implementation = training["update_rule"], training["optimizer_impl"]
    problems = []
    if rule != "bf16" and record["dtype"] != "bfloat16":
        problems.append(f"config key {key}.record.dtype: {record['dtype']} is the seed's storage for the bf16 rule "
                        f"only; set it to bfloat16 for training.update_rule {rule}")
    if rule == "stochastic_rounding" and implementation != "auto":
        problems.append(f"config key {key}.training.optimizer_impl: torchao's stochastic-rounding AdamW has one "
                        f"(compiled) implementation; set optimizer_impl to auto, not {implementation}")
    if rule == "kahan" and implementation == "fused":
        problems.append(f"config key {key}.training.optimizer_impl: torch-optimi has no fused CPU/CUDA kernel "
                        "here; use auto, single_tensor or foreach for the kahan rule")
    return problems
