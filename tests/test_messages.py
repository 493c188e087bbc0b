"""Everything train.py prints and logs, against what the run really did: the device line, one summary line per epoch,
the test line and the final line; every epoch's logged means (CSV and TensorBoard), during the KL warm-up too; and the
command it prints after Ctrl-C before the first epoch is saved. (Ctrl-C later, kill -9 and --resume:
test_reliability.py; the sample grid: test_core.py and test_options.py.)

One run trains 3 epochs of 4 steps with a warm-up of 1.5 epochs (6 steps), beta 0.5 and free bits, so the loss that
is optimised, the ELBO that is reported and beta at each epoch's end all differ; a callback replays every training
and validation batch's forward pass (same dropout and z noise) so the test can recompute each logged mean.
"""
from __future__ import annotations

import contextlib
import csv
import io
import re
from types import SimpleNamespace

import pytest
import torch

import train
from model import elbo_loss

EPOCHS, STEPS, VAL_BATCHES, BATCH = 3, 4, 2, 50
WARMUP, KL_WEIGHT, FREE_BITS = 1.5, 0.5, 0.2
FLAGS = ["--epochs", str(EPOCHS), "--train-size", str(STEPS * BATCH), "--val-size", str(VAL_BATCHES * BATCH),
         "--batch-size", str(BATCH), "--kl-warmup-epochs", str(WARMUP), "--kl-weight", str(KL_WEIGHT),
         "--free-bits", str(FREE_BITS), "--prior", "none", "--no-progress", "--accelerator", "cpu", "--seed", "3"]
NAMES = [f"{stage}_{term}" for stage in ("train", "val") for term in ("loss", "recon", "kl")]


class Replay(train.Callback):
    """Per epoch, the loss each training step optimised, and each step's (and validation batch's) plain ELBO terms
    recomputed from a replay of its forward pass with the random state it ran with."""

    def __init__(self) -> None:
        self.train: dict[int, list[tuple[float, float, float]]] = {}  # epoch -> (optimised loss, recon, kl) per step
        self.val: dict[int, list[tuple[float, float, float]]] = {}    # epoch -> (loss, recon, kl) per batch

    def replay(self, module, batch) -> tuple[float, float, float]:
        after = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        with torch.no_grad():
            x, y = batch
            recon, mean, logvar = module(x, y)
            loss, rec, kl = elbo_loss(recon, x, mean, logvar, kl_weight=KL_WEIGHT)  # the plain ELBO, beta 0.5
        torch.set_rng_state(after)
        return loss.item(), rec.item(), kl.item()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.rng, self.batch = torch.get_rng_state(), batch

    def on_before_backward(self, trainer, module, loss) -> None:
        _, rec, kl = self.replay(module, self.batch)
        self.train.setdefault(trainer.current_epoch, []).append((loss.item(), rec, kl))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.rng = torch.get_rng_state()
            self.val.setdefault(trainer.current_epoch, []).append(self.replay(module, batch))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> SimpleNamespace:
    """train.main with FLAGS and a Replay; what it printed, logged and wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = tmp_path_factory.mktemp("messages")
    replay, build_trainer = Replay(), train.build_trainer
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(train, "build_trainer", lambda args, callbacks=None: build_trainer(args, [replay]))
        code = train.main([*FLAGS, "--data-dir", str(data_dir), "--ckpt", str(tmp / "c.ckpt"),
                           "--run-dir", str(tmp / "run")])
        threads = torch.get_num_threads()
    assert code == 0, err.getvalue()
    version = tmp / "run" / "logs" / "version_0"
    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    return SimpleNamespace(out=out.getvalue(), replay=replay, rows=rows, events=events, threads=threads,
                           ckpt=tmp / "c.ckpt")


def mean(values) -> float:
    return sum(values) / len(values)


def expected_means(run) -> dict[int, dict[str, float]]:
    """Per epoch, every logged mean recomputed from the replay: equal batches, so plain means over them."""
    means = {}
    for epoch in range(EPOCHS):
        steps, val = run.replay.train[epoch], run.replay.val[epoch]
        assert (len(steps), len(val)) == (STEPS, VAL_BATCHES)
        means[epoch] = {
            "train_loss": mean([s[0] for s in steps]), "train_recon": mean([s[1] for s in steps]),
            "train_kl": mean([s[2] for s in steps]),
            "val_loss": mean([v[0] for v in val]), "val_recon": mean([v[1] for v in val]),
            "val_kl": mean([v[2] for v in val]),
            # beta at the epoch's last step (counted from 0): ramped over WARMUP * STEPS steps
            "kl_weight": KL_WEIGHT * min(1.0, (epoch + 1) * STEPS / (WARMUP * STEPS)),
        }
    return means


def test_every_epochs_logged_means_are_what_the_epoch_computed(run):
    """One CSV row per epoch: the training means of the loss that was optimised (beta ramped, free bits) and of the
    plain ELBO's terms, the validation means of the plain ELBO (beta 0.5, no free bits, no dropout), and beta at the
    epoch's last step: 2/3 of 0.5 at the end of the first epoch, inside the warm-up, then 0.5."""
    want = expected_means(run)
    assert [int(row["epoch"]) for row in run.rows] == list(range(EPOCHS))
    for row in run.rows:
        epoch = int(row["epoch"])
        got = {name: float(row[name]) for name in [*NAMES, "kl_weight"]}
        assert got == pytest.approx(want[epoch], rel=1e-5), epoch
    assert want[0]["kl_weight"] == pytest.approx(KL_WEIGHT * 2 / 3)  # 4 of the 6 warm-up steps done
    # The optimised loss differs from the reported ELBO while beta ramps, so the two cannot be confused.
    assert abs(want[0]["train_loss"] - (want[0]["train_recon"] + KL_WEIGHT * want[0]["train_kl"])) > 0.1


