"""Judge a trained CVAE on the MNIST test set and draw the figures people look at.

    python test.py                                   # cvae.ckpt (and its run, runs/cvae) -> results/
    python test.py --ckpt runs/a.ckpt --run-dir runs/a --out-dir results/a --device cuda

Writes into --out-dir: samples.png, manifold.png, latent_scatter.png, reconstructions.png, analogies.png,
training_curves.png (from the run's metrics.csv) and metrics.json, and prints the metrics as a table. Generated digits
are judged by a digit classifier whose weights ship with the repo (classifier.py, weights/digit_cnn.pt): conditional
accuracy is the share of samples it reads as the requested digit, FID compares samples and test images in its
penultimate-layer features. Besides the ELBO it reports an importance-weighted bound on log p(x | y), the accuracy of
the CVAE itself as a classifier (argmax_y log p(x | y)) and how many latent dimensions are active.

`evaluate(model, data_dir)` returns the same numbers as a dict, for scripts that compare several checkpoints.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Normal
from torchvision.utils import make_grid

from checkpoint import CheckpointError, load_cvae
from classifier import JUDGE_FILE, DigitCNN, features_and_predictions, fid, load_judge
from dataset import DEFAULT_DATA_DIR, IMAGE_SIZE, DataError, has_raw_files, load_split, to_float_images
from cli import DEFAULT_CKPT, DEFAULT_RUN_DIR, ArgParser, UsageError, bounded, check_output_file, fail
from model import (ACTIVITY_THRESHOLD, activity, active_units, elbo_loss, eval_mode, gaussian_nll_constant,
                   informative_dims, kl_per_dim, metric_name, metric_names, squared_error)

DPI = 100
# Figure sizes in inches; the PNGs are exactly these times DPI pixels (no tight bounding box), so tests can check them.
FIGSIZES = {
    "samples.png": (6.2, 6.6),
    "manifold.png": (22.0, 10.0),
    "latent_scatter.png": (8.0, 8.6),
    "reconstructions.png": (7.4, 3.9),
    "analogies.png": (8.0, 6.7),
    "training_curves.png": (10.0, 4.2),
}
GAUSSIAN_CONSTANT = gaussian_nll_constant(IMAGE_SIZE ** 2)  # loss units + this = nats (392 ln(pi) per image)
IW_SAMPLES = 100  # default k: a tight bound that still takes seconds, not minutes, on a CPU (bench/README.md)
# The generative classifier's defaults (test images per digit, each bounded under all ten labels with k samples):
# less than half the likelihood bound's work, so `python test.py` stays about a minute (bench/README.md).
CLASSIFY_PER_DIGIT = 100
CLASSIFY_IW_SAMPLES = 50
MANIFOLD_QUANTILES = (0.05, 0.95)
SCATTER_CAPTION = ("In a CVAE the decoder is given the label, so z need not encode which digit it is: the classes "
                   "overlap by design,\nand z carries the style (slant, width, stroke) shared across digits.")


# ----- computations (no plotting) ---------------------------------------------------------------------------------
def load_test_set(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified MNIST test set: images float (10000, 1, 28, 28) in [0, 1] (uint8 / 255, as in training), labels."""
    images, labels = load_split(data_dir, train=False)
    return to_float_images(images), labels


