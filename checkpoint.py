"""Checkpoints on disk: safe (weights_only) reading with one-line errors, atomic writes, and rebuilding a CVAE.

Everything that reads a checkpoint in this repo goes through `safe_torch_load`: only tensors and plain Python
containers are unpickled, so a crafted file cannot execute code.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from model import CVAE

def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves the previous file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_cvae(path: str | Path, map_location: Any = "cpu") -> CVAE:
    """Rebuild a CVAE from a checkpoint alone (its hyper-parameters), safely, in eval mode.

    Raises CheckpointError with a one-line message for anything that is not a loadable checkpoint of this model.
    """
    checkpoint = safe_torch_load(path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"checkpoint {path} has no hyper-parameters; it was not written by this repo's train.py")
    try:
        # First on the meta device, where nothing is allocated, so crafted sizes (a 10^6-wide layer) cannot exhaust
        # memory: the real model is built only once every shape in the file matches the hyper-parameters.
        with torch.device("meta"):
            skeleton = CVAE(**hparams)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not a CVAE checkpoint: {detail}") from None
    try:
        skeleton.load_state_dict(checkpoint["state_dict"], assign=True)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint {path} does not match the CVAE architecture: {detail[:300]}") from None
    model = CVAE(**hparams)
    model.load_state_dict(checkpoint["state_dict"])  # copied into float32, whatever dtype the file holds
    broken = [name for name, value in model.state_dict().items() if not torch.isfinite(value).all()]
    if broken:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights ({', '.join(broken[:3])}); "
                              f"the training run diverged or the file is damaged")
    try:
        model.on_load_checkpoint(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return model.to(map_location if map_location is not None else "cpu").eval()
