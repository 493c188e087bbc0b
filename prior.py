"""The sampling prior, all of it: a density fitted after training to the posterior means of the training set.

A VAE is trained so that the *aggregate* posterior q(z) = E_x q(z | x, y) matches N(0, I), but it never matches it
exactly; decoding z ~ N(0, I) then lands partly in regions the decoder has rarely seen. Fitting a density to the
training codes after training and sampling from it ("ex-post density estimation", Ghosh et al. 2020, "From
Variational to Deterministic Autoencoders") closes most of that gap. The kinds (train.py --prior):

    per-class  a full-covariance Gaussian mixture per digit (--prior-components of them; 10 by default: the sweep's
               refits put it next to the training codes' own samples at every z, bench/README.md)
    global     one mixture for all digits, whatever the label
    flow       a normalizing flow conditioned on the digit (zuko's masked autoregressive flow, Papamakarios et al.
               2017), fitted by maximum likelihood
    codes      the training codes themselves, one drawn at random: no density does better on them, the yardstick

The words, here and everywhere in the repo: the *prior* is where a sample's z comes from, "standard" (N(0, I)) or
"fitted" ("auto": the fitted one when the model has it); the fitted prior's *density* is the dict of tensors fitted
after training; its *kind* (PRIOR_KINDS, above) is the density's family.

Here: each density as plain tensors and bounded settings (so a checkpoint holding it still loads with
weights_only=True), its fit (`fit_density`), its check (`check_density`, before anything is built), its sampler
(`sample_density`, `sample_z`, seeded by the caller's generator) and the callback that fits it when training ends
(`FitPrior`). The model only holds the density (`CVAE.fitted_prior`, saved as the checkpoint's "fitted_prior") and
calls these functions.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

PRIORS = ("standard", "fitted")  # where `CVAE.sample` draws z from: N(0, I), or the density fitted after training
PRIOR_KINDS = ("per-class", "global", "flow", "codes")  # the fitted densities (train.py --prior)
MIXTURE_KINDS = ("per-class", "global")
OLD_KIND = "per-class"  # the kind of a mixture saved before priors had kinds (it has no "kind")
REG_COVAR = 1e-5  # added to every covariance's diagonal, so a nearly flat cluster still has a valid Cholesky factor
# The flow: `transforms` autoregressive layers, each a network of two hidden layers of `hidden` units, fitted in
# `steps` Adam steps (FLOW_LR) on batches of FLOW_BATCH codes, whatever the number of codes. A checkpoint's settings
# must lie in FLOW_BOUNDS before a flow is built from them.
FLOW_SETTINGS = {"transforms": 5, "hidden": 64, "steps": 1500}
FLOW_BOUNDS = {"transforms": (1, 16), "hidden": (2, 512), "steps": (1, 1_000_000)}  # at most 4.5M weights
FLOW_BATCH, FLOW_LR = 1024, 1e-3


# ----- fitting ------------------------------------------------------------------------------------------------------
def fit_density(z: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str = "per-class",
              components: int = 1, seed: int = 0) -> dict[str, Any]:
    """Fit the density `kind` (PRIOR_KINDS) to codes z (N, D) with their labels (N,); `components` counts a mixture's
    Gaussians. Returns the density as plain tensors and settings (its "kind" first)."""
    if kind in MIXTURE_KINDS:
        return fit_mixture(z, labels, num_classes, kind, components, seed)
    if kind == "flow":
        return fit_flow(z, labels, num_classes, seed=seed)
    if kind == "codes":
        return {"kind": "codes", "codes": z.float().cpu().clone(), "labels": labels.long().cpu().clone()}
    raise ValueError(f"prior kind must be one of {PRIOR_KINDS}, got {kind!r}")


def fit_mixture(z: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str = "per-class",
                  n_components: int = 1, seed: int = 0) -> dict[str, Any]:
    """Fit a full-covariance Gaussian mixture to codes z (N, D): one per class ("per-class") or one for all ("global").

    Returns {"kind", "weights" (C, K), "means" (C, K, D), "scale_tril" (C, K, D, D)} with C = num_classes or 1.
    A single component is the codes' mean and (maximum-likelihood) covariance, which is where EM lands; more
    components are fitted by scikit-learn's EM. Both add REG_COVAR to the diagonal, as scikit-learn does. A group with
    fewer than two codes per component (a short run's rare digit) gets as many components as it has pairs of codes,
    the rest of its K at weight 0, never drawn.
    """
    if kind not in MIXTURE_KINDS:
        raise ValueError(f"mixture kind must be one of {MIXTURE_KINDS}, got {kind!r}")
    z_np, y_np = z.double().numpy(), labels.cpu().numpy()
    groups = [z_np[y_np == c] for c in range(num_classes)] if kind == "per-class" else [z_np]
    weights, means, tril = [], [], []
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"too few codes ({len(group)}) to fit a Gaussian")
        d, k = group.shape[1], min(n_components, len(group) // 2)
        if k == 1:
            # Closed form, where EM lands for one component.
            weight, mean = np.ones(1), group.mean(axis=0, keepdims=True)
            cov = (np.cov(group, rowvar=False, bias=True).reshape(d, d) + REG_COVAR * np.eye(d))[None]
        else:
            from sklearn.mixture import GaussianMixture  # only needed for mixtures

            gmm = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, random_state=seed).fit(group)
            weight, mean, cov = gmm.weights_, gmm.means_, gmm.covariances_
        unused = n_components - k  # weight 0, an identity covariance so the Cholesky factor exists
        weights.append(np.concatenate([weight, np.zeros(unused)]))
        means.append(np.concatenate([mean, np.zeros((unused, d))]))
        tril.append(np.linalg.cholesky(np.concatenate([cov, np.tile(np.eye(d), (unused, 1, 1))])))
    return {
        "kind": kind,
        "weights": torch.tensor(np.stack(weights), dtype=torch.float32),
        "means": torch.tensor(np.stack(means), dtype=torch.float32),
        "scale_tril": torch.tensor(np.stack(tril), dtype=torch.float32),
    }


def build_flow(latent_dim: int, num_classes: int, transforms: int, hidden: int, **_):
    """zuko's masked autoregressive flow over z (latent_dim) conditioned on the one-hot digit (num_classes)."""
    import zuko  # only the flow prior needs it

    return zuko.flows.MAF(latent_dim, num_classes, transforms=transforms, hidden_features=[hidden, hidden])


def flow_of(density: dict[str, Any]):
    """The flow module of a fitted flow density, its weights loaded (strictly: a tensor that does not fit raises). The
    initial weights it is built with are drawn from a forked RNG, so building it leaves the global random state
    alone."""
    with torch.random.fork_rng(devices=[]):
        flow = build_flow(**density["settings"])
    flow.load_state_dict(density["state"])
    return flow


def fit_flow(z: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                   **settings: int) -> dict[str, Any]:
    """Fit a flow (build_flow; FLOW_SETTINGS, overridden by `settings`) to codes z (N, D) by maximum likelihood, on
    the CPU and one thread (its small batches gain nothing from more, and the weights then do not depend on the thread
    count), seeded by `seed` alone (the global RNG is forked: the caller's random state is neither used nor changed).
    Returns {"kind": "flow", "settings": {...}, "state": the flow's tensors}."""
    settings = {**FLOW_SETTINGS, **settings, "latent_dim": z.shape[1], "num_classes": num_classes}
    z, context = z.float().cpu(), F.one_hot(labels.long().cpu(), num_classes).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = build_flow(**settings)
            optimizer = torch.optim.Adam(flow.parameters(), lr=FLOW_LR)
            order = torch.Generator().manual_seed(seed)
            batches = iter(())
            for _ in range(settings["steps"]):
                batch = next(batches, None)
                if batch is None:  # a new pass over the codes, in a new order
                    batches = iter(torch.randperm(len(z), generator=order).split(FLOW_BATCH))
                    batch = next(batches)
                loss = -flow(context[batch]).log_prob(z[batch]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    state = {name: value.detach().clone() for name, value in flow.state_dict().items()}
    return {"kind": "flow", "settings": settings, "state": state}


# ----- checking and loading ------------------------------------------------------------------------------------------
def check_density(density: Any, num_classes: int, latent_dim: int) -> None:
    """Raise ValueError unless `density` is a well-formed density of one of PRIOR_KINDS for this model (guards
    checkpoints from elsewhere): sizes and settings are checked before anything is built from them."""
    kind = density.get("kind", OLD_KIND) if isinstance(density, dict) else None
    if kind in MIXTURE_KINDS:
        check_mixture(density, num_classes, latent_dim)
    elif kind == "flow":
        check_flow(density, num_classes, latent_dim)
    elif kind == "codes":
        check_codes(density, num_classes, latent_dim)
    else:
        raise ValueError(f"fitted_prior must be a dict of one of the kinds {PRIOR_KINDS}")


def check_mixture(density: dict, num_classes: int, latent_dim: int) -> None:
    if not all(isinstance(density.get(name), torch.Tensor) for name in ("weights", "means", "scale_tril")):
        raise ValueError("fitted_prior must hold tensors 'weights', 'means' and 'scale_tril'")
    w, m, s = density["weights"], density["means"], density["scale_tril"]
    if not w.is_floating_point() or not w.dtype == m.dtype == s.dtype:
        # sample_density mixes them in one matmul and multinomial draw
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


def check_codes(density: dict, num_classes: int, latent_dim: int) -> None:
    codes, labels = density.get("codes"), density.get("labels")
    if not (isinstance(codes, torch.Tensor) and isinstance(labels, torch.Tensor) and codes.is_floating_point()
            and codes.dim() == 2 and codes.shape[1] == latent_dim and labels.shape == codes.shape[:1]
            and torch.isfinite(codes).all() and not labels.is_floating_point()):
        raise ValueError(f"fitted_prior codes must be (N, {latent_dim}) finite floats with N integer labels")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes or len(labels.unique()) < num_classes:
        raise ValueError(f"fitted_prior codes must hold codes of every one of the {num_classes} labels")


def check_flow(density: dict, num_classes: int, latent_dim: int) -> None:
    """The settings are integers within FLOW_BOUNDS and match the model; the tensors have exactly the shapes a flow of
    those settings has (built only once the bounds hold, so a crafted file cannot ask for a huge one) and are
    finite."""
    settings, state = density.get("settings"), density.get("state")
    if not isinstance(settings, dict) or not isinstance(state, dict) \
            or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("fitted_prior flow must hold 'settings' and a 'state' of tensors")
    for name, (low, high) in FLOW_BOUNDS.items():
        value = settings.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"fitted_prior flow setting {name} must be an integer in {low}..{high}, got {value!r}")
    if (settings.get("latent_dim"), settings.get("num_classes")) != (latent_dim, num_classes):
        raise ValueError(f"fitted_prior flow is for latent_dim {settings.get('latent_dim')} and "
                         f"{settings.get('num_classes')} classes, not {latent_dim} and {num_classes}")
    try:
        flow_of(density)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"fitted_prior flow tensors do not fit its settings: {' '.join(str(err).split())[:200]}"
                         ) from None
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ValueError("fitted_prior flow holds non-finite values")


