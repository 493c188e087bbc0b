"""Every number test.py reports about a trained CVAE, and how each is computed.

Evaluation flows one way, as training does:

    the test set -> model outputs, computed once (`model_outputs`: every test image's posterior and reconstruction,
    the samples, and what the judge makes of them) -> the numbers (`evaluate`: a JSON-ready dict, metrics.json) ->
    the printed report (`report`) and the figures (figures.py, drawn from these same outputs)

Each number is a function here, called by `evaluate`, and an entry in `REPORT`, which carries it to the printed
report; an entry with a `key` is also a column of bench/seeds.py's rows and bench/sweep.py's results.csv and tables
(`summary`).

The judge of generated digits (classifier.py) gives conditional accuracy (the share of samples it reads as the
requested digit) and FID (samples against the grey test images in its penultimate-layer features). Besides the ELBO
there is an importance-weighted bound on log p(x | y), the marginal log p(x) = log sum_y p(y) p(x | y), the accuracy
of the CVAE itself as a classifier (argmax_y log p(x | y)) and the number of active latent dimensions; the
likelihoods are in the training loss's units and in nats. All of it runs in eval mode (no dropout), with noise from
generators seeded by `seed`, so the numbers repeat. A Bernoulli model is scored on the fixed binarization of the test
set (dataset.binarize), everything else on the grey images.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch.distributions import Normal

from classifier import DigitCNN, features_and_predictions, fid
from dataset import IMAGE_SIZE
from model import (CVAE, activity, elbo_loss, gaussian_nll_constant, informative_dims, kl_per_dim, latent_name,
                   metric_names, nll_constant, reconstruction_nll, squared_error)
from torch_utils import eval_mode

GAUSSIAN_CONSTANT = gaussian_nll_constant(IMAGE_SIZE ** 2)  # Gaussian loss units + this = nats (392 ln(pi) per image)
IW_SAMPLES = 100  # samples of z per image for the likelihood bound: tight, and seconds on a CPU (bench/README.md)
# The generative classifier's defaults (test images per digit, each bounded under all ten labels with this many
# samples): less than half the likelihood bound's work, so `python test.py` stays about a minute (bench/README.md).
CLASSIFY_PER_DIGIT = 100
CLASSIFY_IW_SAMPLES = 50
ACTIVITY_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Var_x E_q[z_i] exceeds this
MANIFOLD_QUANTILES = (0.05, 0.95)  # the manifold figure spans these quantiles of N(0, 1) in each dimension


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


def judge_images(judge: DigitCNN, images: torch.Tensor) -> Judged:
    return Judged(*features_and_predictions(judge, images))


@torch.no_grad()
def decode_all(model: CVAE, z: torch.Tensor, labels: torch.Tensor, batch_size: int = 2_000) -> torch.Tensor:
    """Decode codes z (N, latent_dim) under labels (N,) in eval mode: (N, 1, 28, 28) on the CPU."""
    side = model.hparams.image_size
    with eval_mode(model):
        return torch.cat([model.decode(z[i:i + batch_size], labels[i:i + batch_size]).cpu()
                          for i in range(0, len(z), batch_size)]).reshape(-1, 1, side, side)


@torch.no_grad()
def generate(model: CVAE, prior: str, per_digit: int, seed: int = 0, batch_size: int = 10_000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_digit` samples of every digit from `prior`, labels in blocks (0 x per_digit, 1 x per_digit, ...), drawn
    with model.sample and a generator seeded with `seed`: (images (N, 1, 28, 28) on the CPU, labels (N,))."""
    labels = torch.arange(model.hparams.num_classes).repeat_interleave(per_digit)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([model.sample(labels[i:i + batch_size], prior=prior, generator=gen).cpu()
                        for i in range(0, len(labels), batch_size)])
    return images, labels


def model_priors(model: CVAE) -> tuple[str, ...]:
    """The priors a model can sample from: "standard", and "fitted" when it has a fitted prior."""
    return ("standard", "fitted") if model.fitted_prior is not None else ("standard",)


