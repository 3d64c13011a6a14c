"""A Lightning run recorded by thimble: a small transformer language model (``nn.TransformerEncoderLayer``,
causal mask, LayerNorm) in Lightning's ``bf16-true`` precision (bf16 parameters) on the Shakespeare tokens,
AdamW with a cosine schedule set in ``configure_optimizers``, stepped by Lightning's automatic optimization
(``optimizer.step(closure)``: forward and backward run inside the step).

    python examples/lightning_lm.py runs/lightning_lm --steps 2000
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import numpy as np
import torch
from safetensors.numpy import load_file

import thimble.lightning


class TinyLM(pl.LightningModule):
    def __init__(self, vocab: int, width: int, seq_len: int, steps: int, lr: float):
        super().__init__()
        self.save_hyperparameters()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Parameter(torch.zeros(seq_len, width))
        self.block = torch.nn.TransformerEncoderLayer(width, 2, 4 * width, dropout=0.0, batch_first=True)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def training_step(self, batch, index):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        length = inputs.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=self.dtype)
        hidden = self.block(self.embedding(inputs) + self.positions[:length], src_mask=mask, is_causal=True)
        logits = self.head(self.norm(hidden))
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="where the recording goes (its stream/ folder)")
    parser.add_argument("--data", default="results/data/shakespeare_1k")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    tokens = torch.from_numpy(np.load(f"{args.data}/tokens.npy").astype(np.int64))
    dead = load_file(f"{args.data}/live_dead_tokens.safetensors")["dead_mask"]
    windows = tokens[: len(tokens) // (args.seq_len + 1) * (args.seq_len + 1)].view(-1, args.seq_len + 1)
    pl.seed_everything(0)
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch, shuffle=True)
    model = TinyLM(len(dead), args.width, args.seq_len, args.steps, args.lr)
    recorder = thimble.lightning.RecorderCallback(args.run, tensors="*", token_groups={"dead": dead})
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", precision="bf16-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[recorder])
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
