"""Per-epoch cost of train.py's Lightning loop against the plain PyTorch loop, epoch by epoch in one process.

    python bench/paired_epochs.py                # ~3 min on a 2-core EPYC: 10 epochs of each, interleaved
    python bench/paired_epochs.py --epochs 31    # more pairs (~10 min)

bench/train_speed.py runs each variant as a process of its own, so half a minute or more separates the runs it
compares, and this machine's speed drifts by 10-25 % over such spans. Here one process builds the Trainer exactly as
train.py does (train.build_trainer, default flags, progress bar on) and, beside each of its epochs, runs one epoch
of bench/plain_loop.py's loop on a second model and optimizer of its own over the same in-memory data: before the
Lightning epoch on odd epochs, after it on even ones, so that neither always goes first. Each pair of epochs ran
back to back within ~20 s. A Lightning epoch is timed over the same span as train.py's own epoch line (training
batches and validation, from the first on_train_epoch_start hook to the first on_train_epoch_end hook); a plain
epoch is training plus validation too. The first pair is left out of the summary (one-time set-up in both).

Both models draw dropout noise from the same global RNG, so the Lightning model's numbers differ from a plain
`python train.py` run of the same seed; its speed does not.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from common import use_cached_cuda_check  # noqa: E402
from dataset import MNISTDataModule  # noqa: E402
from model import CVAE  # noqa: E402
from plain_loop import plain_epoch, plain_model  # noqa: E402

from pytorch_lightning.callbacks import Callback  # noqa: E402


class PlainEpochBeside(Callback):
    """Runs one plain-loop epoch outside each timed Lightning epoch and records (lightning s, plain s) pairs.
    It must be the trainer's first callback, so that its start hook is the first and its end hook the first."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []
        self.model, self.opt = plain_model()
        self.plain_seconds = 0.0

    def run_plain(self, trainer) -> None:
        data = trainer.datamodule
        start = time.perf_counter()
        plain_epoch(self.model, self.opt, data.splits["train"], data.splits["val"], data.batch_size)
        self.plain_seconds = time.perf_counter() - start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch % 2 == 0:
            self.run_plain(trainer)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        lightning = time.perf_counter() - self.start
        first = "plain" if trainer.current_epoch % 2 == 0 else "Lightning"
        if first == "Lightning":
            self.run_plain(trainer)
        self.pairs.append((lightning, self.plain_seconds))
        print(f"epoch {trainer.current_epoch + 1}: Lightning {lightning:.2f} s, plain {self.plain_seconds:.2f} s, "
              f"ratio {lightning / self.plain_seconds:.3f} ({first} ran first)", flush=True)


def fit_beside(beside: Callback, epochs: int, run_dir: str | Path, extra: Sequence[str] = ()):
    """Train as `python train.py --epochs EPOCHS` does (train.build_trainer, default flags unless `extra` train.py
    flags say otherwise, progress bar on), with `beside` as the first callback, so its hooks run before the
    others'. Returns (trainer, train.py's parsed args)."""
    train.quiet_lightning()
    use_cached_cuda_check()
    targs = train.parse_args(["--epochs", str(epochs), "--run-dir", str(run_dir), "--ckpt", f"{run_dir}/cvae.ckpt",
                              *extra])
    trainer = train.build_trainer(targs)
    # train.py's epoch lines would count the plain-loop work run inside their span; the benches print their own.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, train.EpochSummary)]
    trainer.callbacks.insert(0, beside)
    trainer.fit(CVAE(), MNISTDataModule(targs.data_dir, batch_size=targs.batch_size, seed=targs.seed))
    return trainer, targs


def parse_epochs(doc: str, default: int, minimum: int, why: str) -> int:
    """The benches' one flag, --epochs, at least `minimum` (`why` says why)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=default,
                   help=f"epochs of each loop, at least {minimum} (default: {default})")
    epochs = p.parse_args().epochs
    if epochs < minimum:
        p.error(f"--epochs must be at least {minimum}: {why}")
    return epochs


def main() -> None:
    epochs = parse_epochs(__doc__, 10, 3, "the first pair is left out of the summary")
    beside = PlainEpochBeside()
    trainer, targs = fit_beside(beside, epochs, "runs/paired_epochs")

    pairs, n_train = beside.pairs[1:], len(trainer.datamodule.splits["train"])
    ratios = sorted(lt / pt for lt, pt in pairs)
    lightning = statistics.median(lt for lt, _ in pairs)
    plain = statistics.median(pt for _, pt in pairs)
    print(f"\n{len(pairs)} pairs of epochs (the first left out), batch {targs.batch_size}\n")
    print("| loop | s/epoch (median) | samples/s |")
    print("|---|---|---|")
    print(f"| train.py's Lightning loop | {lightning:.2f} | {n_train / lightning:,.0f} |")
    print(f"| plain PyTorch loop | {plain:.2f} | {n_train / plain:,.0f} |")
    print(f"\nLightning / plain, per pair: median {statistics.median(ratios):.3f}x, "
          f"range {ratios[0]:.3f}-{ratios[-1]:.3f}x; ratio of the medians {lightning / plain:.3f}x")


if __name__ == "__main__":
    main()
