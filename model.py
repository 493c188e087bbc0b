"""Conditional VAE for MNIST (Kingma et al. 2014; Sohn et al. 2015) as a LightningModule.

Architecture (the original repo's design; sizes come from constructor arguments):

    Encoder  [x (784) | one-hot y (10)] = 794 -> 512 -> 256 -> 128 -> mean (latent), logvar (latent)
    Decoder  [z (latent) | one-hot y (10)]    -> 128 -> 256 -> 512 -> 784 (Sigmoid)

Every hidden block is Linear + LayerNorm + ReLU, followed by Dropout except for the encoder's last block.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
import pytorch_lightning as pl

PRIORS = ("standard", "fitted")


def elbo_loss(recon: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
              kl_weight: float = 1.0, free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO with a summed-MSE reconstruction term; returns (total, recon, kl), each a batch mean.

    recon: sum over pixels of (x_hat - x)^2, i.e. a Gaussian decoder with fixed variance up to a constant.
    kl:    KL(N(mean, exp(logvar)) || N(0, I)) in closed form, summed over latent dimensions
           (Kingma & Welling 2014, Appendix B: -1/2 * sum(1 + logvar - mean^2 - exp(logvar))).

    `kl_weight` is beta; 0 gives the original repo's plain-MSE autoencoder objective. `free_bits` (nats per latent
    dimension, Kingma et al. 2016) stops the optimiser from pushing a dimension's batch-mean KL below that value, the
    usual guard against a collapsed (unused) latent dimension. The returned `kl` is always the true KL.
    """
    recon_loss = F.mse_loss(recon, x.reshape(recon.shape), reduction="none").sum(dim=1).mean()
    kl_per_dim = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())  # (N, latent)
    kl = kl_per_dim.sum(dim=1).mean()
    kl_term = kl_per_dim.mean(dim=0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return recon_loss + kl_weight * kl_term, recon_loss, kl


def mlp_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear + LayerNorm + ReLU, then Dropout when dropout > 0."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """q(z | x, y): [x | one-hot y] -> hidden blocks -> (mean, logvar)."""

    def __init__(self, image_dim: int, num_classes: int, hidden_dims: Sequence[int], latent_dim: int,
                 dropout: float):
        super().__init__()
        dims = [image_dim + num_classes, *hidden_dims]
        # The last hidden block has no dropout, as in the original design.
        self.body = nn.Sequential(*[
            mlp_block(d_in, d_out, dropout if i < len(hidden_dims) - 1 else 0.0)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]))
        ])
        self.mean = nn.Linear(dims[-1], latent_dim)
        self.logvar = nn.Linear(dims[-1], latent_dim)

    def forward(self, x_flat: torch.Tensor, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x_flat, y_onehot], dim=1))
        return self.mean(h), self.logvar(h)


class Decoder(nn.Module):
    """p(x | z, y): [z | one-hot y] -> hidden blocks -> pixel intensities in [0, 1]."""

    def __init__(self, latent_dim: int, num_classes: int, hidden_dims: Sequence[int], image_dim: int,
                 dropout: float):
        super().__init__()
        dims = [latent_dim + num_classes, *hidden_dims]
        self.body = nn.Sequential(*[mlp_block(d_in, d_out, dropout) for d_in, d_out in zip(dims[:-1], dims[1:])])
        self.out = nn.Sequential(nn.Linear(dims[-1], image_dim), nn.Sigmoid())

    def forward(self, z: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([z, y_onehot], dim=1)))


class CVAE(pl.LightningModule):
    """Conditional VAE. Images are (N, 1, 28, 28) or (N, 784) in [0, 1]; labels are integer tensors in 0..9."""

    def __init__(
        self,
        latent_dim: int = 2,
        num_classes: int = 10,
        image_size: int = 28,
        encoder_dims: Sequence[int] = (512, 256, 128),
        decoder_dims: Sequence[int] = (128, 256, 512),
        dropout: float = 0.25,
        lr: float = 1e-3,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        free_bits: float = 0.0,
    ):
        super().__init__()
        if latent_dim < 1 or num_classes < 1 or image_size < 1:
            raise ValueError("latent_dim, num_classes and image_size must be positive")
        if kl_weight < 0 or free_bits < 0 or kl_warmup_epochs < 0:
            raise ValueError("kl_weight, free_bits and kl_warmup_epochs must be non-negative")
        # Lists, not tuples, so the hyper-parameters in a checkpoint are plain YAML/JSON types.
        encoder_dims, decoder_dims = list(encoder_dims), list(decoder_dims)
        self.save_hyperparameters()
        self.image_dim = image_size * image_size
        self.encoder = Encoder(self.image_dim, num_classes, encoder_dims, latent_dim, dropout)
        self.decoder = Decoder(latent_dim, num_classes, decoder_dims, self.image_dim, dropout)
        # A density over z fitted after training (see prior.py); plain tensors, saved in the checkpoint.
        self.fitted_prior: dict[str, Any] | None = None
        # stage -> ((loss, recon, kl) summed over this epoch's images, number of images)
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        # training_step runs the optimiser step itself (Lightning's manual optimisation): the zero_grad / backward /
        # step of a plain loop, without automatic optimisation's closure and hooks, which cost about 0.2 ms per step:
        # 3 % of a training step of this small model on a 2-core CPU (README: Performance).
        self.automatic_optimization = False

    # ----- input handling -------------------------------------------------------------------------------------
    def _onehot(self, labels: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """Integer labels -> (N, num_classes) one-hot floats; anything else is a ValueError, not a silent bug."""
        y = torch.as_tensor(labels, device=self.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.reshape(-1).long()
        k = self.hparams.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(f"labels must be in 0..{k - 1}, got values in {int(y.min())}..{int(y.max())}")
        return F.one_hot(y, k).to(self.dtype)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.image_dim:
            raise ValueError(f"images must have {self.image_dim} pixels, got {x.shape[1]}")
        return x.to(self.dtype)

    # ----- the model --------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z | x, y): returns (mean, logvar), each (N, latent_dim)."""
        x = self._flatten(x)
        y = self._onehot(y)
        if len(x) != len(y):
            raise ValueError(f"got {len(x)} images but {len(y)} labels")
        return self.encoder(x, y)

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * eps with eps ~ N(0, I), so gradients flow through mean and logvar."""
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Likelihood mean p(x | z, y): (N, 784) pixel intensities in [0, 1]."""
        z = torch.as_tensor(z, dtype=self.dtype, device=self.device).reshape(-1, self.hparams.latent_dim)
        y = self._onehot(y)
        if len(z) != len(y):
            raise ValueError(f"got {len(z)} latent vectors but {len(y)} labels")
        return self.decoder(z, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (recon (N, 784), mean, logvar)."""
        mean, logvar = self.encode(x, y)
        return self.decode(self.reparameterize(mean, logvar), y), mean, logvar

    @torch.no_grad()
    def sample_z(self, labels: torch.Tensor, prior: str = "auto", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Draw z for each label from the prior: "standard" N(0, I), "fitted" (the density fitted after training),
        or "auto" (fitted when the model has one). Returns (N, latent_dim)."""
        prior = self.resolve_prior(prior)
        labels = torch.as_tensor(labels).reshape(-1).long()
        self._onehot(labels)  # validates the labels
        n, d = len(labels), self.hparams.latent_dim
        if prior == "standard":
            return torch.randn(n, d, generator=generator).to(self.device, self.dtype)
        return sample_fitted_prior(self.fitted_prior, labels.cpu(), generator).to(self.device, self.dtype)

    def resolve_prior(self, prior: str) -> str:
        """Map "auto" to the prior `sample` uses by default; reject unknown names and a missing fitted prior."""
        if prior == "auto":
            return "fitted" if self.fitted_prior is not None else "standard"
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {('auto',) + PRIORS}, got {prior!r}")
        if prior == "fitted" and self.fitted_prior is None:
            raise ValueError("this model has no fitted prior (train.py fits one unless --prior none)")
        return prior

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], z: torch.Tensor | None = None, prior: str = "auto",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate one image per label: (N, 1, 28, 28) in [0, 1].

        z: (N, latent_dim) latent codes to decode; drawn from `prior` when None ("auto": the fitted density when the
        checkpoint has one, else N(0, I); "standard": N(0, I); "fitted": the density fitted after training).
        Runs in eval mode (no dropout) and restores the previous mode afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            labels = torch.as_tensor(labels).reshape(-1)
            if z is None:
                z = self.sample_z(labels, prior=prior, generator=generator)
            side = self.hparams.image_size
            return self.decode(z, labels).reshape(-1, 1, side, side)
        finally:
            self.train(was_training)

    # ----- training -------------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name, a plain string, before and after each of its hook calls: about 30 times
        # per training step. nn.Module.__setattr__ first checks every value for parameters, buffers and submodules,
        # which cost 0.8 % of an epoch here (bench/step_overhead.py); a string needs none of that.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def current_kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first `kl_warmup_epochs` epochs (per step, not per epoch)."""
        warmup = self.hparams.kl_warmup_epochs
        if warmup <= 0 or not self.training or self._trainer is None:
            return self.hparams.kl_weight
        steps_per_epoch = max(1, self.trainer.num_training_batches)
        progress = (self.global_step + 1) / (warmup * steps_per_epoch)
        return self.hparams.kl_weight * min(1.0, progress)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        recon, mean, logvar = self(x, y)
        is_train = stage == "train"
        total, recon_loss, kl = elbo_loss(
            recon, x, mean, logvar,
            kl_weight=self.current_kl_weight() if is_train else self.hparams.kl_weight,
            free_bits=self.hparams.free_bits if is_train else 0.0,
        )
        # Validation/test report the plain ELBO terms so runs with different recipes compare directly.
        reported = total if is_train else recon_loss + self.hparams.kl_weight * kl
        # Summed here and logged once per epoch (_log_epoch_means): each self.log call costs Lightning about a
        # millisecond of bookkeeping, which at this model's size is a tenth of a training step.
        terms = torch.stack([reported, recon_loss, kl]).detach() * len(x)
        sums, count = self._sums.get(stage, (0, 0))
        self._sums[stage] = (terms + sums, count + len(x))
        return total

    def epoch_means(self, stage: str) -> dict[str, float]:
        """Mean loss/recon/kl of `stage` ("train", "val", "test") over the epoch so far (this process), as floats."""
        if stage not in self._sums:
            return {}
        sums, count = self._sums[stage]
        return dict(zip((f"{stage}_loss", f"{stage}_recon", f"{stage}_kl"), (sums / count).tolist()))

    def _log_epoch_means(self, stage: str) -> None:
        # sync_dist averages the processes' means: equal weights, as every process sees as many batches.
        means = self.epoch_means(stage)
        if means:
            self.log_dict(means, on_step=False, on_epoch=True, sync_dist=True, prog_bar=stage == "val")

    def on_train_epoch_start(self) -> None:
        self._sums.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._sums.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def training_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "train")
        # Lightning's optimizer wrapper and manual_backward, not the raw calls: mixed precision (loss scaling), DDP's
        # gradient sync and the step counter behind global_step still go through Lightning.
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def configure_optimizers(self):
        # The fused kernel does the same Adam update in one pass over the parameters: about 10 % faster per step
        # on a 2-core CPU for this small model (bench/train_speed.py).
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused or None)

    # ----- checkpoint extras (plain tensors only, so weights_only loading works) ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.fitted_prior is not None:
            checkpoint["fitted_prior"] = self.fitted_prior

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prior = checkpoint.get("fitted_prior")
        if prior is not None:
            from prior import check_prior

            check_prior(prior, self.hparams.num_classes, self.hparams.latent_dim)
            # The prior is sampled on the CPU (its generator lives there), whatever map_location said.
            prior = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in prior.items()}
        self.fitted_prior = prior


def sample_fitted_prior(prior: dict[str, Any], labels: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """Sample z from a Gaussian mixture stored as plain tensors.

    prior["weights"] (C, K), prior["means"] (C, K, D), prior["scale_tril"] (C, K, D, D): one mixture per class
    (C = num_classes) or one shared mixture (C = 1).
    """
    weights, means, scale_tril = prior["weights"], prior["means"], prior["scale_tril"]
    rows = labels if weights.shape[0] > 1 else torch.zeros_like(labels)
    comp = torch.multinomial(weights[rows], 1, generator=generator).squeeze(1)  # (N,)
    eps = torch.randn(len(labels), means.shape[-1], 1, generator=generator, dtype=means.dtype)
    return means[rows, comp] + (scale_tril[rows, comp] @ eps).squeeze(-1)
