"""Files on disk: safe (weights_only) reading of checkpoints with one-line errors, and atomic writes.

Everything that reads a checkpoint in this repo goes through `safe_torch_load`: only tensors and plain Python
containers are unpickled, so a crafted file cannot execute code. Everything that writes a file another process may
read (checkpoints, the judge's weights, the MNIST files) goes through `atomic_write`. Nothing here knows the CVAE:
`model.load_cvae` rebuilds one from a checkpoint, and the judge (classifier.py) loads through here without it.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call write(f) on a temporary file of this process's own in the same folder, fsync, then rename it over `path`:
    a crash at any moment leaves the previous file or the new one, never half a file, and two processes writing the
    same path at once each put a whole file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic writes and safe (weights_only) reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_torch_load(path, map_location=map_location or "cpu")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, damaged, unsafe or of another model. The message is one line."""


class CheckpointNotFound(CheckpointError):
    """No file at the path; the message says how to make one."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu",
                    make_one: str = "train one with `python train.py`") -> dict[str, Any]:
    """torch.load with weights_only=True: only tensors and plain Python containers are unpickled, so a crafted
    checkpoint cannot execute code. Every failure becomes a one-line CheckpointError naming the file; a missing one
    says how to `make_one`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} not found; {make_one}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    _check_crc(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise on top of the one-line error
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} was refused: it holds Python objects that could run code on "
                                  f"load ({_unsupported_global(err)})") from None
        raise CheckpointError(f"checkpoint {path} is damaged: {_unpickler_detail(err)}") from None
    except Exception as err:  # noqa: BLE001  arbitrary bytes also raise KeyError, IndexError, struct.error, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: {first}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _check_crc(path: Path) -> None:
    """torch.save records a CRC-32 for every member of its zip file but torch.load never checks it, so bytes flipped
    inside a tensor would load as silently wrong weights."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format, or not a checkpoint at all: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001  a damaged archive raises BadZipFile, EOFError, zlib.error, ...
        raise CheckpointError(f"checkpoint {path} is damaged: {' '.join(str(err).split()) or type(err).__name__}"
                              ) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {bad} fails its CRC check")


def _unsupported_global(err: Exception) -> str:
    """What torch's safe unpickler refused (e.g. `GLOBAL builtins.exec`), from its long message."""
    for line in str(err).splitlines():
        if "Unsupported global" in line:
            return line.split("Unsupported global:")[-1].split(" was not an allowed global")[0].strip().rstrip(".")
    return "unsupported object"


def _unpickler_detail(err: Exception) -> str:
    """The useful line of torch's long weights_only message (e.g. `Unsupported operand 149`)."""
    lines = [line.strip() for line in str(err).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
