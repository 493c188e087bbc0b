"""Sample quality across seeds: train the default recipe on several seeds and judge each checkpoint as test.py does.

    python bench/seeds.py                                  # seeds 0 1 2, default recipe, ~2 min per seed + eval
    python bench/seeds.py --train-args "--kl-warmup-epochs 0"   # the recipe without warm-up, for comparison
    python bench/seeds.py --compare-priors                 # also refit other sampling priors on each checkpoint

One row per seed: the time of its `python train.py`, then report.SUMMARY, the numbers test.py reports that travel
into tables (KL, distortion, active units, the bounds, the CVAE's accuracy as a classifier, conditional accuracy and
sample FID with the prior the checkpoint samples from, the reconstruction FID, and the same two with N(0, I)).
Checkpoints go to --out-dir; an existing checkpoint for a seed is reused with --reuse (same flags assumed).
bench/sweep.py trains and judges its runs with train() and judge_checkpoint() from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The sampling priors refitted by --compare-priors and bench/sweep.py --refit-priors: name -> (kind, components).
PRIOR_VARIANTS = {"Gaussian per digit": ("per-class", 1), "3 Gaussians per digit": ("per-class", 3),
                  "10 Gaussians per digit": ("per-class", 10), "10 Gaussians for all": ("global", 10),
                  "flow": ("flow", 1), "training codes": ("codes", 1)}
# A row's first columns, before report.SUMMARY's: (key, title).
RUN_COLUMNS = (("seed", "seed"), ("importance_samples", "K"), ("train_s", "train.py (s)"))


def row_header() -> str:
    """The markdown header of seed rows: RUN_COLUMNS, then a column per report.SUMMARY entry."""
    from report import SUMMARY

    titles = [title for _, title in RUN_COLUMNS] + [entry.header or entry.label for entry in SUMMARY]
    return "| " + " | ".join(titles) + " |\n" + "|---" * len(titles) + "|"


def row_markdown(row: dict[str, Any]) -> str:
    """One seed's row (RUN_COLUMNS and report.SUMMARY's keys) as a markdown line; "–" for a missing value."""
    from report import SUMMARY, format_value

    train_s = row["train_s"]
    k = row.get("importance_samples")
    cells = [str(row["seed"]), "–" if k is None else str(k),  # K: training samples of z per image (an old CSV: none)
             "–" if train_s != train_s else f"{train_s:.1f}"]  # NaN: a reused checkpoint
    cells += [format_value(entry, row.get(entry.key)) for entry in SUMMARY]
    return "| " + " | ".join(cells) + " |"


PRIOR_HEADER = ("| seed | fitted prior | sample seed | cond. acc. | recon acc. | sample FID | recon FID | FID gap "
                "| fit (s) |\n|---|---|---|---|---|---|---|---|---|")


def prior_markdown(row: dict[str, Any]) -> str:
    """One refit_priors row as a markdown line."""
    return (f"| {row['seed']} | {row['prior']} | {row['sample_seed']} | {100 * row['accuracy']:.2f}% "
            f"| {100 * row['recon_accuracy']:.2f}% | {row['fid']:.1f} | {row['recon_fid']:.1f} "
            f"| {100 * (row['fid'] / row['recon_fid'] - 1):+.1f}% | {row['fit_s']:.1f} |")


def parse_args() -> argparse.Namespace:
    from dataset import DEFAULT_DATA_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--train-args", default="", help="extra flags for train.py (default: none, the default recipe)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/seeds"), help="checkpoints (default: runs/seeds)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST folder (default: data)")
    p.add_argument("--samples-per-digit", type=int, default=1_000, help="prior samples per digit (default: 1000)")
    p.add_argument("--reuse", action="store_true", help="reuse an existing checkpoint for a seed")
    p.add_argument("--compare-priors", action="store_true", help="also refit and judge other sampling priors")
    return p.parse_args()


def train_command(ckpt: Path, run_dir: Path, flags: list[str]) -> list[str]:
    """One plain `python train.py` run, to be started in the repo's root."""
    return ["python", "train.py", *flags, "--no-progress", "--ckpt", str(ckpt), "--run-dir", str(run_dir)]


