"""The sampling prior, all of it: a Gaussian mixture fitted after training to the posterior means of the training set.

A VAE is trained so that the *aggregate* posterior q(z) = E_x q(z | x, y) matches N(0, I), but it never matches it
exactly; decoding z ~ N(0, I) then lands partly in regions the decoder has rarely seen. Fitting a density to the
training codes after training and sampling from it ("ex-post density estimation", Ghosh et al. 2020, "From
Variational to Deterministic Autoencoders") closes most of that gap.

Here: the density (plain tensors: weights, means, Cholesky factors, so a checkpoint holding it still loads with
weights_only=True), its fit (`fit_gmm_prior`), its check (`check_prior`), its sampler (`sample_prior`, `draw_z`) and
the callback that fits it when training ends (`FitPrior`). The model only holds the density (`CVAE.fitted_prior`,
saved as the checkpoint's "fitted_prior") and calls these functions.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback

PRIORS = ("standard", "fitted")          # where `CVAE.sample` draws z from: N(0, I), or the fitted mixture
MIXTURE_KINDS = ("per-class", "global")  # a fitted mixture per digit, or one for all digits (train.py --prior)


REG_COVAR = 1e-5  # added to every covariance's diagonal, so a nearly flat cluster still has a valid Cholesky factor


def fit_gmm_prior(z: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str = "per-class",
                  n_components: int = 1, seed: int = 0) -> dict[str, Any]:
    """Fit a full-covariance Gaussian mixture to codes z (N, D): one per class ("per-class") or one for all ("global").

    Returns {"kind", "weights" (C, K), "means" (C, K, D), "scale_tril" (C, K, D, D)} with C = num_classes or 1.
    A single component is the codes' mean and (maximum-likelihood) covariance, which is where EM lands; more
    components are fitted by scikit-learn's EM. Both add REG_COVAR to the diagonal, as scikit-learn does.
    """
    if kind not in MIXTURE_KINDS:
        raise ValueError(f"prior kind must be one of {MIXTURE_KINDS}, got {kind!r}")
    z_np, y_np = z.double().numpy(), labels.cpu().numpy()
    groups = [z_np[y_np == c] for c in range(num_classes)] if kind == "per-class" else [z_np]
    weights, means, tril = [], [], []
    for group in groups:
        if len(group) < n_components * 2:
            raise ValueError(f"too few codes ({len(group)}) to fit {n_components} components")
        d = group.shape[1]
        if n_components == 1:
            # Closed form; also keeps scikit-learn's memory out of the default train.py run (bench/README.md).
            weight, mean = np.ones(1), group.mean(axis=0, keepdims=True)
            cov = (np.cov(group, rowvar=False, bias=True).reshape(d, d) + REG_COVAR * np.eye(d))[None]
        else:
            from sklearn.mixture import GaussianMixture  # only needed for mixtures

            gmm = GaussianMixture(n_components, covariance_type="full", reg_covar=REG_COVAR,
                                  random_state=seed).fit(group)
            weight, mean, cov = gmm.weights_, gmm.means_, gmm.covariances_
        weights.append(weight)
        means.append(mean)
        tril.append(np.linalg.cholesky(cov))
    return {
        "kind": kind,
        "weights": torch.tensor(np.stack(weights), dtype=torch.float32),
        "means": torch.tensor(np.stack(means), dtype=torch.float32),
        "scale_tril": torch.tensor(np.stack(tril), dtype=torch.float32),
    }


def check_prior(prior: Any, num_classes: int, latent_dim: int) -> None:
    """Raise ValueError unless `prior` is a well-formed mixture for this model (guards checkpoints from elsewhere)."""
    if not isinstance(prior, dict) or not all(isinstance(prior.get(name), torch.Tensor)
                                              for name in ("weights", "means", "scale_tril")):
        raise ValueError("fitted_prior must hold tensors 'weights', 'means' and 'scale_tril'")
    w, m, s = prior["weights"], prior["means"], prior["scale_tril"]
    if not w.is_floating_point() or not w.dtype == m.dtype == s.dtype:
        # sample_prior mixes them in one matmul and multinomial draw
        raise ValueError(f"fitted_prior tensors must share one floating-point dtype, got {w.dtype}, {m.dtype}, "
                         f"{s.dtype}")
    mixtures, components = w.shape if w.dim() == 2 else (None, None)
    if mixtures not in (1, num_classes) or m.shape != (mixtures, components, latent_dim) \
            or s.shape != (mixtures, components, latent_dim, latent_dim):
        raise ValueError(f"fitted_prior shapes {tuple(w.shape)}, {tuple(m.shape)}, {tuple(s.shape)} do not fit "
                         f"{num_classes} classes and latent_dim {latent_dim}")
    if not (torch.isfinite(w).all() and torch.isfinite(m).all() and torch.isfinite(s).all()) or (w < 0).any() \
            or not (w.sum(dim=1) > 0).all():
        raise ValueError("fitted_prior holds non-finite values or invalid mixture weights")


def load_prior(prior: Any, num_classes: int, latent_dim: int) -> dict[str, Any] | None:
    """A checkpoint's "fitted_prior" (or None), checked against the model and moved to the CPU, where the sampler's
    generator lives, whatever map_location said."""
    if prior is None:
        return None
    check_prior(prior, num_classes, latent_dim)
    return {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in prior.items()}


def sample_prior(prior: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one z per label from a fitted mixture: (N, D), in the prior's dtype, on the CPU. z = mean + L eps, so
    cov(z) = L L^T, the fitted covariance."""
    # (C, K), (C, K, D), (C, K, D, D): one mixture of K components per class, or C = 1 shared by all digits
    weights, means, scale_tril = prior["weights"], prior["means"], prior["scale_tril"]
    rows = labels if weights.shape[0] > 1 else torch.zeros_like(labels)
    comp = torch.multinomial(weights[rows], 1, generator=generator).squeeze(1)  # (N,) component of each draw
    eps = torch.randn(len(labels), means.shape[-1], 1, generator=generator, dtype=means.dtype)  # (N, D, 1)
    return means[rows, comp] + (scale_tril[rows, comp] @ eps).squeeze(-1)


