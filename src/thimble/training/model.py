"""The model layer: the seed's model, its optimizer, the device and the math they run with.

Below training (``thimble.training.train``) and planning (``thimble.plan``), which both build the same model: this
module imports neither. It holds what decides a step's bits besides the data: the device, torch's
deterministic algorithms on CUDA and MPS, GPT2LMHeadModel as the seed builds it, its loss (on the CPU
``thimble.training.causal_lm_loss``'s row blocks, the same bits as transformers' loss without the float32 logits
matrix), and the optimizer of ``training.update_rule``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from thimble.errors import TrainingError
from thimble.training.adamw import UpdateRule, build_update_rule
from thimble.training.causal_lm_loss import LOSS_PATHS, row_block_causal_lm_loss

#: cuBLAS's setting for deterministic GEMMs; read when CUDA creates its cuBLAS handle
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def loss_path(device: torch.device) -> str:
    """Which loss computes the seed's ``ForCausalLMLoss`` on ``device`` (recorded as ``loss_path``).

    ``row_blocks`` on the CPU, where tests hold its bits equal to transformers'; elsewhere transformers'
    own, until the same check has been made on that device.
    """
    return "row_blocks" if device.type == "cpu" else "transformers"


def use_loss_path(model, path: str) -> None:
    """Make ``model``'s loss the one named (``causal_lm_loss.LOSS_PATHS``)."""
    if path == "row_blocks":
        model.loss_function = row_block_causal_lm_loss
    elif path == "transformers":
        if hasattr(model, "_loss_function"):
            del model._loss_function  # transformers' property falls back to its LOSS_MAPPING
    else:
        raise ValueError(f"unknown loss path {path!r}; one of {', '.join(LOSS_PATHS)}")


def deterministic_math(device: torch.device) -> dict:
    """Switch torch to deterministic algorithms on CUDA and MPS; return what was set (provenance).

    CPU kernels are deterministic at a fixed thread count, and are left as the seed ran them.
    ``CUBLAS_WORKSPACE_CONFIG`` must be set before CUDA creates its cuBLAS handle: ``train``
    sets it before choosing the device.
    """
    deterministic = device.type in ("cuda", "mps")
    if deterministic:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}


def select_device(setting: str) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is 'cuda' but torch sees no CUDA device; set it to auto or cpu")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("training.device is 'mps' but MPS is not available; set it to auto or cpu")
    return torch.device(setting)


def build_model(model_settings: dict, device: torch.device):
    """GPT2LMHeadModel as in the seed: dropout 0, tied embeddings, wte ~ N(0, init_scale), all bf16.

    Draws from torch's global generator (seeded by the caller), like the seed.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=model_settings["vocab_size"],
        n_positions=model_settings["max_seq_len"],
        n_embd=model_settings["hidden_dim"],
        n_layer=model_settings["n_layers"],
        n_head=model_settings["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        # GPT-2's own vocabulary ends with <|endoftext|> = 50256; ours is a byte-level BPE with no special
        # tokens. Only generation reads these ids, never the forward pass or the loss.
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    # the loss GPT2LMHeadModel falls back to anyway (transformers finds no loss in the class name and warns)
    model.loss_type = "ForCausalLM"
    with torch.no_grad():
        nn.init.normal_(model.transformer.wte.weight, mean=0.0, std=model_settings["init_scale"])
    model = model.to(torch.bfloat16).to(device)
    use_loss_path(model, loss_path(device))
    return model


def build_optimizer(model, training: dict, device: torch.device) -> UpdateRule:
    """The optimizer of ``training.update_rule`` over the model's parameters, the embedding first.

    The recorded parameter must come first: under stochastic rounding it draws the step's
    random bits first, which is what lets the replay draw them again.
    """
    hyper = {"lr": training["learning_rate"], "betas": (training["adam_beta1"], training["adam_beta2"]),
             "eps": training["adam_epsilon"], "weight_decay": training["weight_decay"]}
    params = list(model.parameters())
    if params[0] is not model.transformer.wte.weight:
        raise TrainingError("the token embedding is not the model's first parameter; the recording needs it first")
    return build_update_rule(training["update_rule"], params, hyper, training["optimizer_impl"], device,
                             training["seed"])
