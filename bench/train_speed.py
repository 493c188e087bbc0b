"""Training speed: this repo's `python train.py` against a plain PyTorch loop and the original data pipeline.

    python bench/train_speed.py                 # 10 epochs each, alternating, one round
    python bench/train_speed.py --epochs 2 --repeats 2

Every variant runs as its own process, so the whole-process time (imports, data loading, test pass, checkpoint)
and the peak resident memory are measured as a user sees them. The rounds alternate the variants so that drift in
machine load hits all of them alike. Seconds per epoch come from each variant's own `epoch N: ... (S s)` lines
(training plus validation for train.py and the plain loop, training only for the original pipeline).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH_TIME = re.compile(r"epoch \d+(?:/\d+)?:[^\n\r]*?\b([\d.]+) ?s\b")  # progress bars may share the line


def variants(epochs: int, tmp: Path, extra: list[str]) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "train.py (this repo)": [py, "train.py", "--epochs", str(epochs), "--ckpt", str(tmp / "bench.ckpt"),
                                 "--run-dir", str(tmp / "run"), *extra],
        "plain PyTorch loop": [py, "bench/reference/plain_loop.py", "--epochs", str(epochs)],
        "original pipeline": [py, "bench/reference/original_pipeline.py", "--epochs", str(epochs), "--out-dir",
                              str(tmp / "original")],
    }


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, list[float], float]:
    """Run a command; return (wall seconds, per-epoch seconds, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage, peak RSS included
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-2000:]}")
    epochs = [float(s) for s in EPOCH_TIME.findall(out)]
    if len(epochs) == 0:
        raise SystemExit(f"no 'epoch N: ... S s' lines in the output of {' '.join(cmd)}:\n{out[-2000:]}")
    return wall, epochs, usage.ru_maxrss / 1024  # Linux reports KiB

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default: 10)")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for every variant "
                   "(default: torch's choice, all cores)")
    p.add_argument("--skip-original", action="store_true", help="leave out the (slow) original pipeline")
    p.add_argument("--train-args", default="", help="extra flags for train.py, e.g. '--precision bf16-mixed'")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results: dict[str, list[tuple[float, list[float], float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for name, cmd in variants(args.epochs, Path(tmp), args.train_args.split()).items():
                if args.skip_original and name == "original pipeline":
                    continue
                print(f"[round {round_ + 1}] {name} ...", file=sys.stderr, flush=True)
                results.setdefault(name, []).append(run(cmd, env))
    report(results, args.epochs)


def report(results, epochs: int) -> None:
    base = statistics.median(e for _, ep, _ in results["plain PyTorch loop"] for e in ep)
    print(f"\n{epochs} epochs, batch 100, {os.cpu_count()} cores\n")
    print("| pipeline | s/epoch (median) | vs plain loop | samples/s | whole process (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        per_epoch = statistics.median(e for _, ep, _ in runs for e in ep)
        wall = statistics.median(w for w, _, _ in runs)
        rss = max(r for _, _, r in runs)
        print(f"| {name} | {per_epoch:.2f} | {per_epoch / base:.2f}x | {55_000 / per_epoch:,.0f} | {wall:.1f} "
              f"| {rss:.0f} |")
    # The machine's speed drifts from minute to minute, so also pair each train.py run with the plain-loop run of
    # its own round (they ran back to back) and give the spread of those per-round ratios.
    plain = [statistics.median(ep) for _, ep, _ in results["plain PyTorch loop"]]
    for name, runs in results.items():
        if name == "plain PyTorch loop":
            continue
        ratios = sorted(statistics.median(ep) / p for (_, ep, _), p in zip(runs, plain))
        print(f"\n{name} / plain loop, per round: median {statistics.median(ratios):.3f}x, "
              f"range {ratios[0]:.3f}-{ratios[-1]:.3f}x over {len(ratios)} rounds")

if __name__ == "__main__":
    main()
