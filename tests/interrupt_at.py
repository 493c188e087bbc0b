"""train.py that signals itself at an exact point of training: the crash and Ctrl-C tests' child process.

    python tests/interrupt_at.py KILL checkpoint-saved 0 -- --epochs 3 --run-dir ...

SIGNAL is KILL (kill -9: nothing runs after it) or INT (Ctrl-C). POINT EPOCH is where it arrives (epochs from 0):
  checkpoint-saved  right after that epoch's last.ckpt is on disk;
  mid-epoch         after half of that epoch's training batches;
  epoch-logged      after that epoch's validation pass, whose log row is written, before its checkpoint.
A signal sent by the process to itself arrives there and nowhere else, however fast or busy the machine is; a test
that waits for a file and then signals from outside can be early or late.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from checkpoint import AtomicCheckpointIO  # noqa: E402

POINTS = ("checkpoint-saved", "mid-epoch", "epoch-logged")


class SignalAt(pl.Callback):
    """Sends `signum` to this process at `point` of epoch `epoch` (the two points that are callback hooks)."""

    def __init__(self, signum: int, point: str, epoch: int) -> None:
        self.signum, self.point, self.epoch = signum, point, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.point == "mid-epoch" and trainer.current_epoch == self.epoch \
                and batch_idx + 1 == trainer.num_training_batches // 2:
            os.kill(os.getpid(), self.signum)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.point == "epoch-logged" and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


def signal_after_checkpoint(signum: int, epoch: int) -> None:
    """Make the per-epoch checkpoint write of `epoch` send `signum` as soon as the file is in place."""
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_signal(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if Path(path) == train.last_checkpoint(Path(path).parents[1]) and checkpoint["epoch"] == epoch:
            os.kill(os.getpid(), signum)

    AtomicCheckpointIO.save_checkpoint = save_then_signal


def main() -> int:
    name, point, epoch, dashes, *argv = sys.argv[1:]
    if name not in ("KILL", "INT") or point not in POINTS or dashes != "--":
        sys.exit(__doc__)
    signum, epoch = getattr(signal, f"SIG{name}"), int(epoch)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the parent ignored
    if point == "checkpoint-saved":
        signal_after_checkpoint(signum, epoch)
    else:
        build_trainer = train.build_trainer
        train.build_trainer = lambda args: build_trainer(args, callbacks=[SignalAt(signum, point, epoch)])
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
