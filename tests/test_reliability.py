"""Reliability and security: nothing executes from a checkpoint, nothing is lost, bad input never crashes.

Most tests call the code in-process. The ones marked SLOW start real tiny training runs (1,000 images, 3 epochs) in
subprocesses, kill or interrupt them and resume them: five train.py processes, 1-2 minutes on two CPU cores.
"""
from __future__ import annotations

import ast
import copy
import csv
import importlib
import importlib.util
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import train
from checkpoint import AtomicCheckpointIO, CheckpointError, atomic_torch_save, safe_torch_load
from model import load_cvae
from cli import UsageError, check_output_file
from dataset import RAW_FILES, raw_dir
from model import CVAE

ROOT = Path(__file__).resolve().parents[1]
# A run of a few seconds: 1,000 images in 20 batches per epoch, no prior fit.
TINY = ["--train-size", "1000", "--val-size", "200", "--batch-size", "50", "--prior", "none", "--no-progress",
        "--accelerator", "cpu"]
# Subprocess runs compared bit for bit also fix the thread count (in-process runs must not: it would stay set).
ONE_THREAD = ["--num-threads", "1"]
EPOCHS = 3
STEPS_PER_EPOCH = 20  # 1,000 images in batches of 50


# ----- helpers -----------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs Python code that creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_malicious(path: Path, marker: Path, base: dict | None = None, raw_pickle: bool = False) -> Path:
    """A checkpoint whose hyper-parameters run code on load; otherwise `base` (a real checkpoint) unchanged."""
    checkpoint = dict(base or {"state_dict": {}})
    checkpoint["hyper_parameters"] = Payload(marker)
    if raw_pickle:  # the legacy (non-zip) format: a bare pickle stream
        path.write_bytes(pickle.dumps(checkpoint, protocol=2))
    else:
        torch.save(checkpoint, path)
    # The payload is live: an unrestricted load runs it (the legacy reader then fails on the missing magic number).
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:
        pass
    assert marker.exists(), "the test payload should run under an unsafe load"
    marker.unlink()
    return path


def one_line_error(stderr: str, *words: str) -> str:
    """The single `prog: error: ...` line a failing command printed last, with no traceback before it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def run_main(module, argv: list[str], capsys) -> tuple[int, str]:
    """Call a script's main() in-process; returns (exit code, stderr)."""
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:  # escaping main() it would stop the whole pytest session
        code = "KeyboardInterrupt"
    return code, capsys.readouterr().err


def written_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".ckpt", ".tmp"))


@pytest.fixture
def no_torch_default(monkeypatch):
    """Make every torch.load that does not itself pass weights_only=True unpickle freely, so the tests below show the
    code's own protection rather than torch's current default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture(scope="module")
def good_ckpt(tiny_ckpt) -> dict:
    return torch.load(tiny_ckpt, weights_only=True)


# ----- checkpoints: nothing executes on load -----------------------------------------------------------------------
@pytest.mark.parametrize("raw_pickle", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_checkpoint_is_refused_and_does_not_run(tmp_path, good_ckpt, no_torch_default, raw_pickle):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.ckpt", marker, good_ckpt, raw_pickle)
    with pytest.raises(CheckpointError) as err:
        load_cvae(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("refused" in message and "exec" in message) if not raw_pickle else ("refused" in message
                                                                                or "damaged" in message)
    assert not marker.exists()


def test_resume_from_a_malicious_last_ckpt_is_refused(tmp_path, data_dir, good_ckpt, no_torch_default, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_malicious(run_dir / "checkpoints" / "last.ckpt", marker, good_ckpt)
    code, err = run_main(train, ["--resume", "--run-dir", str(run_dir), "--ckpt", str(tmp_path / "out.ckpt"),
                                 "--data-dir", str(data_dir), *TINY], capsys)
    assert code != 0
    one_line_error(err, "cannot resume", "refused", "last.ckpt")
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_lightning_resume_path_loads_through_the_safe_reader(tmp_path, good_ckpt, no_torch_default):
    """Even without train.py's check before fit, Trainer.fit(ckpt_path=...) reads through AtomicCheckpointIO."""
    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "evil.ckpt", marker, good_ckpt)
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "--ckpt", str(tmp_path / "out.ckpt"),
                             "--data-dir", str(tmp_path / "data"), *TINY])
    trainer = train.build_trainer(args)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    batches = DataLoader([(torch.rand(4, 1, 28, 28), torch.arange(4))], batch_size=None)
    with pytest.raises(CheckpointError, match="refused"):
        trainer.fit(CVAE(), train_dataloaders=batches, ckpt_path=evil)
    assert not marker.exists()


