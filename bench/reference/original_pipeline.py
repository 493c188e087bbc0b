"""Reference: the original repo's data pipeline, for comparison in bench/train_speed.py.

torchvision's MNIST dataset with a per-image `transforms.ToTensor()` (PIL image -> tensor for every item), a default
DataLoader (per-item __getitem__ + collate), and a plain Lightning Trainer, training this repo's CVAE on the same
55k/5k split. Prints `epoch N: S s` lines.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dataset import prepare_mnist  # noqa: E402
from model import CVAE  # noqa: E402


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        print(f"epoch {trainer.current_epoch + 1}: {time.perf_counter() - self.start:.2f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.add_argument("--batch-size", type=int, default=100, help="batch size (default: 100)")
    p.add_argument("--data-dir", default="data", help="MNIST folder (default: data)")
    p.add_argument("--out-dir", default="/tmp/original_pipeline", help="logs and checkpoints (default: %(default)s)")
    args = p.parse_args()
    pl.seed_everything(0, verbose=False)
    prepare_mnist(args.data_dir)
    full = datasets.MNIST(args.data_dir, train=True, download=False, transform=transforms.ToTensor())
    train_set, val_set = random_split(full, [55_000, 5_000], generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=args.epochs, default_root_dir=args.out_dir, callbacks=[EpochTimer()],
                         enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(CVAE(), DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
                DataLoader(val_set, batch_size=args.batch_size))


if __name__ == "__main__":
    main()
