"""A plain PyTorch loop recorded by thimble: a small CNN with LayerNorm (not a transformer) with float32
parameters, its forward under bf16 autocast, on synthetic data (noisy images of 4 classes of oriented bars),
AdamW with a one-cycle schedule and gradient clipping. The parameters and AdamW's state are float32, so each
is analysed in float32's own lattice.

    python examples/plain_autocast.py runs/cnn_autocast --steps 2000
"""

from __future__ import annotations

import argparse

import torch

import thimble


def synthetic_batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of an oriented bar (one of 4 orientations, the class) at a random offset, in Gaussian noise."""
    labels = torch.randint(4, (size,), generator=generator)
    images = 0.5 * torch.randn(size, 1, 12, 12, generator=generator)
    offsets = torch.randint(2, 10, (size,), generator=generator)
    line = torch.arange(12)
    for index, (label, offset) in enumerate(zip(labels.tolist(), offsets.tolist())):
        if label == 0:
            images[index, 0, offset, :] += 1.0
        elif label == 1:
            images[index, 0, :, offset] += 1.0
        elif label == 2:
            images[index, 0, line, line] += 1.0
        else:
            images[index, 0, line, 11 - line] += 1.0
    return images, labels


class BarNet(torch.nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.norm = torch.nn.LayerNorm([channels, 12, 12])
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.hidden = torch.nn.Linear(channels * 16, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.norm(self.conv(x))))
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="where the recording goes (its stream/ folder)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = BarNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    with thimble.Recorder(args.run, model, optimizer, tensors="*") as rec:
        for _ in range(args.steps):
            images, labels = synthetic_batch(generator, args.batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            rec.log(loss=loss)
            optimizer.zero_grad()
            schedule.step()


if __name__ == "__main__":
    main()
