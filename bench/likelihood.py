"""A tight -log p(x) in nats, the number the VAE papers report, for checkpoints of this repo.

    python bench/likelihood.py --ckpt cvae.ckpt                          # 2,000 test images, 5,000 samples
    python bench/likelihood.py --ckpt runs/long/checkpoints/epoch=*.ckpt --images 1000 --samples 1000
                                                                         # one long run at several points
    python bench/likelihood.py --ckpt cvae.ckpt --images 300 --compare 1000 5000
                                                                         # how far the estimate still moves

-log p(x) = -log sum_y p(y) p(x | y) with a uniform p(y), each p(x | y) estimated by importance sampling from
q(z | x, y) (metrics.iw_bound, on the images as the model sees them: a Bernoulli model's fixed binarization of the
test set). The papers use thousands of samples per image; for ten labels on 10,000 images that is hours on 2 cores,
so the samples go where they matter. A screening pass bounds every label with --screen-samples (100); the labels
within --margin nats (20) of an image's best then get --samples (5,000), and the others keep their screening bound:
a label 20 nats below the best adds less than e^-20 of the best label's p(x | y) to the sum. The images are a seeded
random subset of the test set (--images, --seed; 10000: the whole of it, as the papers report). One markdown row per
checkpoint: its decoder, z, dropout and K (training samples of z per image, train.py --importance-samples), the
estimates with their standard errors over images, and the seconds it took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import DEFAULT_DATA_DIR, load_test_set, prepare_mnist  # noqa: E402
from metrics import iw_bound, log_likelihood_per_label, marginal_nll  # noqa: E402
from model import CVAE, load_cvae, nll_constant  # noqa: E402

DECODES_PER_BATCH = 20_000  # images x samples decoded at once: 63 MB of pixels, whatever the samples


def refine(model: CVAE, images: torch.Tensor, log_p: torch.Tensor, samples: int, margin: float, seed: int
           ) -> tuple[torch.Tensor, int]:
    """log p(x | y) (N, num_classes) with the pairs within `margin` nats of each image's best bounded again with
    `samples` samples; returns (the refined log p, how many pairs were refined)."""
    close = log_p >= log_p.max(dim=1, keepdim=True).values - margin  # (N, num_classes)
    image_idx, labels = close.nonzero(as_tuple=True)
    pairs = images[image_idx]
    bounds = -iw_bound(model, pairs, labels, *model.posterior(pairs, labels), samples, seed,
                       batch_size=max(1, DECODES_PER_BATCH // samples))
    refined = log_p.clone()
    refined[image_idx, labels] = bounds
    return refined, len(labels)


def standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of per-image values: how far the mean moves with another draw of images."""
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else float("nan")


def estimate(model: CVAE, images: torch.Tensor, labels: torch.Tensor, samples: int, args) -> dict[str, float]:
    """-log p(x) and -log p(x | true label), nats per image, with `samples` samples for the close labels."""
    start = time.perf_counter()
    screened = log_likelihood_per_label(model, images, args.screen_samples, args.seed)
    log_p, refined = refine(model, images, screened, samples, args.margin, args.seed + 1)
    constant = nll_constant(model.hparams.likelihood, images[0].numel())
    marginal = marginal_nll(log_p)  # (N,) float64
    conditional = -log_p[torch.arange(len(labels)), labels].double()
    return {
        "marginal": marginal.mean().item() + constant,
        "marginal_se": standard_error(marginal),
        "conditional": conditional.mean().item() + constant,
        "conditional_se": standard_error(conditional),
        "pairs": refined / len(images),
        "seconds": time.perf_counter() - start,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, nargs="+", required=True, help="checkpoints to score")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is (default: data)")
    p.add_argument("--images", type=int, default=2_000,
                   help="test images, a seeded random subset; 10000 for the whole test set (default: 2000)")
    p.add_argument("--samples", type=int, default=5_000,
                   help="samples of z for each close label (default: 5000)")
    p.add_argument("--screen-samples", type=int, default=100,
                   help="samples of z for every label in the screening pass (default: 100)")
    p.add_argument("--margin", type=float, default=20.0,
                   help="labels within this many nats of an image's best get --samples (default: 20)")
    p.add_argument("--compare", type=int, nargs="+", default=None,
                   help="score each checkpoint with each of these sample counts instead of --samples")
    p.add_argument("--seed", type=int, default=0, help="the subset and the noise (default: 0)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    prepare_mnist(args.data_dir)
    images, labels = load_test_set(args.data_dir)
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:args.images]
    print(f"{len(subset)} test images (seed {args.seed}); every label screened with {args.screen_samples} samples, "
          f"those within {args.margin:g} nats of the best with more; {torch.get_num_threads()} threads\n")
    print("| checkpoint | decoder | z | dropout | K | samples | −log p(x), nats (± s.e.) "
          "| −log p(x | y), nats (± s.e.) | labels refined per image | seconds |\n" + "|---" * 10 + "|")
    for path in args.ckpt:
        model = load_cvae(path)
        observed = model.observe(images)[subset]  # the fixed binarization of the whole test set, then the subset
        for samples in args.compare or [args.samples]:
            r = estimate(model, observed, labels[subset], samples, args)
            hp = model.hparams
            print(f"| {path} | {hp.likelihood} | {hp.latent_dim} | {hp.dropout:g} | {hp.importance_samples} "
                  f"| {samples} | {r['marginal']:.2f} ± {r['marginal_se']:.2f} "
                  f"| {r['conditional']:.2f} ± {r['conditional_se']:.2f} | {r['pairs']:.2f} | {r['seconds']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
