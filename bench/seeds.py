"""Sample quality across seeds: train the default recipe on several seeds and judge each with test.py's evaluate().

    python bench/seeds.py                                  # seeds 0 1 2, default recipe, ~2 min per seed + eval
    python bench/seeds.py --train-args "--kl-warmup-epochs 0"   # the recipe without warm-up, for comparison
    python bench/seeds.py --compare-priors                 # also refit other sampling priors on each checkpoint

One row per seed: test KL, reconstruction MSE per pixel (z = posterior mean), the negative ELBO and the
importance-weighted bound (k = 100) per image in loss units, conditional accuracy and sample FID with the prior the
checkpoint samples from, and the reconstruction FID. Checkpoints go to --out-dir; an existing
checkpoint for a seed is reused with --reuse (same flags assumed).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Alternative sampling priors compared with --compare-priors: (kind, mixture components).
PRIOR_VARIANTS = (("per-class", 1), ("per-class", 3), ("global", 1), ("global", 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--train-args", default="", help="extra flags for train.py (default: none, the default recipe)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/seeds"), help="checkpoints (default: runs/seeds)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="MNIST folder (default: data)")
    p.add_argument("--samples-per-digit", type=int, default=1_000, help="prior samples per digit (default: 1000)")
    p.add_argument("--reuse", action="store_true", help="reuse an existing checkpoint for a seed")
    p.add_argument("--compare-priors", action="store_true", help="also refit and judge other sampling priors")
    args = p.parse_args()

    import torch

    from checkpoint import load_cvae
    from classifier import load_judge
    from dataset import MNISTDataModule
    from prior import fit_gmm_prior
    from test import evaluate

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # evaluation only; training runs in its own process with its own threads
    judge, _ = load_judge()
    rows, prior_rows = [], []
    for seed in args.seeds:
        ckpt = args.out_dir / f"seed{seed}.ckpt"
        train_s = float("nan")  # a reused checkpoint has no training time
        if not (args.reuse and ckpt.is_file()):
            cmd = [sys.executable, "train.py", "--seed", str(seed), "--no-progress", "--data-dir", str(args.data_dir),
                   "--ckpt", str(ckpt), "--run-dir", str(args.out_dir / f"run{seed}"), *shlex.split(args.train_args)]
            print("$", " ".join(cmd), file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            train_s = time.perf_counter() - start  # the whole `python train.py` process
        model = load_cvae(ckpt)
        m = evaluate(model, args.data_dir, args.samples_per_digit, seed=0, judge=judge)
        gen = m["generation"][m["prior_used"]]
        rows.append((seed, train_s, m["test"]["kl_per_image"], m["test"]["kl_per_dim"],
                     m["test"]["mse_per_pixel_posterior_mean"], m["likelihood"]["neg_elbo_per_image"],
                     m["likelihood"]["iw_bound_per_image"], m["prior_used"], gen["conditional_accuracy"],
                     gen["fid"], m["reconstruction_fid"],
                     m["generation"]["standard"]["conditional_accuracy"], m["generation"]["standard"]["fid"]))
        if args.compare_priors:
            data = MNISTDataModule(args.data_dir, seed=seed)
            data.setup()
            train_set = data.splits["train"]
            z = model.posterior_means(train_set.pixels, train_set.labels)
            for kind, k in PRIOR_VARIANTS:
                model.fitted_prior = fit_gmm_prior(z, train_set.labels, model.hparams.num_classes, kind, k, seed=seed)
                g = evaluate(model, args.data_dir, args.samples_per_digit, seed=0, judge=judge)
                prior_rows.append((seed, f"{kind}, {k} component{'s' * (k > 1)}",
                                   g["generation"]["fitted"]["conditional_accuracy"], g["generation"]["fitted"]["fid"],
                                   g["reconstruction_fid"]))

    print(f"\ntrain.py {args.train_args or '(defaults)'}; judged by test.py's evaluate()\n")
    print("| seed | train.py (s) | KL (nats) | KL per dim | MSE/pixel | -ELBO | IW bound | prior | cond. acc. "
          "| sample FID | recon FID | FID gap | N(0,I) acc. | N(0,I) FID |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, train_s, kl, kl_dims, mse, nelbo, iw, prior, acc, fid, rfid, sacc, sfid in rows:
        dims = ", ".join(f"{d:.2f}" for d in kl_dims)
        print(f"| {seed} | {train_s:.1f} | {kl:.2f} | {dims} | {mse:.4f} | {nelbo:.2f} | {iw:.2f} | {prior} "
              f"| {100 * acc:.2f}% | {fid:.1f} "
              f"| {rfid:.1f} "
              f"| {100 * (fid / rfid - 1):+.1f}% | {100 * sacc:.2f}% | {sfid:.1f} |")
    if prior_rows:
        print("\n| seed | fitted prior | cond. acc. | sample FID | recon FID |")
        print("|---|---|---|---|---|")
        for seed, name, acc, fid, rfid in prior_rows:
            print(f"| {seed} | {name} | {100 * acc:.2f}% | {fid:.1f} | {rfid:.1f} |")


if __name__ == "__main__":
    main()