def test_every_load_in_the_repo_is_weights_only():
    """torch.load anywhere in the scripts must pass weights_only=True, and nothing may use Lightning's
    load_from_checkpoint or plain pickle.load (the data module's numpy-only unpickler is the one allowed subclass)."""
    offenders = []
    for source in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if (owner == "torch" and name == "load" and not safe) or name == "load_from_checkpoint" \
                    or (owner == "pickle" and name in ("load", "loads")):
                offenders.append(f"{source.name}:{node.lineno}")
    assert not offenders, f"unsafe loads at {offenders}"


# ----- checkpoints: damaged or foreign files give one line ---------------------------------------------------------
def _flip_bytes(data: bytes) -> bytes:
    middle = len(data) // 2  # inside the first weight tensor
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def _edited(edit):
    """A maker of the good checkpoint changed by edit(checkpoint)."""
    def make(good: dict, good_bytes: bytes) -> dict:
        checkpoint = copy.deepcopy(good)
        edit(checkpoint)
        return checkpoint
    return make


def _hparam(name, value):
    return _edited(lambda c: c["hyper_parameters"].__setitem__(name, value))


def _prior(name, make_value):
    return _edited(lambda c: c["fitted_prior"].__setitem__(name, make_value(c["fitted_prior"])))


# name -> (make(good checkpoint, its bytes) -> file content: bytes, an object to torch.save, or None for no file;
#          a word the one-line error must contain)
DAMAGE = {
    "missing": (lambda g, b: None, "not found"),
    "empty": (lambda g, b: b"", "empty"),
    "truncated": (lambda g, b: b[: len(b) // 2], "truncated"),
    "truncated-tail": (lambda g, b: b[:-20], "truncated"),
    "flipped-bytes": (lambda g, b: _flip_bytes(b), "CRC"),
    "text": (lambda g, b: b"hello, this is not a checkpoint\n", "damaged"),
    "random-bytes": (lambda g, b: bytes(range(256)) * 64, "damaged"),
    "not-a-dict": (lambda g, b: [1, 2, 3], "no state_dict"),
    "no-hyper-parameters": (lambda g, b: {"state_dict": g["state_dict"]}, "hyper-parameters"),
    "another-model": (lambda g, b: {"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)},
                                    "hyper_parameters": {"num_layers": 18}}, "not a CVAE"),
    "other-latent-size": (_hparam("latent_dim", 8), "does not match"),
    "other-layer-sizes": (_hparam("encoder_dims", [512, 256, 64]), "does not match"),
    "tensor-of-another-shape": (_edited(lambda c: c["state_dict"].__setitem__("encoder.mean.weight",
                                                                              torch.zeros(3, 3))), "does not match"),
    "state-dict-not-a-dict": (_edited(lambda c: c.__setitem__("state_dict", [1, 2])), "does not match"),
    # Sizes that would need terabytes if the model were built before its shapes are checked against the file.
    "huge-layers": (_hparam("encoder_dims", [10**6, 10**6, 10**6]), "does not match"),
    "negative-size": (_hparam("encoder_dims", [-1]), "not a CVAE"),
    "string-size": (_hparam("latent_dim", "2"), "not a CVAE"),
    "nan-weights": (_edited(lambda c: c["state_dict"]["decoder.out.0.weight"].fill_(float("nan"))), "NaN"),
    "prior-of-another-shape": (_prior("means", lambda p: torch.zeros(10, 1, 5)), "fitted_prior"),
    "prior-of-ints": (_prior("weights", lambda p: p["weights"].long()), "fitted_prior"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_or_foreign_checkpoint_is_one_line_naming_the_file(case, tmp_path, tiny_ckpt, good_ckpt):
    make, word = DAMAGE[case]
    content = make(good_ckpt, tiny_ckpt.read_bytes())
    path = tmp_path / "cvae.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        load_cvae(path)
    message = str(err.value)
    assert str(path) in message and word in message and "\n" not in message and len(message) < 600, message


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_cvae(tmp_path)


def script_module(script: str):
    """test.py or gradio_test.py imported by path (`import test` could find the standard library's package)."""
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} is not in this checkout")
    if script != "test.py":
        return importlib.import_module(Path(script).stem)
    name = "reliability_test_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # gradio looks its classes up there
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def bad_checkpoint(case: str, folder: Path, tiny_ckpt: Path, good: dict) -> tuple[Path, Path]:
    """(a damaged or malicious cvae.ckpt in folder, the file the malicious one would create)."""
    path, marker = folder / "cvae.ckpt", folder / "pwned"
    if case == "damaged":
        path.write_bytes(tiny_ckpt.read_bytes()[:5000])
    else:
        write_malicious(path, marker, good)
    return path, marker


def script_args(script: str, ckpt: Path, folder: Path) -> list[str]:
    extra = ["--out-dir", str(folder / "out")] if script == "test.py" else ["--port", "7999"]
    return ["--ckpt", str(ckpt), *extra]


@pytest.mark.parametrize("script", ["test.py", "gradio_test.py"])
@pytest.mark.parametrize("case", ["damaged", "malicious"])
def test_scripts_refuse_bad_checkpoints_in_one_line(script, case, tmp_path, tiny_ckpt, good_ckpt, no_torch_default,
                                                    capsys):
    """Non-zero exit, one line naming the file, nothing written, the payload not run."""
    module = script_module(script)
    path, marker = bad_checkpoint(case, tmp_path, tiny_ckpt, good_ckpt)
    code, err = run_main(module, script_args(script, path, tmp_path), capsys)
    assert code not in (0, None)
    one_line_error(err, str(path), "refused" if case == "malicious" else "damaged")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_real_command_line_refuses_a_malicious_checkpoint(tmp_path, tiny_ckpt, good_ckpt):
    """The same through a real interpreter: exit status, no traceback, no payload."""
    if not (ROOT / "test.py").is_file():
        pytest.skip("test.py is not in this checkout")
    path, marker = bad_checkpoint("malicious", tmp_path, tiny_ckpt, good_ckpt)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    result = subprocess.run([sys.executable, "test.py", *script_args("test.py", path, tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    one_line_error(result.stderr, str(path), "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----- checkpoints: writes are atomic ------------------------------------------------------------------------------
def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "cvae.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(1000)}}, path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        atomic_torch_save({"state_dict": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    assert torch.equal(safe_torch_load(path)["state_dict"]["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["cvae.ckpt"]


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_file(tmp_path):
    """SIGKILL while the new checkpoint is half written: the old one is still whole under the final name."""
    path = tmp_path / "cvae.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(1000)}}, path)
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from checkpoint import atomic_torch_save
def half_then_die(obj, f):
    f.write(b"PK\\x03\\x04 half a checkpoint"); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
atomic_torch_save({{"state_dict": {{"w": torch.zeros(1000)}}}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert torch.equal(safe_torch_load(path)["state_dict"]["w"], torch.ones(1000))
    # The half-written file was a hidden temporary next to the target, never the target itself.
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".cvae.ckpt.") and leftovers[0].endswith(".tmp")


def test_lightning_saves_through_a_temporary_in_the_same_folder(tmp_path, monkeypatch):
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "--ckpt", str(tmp_path / "out.ckpt"),
                             "--data-dir", str(tmp_path / "data"), *TINY])
    checkpoint_io = train.build_trainer(args).strategy.checkpoint_io
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))),
                                                         real_replace(src, dst)))
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert len(renames) == 1 and renames[0][1] == target and renames[0][0].parent == target.parent
    assert safe_torch_load(target)["state_dict"]["w"].sum() == 3
    # Readable like a file torch.save would have made (mkstemp alone gives 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# ----- bad command-line input: one line, non-zero exit, nothing written --------------------------------------------
BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "2.5"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--kl-weight", "-1"], "--kl-weight"),
    (["--latent-dim", "0"], "--latent-dim"),
    (["--val-size", "60000"], "--val-size"),
    (["--train-size", "59000", "--val-size", "5000"], "--train-size"),
    (["--accelerator", "foo"], "--accelerator"),
    pytest.param(["--accelerator", "mps"], "MPS", marks=pytest.mark.skipif(torch.backends.mps.is_available(),
                                                                            reason="this host has MPS")),
    (["--devices", "abc"], "trainer"),
    (["--devices", "0"], "trainer"),
    (["--accelerator", "cpu", "--devices", "64"], "would start 64 processes"),
    (["--strategy", "foo"], "strategy"),
    (["--precision", "99"], "recision"),
    (["--no-such-flag"], "unrecognized"),
    (["--ckpt", "{tmp}"], "directory"),
    (["--ckpt", "{file}/cvae.ckpt"], "not a writable directory"),
    (["--ckpt", "/proc/cvae.ckpt"], "not a writable directory"),  # os.access says yes here to root
    (["--run-dir", "/proc/run"], "not a writable directory"),
    (["--data-dir", "{file}"], "not a directory"),
    (["--data-dir", "/proc/mnist"], "data dir"),
    (["--resume"], "no checkpoint"),
]


