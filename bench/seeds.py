"""Sample quality across seeds: train the default recipe on several seeds and judge each with test.py's evaluate().

    python bench/seeds.py                                  # seeds 0 1 2, default recipe, ~2 min per seed + eval
    python bench/seeds.py --train-args "--kl-warmup-epochs 0"   # the recipe without warm-up, for comparison
    python bench/seeds.py --compare-priors                 # also refit other sampling priors on each checkpoint

One row per seed: test KL, active units, reconstruction MSE per pixel (z = posterior mean), the negative ELBO and the
importance-weighted bound (k = 100) per image in loss units, the CVAE's accuracy as a classifier, conditional accuracy
and sample FID with the prior the checkpoint samples from, and the reconstruction FID. Checkpoints go to --out-dir; an
existing checkpoint for a seed is reused with --reuse (same flags assumed). bench/sweep.py trains and judges its runs
with train() and seed_row() from here.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Alternative sampling priors compared with --compare-priors: (kind, mixture components).
PRIOR_VARIANTS = (("per-class", 1), ("per-class", 3), ("global", 1), ("global", 10))


class SeedRow(NamedTuple):
    """One seed's checkpoint, judged by test.py's evaluate()."""

    seed: int
    train_s: float     # the whole `python train.py` process; NaN for a reused checkpoint
    kl: float          # test KL per image, nats: the rate
    kl_dims: list[float]
    active_units: int  # latent dimensions whose posterior mean varies (Burda et al. 2016)
    recon: float       # summed squared error per image, one z draw: the distortion
    mse: float         # per pixel, z = posterior mean
    neg_elbo: float    # per image, loss units
    iw_bound: float    # importance-weighted, k = 100, loss units
    class_accuracy: float  # the CVAE as a classifier, argmax_y log p(x | y)
    prior: str         # the prior the checkpoint samples from
    accuracy: float    # conditional accuracy with that prior
    fid: float         # sample FID with that prior
    recon_fid: float
    standard_accuracy: float  # the same two with N(0, I)
    standard_fid: float

    def markdown(self) -> str:
        dims = ", ".join(f"{d:.2f}" for d in self.kl_dims)
        return (f"| {self.seed} | {self.train_s:.1f} | {self.kl:.2f} | {dims} | {self.active_units} "
                f"| {self.mse:.4f} | {self.neg_elbo:.2f} | {self.iw_bound:.2f} | {100 * self.class_accuracy:.1f}% "
                f"| {self.prior} | {100 * self.accuracy:.2f}% | {self.fid:.1f} "
                f"| {self.recon_fid:.1f} | {100 * (self.fid / self.recon_fid - 1):+.1f}% "
                f"| {100 * self.standard_accuracy:.2f}% | {self.standard_fid:.1f} |")


SEED_HEADER = ("| seed | train.py (s) | KL (nats) | KL per dim | active units | MSE/pixel | -ELBO | IW bound "
               "| as a classifier | prior | cond. acc. | sample FID | recon FID | FID gap | N(0,I) acc. "
               "| N(0,I) FID |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


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


def seed_row(seed: int, train_s: float, m: dict) -> SeedRow:
    """The row of one seed from evaluate()'s metrics."""
    t, lk = m["test"], m["likelihood"]
    gen, standard = m["generation"][m["prior_used"]], m["generation"]["standard"]
    return SeedRow(seed, train_s, t["kl_per_image"], t["kl_per_dim"], m["latent"]["active_units"],
                   t["recon_per_image"], t["mse_per_pixel_posterior_mean"], lk["neg_elbo_per_image"],
                   lk["iw_bound_per_image"], m["generative_classification"]["accuracy"], m["prior_used"],
                   gen["conditional_accuracy"], gen["fid"], m["reconstruction_fid"], standard["conditional_accuracy"],
                   standard["fid"])


def compare_priors(model, seed: int, args: argparse.Namespace, judge) -> list[PriorRow]:
    """Refit each of PRIOR_VARIANTS to the seed's training codes and judge its samples."""
    from dataset import MNISTDataModule
    from prior import fit_gmm_prior
    from test import evaluate

    data = MNISTDataModule(args.data_dir, seed=seed)
    data.setup()
    train_set = data.splits["train"]
    z = model.posterior_means(train_set.pixels, train_set.labels)
    rows = []
    for kind, k in PRIOR_VARIANTS:
        model.fitted_prior = fit_gmm_prior(z, train_set.labels, model.hparams.num_classes, kind, k, seed=seed)
        g = evaluate(model, args.data_dir, args.samples_per_digit, seed=0, judge=judge)
        fitted = g["generation"]["fitted"]
        rows.append(PriorRow(seed, f"{kind}, {k} component{'s' * (k > 1)}", fitted["conditional_accuracy"],
                             fitted["fid"], g["reconstruction_fid"]))
    return rows


def main() -> None:
    args = parse_args()
    import torch

    from checkpoint import load_cvae
    from classifier import load_judge
    from test import evaluate

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluation only; training runs in its own process with its own threads
    judge, _ = load_judge()
    rows: list[SeedRow] = []
    prior_rows: list[PriorRow] = []
    for seed in args.seeds:
        ckpt = args.out_dir / f"seed{seed}.ckpt"
        command = train_command(ckpt, args.out_dir / f"run{seed}",
                                ["--seed", str(seed), "--data-dir", str(args.data_dir), *shlex.split(args.train_args)])
        reuse = args.reuse and ckpt.is_file()
        train_s = float("nan") if reuse else train(command, args.out_dir / f"train{seed}.log")
        model = load_cvae(ckpt)
        rows.append(seed_row(seed, train_s, evaluate(model, args.data_dir, args.samples_per_digit, seed=0,
                                                     judge=judge)))
        if args.compare_priors:
            prior_rows += compare_priors(model, seed, args, judge)

    print(f"\ntrain.py {args.train_args or '(defaults)'}; judged by test.py's evaluate()\n")
    print(SEED_HEADER)
    for row in rows:
        print(row.markdown())
    if prior_rows:
        print("\n" + PRIOR_HEADER)
        for row in prior_rows:
            print(row.markdown())


if __name__ == "__main__":
    main()
