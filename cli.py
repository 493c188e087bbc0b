"""Command-line helpers the three scripts share: one-line errors, argument checks, writable-path checks."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

# Where the scripts write and read by default (train.py's --ckpt and --run-dir, test.py's and gradio_test.py's too).
DEFAULT_CKPT = Path("cvae.ckpt")
DEFAULT_RUN_DIR = Path("runs/cvae")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, 100 columns wide."""

    def __init__(self, prog: str):
        super().__init__(prog, width=100)


class ArgParser(argparse.ArgumentParser):
    """argparse with defaults in --help, reporting a bad flag in one line (no usage block) with exit status 2."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

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
        if isinstance(value, float) and not math.isfinite(value):
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
    if not existing.is_dir() or not can_create_in(existing):
        raise UsageError(f"cannot write {what} {path}: {existing} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: permission denied")


def can_create_in(folder: Path) -> bool:
    """Create and remove a probe file: os.access says yes to root even where nothing can be created (/proc,
    read-only mounts), and a run should fail before training, not at its final save."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_data_dir(path: Path) -> None:
    """The data dir must be a readable directory, or creatable."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"data dir {path} is not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise UsageError(f"data dir {path} is not readable")
    else:
        check_output_file(path / "x", "data dir")


def parse_device(name: str):
    """--device NAME as a torch.device that exists here; a UsageError (one line) otherwise."""
    import torch  # here: the argument helpers above need no torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    return device