def resolve_prior(name: str, fitted: dict[str, Any] | None) -> str:
    """Map "auto" to "fitted" when there is a fitted prior, else "standard"; reject unknown names and a missing fitted
    prior."""
    if name == "auto":
        return "fitted" if fitted is not None else "standard"
    if name not in PRIORS:
        raise ValueError(f"prior must be one of {('auto',) + PRIORS}, got {name!r}")
    if name == "fitted" and fitted is None:
        raise ValueError("this model has no fitted prior (train.py fits one unless --prior none)")
    return name


def describe_prior(name: str, fitted: dict[str, Any] | None) -> str:
    """The prior `name` ("auto", "standard" or "fitted") in words, for the printed report, the figures and the UI."""
    if resolve_prior(name, fitted) == "standard":
        return "the standard normal N(0, I)"
    components = fitted["weights"].shape[1]
    density = "a Gaussian" if components == 1 else f"a mixture of {components} Gaussians"
    if fitted.get("kind", "per-class") == "global":
        density = f"one {density.removeprefix('a ')} for all digits"
    else:
        density = f"{density} per digit"
    return f"{density}, fitted to the training codes"


def draw_z(name: str, fitted: dict[str, Any] | None, labels: torch.Tensor, latent_dim: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One z per label (N,) from the prior `name` ("auto", "standard" or "fitted"): (N, latent_dim) on the CPU."""
    if resolve_prior(name, fitted) == "standard":
        return torch.randn(len(labels), latent_dim, generator=generator)
    return sample_prior(fitted, labels.cpu(), generator)


class FitPrior(Callback):
    """When fit ends (also when a resumed run had no epochs left), fit the sampling prior to the posterior means of
    the training images (as the model sees them: a Bernoulli model's through their fixed binarization); the final
    checkpoint stores it."""

    def __init__(self, kind: str = "per-class", components: int = 1, seed: int = 0) -> None:
        self.kind, self.components, self.seed = kind, components, seed

    def on_fit_end(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        labels = data.splits["train"].labels
        z = pl_module.posterior_means(data.fixed_pixels("train"), labels)  # the images as the model sees them
        pl_module.fitted_prior = fit_gmm_prior(z, labels.cpu(), pl_module.hparams.num_classes, self.kind,
                                               self.components, seed=self.seed)