def model_outputs(model: CVAE, judge: DigitCNN, images: torch.Tensor, labels: torch.Tensor,
                  samples_per_digit: int = 1_000, seed: int = 0) -> Outputs:
    """Run the model and the judge once over the test set (grey images (N, 1, 28, 28) in [0, 1], labels) and over
    `samples_per_digit` samples of every digit from each prior, drawn from `seed`. A Bernoulli model sees the fixed
    binarization of the images (dataset.binarize); the judge sees grey images, samples and reconstructions (pixel
    probabilities, for a Bernoulli model)."""
    observed = model.observe(images)
    means, logvars = model.posterior(observed, labels)
    reconstructions = decode_all(model, means, labels)
    samples = {}
    for prior in model_priors(model):
        generated, wanted = generate(model, prior, samples_per_digit, seed)
        samples[prior] = Samples(generated, wanted, judge_images(judge, generated))
    return Outputs(images, observed, labels, means, logvars, reconstructions, judge_images(judge, images),
                   judge_images(judge, reconstructions), samples)


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
    likelihood = model.hparams.likelihood
    eps = torch.randn(len(outputs.images), latent_dim, generator=torch.Generator().manual_seed(seed))
    recon_sum = kl_sum = squared_sum = 0.0
    with eval_mode(model):
        for i in range(0, len(outputs.images), batch_size):
            batch = slice(i, i + batch_size)
            x, y = outputs.observed[batch].to(dev).flatten(1), outputs.labels[batch].to(dev)
            mean, logvar = outputs.means[batch].to(dev), outputs.logvars[batch].to(dev)
            decoded = model.decode(model.reparameterize(mean, logvar, eps[batch].to(dev)), y)
            _, recon, kl = elbo_loss(decoded, x, mean, logvar, beta, likelihood=likelihood)  # batch means
            recon_sum += recon.item() * len(x)
            kl_sum += kl.item() * len(x)
            squared_sum += squared_error(decoded, outputs.images[batch].to(dev)).sum().item()
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
    dev, d, likelihood = model.device, model.hparams.latent_dim, model.hparams.likelihood
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev).flatten(1)  # (B, 784)
            y = labels[i:i + batch_size].to(dev)
            mean, logvar = means[i:i + batch_size].to(dev), logvars[i:i + batch_size].to(dev)  # (B, d)
            eps = torch.randn(iw_samples, len(x), d, generator=gen).to(dev)
            z = model.reparameterize(mean, logvar, eps)  # (S, B, d)
            recon = model.decode(z.reshape(-1, d), y.repeat(iw_samples))
            log_px = -reconstruction_nll(recon, x.repeat(iw_samples, 1), likelihood).reshape(iw_samples, len(x))
            log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_qz = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
            log_w = log_px + log_pz - log_qz  # (S, B) log importance weights
            out.append(-(torch.logsumexp(log_w, dim=0) - math.log(iw_samples)).cpu())
    return torch.cat(out)


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


def active_units(means: torch.Tensor) -> int:
    """The number of latent dimensions whose posterior mean varies more than ACTIVITY_THRESHOLD over `means`."""
    return int((activity(means) > ACTIVITY_THRESHOLD).sum())


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
                  "sampling_prior": model.describe_prior(), "likelihood": model.hparams.likelihood},
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


# ----- the report: one entry per number -----------------------------------------------------------------------------
class Entry(NamedTuple):
    """One number of the printed report. With a `key` it is also a column of bench/seeds.py's rows and of
    bench/sweep.py's results.csv and tables (`summary`)."""

    label: str                    # the report's words for it
    read: Callable[[dict], Any]   # where it sits in evaluate()'s dict (metrics.json); a list prints as one row
    fmt: str = ".2f"              # format of the value (each item of a list)
    scale: float = 1.0            # 100, with unit "%", for a share
    unit: str = ""
    key: str | None = None        # the column's name in results.csv
    header: str | None = None     # the column's title in markdown tables (default: the label)
    kind: type = float            # how results.csv's text reads back: float, int, str or list (of floats)
    median: bool = False          # also a column of the sweep's table of medians


