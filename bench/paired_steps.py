"""Cost of train.py's Lightning loop against the plain PyTorch loop, step by step in one process.

    python bench/paired_steps.py                 # ~1 min on a 2-core EPYC: 3 epochs of each, interleaved by step
    python bench/paired_steps.py --epochs 6

bench/paired_epochs.py compares whole epochs, ~10 s apart, and this machine's speed drifts by up to 25 % even
between neighbouring epochs. Here the two loops take turns at every step instead, so each pair is measured within
~30 ms and the drift hits both alike. One process builds the Trainer exactly as train.py does (train.build_trainer,
default flags, progress bar on). A callback that goes before all the others runs, after each Lightning training
step, one step of bench/plain_loop.py's loop (the same gather, forward, loss, zero_grad, backward and fused Adam
step) on a second model and optimizer of its own, and times it. A Lightning step is everything between the end of
one such plain step and the start of the next: the other callbacks' and the module's batch-end hooks, Lightning's
end-of-batch checks, fetching the next batch, the batch-start hooks and training_step. Each epoch's end is paired
too: the plain loop's validation pass against Lightning's, from its start to the epoch-end hooks (validation, the
per-epoch checkpoint, the epoch's logging). The first epoch is left out (one-time set-up in both), and so is each epoch's
first training step (it has no plain step before it to be timed against).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired_epochs import fit_beside, parse_epochs  # noqa: E402
from plain_loop import plain_model, plain_step, plain_validate  # noqa: E402

from pytorch_lightning.callbacks import Callback  # noqa: E402


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


def main() -> None:
    epochs = parse_epochs(__doc__, 3, 2, "the first epoch is left out of the summary")
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
