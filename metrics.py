"""Every number test.py reports about a trained CVAE, and how each is computed.

Evaluation flows one way, as training does:

    the test set -> model outputs, computed once (`model_outputs`: every test image's posterior and reconstruction,
    the samples, what the judge makes of them, and the decodes the figures show) -> the numbers (`evaluate`: a
    JSON-ready dict, metrics.json) -> the printed report (report.py) and the figures (figures.py, drawn from these
    same outputs without running the model)

Each number is a function here, called by `evaluate`, and an entry in report.REPORT, which carries it to the printed
report and, with a `key`, to bench/seeds.py's rows and bench/sweep.py's results.csv and tables.

The judge of generated digits (classifier.py) gives conditional accuracy (the share of samples it reads as the
requested digit) and FID (samples against the grey test images in its penultimate-layer features). Besides the ELBO
there is an importance-weighted bound on log p(x | y), the marginal log p(x) = log sum_y p(y) p(x | y), the accuracy
of the CVAE itself as a classifier (argmax_y log p(x | y)) and the number of active latent dimensions; the
likelihoods are in the training loss's units and in nats. All of it runs in eval mode (no dropout), with noise from
generators seeded by `seed`, so the numbers repeat. A Bernoulli model is scored on the fixed binarization of the test
set (dataset.binarize), everything else on the grey images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from classifier import DigitCNN, features_and_predictions, fid
from dataset import IMAGE_SIZE
from latent import ACTIVITY_THRESHOLD, activity, active_units, informative_dims
from model import (CVAE, elbo_loss, gaussian_nll_constant, importance_weighted_loss, kl_per_dim, nll_constant,
                   squared_error)
from torch_utils import batched, eval_mode

GAUSSIAN_CONSTANT = gaussian_nll_constant(IMAGE_SIZE ** 2)  # Gaussian loss units + this = nats (392 ln(pi) per image)
IW_SAMPLES = 100  # samples of z per image for the likelihood bound: tight, and seconds on a CPU (bench/README.md)
# The generative classifier's defaults (test images per digit, each bounded under all ten labels with this many
# samples): less than half the likelihood bound's work, so `python test.py` stays about a minute (bench/README.md).
CLASSIFY_PER_DIGIT = 100
CLASSIFY_IW_SAMPLES = 50
MANIFOLD_QUANTILES = (0.05, 0.95)  # the manifold figure spans these quantiles of N(0, 1) in each dimension
MANIFOLD_STEPS = 15  # the manifold figure's grid, per side
SAMPLE_GRID = 10     # samples.png's samples per digit
ANALOGIES = 8        # analogies.png's rows: the first test images


# ----- model outputs, computed once ---------------------------------------------------------------------------------
@dataclass
class Judged:
    """What the judge makes of a set of images."""

    features: torch.Tensor     # (N, 128) float64: its penultimate layer, the space FID is computed in
    predictions: torch.Tensor  # (N,) the digit it reads


@dataclass
class Samples:
    """Generated digits of one prior: per_digit of every digit, labels in blocks (0, 0, ..., 1, 1, ...)."""

    images: torch.Tensor  # (N, 1, 28, 28)
    labels: torch.Tensor  # (N,) the requested digits
    judged: Judged


@dataclass
class Decodes:
    """The decodes the figures show besides the test set's (figures.py draws them; nothing runs the model then)."""

    sample_grid: torch.Tensor      # (num_classes, SAMPLE_GRID, 28, 28) row k: samples of digit k from the prior used
    dims: tuple[int, ...]          # the latent dimensions the 2-D figures show (latent.informative_dims)
    manifold: torch.Tensor         # (num_classes, rows, steps, 28, 28) decodes over a grid of those dimensions
    manifold_values: torch.Tensor  # (steps,) the grid's values in each of them, quantiles of N(0, 1)
    analogies: torch.Tensor        # (ANALOGIES, num_classes, 28, 28) the first test images' means under every label


@dataclass
class Outputs:
    """The model's and the judge's outputs for one evaluation, handed to every metric and figure that needs them."""

    images: torch.Tensor           # (N, 1, 28, 28) test images in [0, 1], grey
    observed: torch.Tensor         # the same as the model sees and scores them: grey, or binarized (Bernoulli)
    labels: torch.Tensor           # (N,)
    means: torch.Tensor            # (N, latent_dim) means of q(z | x, y), x the observed images
    logvars: torch.Tensor          # (N, latent_dim) their log-variances
    reconstructions: torch.Tensor  # (N, 1, 28, 28) each posterior mean decoded under its own label
    test: Judged                   # the judge on the test images
    reconstructed: Judged          # the judge on the reconstructions
    samples: dict[str, Samples]    # per prior: "standard", and "fitted" when the model has one
    decodes: Decodes               # what the figures show besides