@pytest.mark.parametrize("flags, word", BAD_FLAGS,
                         ids=[" ".join(getattr(case, "values", case)[0]) for case in BAD_FLAGS])
def test_bad_flags_are_one_line_and_nothing_is_written(flags, word, tmp_path, data_dir, monkeypatch, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    flags = [f.format(tmp=tmp_path, file=afile) for f in flags]
    monkeypatch.setattr(train.pl.Trainer, "fit", lambda *a, **k: pytest.fail("bad flags reached training"))
    defaults = ["--ckpt", str(tmp_path / "cvae.ckpt"), "--run-dir", str(tmp_path / "run"),
                "--data-dir", str(data_dir)]
    code, err = run_main(train, defaults + flags, capsys)
    assert code not in (0, None)
    one_line_error(err, word)
    assert written_checkpoints(tmp_path) == []


def test_write_probe_leaves_nothing_behind_and_refuses_unwritable_folders(tmp_path):
    """The check before training creates and removes a probe file: nothing is left in a writable folder, and a folder
    where no file can be created fails the check, even for root, to whom os.access says yes everywhere."""
    check_output_file(tmp_path / "sub" / "cvae.ckpt", "checkpoint")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="/proc is not a writable directory"):
        check_output_file(Path("/proc/run/cvae.ckpt"), "checkpoint")
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="not a writable directory"):
            check_output_file(locked / "cvae.ckpt", "checkpoint")


