"""--lr-schedule: the learning rate each step really took, against torch's own schedulers; a scheduled run resumed
after Ctrl-C ends with the uninterrupted run's weights; a resume that would stretch the schedule is refused."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import train
from checkpoint import safe_torch_load
from model import load_cvae
from test_options import Probe  # records every training step's loss, replayed forward pass and learning rate

EPOCHS, STEPS, LR = 3, 4, 3e-3
FLAGS = ["--epochs", str(EPOCHS), "--train-size", str(STEPS * 50), "--val-size", "100", "--batch-size", "50",
         "--lr", str(LR), "--prior", "none", "--no-progress", "--accelerator", "cpu"]


def reference_rates(schedule: str, steps: int) -> list[float]:
    """The rate of each step under torch's scheduler, stepped by hand."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = {"constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                 "one-cycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps),
                 "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)}[schedule]()
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@contextlib.contextmanager
def ctrl_c_at_step(step: int):
    """Ctrl-C (a KeyboardInterrupt) at the `step`-th training step, counted from 1, of the runs inside the block."""
    calls, real_step = [], train.CVAE.training_step

    def training_step(self, batch, batch_idx):
        calls.append(batch_idx)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()):
        patch.setattr(train.CVAE, "training_step", training_step)
        yield


def run(data_dir, tmp_path, *flags: str, callbacks=()) -> int:
    build_trainer = train.build_trainer
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(train, "build_trainer", lambda args, extra=None: build_trainer(args, list(callbacks)))
        return train.main([*FLAGS, *flags, "--data-dir", str(data_dir), "--ckpt", str(tmp_path / "c.ckpt"),
                           "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("schedule", ["constant", "one-cycle", "cosine"])
def test_each_step_takes_the_rate_of_its_schedule(schedule, data_dir, tmp_path):
    """--lr is the rate throughout, the one-cycle's peak or the cosine's start; the schedule spans all the run's
    steps and is stored with the weights."""
    probe = Probe()
    assert run(data_dir, tmp_path, "--lr-schedule", schedule, callbacks=[probe]) == 0
    rates = [step["lr"] for step in probe.steps]
    assert rates == pytest.approx(reference_rates(schedule, EPOCHS * STEPS), rel=1e-6)
    if schedule == "one-cycle":
        assert rates[0] == pytest.approx(LR / 25) and max(rates) == pytest.approx(LR, rel=0.05)
    assert load_cvae(tmp_path / "c.ckpt").hparams.lr_schedule == schedule


def test_a_scheduled_run_resumed_after_ctrl_c_ends_like_an_uninterrupted_one(data_dir, tmp_path, restore_sigint):
    """The scheduler's state travels in last.ckpt: Ctrl-C in the second epoch, then --resume, gives the weights of the
    run that was never stopped."""
    assert run(data_dir, tmp_path / "whole", "--lr-schedule", "one-cycle") == 0
    with ctrl_c_at_step(STEPS + 2):  # in the second epoch
        assert run(data_dir, tmp_path / "cut", "--lr-schedule", "one-cycle") == 130
    assert safe_torch_load(train.last_checkpoint(tmp_path / "cut" / "run"))["epoch"] == 0
    assert run(data_dir, tmp_path / "cut", "--lr-schedule", "one-cycle", "--resume") == 0
    whole, cut = (load_cvae(path / "c.ckpt").state_dict() for path in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(whole[name], cut[name]) for name in whole)


def test_resuming_a_scheduled_run_with_other_epochs_is_refused(data_dir, tmp_path, capsys):
    """Another --epochs would stretch the schedule (or step a one-cycle past its end, deep inside fit): one line, and
    last.ckpt stays as it was. Without a schedule, more epochs just continue the run."""
    assert run(data_dir, tmp_path, "--lr-schedule", "cosine") == 0
    before = train.last_checkpoint(tmp_path / "run").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run(data_dir, tmp_path, "--lr-schedule", "cosine", "--resume", "--epochs", str(EPOCHS + 1))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert f"follows a cosine learning-rate schedule over {EPOCHS} epochs; resume with --epochs {EPOCHS}" in err
    assert train.last_checkpoint(tmp_path / "run").read_bytes() == before
    assert run(data_dir, tmp_path / "constant") == 0
    assert run(data_dir, tmp_path / "constant", "--resume", "--epochs", str(EPOCHS + 1)) == 0
