"""Sample quality across seeds: train the default recipe on several seeds and judge each checkpoint as test.py does.

    python bench/seeds.py                                  # seeds 0 1 2, default recipe, ~2 min per seed + eval
    python bench/seeds.py --train-args "--kl-warmup-epochs 0"   # the recipe without warm-up, for comparison
    python bench/seeds.py --compare-priors                 # also refit other sampling priors on each checkpoint

One row per seed: the time of its `python train.py`, then metrics.SUMMARY, the numbers test.py reports that travel
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
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Alternative sampling priors compared with --compare-priors: (kind, mixture components).
PRIOR_VARIANTS = (("per-class", 1), ("per-class", 3), ("global", 1), ("global", 10))
# A row's first columns, before metrics.SUMMARY's: (key, title).
RUN_COLUMNS = (("seed", "seed"), ("train_s", "train.py (s)"))


def row_header() -> str:
    """The markdown header of seed rows: RUN_COLUMNS, then a column per metrics.SUMMARY entry."""
    from metrics import SUMMARY

    titles = [title for _, title in RUN_COLUMNS] + [entry.header or entry.label for entry in SUMMARY]
    return "| " + " | ".join(titles) + " |\n" + "|---" * len(titles) + "|"


def row_markdown(row: dict[str, Any]) -> str:
    """One seed's row (RUN_COLUMNS and metrics.SUMMARY's keys) as a markdown line; "–" for a missing value."""
    from metrics import SUMMARY, format_value

    train_s = row["train_s"]
    cells = [str(row["seed"]), "–" if train_s != train_s else f"{train_s:.1f}"]  # NaN: a reused checkpoint
    cells += [format_value(entry, row.get(entry.key)) for entry in SUMMARY]
    return "| " + " | ".join(cells) + " |"


class PriorRow(NamedTuple):
    """One refitted sampling prior on one seed's checkpoint (--compare-priors)."""

    seed: int
    name: str
    accuracy: float
    fid: float
    recon_fid: float

    def markdown(self) -> str:
        return f"| {self.seed} | {self.name} | {100 * self.accuracy:.2f}% | {self.fid:.1f} | {self.recon_fid:.1f} |"


PRIOR_HEADER = "| seed | fitted prior | cond. acc. | sample FID | recon FID |\n|---|---|---|---|---|"


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


def compare_priors(model, outputs, seed: int, args: argparse.Namespace, judge) -> list[PriorRow]:
    """Refit each of PRIOR_VARIANTS to the seed's training codes and judge its samples against the same test-set
    outputs (only the samples change)."""
    from classifier import fid
    from dataset import MNISTDataModule
    from metrics import Samples, generate, generation_metrics, judge_images
    from prior import fit_prior

    data = MNISTDataModule(args.data_dir, seed=seed, binarize=model.hparams.likelihood == "bernoulli")
    data.setup()
    train_set = data.splits["train"]
    z = model.posterior_means(data.fixed_pixels("train"), train_set.labels)
    recon_fid = fid(outputs.reconstructed.features, outputs.test.features)
    rows = []
    for kind, components in PRIOR_VARIANTS:
        model.fitted_prior = fit_prior(z, train_set.labels, model.hparams.num_classes, kind, components, seed=seed)
        images, labels = generate(model, "fitted", args.samples_per_digit, seed=0)
        refitted = dataclasses.replace(outputs, samples={"fitted": Samples(images, labels, judge_images(judge, images))})
        fitted = generation_metrics(refitted)["fitted"]
        rows.append(PriorRow(seed, f"{kind}, {components} component{'s' * (components > 1)}",
                             fitted["conditional_accuracy"], fitted["fid"], recon_fid))
    return rows


def main() -> None:
    args = parse_args()
    import torch

    from classifier import load_judge
    from dataset import load_test_set
    from metrics import summary
    from model import load_cvae

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluation only; training runs in its own process with its own threads
    judge, _ = load_judge()
    test_set = load_test_set(args.data_dir)
    rows: list[dict[str, Any]] = []
    prior_rows: list[PriorRow] = []
    for seed in args.seeds:
        ckpt = args.out_dir / f"seed{seed}.ckpt"
        command = train_command(ckpt, args.out_dir / f"run{seed}",
                                ["--seed", str(seed), "--data-dir", str(args.data_dir), *shlex.split(args.train_args)])
        reuse = args.reuse and ckpt.is_file()
        train_s = float("nan") if reuse else train(command, args.out_dir / f"train{seed}.log")
        model = load_cvae(ckpt)
        numbers, outputs = judge_checkpoint(model, judge, test_set, args.samples_per_digit)
        rows.append({"seed": seed, "train_s": train_s, **summary(numbers)})
        if args.compare_priors:
            prior_rows += compare_priors(model, outputs, seed, args, judge)

    print(f"\ntrain.py {args.train_args or '(defaults)'}; judged as test.py judges\n")
    print(row_header())
    for row in rows:
        print(row_markdown(row))
    if prior_rows:
        print("\n" + PRIOR_HEADER)
        for row in prior_rows:
            print(row.markdown())


if __name__ == "__main__":
    main()