def test_tensorboard_gets_the_same_means_at_each_epochs_last_step(run):
    want = expected_means(run)
    for name in [*NAMES, "kl_weight"]:
        scalars = run.events.Scalars(name)
        assert [s.step for s in scalars] == [(epoch + 1) * STEPS - 1 for epoch in range(EPOCHS)], name
        assert [s.value for s in scalars] == pytest.approx([want[e][name] for e in range(EPOCHS)], rel=1e-5), name


def test_it_prints_the_device_every_epochs_means_the_test_terms_and_the_checkpoint(run):
    """The lines a user reads: the device and threads; per epoch, its number and the logged means (2 decimals), and
    the seconds it took; the test pass's terms as TensorBoard holds them; where the checkpoint went."""
    lines = run.out.splitlines()
    assert f"Device: cpu (1 device(s) x 1 node(s), precision 32-true, {run.threads} CPU threads)" in lines
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == EPOCHS
    for epoch, (line, row) in enumerate(zip(epoch_lines, run.rows)):
        numbers = ", ".join(f"{name} {float(row[name]):.2f}" for name in NAMES)
        assert re.fullmatch(rf"epoch {epoch + 1}/{EPOCHS}: {numbers} \((\d+\.\d\d)s\)", line), line
        assert float(line.rsplit("(", 1)[1].rstrip("s)")) > 0
    test = {name: run.events.Scalars(f"test_{name}")[0].value for name in ("loss", "recon", "kl")}
    assert (f"test: loss {test['loss']:.2f}, recon {test['recon']:.2f} (MSE per pixel {test['recon'] / 784:.4f}), "
            f"kl {test['kl']:.2f}") in lines
    assert lines[-1] == f"Wrote {run.ckpt}"
    assert lines.index(epoch_lines[-1]) < lines.index(f"Wrote {run.ckpt}")


def test_without_validation_the_epoch_lines_show_the_training_means(data_dir, tmp_path, capsys):
    """--limit-val-batches 0: each epoch's line holds its training means, as logged, and nothing of validation."""
    assert train.main(["--epochs", "2", "--train-size", "200", "--batch-size", "50", "--limit-val-batches", "0",
                       "--prior", "none", "--no-progress", "--accelerator", "cpu", "--data-dir", str(data_dir),
                       "--ckpt", str(tmp_path / "c.ckpt"), "--run-dir", str(tmp_path / "run")]) == 0
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(epoch_lines) == len(rows) == 2
    for epoch, (line, row) in enumerate(zip(epoch_lines, rows)):
        numbers = ", ".join(f"{name} {float(row[name]):.2f}" for name in NAMES[:3])
        assert re.fullmatch(rf"epoch {epoch + 1}/2: {numbers} \(\d+\.\d\ds\)", line), line


def test_ctrl_c_in_the_first_epoch_says_to_start_again_with_the_same_flags(data_dir, tmp_path, monkeypatch, capsys,
                                                                           restore_sigint):
    """Nothing is saved yet, so the command to run is the same one (without --resume, which would have nothing to
    resume from): exit 130, one line on stderr, no checkpoint."""
    calls = []

    def ctrl_c_at_the_third_step(self, batch, batch_idx):
        calls.append(batch_idx)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return type(self)._shared_step(self, batch, "train")

    monkeypatch.setattr(train.CVAE, "training_step", ctrl_c_at_the_third_step)
    argv = [*FLAGS, "--data-dir", str(data_dir), "--ckpt", str(tmp_path / "c.ckpt"), "--run-dir", str(tmp_path / "run")]
    assert train.main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Interrupted")]
    assert err == [f"Interrupted before the first epoch finished; start again with: python train.py "
                   f"{' '.join(argv)}"]
    assert not (tmp_path / "c.ckpt").exists() and not train.last_checkpoint(tmp_path / "run").exists()
