"""Where a training epoch of `python train.py` goes: the model's own work against Lightning's per-step machinery.

    python bench/step_overhead.py                # ~1 min on a 2-core EPYC: the second epoch of train.py's own setup
    python bench/step_overhead.py --epochs 3     # the last of 3 epochs

It builds the Trainer exactly as train.py does (train.build_trainer, default flags, progress bar on) and wraps a
few of Lightning's per-step functions with a timer for the measured epoch only. Each row is the inclusive wall time
of one piece, summed over the epoch's training batches (validation excluded). The first three rows add up to the
epoch; the indented rows below them are parts of those three (those marked "inside training_step" of the first,
the others of the rest of the loop). The wrappers themselves add about a microsecond per call.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from common import use_cached_cuda_check  # noqa: E402
from dataset import MNISTDataModule  # noqa: E402
from model import CVAE  # noqa: E402

from pytorch_lightning.core.module import LightningModule  # noqa: E402
from pytorch_lightning.core.optimizer import LightningOptimizer  # noqa: E402
from pytorch_lightning.loops.fetchers import _PrefetchDataFetcher  # noqa: E402
from pytorch_lightning.loops.optimization.manual import _ManualOptimization  # noqa: E402
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop  # noqa: E402
from pytorch_lightning.trainer import call  # noqa: E402
from pytorch_lightning.trainer.connectors.logger_connector.logger_connector import _LoggerConnector  # noqa: E402

TOTAL: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()
STATE = {"active": False, "in_step": False}
STEP = "training_step (forward, loss, backward, optimizer step)"
FETCH = "next batch (Lightning's fetcher, the DataLoader, the gather)"
MANUAL = "manual optimization loop around training_step"


def timed(owner, name: str, label: str, by_hook: bool = False) -> None:
    """Replace owner.name with a wrapper that adds its wall time to TOTAL while the measured epoch runs. Rows
    timed inside training_step are marked so, as they are part of the training_step row."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not STATE["active"]:
            return original(*args, **kwargs)
        key = f"{label} {args[1]}" if by_hook else label
        is_step = key == f"strategy hook training_step"
        key = STEP if is_step else key + (" (inside training_step)" if STATE["in_step"] else "")
        STATE["in_step"] |= is_step
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TOTAL[key] += time.perf_counter() - start
            CALLS[key] += 1
            if is_step:
                STATE["in_step"] = False

    setattr(owner, name, wrapper)


class MeasuredCVAE(CVAE):
    """The default CVAE; it switches the timers on for the training batches of the last epoch."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch == self.trainer.max_epochs - 1:
            STATE["active"] = True
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if STATE["active"] and batch_idx == self.trainer.num_training_batches - 1:
            STATE["active"] = False  # validation is not measured
            self.epoch_seconds = time.perf_counter() - self._epoch_start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="epochs to run, at least 2; the last one is measured")
    args = p.parse_args()
    timed(_PrefetchDataFetcher, "__next__", FETCH)
    timed(_TrainingEpochLoop, "_build_kwargs", "training_step's arguments (signature inspection)")
    timed(call, "_call_strategy_hook", "strategy hook", by_hook=True)
    timed(call, "_call_callback_hooks", "callbacks' hook", by_hook=True)
    timed(call, "_call_lightning_module_hook", "module hook", by_hook=True)
    timed(LightningModule, "manual_backward", "manual_backward (backward and its hooks)")
    timed(LightningOptimizer, "step", "optimizer.step (Adam and its hooks)")
    timed(_ManualOptimization, "run", MANUAL)
    timed(_TrainingEpochLoop, "on_advance_end", "end of batch: validation check, step logging")
    for name in ("on_batch_start", "on_batch_end"):
        timed(_LoggerConnector, name, f"logger connector {name}")

    train.quiet_lightning()
    use_cached_cuda_check()
    targs = train.parse_args(["--epochs", str(max(2, args.epochs)), "--run-dir", "runs/step_overhead",
                              "--ckpt", "runs/step_overhead/cvae.ckpt"])
    model = MeasuredCVAE()
    train.build_trainer(targs).fit(model, MNISTDataModule(targs.data_dir, batch_size=targs.batch_size))

    epoch, steps = model.epoch_seconds, CALLS[STEP]
    rest = epoch - TOTAL[STEP] - TOTAL[FETCH]
    TOTAL[MANUAL] -= TOTAL[STEP]  # run() contains training_step: keep only its own work
    print(f"\nmeasured epoch: {steps} training batches in {epoch:.3f} s, {epoch / steps * 1e3:.2f} ms per batch "
          f"(validation not included)\n")
    print("| piece | ms per epoch | % of the epoch | µs per batch |")
    print("|---|---|---|---|")
    rows = [(STEP, TOTAL[STEP]), (FETCH, TOTAL[FETCH]), ("the rest of Lightning's loop", rest)]
    rows += sorted(((k, v) for k, v in TOTAL.items() if k not in (STEP, FETCH)), key=lambda kv: -kv[1])
    for i, (key, seconds) in enumerate(rows):
        name = key if i < 3 else f"&nbsp;&nbsp;{key}"  # detail rows: parts of the three above
        print(f"| {name} | {seconds * 1e3:.1f} | {100 * seconds / epoch:.1f} | {seconds / steps * 1e6:.1f} |")

if __name__ == "__main__":
    main()