@torch.no_grad()
def elbo_terms(model, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, batch_size: int = 1_000
               ) -> dict[str, Any]:
    """The training objective (model.elbo_loss) on held-out images, per image.

    z is one draw from q(z | x, y) per image, z = mean + exp(logvar / 2) * eps, in eval mode (no dropout), as
    train.py's test step computes it; eps (N, latent_dim) is drawn at once, in test-set order, from a generator
    seeded with `seed`, so the numbers repeat exactly.
    """
    dev, beta = model.device, model.hparams.kl_weight
    eps = torch.randn(len(images), model.hparams.latent_dim, generator=torch.Generator().manual_seed(seed))
    recon_sum = kl_sum = recon_mean_z_sum = 0.0
    kl_dims = torch.zeros(model.hparams.latent_dim, dtype=torch.float64)
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev).flatten(1)
            y = labels[i:i + batch_size].to(dev)
            mean, logvar = model.encode(x, y)
            z = model.reparameterize(mean, logvar, eps[i:i + batch_size].to(dev))
            _, recon, kl = elbo_loss(model.decode(z, y), x, mean, logvar, beta)  # batch means
            recon_sum += recon.item() * len(x)
            kl_sum += kl.item() * len(x)
            recon_mean_z_sum += squared_error(model.decode(mean, y), x).sum().item()
            kl_dims += kl_per_dim(mean, logvar).double().sum(dim=0).cpu()
    n, pixels = len(images), images[0].numel()
    recon, kl = recon_sum / n, kl_sum / n
    return {
        "images": n,
        "z": f"one draw z = mean + sigma * eps per image, eps ~ N(0, I) from seed {seed}, eval mode",
        "recon_per_image": recon,
        "kl_per_image": kl,
        "kl_weight": beta,
        "loss_per_image": recon + beta * kl,
        "mse_per_pixel": recon / pixels,
        "mse_per_pixel_posterior_mean": recon_mean_z_sum / n / pixels,
        "kl_per_dim": (kl_dims / n).tolist(),
    }


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2_000) -> torch.Tensor:
    """Decode each image's posterior mean under its own label, eval mode: (N, 1, 28, 28) on the CPU."""
    z = model.posterior_means(images, labels)
    side = model.hparams.image_size
    with eval_mode(model):
        return torch.cat([model.decode(z[i:i + batch_size], labels[i:i + batch_size]).cpu()
                          for i in range(0, len(z), batch_size)]).reshape(-1, 1, side, side)


@torch.no_grad()
def analogies(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Encode each image under its own label (posterior mean) and decode that one z under every label:
    (N, num_classes, 28, 28), row i = one handwriting style written as each digit."""
    k, side = model.hparams.num_classes, model.hparams.image_size
    z = model.posterior_means(images, labels).to(model.device)  # (N, latent_dim)
    with eval_mode(model):
        out = model.decode(z.repeat_interleave(k, dim=0), torch.arange(k).repeat(len(z)))  # (N * k, 784)
    return out.cpu().reshape(len(z), k, side, side)


@torch.no_grad()
def manifold(model, steps: int = 15, dims: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """For every digit, decode a steps x steps grid over N(0, 1) quantiles 0.05..0.95 of z[dims[0]] (columns, left to
    right) and z[dims[1]] (rows, bottom to top); other dimensions stay at 0, the prior's mean.

    Returns (images (num_classes, rows, steps, 28, 28), quantile values (steps,)); rows = 1 when latent_dim is 1.
    """
    k, d, side = model.hparams.num_classes, model.hparams.latent_dim, model.hparams.image_size
    q = torch.special.ndtri(torch.linspace(*MANIFOLD_QUANTILES, steps, dtype=torch.float64)).float()
    rows = steps if d >= 2 else 1
    z = torch.zeros(rows, steps, d)
    z[..., dims[0]] = q  # columns
    if d >= 2:
        z[..., dims[1]] = q.flip(0)[:, None]  # top row = largest value, as on a plot's y axis
    z = z.reshape(-1, d)
    with eval_mode(model):
        images = torch.stack([model.decode(z, torch.full((len(z),), digit)).cpu() for digit in range(k)])
    return images.reshape(k, rows, steps, side, side), q


@torch.no_grad()
def generate(model, prior: str, per_digit: int, seed: int = 0, batch_size: int = 10_000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_digit` samples of every digit from `prior`, labels in blocks (0 x per_digit, 1 x per_digit, ...), drawn
    with model.sample and a generator seeded with `seed`: (images (N, 1, 28, 28) on the CPU, labels (N,))."""
    labels = torch.arange(model.hparams.num_classes).repeat_interleave(per_digit)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([model.sample(labels[i:i + batch_size], prior=prior, generator=gen).cpu()
                        for i in range(0, len(labels), batch_size)])
    return images, labels


@torch.no_grad()
def iw_bound(model, images: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0, batch_size: int = 200
             ) -> torch.Tensor:
    """Importance-weighted bound on log p(x | y) per image (Burda, Grosse and Salakhutdinov 2016), in eval mode:

        log p(x | y) >= log (1/k) sum_i p(x | z_i, y) p(z_i) / q(z_i | x, y),   z_i ~ q(z | x, y).

    Returned as a loss, the negative bound in the training loss's units: -log p(x | z, y) is taken as the summed
    squared error, so add GAUSSIAN_CONSTANT for nats. k = 1 is a one-sample ELBO; the bound tightens as k grows.
    Noise comes from a generator seeded with `seed`, in test-set order, so the numbers repeat. Returns (N,) on the CPU.
    """
    dev, d = model.device, model.hparams.latent_dim
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev).flatten(1)  # (B, 784)
            y = labels[i:i + batch_size].to(dev)
            mean, logvar = model.encode(x, y)  # (B, d)
            eps = torch.randn(k, len(x), d, generator=gen).to(dev)
            z = model.reparameterize(mean, logvar, eps)  # (k, B, d)
            log_px = -squared_error(model.decode(z.reshape(-1, d), y.repeat(k)), x.repeat(k, 1)).reshape(k, len(x))
            log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_qz = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
            log_w = log_px + log_pz - log_qz  # (k, B) log importance weights
            out.append(-(torch.logsumexp(log_w, dim=0) - math.log(k)).cpu())
    return torch.cat(out)