# ----- damaged data: detected and reported, not trained on ---------------------------------------------------------
def _damaged_data_dir(data_dir: Path, tmp_path: Path, name: str, damage) -> Path:
    """A copy of the data dir (links to the real files) in which `name` is replaced by damage(its bytes)."""
    out = tmp_path / "data"
    raw = raw_dir(out)
    raw.mkdir(parents=True)
    for pair in RAW_FILES.values():
        for file in pair:
            (raw / file).symlink_to(raw_dir(data_dir) / file)
    data = (raw / name).read_bytes()
    (raw / name).unlink()
    (raw / name).write_bytes(damage(data))
    return out


def _relabel(data: bytes) -> bytes:
    header, labels = data[:8], bytearray(data[8:])
    labels[:500] = bytes(500)  # 500 more zeros: the right count of labels, the wrong histogram
    return header + bytes(labels)


DATA_DAMAGE = [
    ("train-images-idx3-ubyte", lambda d: d[: len(d) // 3], "cannot read the MNIST train files"),
    ("train-images-idx3-ubyte", lambda d: d + bytes(784), "cannot read the MNIST train files"),
    ("train-labels-idx1-ubyte", lambda d: d[:-1000], "cannot read the MNIST train files"),
    ("train-labels-idx1-ubyte", _relabel, "label counts"),
    ("t10k-labels-idx1-ubyte", _relabel, "label counts"),
]


@pytest.mark.parametrize("name, damage, word", DATA_DAMAGE,
                         ids=["images-truncated", "images-too-long", "labels-truncated", "train-label-counts",
                              "test-label-counts"])
def test_damaged_mnist_is_reported_and_not_trained_on(name, damage, word, data_dir, tmp_path, capsys):
    damaged = _damaged_data_dir(data_dir, tmp_path, name, damage)
    code, err = run_main(train, ["--data-dir", str(damaged), "--ckpt", str(tmp_path / "cvae.ckpt"),
                                 "--run-dir", str(tmp_path / "run"), "--epochs", "1", *TINY], capsys)
    assert code == 1
    one_line_error(err, word)
    assert written_checkpoints(tmp_path) == []


# ----- interrupted training ----------------------------------------------------------------------------------------
def default_sigint() -> None:
    """Run in the child before it starts: a user's Ctrl-C reaches train.py, whatever pytest was started with. A
    background job of a non-interactive shell ignores SIGINT, children inherit that, and Python then leaves SIGINT
    ignored instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INTERRUPT_AT = ROOT / "tests" / "interrupt_at.py"  # train.py that signals itself at an exact point


def start_training(tmp_path: Path, name: str, data_dir: Path, *extra: str,
                   interrupt: tuple[str, str, int] | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """train.py in a subprocess, or, with interrupt=(signal, point, epoch), interrupt_at.py sending that signal at
    that point; returns (process, its run dir, its final checkpoint path)."""
    run_dir, ckpt = tmp_path / f"{name}-run", tmp_path / f"{name}.ckpt"
    script = ["train.py"] if interrupt is None else [str(INTERRUPT_AT), *map(str, interrupt), "--"]
    log = open(tmp_path / f"{name}.log", "a")  # files, not pipes: a full pipe would stall the child
    proc = subprocess.Popen([sys.executable, *script, "--epochs", str(EPOCHS), "--data-dir", str(data_dir),
                             "--run-dir", str(run_dir), "--ckpt", str(ckpt), *TINY, *ONE_THREAD, *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    log.close()
    return proc, run_dir, ckpt


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    """The child's exit status. The limit only stops a hung child from hanging the suite; a busy machine is slow."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def logged_epochs(version: Path) -> dict[str, set[int]]:
    """Epochs with a value, per logged name, in one log version: its metrics.csv and its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = {name: {int(row["epoch"]) for row in rows if row.get(name)} for name in LOGGED}
    events = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    # TensorBoard keeps steps, not epochs: the scalars carry the epoch's last step (counted from 0), the sample grid
    # the step after it.
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    for name in LOGGED:
        epochs[f"tensorboard {name}"] = {e.step // STEPS_PER_EPOCH for e in events.Scalars(name)} \
            if name in scalars else set()
    epochs["tensorboard samples_by_digit"] = {(e.step - 1) // STEPS_PER_EPOCH for e in events.Images("samples_by_digit")
                                             } if "samples_by_digit" in images else set()
    return epochs


LOGGED = ("train_loss", "train_recon", "train_kl", "kl_weight", "val_loss", "val_recon", "val_kl")


def assert_logs_hold_saved_epochs(run_dir: Path, saved: int) -> None:
    """The interrupted process's log on disk holds every epoch its last.ckpt holds (and may hold the next one)."""
    [version] = run_dir.glob("logs/version_*")
    for name, epochs in logged_epochs(version).items():
        assert set(range(saved + 1)) <= epochs <= set(range(saved + 2)), (name, epochs)


def assert_resumed_where_it_stopped(log: str, run_dir: Path, done: int, reference_run: Path) -> None:
    """The resumed process trained exactly the epochs after the `done` saved ones, logged them in a new version, and
    the run's logs join into the uninterrupted run's curves, every epoch once."""
    resumed = log.split("Resuming from ")[-1]
    assert [int(n) for n in re.findall(r"^epoch (\d+)/", resumed, re.M)] == list(range(done + 1, EPOCHS + 1)), log
    versions = sorted(run_dir.glob("logs/version_*"))
    assert len(versions) == 2
    assert all(epochs == set(range(done, EPOCHS)) for epochs in logged_epochs(versions[1]).values())
    from figures import read_training_log
    from model import metric_names

    names = metric_names("train", "val")
    curves, reference = read_training_log(run_dir, names), read_training_log(reference_run, names)
    assert all(sorted(curve) == list(range(EPOCHS)) for curve in reference.values()) and curves == reference


def assert_same_run(ckpt: Path, reference: Path) -> None:
    """Finished at the same epoch and step, with bit-identical weights."""
    got, want = safe_torch_load(ckpt), safe_torch_load(reference)
    assert (got["epoch"], got["global_step"]) == (want["epoch"], want["global_step"]) \
        == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    load_cvae(ckpt)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """SLOW: the reference run, EPOCHS epochs without a break. It starts at once and runs alongside the test that
    first asks for it; calling the fixture's value waits for it and returns its checkpoint."""
    proc, _, ckpt = start_training(tmp_path_factory.mktemp("reference"), "reference", data_dir)

    def result() -> Path:
        assert finish(proc) == 0 and ckpt.is_file()
        return ckpt

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# (point, epoch) of the interruption: the worst moments for the logs and the checkpoint. Each leaves epoch 0 saved.
WORST_MOMENTS = [("checkpoint-saved", 0), ("mid-epoch", 1), ("epoch-logged", 1)]


@pytest.mark.parametrize("point, epoch", WORST_MOMENTS, ids=[point for point, _ in WORST_MOMENTS])
def test_kill_9_then_resume_loses_nothing(point, epoch, tmp_path, data_dir, uninterrupted):
    """SLOW: kill -9 at each worst moment: the logs on disk hold every saved epoch; --resume then ends with the
    uninterrupted run's weights and its training curves."""
    proc, run_dir, ckpt = start_training(tmp_path, "killed", data_dir, interrupt=("KILL", point, epoch))
    assert finish(proc) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    saved = safe_torch_load(train.last_checkpoint(run_dir))  # whole, not half written
    assert saved["epoch"] == 0 and not ckpt.exists()
    assert_logs_hold_saved_epochs(run_dir, saved["epoch"])
    proc, _, _ = start_training(tmp_path, "killed", data_dir, "--resume")
    assert finish(proc) == 0, (tmp_path / "killed.log").read_text()
    log = (tmp_path / "killed.log").read_text()
    assert f"Resuming from {train.last_checkpoint(run_dir)} (epoch 1 done)" in log
    reference = uninterrupted()
    assert_resumed_where_it_stopped(log, run_dir, 1, reference.with_name("reference-run"))
    assert_same_run(ckpt, reference)


def test_ctrl_c_saves_says_how_to_resume_and_resume_finishes(tmp_path, data_dir, uninterrupted):
    """SLOW: Ctrl-C in the middle of the second epoch: exit 130, the resume command, an intact last.ckpt with the
    first epoch and its log; resuming ends like the uninterrupted run."""
    proc, run_dir, ckpt = start_training(tmp_path, "interrupted", data_dir, interrupt=("INT", "mid-epoch", 1))
    assert finish(proc) == 130, (tmp_path / "interrupted.log").read_text()
    log = (tmp_path / "interrupted.log").read_text()
    assert "Traceback" not in log
    hint = log.split("Continue with: python train.py ")[-1].splitlines()[0]
    assert f"--run-dir {run_dir}" in hint and "--train-size 1000" in hint and hint.endswith("--resume"), log
    assert f"Interrupted: the last finished epoch is saved in {train.last_checkpoint(run_dir)}. Continue with" in log
    saved = safe_torch_load(train.last_checkpoint(run_dir))
    assert saved["epoch"] == 0 and not ckpt.exists()
    assert_logs_hold_saved_epochs(run_dir, saved["epoch"])
    proc, _, _ = start_training(tmp_path, "interrupted", data_dir, "--resume")
    assert finish(proc) == 0, (tmp_path / "interrupted.log").read_text()
    reference = uninterrupted()
    assert_resumed_where_it_stopped((tmp_path / "interrupted.log").read_text(), run_dir, 1,
                                    reference.with_name("reference-run"))
    assert_same_run(ckpt, reference)


@pytest.mark.parametrize("where", ["test", "prior"])
def test_ctrl_c_after_training_says_how_to_finish(where, tmp_path, data_dir, uninterrupted, capsys, monkeypatch,
                                                  restore_sigint):
    """Ctrl-C in the prior fit (a plain KeyboardInterrupt) or in the test pass (Lightning's own handler:
    sys.exit(1)): exit 130 and the --resume command, which then writes the uninterrupted run's weights."""
    reference = uninterrupted()
    run_dir, ckpt = tmp_path / "run", tmp_path / "final.ckpt"
    train.last_checkpoint(run_dir).parent.mkdir(parents=True)
    shutil.copy(train.last_checkpoint(reference.with_name("reference-run")), train.last_checkpoint(run_dir))
    argv = ["--resume", "--epochs", str(EPOCHS), "--run-dir", str(run_dir), "--ckpt", str(ckpt),
            "--data-dir", str(data_dir), *TINY, "--prior", "per-class"]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    target = (CVAE, "test_step") if where == "test" else (CVAE, "posterior_means")
    with monkeypatch.context() as patch:
        patch.setattr(*target, ctrl_c)
        code, err = run_main(train, argv, capsys)
    assert code == 130 and "Traceback" not in err and not ckpt.exists()
    hint = err.split("Continue with: python train.py ")[-1].splitlines()[0]
    assert f"Interrupted after training finished, before {ckpt} was written" in err
    assert f"--run-dir {run_dir}" in hint and hint.endswith("--resume"), err
    code, err = run_main(train, argv, capsys)
    assert code == 0, err
    assert_same_run(ckpt, reference)
    assert load_cvae(ckpt).fitted_prior is not None


def test_a_run_saved_before_a_hyper_parameter_existed_resumes_with_its_default(tmp_path, data_dir, uninterrupted,
                                                                               capsys):
    """A last.ckpt without free_bits (a hyper-parameter added later): it had the default then, so a resume with the
    default is the same run and goes on; asking for another value is refused."""
    reference = uninterrupted()
    run_dir = tmp_path / "run"
    saved = safe_torch_load(train.last_checkpoint(reference.with_name("reference-run")))
    del saved["hyper_parameters"]["free_bits"]
    train.last_checkpoint(run_dir).parent.mkdir(parents=True)
    torch.save(saved, train.last_checkpoint(run_dir))
    resume = ["--resume", "--epochs", str(EPOCHS + 1), "--run-dir", str(run_dir), "--ckpt", str(tmp_path / "b.ckpt"),
              "--data-dir", str(data_dir), *TINY]
    code, err = run_main(train, [*resume, "--free-bits", "0.5"], capsys)
    assert code == 1
    one_line_error(err, "cannot resume", "free_bits 0.0 in the checkpoint, 0.5 now")
    code, err = run_main(train, resume, capsys)
    assert code == 0, err
    assert safe_torch_load(tmp_path / "b.ckpt")["epoch"] == EPOCHS + 1


def test_resume_with_other_model_settings_is_refused(tmp_path, data_dir, uninterrupted, capsys):
    """A last.ckpt of a run with another latent size: one line before training, not a size-mismatch traceback."""
    reference = uninterrupted()
    run_dir = tmp_path / "run"
    train.last_checkpoint(run_dir).parent.mkdir(parents=True)
    shutil.copy(train.last_checkpoint(reference.with_name("reference-run")), train.last_checkpoint(run_dir))
    before = train.last_checkpoint(run_dir).read_bytes()
    resume = ["--resume", "--epochs", "4", "--run-dir", str(run_dir), "--ckpt", str(tmp_path / "b.ckpt"),
              "--data-dir", str(data_dir), *TINY]
    code, err = run_main(train, [*resume, "--latent-dim", "3"], capsys)
    assert code == 1
    one_line_error(err, "cannot resume", "latent_dim 2 in the checkpoint, 3 now")
    assert train.last_checkpoint(run_dir).read_bytes() == before and not (tmp_path / "b.ckpt").exists()
    # A weights-only file (what cvae.ckpt is) cannot be resumed from either.
    shutil.copy(reference, train.last_checkpoint(run_dir))
    code, err = run_main(train, resume, capsys)
    assert code == 1
    one_line_error(err, "no training state")
    assert not (tmp_path / "b.ckpt").exists()