def judge_images(judge: DigitCNN, images: torch.Tensor) -> Judged:
    return Judged(*features_and_predictions(judge, images))


@torch.no_grad()
def decode_all(model: CVAE, z: torch.Tensor, labels: torch.Tensor, batch_size: int = 2_000) -> torch.Tensor:
    """Decode codes z (N, latent_dim) under labels (N,) in eval mode: (N, 1, 28, 28) on the CPU."""
    side = model.hparams.image_size
    with eval_mode(model):
        images = batched(lambda zs, ys: model.decode(zs, ys).cpu(), z, labels, batch_size=batch_size)
    return images.reshape(-1, 1, side, side)


@torch.no_grad()
def generate(model: CVAE, prior: str, per_digit: int, seed: int = 0, batch_size: int = 10_000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_digit` samples of every digit from `prior`, labels in blocks (0 x per_digit, 1 x per_digit, ...), drawn
    with model.sample and a generator seeded with `seed`: (images (N, 1, 28, 28) on the CPU, labels (N,))."""
    labels = torch.arange(model.hparams.num_classes).repeat_interleave(per_digit)
    gen = torch.Generator().manual_seed(seed)
    images = batched(lambda ys: model.sample(ys, prior=prior, generator=gen).cpu(), labels, batch_size=batch_size)
    return images, labels


def model_priors(model: CVAE) -> tuple[str, ...]:
    """The priors a model can sample from: "standard", and "fitted" when it has a fitted prior."""
    return ("standard", "fitted") if model.fitted_prior is not None else ("standard",)


def model_outputs(model: CVAE, judge: DigitCNN, images: torch.Tensor, labels: torch.Tensor,
                  samples_per_digit: int = 1_000, seed: int = 0, manifold_steps: int = MANIFOLD_STEPS) -> Outputs:
    """Run the model and the judge once over the test set (grey images (N, 1, 28, 28) in [0, 1], labels) and over
    `samples_per_digit` samples of every digit from each prior, drawn from `seed`, and decode what the figures show
    besides (figure_decodes). A Bernoulli model sees the fixed binarization of the images (dataset.binarize); the
    judge sees grey images, samples and reconstructions (pixel probabilities, for a Bernoulli model)."""
    observed = model.observe(images)
    means, logvars = model.posterior(observed, labels)
    reconstructions = decode_all(model, means, labels)
    samples = {}
    for prior in model_priors(model):
        generated, wanted = generate(model, prior, samples_per_digit, seed)
        samples[prior] = Samples(generated, wanted, judge_images(judge, generated))
    return Outputs(images, observed, labels, means, logvars, reconstructions, judge_images(judge, images),
                   judge_images(judge, reconstructions), samples, figure_decodes(model, means, seed, manifold_steps))


def figure_decodes(model: CVAE, means: torch.Tensor, seed: int, manifold_steps: int) -> Decodes:
    """The decodes of test.py's figures beyond the test set's: SAMPLE_GRID samples of every digit from the prior the
    model samples from by default, drawn from `seed` (samples.png); the manifold over the two most informative latent
    dimensions of `means` (manifold.png); the first ANALOGIES means decoded under every label (analogies.png)."""
    num_classes, side = model.hparams.num_classes, model.hparams.image_size
    grid, _ = generate(model, model.resolve_prior("auto"), SAMPLE_GRID, seed)
    dims = informative_dims(means)
    manifold, values = manifold_decodes(model, manifold_steps, dims)
    return Decodes(grid.reshape(num_classes, SAMPLE_GRID, side, side), dims, manifold, values,
                   analogy_decodes(model, means[:ANALOGIES]))


@torch.no_grad()
def analogy_decodes(model: CVAE, means: torch.Tensor) -> torch.Tensor:
    """Decode each posterior mean (N, latent_dim) under every label: (N, num_classes, 28, 28), row i = one handwriting
    style written as each digit."""
    num_classes, side = model.hparams.num_classes, model.hparams.image_size
    z = means.repeat_interleave(num_classes, dim=0)  # (N * num_classes, latent_dim)
    images = decode_all(model, z, torch.arange(num_classes).repeat(len(means)))
    return images.reshape(len(means), num_classes, side, side)


@torch.no_grad()
def manifold_decodes(model: CVAE, steps: int = MANIFOLD_STEPS, dims: tuple[int, ...] = (0, 1)
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every digit, decode a steps x steps grid over N(0, 1) quantiles MANIFOLD_QUANTILES of z[dims[0]]
    (columns, left to right) and z[dims[1]] (rows, bottom to top); other dimensions stay at 0, the prior's mean.

    Returns (images (num_classes, rows, steps, 28, 28), quantile values (steps,)); rows = 1 when latent_dim is 1.
    """
    num_classes, d, side = model.hparams.num_classes, model.hparams.latent_dim, model.hparams.image_size
    q = torch.special.ndtri(torch.linspace(*MANIFOLD_QUANTILES, steps, dtype=torch.float64)).float()
    rows = steps if d >= 2 else 1
    z = torch.zeros(rows, steps, d)
    z[..., dims[0]] = q  # columns
    if d >= 2:
        z[..., dims[1]] = q.flip(0)[:, None]  # top row = largest value, as on a plot's y axis
    z = z.reshape(-1, d)
    with eval_mode(model):
        images = torch.stack([model.decode(z, torch.full((len(z),), digit)).cpu() for digit in range(num_classes)])
    return images.reshape(num_classes, rows, steps, side, side), q


# ----- the numbers --------------------------------------------------------------------------------------------------
@torch.no_grad()
def elbo_terms(model: CVAE, outputs: Outputs, seed: int = 0, batch_size: int = 1_000) -> dict[str, Any]:
    """The training objective (model.elbo_loss) on the test images, per image, and the squared error of the decoded
    images against the grey test images.

    z is one draw from q(z | x, y) per image, z = mean + exp(logvar / 2) * eps, in eval mode (no dropout), as
    train.py's test step computes it; eps (N, latent_dim) is drawn at once, in test-set order, from a generator
    seeded with `seed`, so the numbers repeat exactly.
    """
    dev, beta, latent_dim = model.device, model.hparams.kl_weight, model.hparams.latent_dim
    eps = torch.randn(len(outputs.images), latent_dim, generator=torch.Generator().manual_seed(seed))

    def sums(x, y, mean, logvar, eps, grey):  # one batch -> (1, 3) float64: summed recon, KL and squared error
        x, y, mean, logvar, grey = x.to(dev).flatten(1), y.to(dev), mean.to(dev), logvar.to(dev), grey.to(dev)
        decoded = model.decode(model.reparameterize(mean, logvar, eps.to(dev)), y)
        _, recon, kl = elbo_loss(decoded, x, mean, logvar, beta, likelihood=model.hparams.likelihood)  # batch means
        return torch.tensor([[recon.item() * len(x), kl.item() * len(x),
                              squared_error(decoded, grey).sum().item()]], dtype=torch.float64)

    with eval_mode(model):
        per_batch = batched(sums, outputs.observed, outputs.labels, outputs.means, outputs.logvars, eps,
                            outputs.images, batch_size=batch_size)
    # Summed in Python, batch after batch, so the totals are the same floats whatever torch's summation order.
    recon_sum, kl_sum, squared_sum = (sum(column) for column in zip(*per_batch.tolist()))
    n, pixels = len(outputs.images), outputs.images[0].numel()
    recon, kl = recon_sum / n, kl_sum / n
    squared_at_mean = squared_error(outputs.reconstructions.flatten(1), outputs.images).double().mean().item()
    return {
        "images": n,
        "z": f"one draw z = mean + sigma * eps per image, eps ~ N(0, I) from seed {seed}, eval mode",
        "recon_per_image": recon,
        "kl_per_image": kl,
        "kl_weight": beta,
        "loss_per_image": recon + beta * kl,
        "mse_per_pixel": squared_sum / n / pixels,  # against the grey image; a Gaussian model's recon / pixels
        "mse_per_pixel_posterior_mean": squared_at_mean / pixels,
        "kl_per_dim": kl_per_dim(outputs.means, outputs.logvars).double().mean(dim=0).tolist(),
    }


@torch.no_grad()
def iw_bound(model: CVAE, images: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor,
             iw_samples: int, seed: int = 0, batch_size: int = 200) -> torch.Tensor:
    """Importance-weighted bound on log p(x | y) per image (Burda, Grosse and Salakhutdinov 2016), in eval mode:

        log p(x | y) >= log (1/S) sum_s p(x | z_s, y) p(z_s) / q(z_s | x, y),   z_s ~ q(z | x, y), S = iw_samples,

    for images as the model sees them, with q(z | x, y) = N(means, exp(logvars)) (model.posterior of these images
    under these labels). Returned as a loss, the negative bound in the training loss's units (model.reconstruction_nll
    as -log p(x | z, y); add model.nll_constant for nats). One sample is a one-draw ELBO; the bound tightens as the
    samples grow. Noise comes from a generator seeded with `seed`, in the images' order, so the numbers repeat, and the
    same images get the same noise whatever their labels. Returns (N,) on the CPU.
    """
    dev, d = model.device, model.hparams.latent_dim
    gen = torch.Generator().manual_seed(seed)

    def bound(x, y, mean, logvar):  # one batch of B images -> (B,)
        eps = torch.randn(iw_samples, len(x), d, generator=gen).to(dev)  # (S, B, d)
        log_w, _ = model.log_weights(x.to(dev), y.to(dev), mean.to(dev), logvar.to(dev), eps)
        return importance_weighted_loss(log_w).cpu()

    with eval_mode(model):
        return batched(bound, images, labels, means, logvars, batch_size=batch_size)


def log_likelihood_per_label(model: CVAE, images: torch.Tensor, iw_samples: int, seed: int = 0) -> torch.Tensor:
    """log p(x | y) of every image (as the model sees it) under every label y, each the importance-weighted bound
    (iw_bound, negated) with `iw_samples` samples from q(z | x, y) for that label, the same noise for every label:
    (N, num_classes), loss units."""
    columns = []
    for label in range(model.hparams.num_classes):
        labels = torch.full((len(images),), label)
        columns.append(-iw_bound(model, images, labels, *model.posterior(images, labels), iw_samples, seed))
    return torch.stack(columns, dim=1)


def marginal_nll(log_p: torch.Tensor) -> torch.Tensor:
    """-log p(x) = -log sum_y p(y) p(x | y) with a uniform p(y), per image, from log p(x | y) (N, num_classes)."""
    return -(torch.logsumexp(log_p.double(), dim=1) - math.log(log_p.shape[1]))


def likelihood_metrics(model: CVAE, outputs: Outputs, terms: dict[str, Any], iw_samples: int, seed: int,
                       per_label: torch.Tensor, per_label_samples: int) -> dict[str, Any]:
    """The negative ELBO (from elbo_terms' `terms`) and the importance-weighted bound on -log p(x | y) (iw_bound),
    per test image, and the marginal -log p(x) of the images whose log p(x | y) under every label is `per_label`
    (log_likelihood_per_label, with `per_label_samples` samples), in loss units and in nats."""
    likelihood, pixels = model.hparams.likelihood, outputs.images[0].numel()
    constant = nll_constant(likelihood, pixels)
    units = {"gaussian": f"loss units: the summed squared error as -log p(x | z, y); nats: plus 392 ln(pi) = "
                         f"{constant:.2f} (a Gaussian decoder with variance 1/2, a density on the grey images)",
             "bernoulli": "nats: the summed binary cross-entropy is -log p(x | z, y) of the binarized test images "
                          "(dataset.binarize, seed 0); loss units are nats"}[likelihood]
    neg_elbo = terms["recon_per_image"] + terms["kl_per_image"]  # the ELBO itself, whatever kl_weight trained it
    iw = iw_bound(model, outputs.observed, outputs.labels, outputs.means, outputs.logvars, iw_samples, seed)
    marginal = marginal_nll(per_label).mean().item() + constant
    return {
        "units": units,
        "neg_elbo_per_image": neg_elbo,
        "iw_samples": iw_samples,
        "iw_bound_per_image": iw.mean().item(),
        "neg_elbo_nats_per_image": neg_elbo + constant,
        "iw_bound_nats_per_image": iw.mean().item() + constant,
        "marginal_nll_nats": marginal,
        "marginal_iw_samples": per_label_samples,
        "marginal_images": len(per_label),
        "marginal": "-log p(x) = -log sum_y p(y) p(x | y), uniform p(y), each p(x | y) importance-weighted with "
                    "marginal_iw_samples samples of z from q(z | x, y), on the generative classifier's "
                    "class-balanced test images",
    }


def balanced_subset(labels: torch.Tensor, per_class: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` images of every class (all of a class that has fewer), drawn without replacement by a
    generator seeded with `seed`, class 0's first."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


def generative_classification(per_label: torch.Tensor, wanted: torch.Tensor, iw_samples: int) -> dict[str, Any]:
    """The CVAE as a Bayes classifier with a uniform p(y): y_hat = argmax over y of log p(x | y), from log p(x | y)
    under every label (per_label, log_likelihood_per_label with `iw_samples` samples) of images whose labels are
    `wanted`. A decoder that ignores y gives every label the same likelihood and scores chance (10 %); the accuracy
    says how much the decoder relies on the label."""
    hits = (per_label.argmax(dim=1) == wanted).double()
    return {
        "rule": "argmax over y of log p(x | y), uniform p(y); log p(x | y) is the importance-weighted bound with "
                "iw_samples samples from q(z | x, y) for that label, the same noise for every label",
        "images": len(wanted),
        "iw_samples": iw_samples,
        "accuracy": hits.mean().item(),
        "per_digit": [hits[wanted == c].mean().item() for c in range(per_label.shape[1])],
    }


def latent_metrics(means: torch.Tensor) -> dict[str, Any]:
    """Which latent dimensions carry information, from the test images' posterior means (N, latent_dim): each one's
    activity (the variance of its posterior mean), the number of active units (activity above ACTIVITY_THRESHOLD;
    Burda et al. 2016) and the two dimensions the figures show (model.informative_dims)."""
    return {
        "posterior_mean_variance": activity(means).tolist(),
        "activity_threshold": ACTIVITY_THRESHOLD,
        "active_units": active_units(means),
        "informative_dims": list(informative_dims(means)),
    }


def generation_metrics(outputs: Outputs) -> dict[str, dict[str, Any]]:
    """For each prior's samples: how often the judge reads a sample as the requested digit (overall and per digit),
    and the samples' FID against the test images."""
    generation = {}
    for prior, samples in outputs.samples.items():
        hits = (samples.judged.predictions == samples.labels).double()
        generation[prior] = {
            "samples": len(samples.labels),
            "conditional_accuracy": hits.mean().item(),
            "per_digit": [hits[samples.labels == digit].mean().item() for digit in samples.labels.unique()],
            "fid": fid(samples.judged.features, outputs.test.features),
        }
    return generation


def reconstruction_accuracy(outputs: Outputs) -> float:
    """How often the judge reads a test image's reconstruction as its label: the conditional accuracy that samples
    from a perfect prior would reach with this decoder."""
    return (outputs.reconstructed.predictions == outputs.labels).double().mean().item()


def evaluate(model: CVAE, outputs: Outputs, seed: int = 0, iw_samples: int = IW_SAMPLES,
             classify_per_digit: int = CLASSIFY_PER_DIGIT, classify_iw_samples: int = CLASSIFY_IW_SAMPLES
             ) -> dict[str, Any]:
    """Every number test.py reports, for one model and its `outputs` (model_outputs), as a JSON-ready dict: "test"
    (elbo_terms), "latent" (latent_metrics), "likelihood" (likelihood_metrics), "generative_classification",
    "generation" (generation_metrics, per prior), "reconstruction_fid" (the reconstructions against the test images,
    a floor for the sample FID), "reconstruction_accuracy" (the judge's accuracy on them, the mark for the samples'
    conditional accuracy) and "prior_used" (the prior samples.png and the headline numbers use).

    log p(x | y) under every label is bounded once, with `classify_iw_samples` samples, for `classify_per_digit`
    test images of each digit (balanced_subset): the generative classifier and the marginal -log p(x) share it."""
    terms = elbo_terms(model, outputs, seed)
    subset = balanced_subset(outputs.labels, classify_per_digit, model.hparams.num_classes, seed)
    per_label = log_likelihood_per_label(model, outputs.observed[subset], classify_iw_samples, seed)
    return {
        "seed": seed,
        "model": {"latent_dim": model.hparams.latent_dim, "kl_weight": model.hparams.kl_weight,
                  "fitted_prior": None if model.fitted_prior is None else model.fitted_prior["kind"],
                  "sampling_prior": model.describe_prior(), "likelihood": model.hparams.likelihood,
                  "importance_samples": model.hparams.importance_samples},
        "prior_used": model.resolve_prior("auto"),
        "classifier": {"test_accuracy": (outputs.test.predictions == outputs.labels).double().mean().item(),
                       "features": f"DigitCNN penultimate layer ({outputs.test.features.shape[1]}-d), FID in float64"},
        "test": terms,
        "latent": latent_metrics(outputs.means),
        "likelihood": likelihood_metrics(model, outputs, terms, iw_samples, seed, per_label, classify_iw_samples),
        "generative_classification": generative_classification(per_label, outputs.labels[subset],
                                                               classify_iw_samples),
        "generation": generation_metrics(outputs),
        "reconstruction_fid": fid(outputs.reconstructed.features, outputs.test.features),
        "reconstruction_accuracy": reconstruction_accuracy(outputs),
    }