def balanced_subset(labels: torch.Tensor, per_class: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` images of every class (all of a class that has fewer), drawn without replacement by a
    generator seeded with `seed`, class 0's first."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


@torch.no_grad()
def log_likelihood_per_label(model, images: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """log p(x | y) of every image under every label y, each the importance-weighted bound (iw_bound, negated) with
    k samples from q(z | x, y) for that label: (N, num_classes), loss units."""
    c = model.hparams.num_classes
    pairs = iw_bound(model, images.repeat_interleave(c, dim=0), torch.arange(c).repeat(len(images)), k, seed)
    return -pairs.reshape(len(images), c)  # image-major: row i holds image i under labels 0..c-1


def generative_classification(model, images: torch.Tensor, labels: torch.Tensor, per_digit: int, k: int,
                              seed: int = 0) -> dict[str, Any]:
    """The CVAE as a Bayes classifier with a uniform p(y): y_hat = argmax over y of log p(x | y), on a class-balanced
    subset of `per_digit` images of each digit (balanced_subset). A decoder that ignores y gives every label the same
    likelihood and scores chance (10 %); the accuracy says how much the decoder relies on the label."""
    num_classes = model.hparams.num_classes
    idx = balanced_subset(labels, per_digit, num_classes, seed)
    wanted = labels[idx]
    hits = (log_likelihood_per_label(model, images[idx], k, seed).argmax(dim=1) == wanted).double()
    return {
        "rule": "argmax over y of log p(x | y), uniform p(y); log p(x | y) is the importance-weighted bound with "
                "k samples from q(z | x, y) for that label",
        "images": len(idx),
        "iw_samples": k,
        "accuracy": hits.mean().item(),
        "per_digit": [hits[wanted == c].mean().item() for c in range(num_classes)],
    }


def latent_metrics(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Which latent dimensions carry information: each one's activity (the variance of its posterior mean over the
    images), the number of active units (activity above ACTIVITY_THRESHOLD; Burda et al. 2016) and the two
    dimensions the figures show (model.informative_dims)."""
    means = model.posterior_means(images, labels)
    return {
        "posterior_mean_variance": activity(means).tolist(),
        "activity_threshold": ACTIVITY_THRESHOLD,
        "active_units": active_units(means),
        "informative_dims": list(informative_dims(means)),
    }


def evaluate(model, data_dir: str | Path, samples_per_digit: int = 1_000, seed: int = 0,
             iw_samples: int = IW_SAMPLES, judge: DigitCNN | None = None,
             classify_per_digit: int = CLASSIFY_PER_DIGIT, classify_iw_samples: int = CLASSIFY_IW_SAMPLES
             ) -> dict[str, Any]:
    """Every number test.py reports, for one model, as a JSON-ready dict: "test" (elbo_terms on the 10k test
    images), "latent" (latent_metrics), "likelihood" (likelihood_metrics), "generative_classification"
    (generative_classification), "generation" (generation_metrics, per prior), "reconstruction_fid" (the test
    images' reconstructions against the test set, a floor for the sample FID) and "prior_used" (the prior
    samples.png and the headline numbers use). FID and accuracy come from `judge` (default: the shipped weights).
    """
    if judge is None:
        judge, _ = load_judge(device=model.device)
    images, labels = load_test_set(data_dir)
    test_feats, test_preds = features_and_predictions(judge, images)
    generation = generation_metrics(model, judge, test_feats, samples_per_digit, seed)
    recon_feats, _ = features_and_predictions(judge, reconstruct(model, images, labels))
    terms = elbo_terms(model, images, labels, seed)
    return {
        "seed": seed,
        "model": {"latent_dim": model.hparams.latent_dim, "kl_weight": model.hparams.kl_weight,
                  "fitted_prior": None if model.fitted_prior is None else model.fitted_prior.get("kind", "mixture")},
        "prior_used": model.resolve_prior("auto"),
        "classifier": {"test_accuracy": (test_preds == labels).double().mean().item(),
                       "features": f"DigitCNN penultimate layer ({test_feats.shape[1]}-d), FID in float64"},
        "test": terms,
        "latent": latent_metrics(model, images, labels),
        "likelihood": likelihood_metrics(model, images, labels, terms, iw_samples, seed),
        "generative_classification": generative_classification(model, images, labels, classify_per_digit,
                                                               classify_iw_samples, seed),
        "generation": generation,
        "reconstruction_fid": fid(recon_feats, test_feats),
    }


def generation_metrics(model, judge: DigitCNN, test_feats: torch.Tensor, samples_per_digit: int, seed: int
                       ) -> dict[str, dict[str, Any]]:
    """For each prior the model has ("standard", and "fitted" when present): how often the judge reads a sample as
    the requested digit (overall and per digit), and the samples' FID against the test set's features."""
    k = model.hparams.num_classes
    generation = {}
    for prior in ("standard", "fitted") if model.fitted_prior is not None else ("standard",):
        samples, wanted = generate(model, prior, samples_per_digit, seed)
        feats, preds = features_and_predictions(judge, samples)
        hits = (preds == wanted).double()
        generation[prior] = {
            "samples": len(samples),
            "conditional_accuracy": hits.mean().item(),
            "per_digit": [hits[wanted == c].mean().item() for c in range(k)],
            "fid": fid(feats, test_feats),
        }
    return generation


def likelihood_metrics(model, images: torch.Tensor, labels: torch.Tensor, terms: dict[str, Any], iw_samples: int,
                       seed: int) -> dict[str, Any]:
    """The negative ELBO (from elbo_terms' `terms`) and the importance-weighted bound (iw_bound), per image, in loss
    units and in nats."""
    neg_elbo = terms["recon_per_image"] + terms["kl_per_image"]  # the ELBO itself, whatever kl_weight trained it
    iw = iw_bound(model, images, labels, iw_samples, seed).mean().item()
    return {
        "units": f"loss units: -log p(x | y) with the summed squared error as -log p(x | z, y); "
                 f"nats: plus 392 ln(pi) = {GAUSSIAN_CONSTANT:.2f} (a Gaussian decoder with variance 1/2)",
        "neg_elbo_per_image": neg_elbo,
        "iw_samples": iw_samples,
        "iw_bound_per_image": iw,
        "neg_elbo_nats_per_image": neg_elbo + GAUSSIAN_CONSTANT,
        "iw_bound_nats_per_image": iw + GAUSSIAN_CONSTANT,
    }


def metrics_table(m: dict[str, Any]) -> str:
    """The metrics as a plain-text table."""
    t, lk, gen, used = m["test"], m["likelihood"], m["generation"], m["prior_used"]
    lat, gc = m["latent"], m["generative_classification"]
    lines = [
        f"Digit classifier: {100 * m['classifier']['test_accuracy']:.2f}% on the MNIST test set",
        "",
        f"Test set, {t['images']} images, per image (z: one draw from q(z|x,y), seed {m['seed']})",
        f"  {'reconstruction (sum of squared errors)':<42}{t['recon_per_image']:>10.3f}",
        f"  {'KL (nats)':<42}{t['kl_per_image']:>10.3f}",
        f"  {'loss (recon + ' + format(t['kl_weight'], 'g') + ' x KL)':<42}{t['loss_per_image']:>10.3f}",
        f"  {'MSE per pixel':<42}{t['mse_per_pixel']:>10.5f}",
        f"  {'MSE per pixel, z = posterior mean':<42}{t['mse_per_pixel_posterior_mean']:>10.5f}",
        "",
        f"Latent dimensions (z[0] ... z[{len(t['kl_per_dim']) - 1}]) over the test images",
        f"  {'active units (posterior-mean variance > ' + format(lat['activity_threshold'], 'g') + ')':<42}"
        f"{lat['active_units']:>10} of {len(t['kl_per_dim'])}",
        f"  {'KL per dimension (nats)':<42}" + " ".join(f"{v:.2f}" for v in t["kl_per_dim"]),
        f"  {'posterior-mean variance':<42}" + " ".join(f"{v:.2f}" for v in lat["posterior_mean_variance"]),
        "",
        f"Negative log-likelihood bounds, per image (lower is tighter){'loss units':>14}{'nats':>10}",
        f"  {'-ELBO (recon + KL)':<58}{lk['neg_elbo_per_image']:>10.3f}{lk['neg_elbo_nats_per_image']:>10.3f}",
        f"  {'importance-weighted, k = ' + str(lk['iw_samples']):<58}{lk['iw_bound_per_image']:>10.3f}"
        f"{lk['iw_bound_nats_per_image']:>10.3f}",
        f"  (nats = loss units + 392 ln(pi) = {GAUSSIAN_CONSTANT:.2f}: a Gaussian decoder with variance 1/2)",
        "",
        f"The CVAE as a classifier, argmax_y log p(x|y) (IW bound, k = {gc['iw_samples']} per label), "
        f"{gc['images']} test images",
        f"  {'accuracy (a decoder that ignores y: 10%)':<42}{100 * gc['accuracy']:>9.2f}%",
        f"  {'per digit':<42}" + " ".join(f"{100 * a:.0f}%" for a in gc["per_digit"]),
        "",
        f"Generated digits ({next(iter(gen.values()))['samples']} per prior)".ljust(44)
        + "".join(f"{name + (' *' if name == used else ''):>12}" for name in gen),
        f"  {'conditional accuracy':<42}" + "".join(f"{100 * g['conditional_accuracy']:>11.2f}%" for g in gen.values()),
        f"  {'FID vs test set':<42}" + "".join(f"{g['fid']:>12.3f}" for g in gen.values()),
    ]
    lines += [f"  {f'accuracy, digit {c}':<42}" + "".join(f"{100 * g['per_digit'][c]:>11.2f}%" for g in gen.values())
              for c in range(len(next(iter(gen.values()))["per_digit"]))]
    lines += ["  (* the prior samples.png uses)", "",
              f"Reconstruction FID (test images decoded from their posterior means): {m['reconstruction_fid']:.3f}"]
    return "\n".join(lines)


CURVES = metric_names("train", "val")  # the epoch means train.py logs


def read_training_log(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """The per-epoch values of CURVES in RUN_DIR/logs/version_*/metrics.csv, as {name: {epoch: value}}; empty when the
    run has no log.

    Every train.py process logs to a new version. A version whose first epoch is 0 starts a run, and replaces what the
    versions before it hold; a later one is that run resumed and continues it (its values win for an epoch logged
    twice: one logged after the last checkpoint of a killed process and trained again), so a resumed run gives one
    continuous curve."""
    versions = {p: p.parent.name.removeprefix("version_") for p in Path(run_dir).glob("logs/version_*/metrics.csv")}
    curves: dict[str, dict[int, float]] = {}
    for path in sorted((p for p, n in versions.items() if n.isdigit()), key=lambda p: int(versions[p])):
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if any(row.get(name) for name in CURVES)]
        if rows and min(int(row["epoch"]) for row in rows) == 0:
            curves = {}
        for row in rows:
            for name in CURVES:
                if row.get(name):
                    curves.setdefault(name, {})[int(row["epoch"])] = float(row[name])
    return curves


# ----- figures ------------------------------------------------------------------------------------------------------
def tile(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(R, C, H, W) images -> one (R*H + (R-1)*pad, C*W + (C-1)*pad) array with white lines between the tiles:
    torchvision's make_grid, less the white frame it draws around the whole grid."""
    r, c, h, w = images.shape
    grid = make_grid(images.reshape(r * c, 1, h, w), nrow=c, padding=pad, pad_value=1.0)[0]  # (3, ...) -> one channel
    return grid[pad:grid.shape[0] - pad, pad:grid.shape[1] - pad].numpy() if r * c > 1 else grid.numpy()


def tile_centres(n: int, size: int, pad: int = 2) -> list[float]:
    """Pixel coordinates of the centres of n tiles of `size` along one axis of a tile() image."""
    return [i * (size + pad) + (size - 1) / 2 for i in range(n)]


def new_figure(name: str):
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend

    return Figure(figsize=FIGSIZES[name], dpi=DPI)


def save(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZES[name] * DPI
    return path


def show_grid(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_samples(model, out_dir: Path, seed: int) -> Path:
    """samples.png: row k = ten samples of digit k from the prior "auto" resolves to."""
    prior = model.resolve_prior("auto")
    k, side = model.hparams.num_classes, model.hparams.image_size
    images, _ = generate(model, prior, 10, seed)
    fig = new_figure("samples.png")
    ax = fig.add_axes((0.1, 0.02, 0.87, 0.83))
    show_grid(ax, tile(images.reshape(k, 10, side, side)))
    ax.set_yticks(tile_centres(k, side), [str(c) for c in range(k)], fontsize=12)
    ax.set_ylabel("requested digit", fontsize=12)
    ax.set_xticks([])
    ax.tick_params(length=0)
    desc = {"standard": "standard prior N(0, I)",
            "fitted": f"fitted prior ({(model.fitted_prior or {}).get('kind', 'mixture')} Gaussian mixture)"}[prior]
    fig.suptitle(f"Samples of each digit\nz from the {desc}, seed {seed}", fontsize=13, y=0.975)
    return save(fig, out_dir, "samples.png")


def dim_names(dims: tuple[int, ...], latent_dim: int) -> list[str]:
    """How the figures name the latent dimensions they show: z1, z2 for a 1- or 2-D latent, z[i] (the index) for the
    two chosen from a wider one."""
    return [f"z{i + 1}" for i in dims] if latent_dim <= 2 else [f"z[{i}]" for i in dims]


def plot_manifold(model, out_dir: Path, dims: tuple[int, ...], steps: int = 15) -> Path:
    """manifold.png: one panel per digit, decoding a grid over the latent dimensions `dims` (informative_dims)."""
    images, q = manifold(model, steps, dims)
    k, rows, side, d = images.shape[0], images.shape[1], model.hparams.image_size, model.hparams.latent_dim
    names = dim_names(dims, d)
    fig = new_figure("manifold.png")
    ncols = math.ceil(k / 2) if k > 1 else 1
    axes = fig.subplots(math.ceil(k / ncols), ncols, squeeze=False,
                        gridspec_kw=dict(left=0.03, right=0.99, bottom=0.05, top=0.85, wspace=0.12, hspace=0.2))
    marks = [0, steps // 2, steps - 1]  # ticks at both ends and the middle of the grid
    for digit, ax in enumerate(axes.flat):
        if digit >= k:
            ax.set_visible(False)
            continue
        show_grid(ax, tile(images[digit], pad=0))
        ax.set_title(f"digit {digit}", fontsize=14)
        ax.set_xticks([tile_centres(steps, side, 0)[i] for i in marks], [f"{q[i]:.2f}" for i in marks])
        ax.set_xlabel(names[0], labelpad=1)
        if rows > 1:
            ax.set_yticks([tile_centres(rows, side, 0)[i] for i in marks], [f"{q.flip(0)[i]:.2f}" for i in marks])
            ax.set_ylabel(names[1], labelpad=1)
        else:
            ax.set_yticks([])
    what = (f"{names[0]} (left to right) and {names[1]} (bottom to top)" if d >= 2
            else "z1 (left to right; latent_dim is 1)")
    rest = f"; the other {d - 2} dimensions are fixed at 0" if d > 2 else ""
    lo, hi = MANIFOLD_QUANTILES
    fig.suptitle(f"Decoded latent manifold for each digit\n{what} at the {lo:g}...{hi:g} quantiles of N(0, 1), "
                 f"{steps} steps{rest}", fontsize=16)
    return save(fig, out_dir, "manifold.png")


def plot_latent_scatter(model, images: torch.Tensor, labels: torch.Tensor, out_dir: Path, dims: tuple[int, ...]
                        ) -> Path:
    """latent_scatter.png: posterior means of the test images in the latent dimensions `dims` (informative_dims),
    coloured by digit."""
    from matplotlib import colormaps
    from matplotlib.patches import Circle

    z = model.posterior_means(images, labels).numpy()
    d, k = z.shape[1], model.hparams.num_classes
    names = dim_names(dims, d)
    fig = new_figure("latent_scatter.png")
    ax = fig.add_axes((0.11, 0.17, 0.85, 0.74))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(z))  # plot in random order so no digit is painted over all the others
    x_vals = z[order, dims[0]]
    y_vals = z[order, dims[1]] if d >= 2 else labels.numpy()[order] + rng.uniform(-0.3, 0.3, len(z))
    colours = np.asarray([colormaps["tab10"](c % 10) for c in range(k)])
    ax.scatter(x_vals, y_vals, c=colours[labels.numpy()[order]], s=3, alpha=0.6, linewidths=0)
    for c in range(k):  # legend entries with readable markers
        ax.scatter([], [], color=colours[c], s=30, label=str(c))
    ax.legend(title="digit", loc="upper right", fontsize=9, ncols=2, framealpha=0.9)
    if d >= 2:
        ax.add_patch(Circle((0, 0), 2.0, fill=False, ls="--", color="0.3", lw=1))
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_ylabel(f"{names[1]} (posterior mean)")
        ax.text(0.02, 0.02, "dashed circle: radius 2, holds 86% of N(0, I)", transform=ax.transAxes, fontsize=9,
                color="0.3")
    else:
        ax.set_ylabel("digit (jittered)")
    ax.set_xlabel(f"{names[0]} (posterior mean)")
    which = f", the 2 of {d} latent dimensions whose means vary most" if d > 2 else ""
    ax.set_title(f"Posterior means of the {len(z):,} test images{which}", fontsize=12)
    fig.text(0.5, 0.025, SCATTER_CAPTION, ha="center", va="bottom", fontsize=9.5, wrap=False)
    return save(fig, out_dir, "latent_scatter.png")


def plot_reconstructions(model, images: torch.Tensor, labels: torch.Tensor, out_dir: Path) -> Path:
    """reconstructions.png: two blocks of (test images, reconstructions); each block shows one example of every
    digit, the first block the first example in the test set, the second the next."""
    k, side = model.hparams.num_classes, model.hparams.image_size
    fig = new_figure("reconstructions.png")
    axes = fig.subplots(2, 1, gridspec_kw=dict(left=0.2, right=0.98, bottom=0.02, top=0.78, hspace=0.12))
    for block, ax in enumerate(axes):
        idx = torch.stack([torch.nonzero(labels == c)[block, 0] for c in range(k)])
        recon = reconstruct(model, images[idx], labels[idx])
        show_grid(ax, tile(torch.stack([images[idx, 0], recon[:, 0]])))
        ax.set_yticks(tile_centres(2, side), ["test image", "reconstruction"], fontsize=10)
        ax.set_xticks(tile_centres(k, side), [str(c) for c in range(k)] if block == 0 else [])
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
    fig.suptitle("Test images above their reconstructions\n(decoded from the posterior mean under the true label)",
                 fontsize=12)
    return save(fig, out_dir, "reconstructions.png")


def plot_analogies(model, images: torch.Tensor, labels: torch.Tensor, out_dir: Path, n: int = 8) -> Path:
    """analogies.png: the first n test images, each followed by its z decoded under all ten labels."""
    k, side = model.hparams.num_classes, model.hparams.image_size
    grid = analogies(model, images[:n], labels[:n])
    fig = new_figure("analogies.png")
    left, right = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1, k], left=0.1, right=0.98, bottom=0.02,
                                                      top=0.82, wspace=0.04))
    show_grid(left, tile(images[:n, 0].unsqueeze(1)))
    left.set_yticks(tile_centres(n, side), [str(int(y)) for y in labels[:n]])
    left.set_ylabel("label of the input")
    left.set_xticks([tile_centres(1, side)[0]], ["input"])
    show_grid(right, tile(grid))
    right.set_yticks([])
    right.set_xticks(tile_centres(k, side), [str(c) for c in range(k)])
    right.set_xlabel("decoded under label", labelpad=4)
    for ax in (left, right):
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.tick_params(length=0)
    fig.suptitle("One handwriting style, ten digits\neach row: z = posterior mean of the test image on the left, "
                 "decoded under every label", fontsize=12)
    return save(fig, out_dir, "analogies.png")


def plot_training_curves(curves: dict[str, dict[int, float]], warmup_epochs: float, out_dir: Path,
                         run_dir: str | Path = "the run") -> Path:
    """training_curves.png: reconstruction and KL per epoch, train and validation, with the KL warm-up shaded.
    An epoch's point sits at its end (epoch 1 at x = 1); training values are means over the epoch, with dropout on,
    validation values are measured after it, with dropout off."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure("training_curves.png")
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.13, top=0.82, wspace=0.2))
    titles = {"recon": "reconstruction (summed squared error per image)", "kl": "KL(q(z|x,y) || N(0, I)), nats"}
    for ax, (term, title) in zip(axes, titles.items()):
        if warmup_epochs > 0:
            ax.axvspan(0, warmup_epochs, color="tab:orange", alpha=0.15, lw=0,
                       label=f"KL warm-up: beta 0 -> 1 over {warmup_epochs:g} epochs")
        for stage, style in (("train", "-o"), ("val", "--s")):
            points = sorted(curves.get(metric_name(stage, term), {}).items())
            if points:
                epochs, values = zip(*points)
                ax.plot([e + 1 for e in epochs], values, style, ms=4, label="train" if stage == "train" else
                        "validation")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"Training curves of {run_dir}: epoch means (training with dropout, validation without)",
                 fontsize=13)
    return save(fig, out_dir, "training_curves.png")


# ----- command line -------------------------------------------------------------------------------------------------
def build_parser() -> ArgParser:
    p = ArgParser(description="Evaluate a trained CVAE on the MNIST test set and write figures and metrics.json.")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint written by train.py")
    p.add_argument("--out-dir", type=Path, default=Path("results"), help="where the figures and metrics.json go")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seed for samples and the test ELBO's z draws")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    # One thread by default: the batches here are small, and on a shared machine two torch threads wait on each other
    # (bench/README.md).
    p.add_argument("--num-threads", type=bounded(int, 1), default=1, help="CPU threads for torch")
    p.add_argument("--samples-per-digit", type=bounded(int, 2), default=1_000,
                   help="prior samples per digit for conditional accuracy and FID")
    p.add_argument("--manifold-steps", type=bounded(int, 2, 50), default=15, help="grid size of each manifold panel")
    p.add_argument("--iw-samples", type=bounded(int, 1, 10_000), default=IW_SAMPLES,
                   help="k of the importance-weighted likelihood bound (samples of z per test image)")
    p.add_argument("--classify-per-digit", type=bounded(int, 1), default=CLASSIFY_PER_DIGIT,
                   help="test images per digit (a seeded, class-balanced subset) that the CVAE classifies by "
                        "argmax_y log p(x|y)")
    p.add_argument("--classify-iw-samples", type=bounded(int, 1, 10_000), default=CLASSIFY_IW_SAMPLES,
                   help="k of the importance-weighted bound on each log p(x|y) of that classifier")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help="train.py's --run-dir of this checkpoint, for training_curves.png")
    p.add_argument("--judge", type=Path, default=None,
                   help="digit classifier weights for FID and accuracy (default: the shipped weights/digit_cnn.pt, "
                        "checked against its recorded hash)")
    return p


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.num_threads)
    try:
        device = parse_device(args.device)
        check_output_file(args.out_dir / "metrics.json", "out dir")
        # Load on the CPU, then move: the fitted prior stays on the CPU, where its sampler's generator lives.
        model = load_cvae(args.ckpt, map_location="cpu").to(device)
        judge, judge_sha256 = load_judge(args.judge, device=device)
        if not has_raw_files(args.data_dir):
            raise DataError(f"no MNIST files in {args.data_dir}; write them with `python -c \"import dataset; "
                             f"dataset.prepare_mnist('{args.data_dir}')\"` (train.py does this too) or pass --data-dir")
    except UsageError as err:
        fail(str(err), code=2)
    except (CheckpointError, DataError) as err:
        fail(str(err))
    print(f"Device: {device}; checkpoint {args.ckpt} (latent_dim {model.hparams.latent_dim}, "
          f"prior for samples: {model.resolve_prior('auto')})", flush=True)
    try:
        metrics = {"checkpoint": str(args.ckpt),
                   "judge": {"weights": str(args.judge or JUDGE_FILE), "sha256": judge_sha256},
                   **evaluate(model, args.data_dir, args.samples_per_digit, args.seed, args.iw_samples, judge,
                              args.classify_per_digit, args.classify_iw_samples)}
        images, labels = load_test_set(args.data_dir)
    except DataError as err:
        fail(str(err))
    print(metrics_table(metrics))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dims = tuple(metrics["latent"]["informative_dims"])
    written = [
        plot_samples(model, args.out_dir, args.seed),
        plot_manifold(model, args.out_dir, dims, args.manifold_steps),
        plot_latent_scatter(model, images, labels, args.out_dir, dims),
        plot_reconstructions(model, images, labels, args.out_dir),
        plot_analogies(model, images, labels, args.out_dir),
    ]
    curves = read_training_log(args.run_dir)
    if curves:
        written.append(plot_training_curves(curves, model.hparams.kl_warmup_epochs, args.out_dir, args.run_dir))
    else:
        print(f"No training log in {args.run_dir} (logs/version_*/metrics.csv); training_curves.png not written "
              f"(pass the run's --run-dir)")
    metrics_path = args.out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"\nWrote {', '.join(p.name for p in written)} and {metrics_path.name} to {args.out_dir}/ "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
