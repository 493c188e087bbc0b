"""Pieces the three scripts share: one-line CLI errors, argument checks, safe checkpoint I/O."""
from __future__ import annotations

import argparse
import atexit
import os
import pickle
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def use_cached_cuda_check() -> None:
    """Make torch.cuda.is_available() cheap again on a machine without a GPU.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that asking whether CUDA is there never initialises
    it (fork safety). With a CUDA build of torch and no GPU, that check loads the NVML library again on every call,
    and torch's optimizers ask once per step: about 0.4 s of a 10 s epoch on a 2-core CPU (py-spy on train.py and
    bench/plain_loop.py). With no GPU there is nothing to keep fork-safe, so go back to torch's own check.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def exit_now(code: int) -> None:
    """Finish the process without the interpreter's teardown: run the atexit handlers, flush, then os._exit.

    Tearing down a CUDA build of torch touches about 120 MB of library pages on the way out: `python -c "import
    torch"` peaks at 636 MB of resident memory at exit against 511 MB while it runs. A script whose files are all
    written and closed loses nothing by skipping that, and its peak memory is then what its work needed.
    """
    atexit._run_exitfuncs()  # logging.shutdown and the like still run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    if not existing.is_dir() or not _can_create_in(existing):
        raise UsageError(f"cannot write {what} {path}: {existing} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: permission denied")


def _can_create_in(folder: Path) -> bool:
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


# ----- checkpoints -------------------------------------------------------------------------------------------------
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
        # On the meta device nothing is allocated, so crafted sizes (a 10^6-wide layer) cannot exhaust memory;
        # the real tensors come from the file below, and only if every shape matches.
        with torch.device("meta"):
            model = CVAE(**hparams)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not a CVAE checkpoint: {detail}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"], assign=True)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint {path} does not match the CVAE architecture: {detail[:300]}") from None
    model.float()  # as copying into a freshly built float32 model did, whatever dtype the file holds
    broken = [name for name, value in model.state_dict().items() if not torch.isfinite(value).all()]
    if broken:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights ({', '.join(broken[:3])}); "
                              f"the training run diverged or the file is damaged")
    try:
        model.on_load_checkpoint(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return model.to(map_location if map_location is not None else "cpu").eval()
