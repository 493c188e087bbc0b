"""The drift-free speed benchmark pairs each Lightning training step with one plain-loop step (bench/paired_steps.py).
Only its bookkeeping is checked here, on a few batches; its timings are for bench/README.md, not for tests."""
from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_paired_steps_pairs_every_training_step_after_the_first_epoch(tmp_path, data_dir):
    from paired_steps import PlainStepBeside, fit_beside

    beside = PlainStepBeside()
    trainer, _ = fit_beside(beside, 3, tmp_path / "run", [
        "--data-dir", str(data_dir), "--train-size", "1000", "--limit-train-batches", "4",
        "--limit-val-batches", "2", "--no-progress", "--prior", "none"])
    assert trainer.current_epoch == 3 and trainer.global_step == 12  # train.py's loop ran as usual
    # Epochs 2 and 3: four steps each, the first of each epoch unpaired; one epoch end each.
    assert len(beside.steps) == 2 * 3 and len(beside.ends) == 2
    # Only that each side was timed: how long a step takes is the machine's business (a busy CI runner), not a test's.
    assert all(lt > 0 and pt > 0 for lt, pt in beside.steps + beside.ends)
    # The plain loop trained its own model: one step after every Lightning step, the first epoch's included.
    assert int(beside.opt.state_dict()["state"][0]["step"]) == 3 * 4
    assert not beside.model.training  # it ran the validation pass last