def load_density(density: Any, num_classes: int, latent_dim: int) -> dict[str, Any] | None:
    """A checkpoint's "fitted_prior" (or None), checked against the model and moved to the CPU, where the sampler's
    generator lives, whatever map_location said; a mixture saved before priors had kinds gets its kind here, so every
    other reader finds one."""
    if density is None:
        return None
    check_density(density, num_classes, latent_dim)
    return to_cpu({"kind": OLD_KIND, **density})


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return {name: to_cpu(item) for name, item in value.items()} if isinstance(value, dict) else value


# ----- sampling ------------------------------------------------------------------------------------------------------
def sample_density(density: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Draw one z per label from a fitted density: (N, D) on the CPU, all randomness from `generator`."""
    kind = density["kind"]
    if kind == "flow":
        return sample_flow(density, labels, generator)
    if kind == "codes":
        return sample_codes(density, labels, generator)
    return sample_mixture(density, labels, generator)


def sample_mixture(density: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """z = mean + L eps from a component drawn by its weight, so cov(z) = L L^T, the fitted covariance."""
    # (C, K), (C, K, D), (C, K, D, D): one mixture of K components per class, or C = 1 shared by all digits
    weights, means, scale_tril = density["weights"], density["means"], density["scale_tril"]
    rows = labels if weights.shape[0] > 1 else torch.zeros_like(labels)
    comp = torch.multinomial(weights[rows], 1, generator=generator).squeeze(1)  # (N,) component of each draw
    eps = torch.randn(len(labels), means.shape[-1], 1, generator=generator, dtype=means.dtype)  # (N, D, 1)
    return means[rows, comp] + (scale_tril[rows, comp] @ eps).squeeze(-1)


@torch.no_grad()
def sample_flow(density: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """z = f^-1(eps | y) with eps ~ N(0, I) from `generator`: the flow maps codes to noise, its inverse noise to
    codes."""
    settings = density["settings"]
    eps = torch.randn(len(labels), settings["latent_dim"], generator=generator)
    return flow_of(density)(F.one_hot(labels.long(), settings["num_classes"]).float()).transform.inv(eps)


def sample_codes(density: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """A training code of each label's digit, drawn uniformly among them."""
    order = torch.argsort(density["labels"], stable=True)  # the codes grouped by digit
    counts = torch.bincount(density["labels"])  # every digit has codes (check_density)
    starts = torch.cumsum(counts, 0) - counts
    picks = starts[labels] + (torch.rand(len(labels), generator=generator) * counts[labels]).long()
    return density["codes"][order[picks]]


def resolve_prior(prior: str, density: dict[str, Any] | None) -> str:
    """The prior z is drawn from: "auto" is "fitted" when the model has a fitted density, else "standard"; an unknown
    prior, or "fitted" without a density, is a ValueError."""
    if prior == "auto":
        return "fitted" if density is not None else "standard"
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {('auto',) + PRIORS}, got {prior!r}")
    if prior == "fitted" and density is None:
        raise ValueError("this model has no fitted prior (train.py fits one unless --prior none)")
    return prior


def describe_prior(prior: str, density: dict[str, Any] | None) -> str:
    """The prior ("auto", "standard" or "fitted", with the model's fitted density) in words, for the printed report,
    the figures and the UI."""
    if resolve_prior(prior, density) == "standard":
        return "the standard normal N(0, I)"
    kind = density["kind"]
    if kind == "flow":
        return "a normalizing flow conditioned on the digit, fitted to the training codes"
    if kind == "codes":
        return "the training codes themselves, one drawn at random"
    components = density["weights"].shape[1]
    mixture = "a Gaussian" if components == 1 else f"a mixture of {components} Gaussians"
    if kind == "global":
        mixture = f"one {mixture.removeprefix('a ')} for all digits"
    else:
        mixture = f"{mixture} per digit"
    return f"{mixture}, fitted to the training codes"


def sample_z(prior: str, density: dict[str, Any] | None, labels: torch.Tensor, latent_dim: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One z per label (N,) from the prior ("auto", "standard" or "fitted", with the model's fitted density):
    (N, latent_dim) on the CPU."""
    if resolve_prior(prior, density) == "standard":
        return torch.randn(len(labels), latent_dim, generator=generator)
    return sample_density(density, labels.cpu(), generator)


class FitPrior(Callback):
    """When fit ends (also when a resumed run had no epochs left), fit the sampling prior to the posterior means of
    the training images (as the model sees them: a Bernoulli model's through their fixed binarization); the final
    checkpoint stores it."""

    def __init__(self, kind: str = "per-class", components: int = 10, seed: int = 0) -> None:
        self.kind, self.components, self.seed = kind, components, seed

    def on_fit_end(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        labels = data.splits["train"].labels
        z = pl_module.posterior_means(data.fixed_pixels("train"), labels)  # the images as the model sees them
        pl_module.fitted_prior = fit_density(z, labels.cpu(), pl_module.hparams.num_classes, self.kind,
                                           self.components, seed=self.seed)
