"""The drift-free speed benchmark pairs each Lightning training step with one plain-loop step (bench/paired_steps.py).
Only its bookkeeping is checked here, on a few batches; its timings are for bench/README.md, not for tests."""
from __future__ import annotations

import statistics
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
    # Both sides of a pair are one training step of the same model on 100 images: comparable times. Timing only a
    # hook, or a plain step against itself, would put the ratio near 0 or 1 exactly.
    ratio = statistics.median(lt / pt for lt, pt in beside.steps)
    assert 0.5 < ratio < 3 and ratio != 1.0
    # An epoch end pairs Lightning's validation (2 batches here) with the plain loop's (all 50 batches of the
    # validation split): far longer than one training step.
    plain_step = statistics.median(pt for _, pt in beside.steps)
    assert all(lt > 0 and pt > 5 * plain_step for lt, pt in beside.ends)
    # The plain loop trained its own model: one step after every Lightning step, the first epoch's included.
    assert int(beside.opt.state_dict()["state"][0]["step"]) == 3 * 4
    assert not beside.model.training  # it ran the validation pass last