def train(command: list[str], log: Path) -> float:
    """Run a train_command in the repo's root with this Python, its output to the file `log`; returns the whole
    process's seconds."""
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)  # one write: a line of its own beside other threads
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def judge_checkpoint(model, judge, test_set, samples_per_digit: int = 1_000, **settings: int):
    """test.py's evaluation of one model (seed 0): (metrics.evaluate's dict, the metrics.Outputs it came from).
    `settings`: evaluate's iw_samples, classify_per_digit and classify_iw_samples."""
    from metrics import evaluate, model_outputs

    outputs = model_outputs(model, judge, *test_set, samples_per_digit, seed=0)
    return evaluate(model, outputs, seed=0, **settings), outputs


def refit_priors(model, outputs, seed: int, data_dir: Path, judge, samples_per_digit: int,
                 variants: dict[str, tuple[str, int]] = PRIOR_VARIANTS, sample_seeds: tuple[int, ...] = (0,)
                 ) -> list[dict[str, Any]]:
    """Refit each of `variants` to the training codes of the checkpoint's split (`seed`) and judge `samples_per_digit`
    samples of every digit from each, once per sample seed, against the same test-set `outputs` (only the samples
    change). A row per variant and sample seed: its conditional accuracy and sample FID beside the reconstructions'
    (the marks a prior aims for), and the seconds the fit took."""
    from classifier import fid
    from dataset import MNISTDataModule
    from metrics import Samples, generate, generation_metrics, judge_images, reconstruction_accuracy
    from prior import fit_density

    data = MNISTDataModule(data_dir, seed=seed, binarize=model.sees_binary_images)
    data.setup()
    labels = data.splits["train"].labels
    z = model.posterior_means(data.fixed_pixels("train"), labels)
    marks = {"recon_accuracy": reconstruction_accuracy(outputs),
             "recon_fid": fid(outputs.reconstructed.features, outputs.test.features)}
    rows = []
    for name, (kind, components) in variants.items():
        start = time.perf_counter()
        model.fitted_prior = fit_density(z, labels, model.hparams.num_classes, kind, components, seed=seed)
        fit_s = time.perf_counter() - start
        for sample_seed in sample_seeds:
            images, wanted = generate(model, "fitted", samples_per_digit, seed=sample_seed)
            refitted = dataclasses.replace(outputs, samples={"fitted": Samples(images, wanted,
                                                                               judge_images(judge, images))})
            fitted = generation_metrics(refitted)["fitted"]
            rows.append({"seed": seed, "prior": name, "sample_seed": sample_seed,
                         "accuracy": fitted["conditional_accuracy"], "fid": fitted["fid"], **marks, "fit_s": fit_s})
    return rows


def main() -> None:
    args = parse_args()
    import torch

    from classifier import load_judge
    from dataset import load_test_set
    from report import summary
    from model import load_cvae

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluation only; training runs in its own process with its own threads
    judge, _ = load_judge()
    test_set = load_test_set(args.data_dir)
    rows: list[dict[str, Any]] = []
    prior_rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        ckpt = args.out_dir / f"seed{seed}.ckpt"
        command = train_command(ckpt, args.out_dir / f"run{seed}",
                                ["--seed", str(seed), "--data-dir", str(args.data_dir), *shlex.split(args.train_args)])
        reuse = args.reuse and ckpt.is_file()
        train_s = float("nan") if reuse else train(command, args.out_dir / f"train{seed}.log")
        model = load_cvae(ckpt)
        numbers, outputs = judge_checkpoint(model, judge, test_set, args.samples_per_digit)
        rows.append({"seed": seed, "importance_samples": model.hparams.importance_samples, "train_s": train_s,
                     **summary(numbers)})
        if args.compare_priors:
            prior_rows += refit_priors(model, outputs, seed, args.data_dir, judge, args.samples_per_digit)

    print(f"\ntrain.py {args.train_args or '(defaults)'}; judged as test.py judges\n")
    print(row_header())
    for row in rows:
        print(row_markdown(row))
    if prior_rows:
        print("\n" + PRIOR_HEADER)
        for row in prior_rows:
            print(prior_markdown(row))


if __name__ == "__main__":
    main()
