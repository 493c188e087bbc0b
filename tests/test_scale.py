"""Scale-out through Lightning's own engine: two-process DDP on CPU (gloo) gives a checkpoint like a single process."""
from __future__ import annotations

import csv
import subprocess
import sys

import torch

from checkpoint import load_cvae, safe_torch_load
from conftest import ROOT

FLAGS = ["--epochs", "1", "--limit-train-batches", "4", "--limit-val-batches", "3", "--no-progress",
         "--accelerator", "cpu", "--num-threads", "1"]


def run_train(tmp_path, name: str, data_dir, *extra: str) -> tuple[subprocess.CompletedProcess, object]:
    ckpt = tmp_path / f"{name}.ckpt"
    cmd = [sys.executable, "train.py", *FLAGS, "--data-dir", str(data_dir), "--ckpt", str(ckpt),
           "--run-dir", str(tmp_path / name), *extra]
    # DDP re-launches `python train.py ...` for rank 1, so this must be a real process, not train.main().
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, ckpt


def val_losses(run_dir) -> list[float]:
    with open(next(run_dir.glob("logs/version_*/metrics.csv"))) as f:
        return [float(row["val_loss"]) for row in csv.DictReader(f) if row.get("val_loss")]


def test_two_process_ddp_checkpoint_loads_and_samples_like_single_process(tmp_path, data_dir):
    ddp, ddp_ckpt = run_train(tmp_path, "ddp", data_dir, "--devices", "2", "--strategy", "ddp")
    single, single_ckpt = run_train(tmp_path, "single", data_dir, "--devices", "1")
    assert "Device: cpu (2 device(s)" in ddp.stdout
    assert ddp.stdout.count("Wrote ") == 1  # rank 0 reports and writes; rank 1 stays quiet

    a, b = safe_torch_load(ddp_ckpt), safe_torch_load(single_ckpt)
    assert a["hyper_parameters"] == b["hyper_parameters"]
    assert {k: v.shape for k, v in a["state_dict"].items()} == {k: v.shape for k, v in b["state_dict"].items()}
    # Each process trained on its own shard: 4 steps of 2 x 100 images, so the weights differ from one process.
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["global_step"] == b["global_step"] == 4

    model = load_cvae(ddp_ckpt)
    images = model.sample(torch.arange(10))
    assert images.shape == (10, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert model.fitted_prior is not None
    losses = val_losses(tmp_path / "ddp")
    assert len(losses) == 1 and 0 < losses[0] < 100
