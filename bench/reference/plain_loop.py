"""Reference: the same CVAE trained by a minimal plain-PyTorch loop over in-memory tensors (no Lightning).

Same data split, batch size, optimizer and per-epoch work (train on 55k, validate on 5k) as `python train.py`;
used by bench/train_speed.py and bench/paired_steps.py as the lower bound for what the framework costs. Prints
`epoch N: S s` lines.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dataset import MNISTDataModule, TensorPairDataset  # noqa: E402
from model import CVAE, elbo_loss  # noqa: E402


def plain_model() -> tuple[CVAE, torch.optim.Optimizer]:
    """The plain loop's model, default settings, and the same optimizer train.py configures for it."""
    model = CVAE()
    return model, model.configure_optimizers()


def plain_step(model: CVAE, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """One training step: forward, loss, zero_grad, backward, optimizer step."""
    recon, mean, logvar = model(xb, yb)
    loss, _, _ = elbo_loss(recon, xb, mean, logvar)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def plain_validate(model: CVAE, val: TensorPairDataset, batch_size: int) -> float:
    """The validation pass, in eval mode without gradients. Returns the mean validation loss."""
    model.eval()
    val_loss = 0.0
    with torch.no_grad():
        for idx in torch.arange(len(val)).split(batch_size):
            xb, yb = val[idx]
            recon, mean, logvar = model(xb, yb)
            val_loss += elbo_loss(recon, xb, mean, logvar)[0].item() * len(idx)
    return val_loss / len(val)


def plain_epoch(model: CVAE, opt: torch.optim.Optimizer, train: TensorPairDataset, val: TensorPairDataset,
                batch_size: int) -> float:
    """One epoch of the plain loop: shuffled training batches, then the validation pass. Returns the val loss."""
    model.train()
    for idx in torch.randperm(len(train)).split(batch_size):
        plain_step(model, opt, *train[idx])  # the same uint8 gather + float scaling as train.py's batches
    return plain_validate(model, val, batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.add_argument("--batch-size", type=int, default=100, help="batch size (default: 100)")
    p.add_argument("--data-dir", default="data", help="MNIST folder (default: data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data = MNISTDataModule(args.data_dir, batch_size=args.batch_size, seed=args.seed)
    data.prepare_data()
    data.setup()
    model, opt = plain_model()
    for epoch in range(args.epochs):
        start = time.perf_counter()
        val_loss = plain_epoch(model, opt, data.splits["train"], data.splits["val"], args.batch_size)
        print(f"epoch {epoch + 1}: {time.perf_counter() - start:.2f} s (val loss {val_loss:.2f})", flush=True)


if __name__ == "__main__":
    main()
