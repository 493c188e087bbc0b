"""Pieces the three scripts share: one-line CLI errors, argument checks, safe checkpoint I/O, seeding."""
from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with status 2."""

    def error(self, message: str):  # type: ignore[override]
        fail(f"{message} (see --help)", code=2, prog=self.prog)


def fail(message: str, code: int = 1, prog: str | None = None) -> None:
    """Print `prog: error: message` on one line to stderr and exit."""
    prog = prog or Path(sys.argv[0]).name
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def bounded(kind: Callable[[str], Any], low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], Any]:
    """argparse type: parse with `kind`, then require low <= value (low < value when low_open) and value <= high."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_output_file(path: Path, what: str) -> None:
    """Raise UsageError unless `path` can be written: not a directory, parent exists (or can be made) and writable."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, expected a file path")
    parent = path.parent
    existing = next(p for p in [parent, *parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {path}: {existing} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: permission denied")


def check_data_dir(path: Path) -> None:
    """The data dir must be a readable directory, or creatable."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"data dir {path} is not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise UsageError(f"data dir {path} is not readable")
    else:
        check_output_file(path / "x", "data dir")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----- checkpoints -------------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves the previous file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic writes and safe (weights_only) reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location=map_location or "cpu")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, damaged, unsafe or of another model. The message is one line."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True: only tensors and plain Python containers are unpickled, so a crafted
    checkpoint cannot execute code. Every failure becomes a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; train one with `python train.py`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} was refused: it holds Python objects that could run code on "
                                  f"load ({_unsupported_global(err)})") from None
        raise CheckpointError(f"checkpoint {path} is damaged: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {first}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _unsupported_global(err: Exception) -> str:
    """The name of the global torch's safe unpickler refused, from its long message."""
    for line in str(err).splitlines():
        if "Unsupported global" in line:
            return line.strip().split("Unsupported global:")[-1].strip().rstrip(".")
    return "unsupported object"


def load_cvae(path: str | Path, map_location: Any = "cpu"):
    """Rebuild a CVAE from a checkpoint alone (its hyper-parameters), safely, in eval mode.

    Raises CheckpointError with a one-line message for anything that is not a loadable checkpoint of this model.
    """
    from model import CVAE  # here, so importing common stays light

    checkpoint = safe_torch_load(path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"checkpoint {path} has no hyper-parameters; it was not written by this repo's train.py")
    try:
        model = CVAE(**hparams)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is not a CVAE checkpoint: {err}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint {path} does not match the CVAE architecture: {detail[:300]}") from None
    try:
        model.on_load_checkpoint(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return model.to(map_location if map_location is not None else "cpu").eval()
