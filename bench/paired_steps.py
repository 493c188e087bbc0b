"""Cost of train.py's Lightning loop against the plain PyTorch loop, step by step in one process.

    python bench/paired_steps.py                 # ~1 min on a 2-core machine: 3 epochs of each, interleaved by step
    python bench/paired_steps.py --epochs 6

Two separate processes, or even two neighbouring epochs, are seconds apart, and a shared 2-core machine's speed
drifts by up to 25 % over such spans. Here the two loops take turns at every step instead, so each pair is measured
within ~30 ms and the drift hits both alike. One process builds the Trainer exactly as train.py does
(train.build_trainer, default flags, progress bar on). A callback that goes before all the others runs, after each
Lightning training step, one step of bench/reference/plain_loop.py's loop (the same gather, forward, loss,
zero_grad, backward and fused Adam step) on a second model and optimizer of its own, and times it. A Lightning step
is everything between the end of one such plain step and the start of the next: the other callbacks' and the
module's batch-end hooks, Lightning's end-of-batch checks, fetching the next batch, the batch-start hooks and the
training step with its backward and optimizer step. Each epoch's end is paired too: the plain loop's validation pass
against Lightning's, from its start to the epoch-end hooks (validation, the per-epoch checkpoint, the epoch's
logging). The first epoch is left out (one-time set-up in both), and so is each epoch's first training step (it has
no plain step before it to be timed against).

Both models draw dropout noise from the same global RNG, so the Lightning model's numbers differ from a plain
`python train.py` run of the same seed; its speed does not. For where the time of an epoch goes, add
`profiler="simple"` to the Trainer in train.build_trainer and run train.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from pytorch_lightning.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "reference"))
import train  # noqa: E402
from plain_loop import plain_model, plain_step, plain_validate  # noqa: E402


class PlainStepBeside(Callback):
    """Interleaves the plain loop with Lightning's, step by step, and records the times of both.
    It must be the trainer's first callback, so that its hooks run before the others'."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []  # (lightning s, plain s) per training step
        self.ends: list[tuple[float, float]] = []  # (lightning s, plain s) per epoch end (validation and the rest)
        self.model, self.opt = plain_model()
        self.batches: list[torch.Tensor] = []
        self.last_end: float | None = None  # when the last plain step ended; None: no Lightning step to time yet
        self.end_start = self.plain_end = 0.0  # this epoch's end: when Lightning's began, how long the plain one took

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.model.train()
        # A new shuffled pass over the training set, as in the plain loop's epoch; popped from the end.
        data = trainer.datamodule
        self.batches = list(torch.randperm(len(data.splits["train"])).split(data.batch_size))[::-1]
        self.last_end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        lightning = start - self.last_end if self.last_end is not None else None
        plain_step(self.model, self.opt, *trainer.datamodule.splits["train"][self.batches.pop()])
        plain = time.perf_counter() - start
        if lightning is not None and trainer.current_epoch > 0:
            self.steps.append((lightning, plain))
        self.last_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        data = trainer.datamodule
        start = time.perf_counter()
        plain_validate(self.model, data.splits["val"], data.batch_size)
        self.plain_end = time.perf_counter() - start
        self.end_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self.ends.append((time.perf_counter() - self.end_start, self.plain_end))


def fit_beside(beside: Callback, epochs: int, run_dir: str | Path, extra: Sequence[str] = ()):
    """Train as `python train.py --epochs EPOCHS` does (train.build_trainer, default flags unless `extra` train.py
    flags say otherwise, progress bar on), with `beside` as the first callback, so its hooks run before the
    others'. Returns (trainer, train.py's parsed args)."""
    targs = train.parse_args(["--epochs", str(epochs), "--run-dir", str(run_dir), "--ckpt", f"{run_dir}/cvae.ckpt",
                              *extra])
    trainer = train.build_trainer(targs)
    # train.py's epoch lines would count the plain-loop work run inside their span; this bench prints its own.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, train.EpochSummary)]
    trainer.callbacks.insert(0, beside)
    trainer.fit(train.build_model(targs), train.build_data(targs))
    return trainer, targs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each loop, at least 2 (default: 3)")
    epochs = p.parse_args().epochs
    if epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is left out of the summary")
    beside = PlainStepBeside()
    _, targs = fit_beside(beside, epochs, "runs/paired_steps")

    steps, ends = beside.steps, beside.ends
    ratios = sorted(lt / pt for lt, pt in steps)
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"\n{len(steps)} pairs of training steps and {len(ends)} of epoch ends (epochs 2-{epochs}), "
          f"batch {targs.batch_size}\n")
    print("| loop | ms per step (median) | ms per epoch end (median) | s per epoch (total / epochs) |")
    print("|---|---|---|---|")
    for name, i in (("train.py's Lightning loop", 0), ("plain PyTorch loop", 1)):
        per_epoch = (sum(s[i] for s in steps) + sum(e[i] for e in ends)) / (epochs - 1)
        print(f"| {name} | {statistics.median(s[i] for s in steps) * 1e3:.2f} "
              f"| {statistics.median(e[i] for e in ends) * 1e3:.0f} | {per_epoch:.2f} |")
    total = [sum(s[i] for s in steps) + sum(e[i] for e in ends) for i in (0, 1)]
    print(f"\nLightning / plain: per step, median of the pairs {statistics.median(ratios):.3f}x "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}x); per epoch, steps and ends together "
          f"{total[0] / total[1]:.3f}x")


if __name__ == "__main__":
    main()
