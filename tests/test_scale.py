"""Scale-out through Lightning's own engine: two-process DDP on CPU (gloo) averages the gradients of both processes,
keeps their weights identical, and writes one checkpoint and one log."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from checkpoint import safe_torch_load
from model import load_cvae
from conftest import ROOT

FLAGS = ["--epochs", "1", "--limit-train-batches", "4", "--limit-val-batches", "3", "--no-progress",
         "--accelerator", "cpu", "--num-threads", "1", "--devices", "2", "--strategy", "ddp"]

# train.py with one more callback, which saves what each process saw. DDP starts rank 1 by running this same script
# again, so the callback is added here rather than in the test's own process.
PROBE = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train

class Probe(train.Callback):
    '''Per process: the first step's gradients before and after DDP's all-reduce, and the final weights.'''

    def on_before_backward(self, trainer, module, loss):
        if trainer.global_step == 0:
            self.local = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)

    def on_after_backward(self, trainer, module):
        if trainer.global_step == 0:
            self.synced = [p.grad.clone() for p in module.parameters()]

    def on_train_end(self, trainer, module):
        torch.save({{"local": self.local, "synced": self.synced, "weights": module.state_dict()}},
                   os.path.join({out!r}, f"rank{{trainer.global_rank}}.pt"))

build_trainer = train.build_trainer
train.build_trainer = lambda args, callbacks=None: build_trainer(args, [*(callbacks or []), Probe()])
sys.exit(train.main())
"""


def test_two_process_ddp_averages_gradients_and_keeps_the_processes_identical(tmp_path, data_dir):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(root=str(ROOT), out=str(tmp_path)))
    ckpt, run_dir = tmp_path / "ddp.ckpt", tmp_path / "run"
    proc = subprocess.run([sys.executable, str(probe), *FLAGS, "--data-dir", str(data_dir), "--ckpt", str(ckpt),
                           "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Device: cpu (2 device(s)" in proc.stdout
    assert proc.stdout.count("Wrote ") == 1  # rank 0 reports and writes; rank 1 stays quiet

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    # Each process trained on its own shard of the batches, so their own gradients differ ...
    assert not all(torch.allclose(a, b) for a, b in zip(local0, local1))
    # ... and after the all-reduce both hold their average, so both take the same optimizer step.
    for a, b, synced0, synced1 in zip(local0, local1, ranks[0]["synced"], ranks[1]["synced"]):
        torch.testing.assert_close(synced0, (a + b) / 2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(synced1, synced0, rtol=0, atol=0)
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], weight), name

    saved = safe_torch_load(ckpt)
    assert saved["global_step"] == 4  # 4 steps of 2 x 100 images
    for name, weight in saved["state_dict"].items():
        assert torch.equal(weight, ranks[0]["weights"][name]), name
    model = load_cvae(ckpt)
    images = model.sample(torch.arange(10))
    assert images.shape == (10, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert model.fitted_prior is not None

    # One log, written by rank 0: a metrics.csv and TensorBoard events with one sample grid for the one epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted(os.listdir(run_dir / "logs"))
    assert logs == ["version_0"]
    events = EventAccumulator(str(run_dir / "logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("samples_by_digit")) == 1
    assert [e.step for e in events.Scalars("val_loss")] == [3]