NATS = {"gaussian": "nats = loss units + 392 ln(pi)", "bernoulli": "loss units are nats"}  # the report's reminder


def _used(m: dict) -> dict:
    """The generation numbers of the prior samples.png uses."""
    return m["generation"][m["prior_used"]]


def _fid_gap(m: dict) -> float:
    """How far the sample FID lies above the reconstruction FID, the floor a sampler can reach, as a share."""
    return _used(m)["fid"] / m["reconstruction_fid"] - 1 if m["reconstruction_fid"] > 0 else math.nan


REPORT: tuple[tuple[Callable[[dict], str], tuple[Entry, ...]], ...] = (
    (lambda m: f"Test set: {m['test']['images']} images, per image (z: one draw from q(z|x,y), seed {m['seed']})", (
        Entry("reconstruction, -log p(x|z,y) in loss units", lambda m: m["test"]["recon_per_image"],
              key="recon", header="distortion", median=True),
        Entry("KL (nats)", lambda m: m["test"]["kl_per_image"], key="kl", header="KL (rate)", median=True),
        Entry("loss (recon + β × KL)", lambda m: m["test"]["loss_per_image"]),
        Entry("MSE per pixel against the grey image", lambda m: m["test"]["mse_per_pixel"], fmt=".4f"),
        Entry("MSE per pixel, z = posterior mean", lambda m: m["test"]["mse_per_pixel_posterior_mean"], fmt=".4f",
              key="mse", header="MSE/pixel"),
    )),
    (lambda m: "Latent dimensions " + " ".join(latent_name(i, m["model"]["latent_dim"])
                                                for i in range(m["model"]["latent_dim"])) + " over the test images", (
        Entry(f"active units (posterior-mean variance > {ACTIVITY_THRESHOLD:g})",
              lambda m: m["latent"]["active_units"], fmt="g", key="active_units", header="active units", kind=int,
              median=True),
        Entry("KL per dimension (nats)", lambda m: m["test"]["kl_per_dim"], fmt=".2f", key="kl_dims",
              header="KL per dim", kind=list),
        Entry("posterior-mean variance", lambda m: m["latent"]["posterior_mean_variance"], fmt=".2f"),
    )),
    (lambda m: f"Negative log-likelihood per image, lower is better ({m['model']['likelihood']} decoder: "
               f"{NATS[m['model']['likelihood']]})", (
        Entry("-ELBO (recon + KL), loss units", lambda m: m["likelihood"]["neg_elbo_per_image"], key="neg_elbo",
              header="−ELBO", median=True),
        Entry("importance-weighted bound, loss units", lambda m: m["likelihood"]["iw_bound_per_image"],
              key="iw_bound", header="IW bound", median=True),
        Entry("-ELBO, nats", lambda m: m["likelihood"]["neg_elbo_nats_per_image"]),
        Entry("-log p(x | y), nats (the bound)", lambda m: m["likelihood"]["iw_bound_nats_per_image"], key="nll",
              header="−log p(x|y), nats"),
        Entry("  its samples of z per image", lambda m: m["likelihood"]["iw_samples"], fmt="d"),
        Entry("-log p(x), nats (sum over y, uniform p(y))", lambda m: m["likelihood"]["marginal_nll_nats"],
              key="marginal_nll", header="−log p(x), nats", median=True),
        Entry("  its images, and samples of z per label", lambda m: (f"{m['likelihood']['marginal_images']}, "
                                                                     f"{m['likelihood']['marginal_iw_samples']}"),
              fmt="s"),
    )),
    (lambda m: f"The CVAE as a classifier, argmax_y log p(x|y) (IW bound, {m['generative_classification']['iw_samples']}"
               f" samples per label), {m['generative_classification']['images']} test images", (
        Entry("accuracy (a decoder that ignores y: 10%)", lambda m: m["generative_classification"]["accuracy"],
              fmt=".1f", scale=100, unit="%", key="class_accuracy", header="as a classifier", median=True),
        Entry("per digit", lambda m: m["generative_classification"]["per_digit"], fmt=".0f", scale=100, unit="%"),
    )),
    (lambda m: f"Generated digits, {_used(m)['samples']} per prior; samples.png uses the {m['prior_used']} prior, "
               f"{m['model']['sampling_prior']}", (
        Entry("prior", lambda m: m["prior_used"], fmt="s", key="prior", kind=str),
        Entry("conditional accuracy", lambda m: _used(m)["conditional_accuracy"], fmt=".2f", scale=100, unit="%",
              key="accuracy", header="cond. acc.", median=True),
        Entry("FID against the test images", lambda m: _used(m)["fid"], fmt=".1f", key="fid", header="sample FID",
              median=True),
        Entry("accuracy per digit", lambda m: _used(m)["per_digit"], fmt=".1f", scale=100, unit="%"),
        Entry("reconstruction FID (posterior means decoded)", lambda m: m["reconstruction_fid"], fmt=".1f",
              key="recon_fid", header="recon FID"),
        Entry("the judge's accuracy on the reconstructions", lambda m: m["reconstruction_accuracy"], fmt=".2f",
              scale=100, unit="%", key="recon_accuracy", header="recon acc."),
        Entry("sample FID over reconstruction FID", _fid_gap,
              fmt="+.1f", scale=100, unit="%", key="fid_gap", header="FID gap"),
        Entry("conditional accuracy, N(0, I)", lambda m: m["generation"]["standard"]["conditional_accuracy"],
              fmt=".2f", scale=100, unit="%", key="standard_accuracy", header="N(0,I) acc."),
        Entry("FID, N(0, I)", lambda m: m["generation"]["standard"]["fid"], fmt=".1f", key="standard_fid",
              header="N(0,I) FID"),
    )),
)
ENTRIES = tuple(entry for _, entries in REPORT for entry in entries)
SUMMARY = tuple(entry for entry in ENTRIES if entry.key)  # the columns of bench/'s rows and results.csv


