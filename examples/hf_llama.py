"""A Hugging Face ``Trainer`` run recorded by thimble: a small Llama-architecture model with bf16 parameters on
the Shakespeare tokens, a linear warm-up and decay, weight decay 0.1 and gradient clipping 1.0 (Trainer's own
AdamW, its fused CPU kernel by default).

    snakemake --cores 2 results/data/shakespeare_1k/tokens.npy results/data/shakespeare_1k/live_dead_tokens.safetensors
    python examples/hf_llama.py runs/llama_hf --steps 2000

The tokens' dead rows (tokens of the tokenizer the model corpus never uses) are handed to the recorder as
``token_groups``, so the analysis splits the embedding as it splits the seed's.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import thimble.hf


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of the token stream, each a causal-LM example."""

    def __init__(self, tokens: np.ndarray, length: int):
        self.tokens, self.length = torch.from_numpy(tokens.astype(np.int64)), length

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.length

    def __getitem__(self, index: int) -> dict:
        window = self.tokens[index * self.length:(index + 1) * self.length]
        return {"input_ids": window, "labels": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="where the recording goes (its stream/ folder)")
    parser.add_argument("--data", default="results/data/shakespeare_1k")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--optim", default="adamw_torch_fused",
                        help="Trainer's optim: adamw_torch_fused (its default on the CPU) or adamw_torch (torch's "
                             "AdamW, whose decay is its own rounding step)")
    args = parser.parse_args()

    tokens = np.load(f"{args.data}/tokens.npy")
    dead = load_file(f"{args.data}/live_dead_tokens.safetensors")["dead_mask"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(dead), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup, weight_decay=0.1,
            max_grad_norm=1.0, optim=args.optim, use_cpu=True, report_to=[], save_strategy="no", seed=0,
            logging_steps=1, disable_tqdm=True)  # a log per step: the recorder takes each step's loss from it
        recorder = thimble.hf.RecorderCallback(args.run, tensors="*", token_groups={"dead": dead})
        Trainer(model=model, args=training, train_dataset=TokenWindows(tokens, args.seq_len),
                callbacks=[recorder]).train()


if __name__ == "__main__":
    main()