def format_value(entry: Entry, value: Any) -> str:
    """A value as the report and the markdown tables print it; "–" for one that is missing (NaN or None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, list):
        return ", ".join(format_value(entry, v) for v in value)
    if isinstance(value, str):
        return value
    return f"{value * entry.scale if entry.scale != 1 else value:{entry.fmt}}{entry.unit}"


def report(m: dict[str, Any]) -> str:
    """evaluate()'s numbers as a plain-text report, section by section, a line per REPORT entry."""
    lines = [f"Digit classifier: {100 * m['classifier']['test_accuracy']:.2f}% on the MNIST test set"]
    for title, entries in REPORT:
        lines += ["", title(m)]
        for entry in entries:
            lines.append(f"  {entry.label:<48}{format_value(entry, entry.read(m)):>12}")
    return "\n".join(lines)


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The SUMMARY numbers of evaluate()'s dict, by key: one row of bench/seeds.py and bench/sweep.py."""
    return {entry.key: entry.read(m) for entry in SUMMARY}


# ----- the model outputs the figures show ---------------------------------------------------------------------------
@torch.no_grad()
def analogies(model: CVAE, means: torch.Tensor) -> torch.Tensor:
    """Decode each posterior mean (N, latent_dim) under every label: (N, num_classes, 28, 28), row i = one handwriting
    style written as each digit."""
    num_classes, side = model.hparams.num_classes, model.hparams.image_size
    z = means.repeat_interleave(num_classes, dim=0)  # (N * num_classes, latent_dim)
    images = decode_all(model, z, torch.arange(num_classes).repeat(len(means)))
    return images.reshape(len(means), num_classes, side, side)


@torch.no_grad()
def manifold(model: CVAE, steps: int = 15, dims: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
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


def first_of_each_digit(labels: torch.Tensor, num_classes: int, block: int = 0) -> torch.Tensor:
    """The index of the (block + 1)-th image of every digit, digit 0's first: (num_classes,)."""
    return torch.stack([torch.nonzero(labels == c)[block, 0] for c in range(num_classes)])


# ----- the training log ---------------------------------------------------------------------------------------------
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
