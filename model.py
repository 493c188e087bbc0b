"""Conditional VAE for MNIST (Kingma et al. 2014; Sohn et al. 2015) as a LightningModule.

Architecture (the original repo's design; sizes come from constructor arguments):

    Encoder  [x (784) | one-hot y (10)] = 794 -> 512 -> 256 -> 128 -> mean (latent), logvar (latent)
    Decoder  [z (latent) | one-hot y (10)]    -> 128 -> 256 -> 512 -> 784 (Sigmoid)

Every hidden block is Linear + LayerNorm + ReLU, followed by Dropout except for the encoder's last block.

The decoder's Sigmoid output is read by one of two likelihoods (`likelihood`): "gaussian", the original's summed
squared error (a Gaussian of variance 1/2 per pixel, on the grey images), or "bernoulli", each output a pixel's
probability of ink and the summed binary cross-entropy its -log p(x | z, y) in nats, on binarized images (which
images, dataset.binarize says).

Training maximises the ELBO (`elbo_loss`, closed-form KL), or with importance_samples K > 1 the tighter K-sample
importance-weighted bound (`importance_log_weights`, Burda et al. 2016), the same bound test.py scores with; validation
and test report the ELBO either way.

The constructor's defaults are the recipe `python train.py` trains (train.py takes its flags' defaults from them), so
`CVAE()` in a notebook with a Trainer of your own is the model the README describes. `load_cvae` rebuilds a trained
one from a checkpoint alone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal
import pytorch_lightning as pl
from torchmetrics import MeanMetric

from checkpoint import CheckpointError, safe_torch_load
from dataset import binarize, to_float_images
from prior import describe_prior, load_density, resolve_prior, sample_z
from torch_utils import batched, eval_mode

STAGES = ("train", "val", "test")
TERMS = ("loss", "recon", "kl")  # what elbo_loss returns, in that order


def metric_name(stage: str, term: str) -> str:
    """The name a term's epoch mean is logged under, e.g. "val_recon"."""
    return f"{stage}_{term}"


def metric_names(*stages: str) -> list[str]:
    """Every term's name for these stages, stage by stage: metric_names("test") == ["test_loss", "test_recon",
    "test_kl"]."""
    return [metric_name(stage, term) for stage in stages for term in TERMS]


def kl_per_dim(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) for every image and latent dimension, in nats: (N, latent).

    Closed form (Kingma & Welling 2014, Appendix B): -1/2 * (1 + logvar - mean^2 - exp(logvar)).
    """
    return -0.5 * (1 + logvar - mean.pow(2) - logvar.exp())


LIKELIHOODS = ("gaussian", "bernoulli")  # how the decoder's output scores an image: p(x | z, y)
# The learning rate over a run, step by step: `lr` throughout; a one-cycle (Smith & Topor 2019) warm-up from lr / 25
# to the peak `lr` over the first 30 % of the steps and a cosine decay to lr / 25e4; a cosine decay from `lr` to 0.
LR_SCHEDULES = ("constant", "one-cycle", "cosine")


def squared_error(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each image's pixels, (N,): -log p(x | z, y) less gaussian_nll_constant."""
    return (recon - x.reshape(recon.shape)).pow(2).sum(dim=1)


def gaussian_nll_constant(pixels: int) -> float:
    """What squared_error leaves out of -log p(x | z, y), in nats. A Gaussian decoder with variance 1/2 per pixel has
    -log N(x; x_hat, 1/2) = (x - x_hat)^2 + ln(pi) / 2 per pixel: (pixels / 2) ln(pi), 448.73 for 28 x 28 pixels."""
    return pixels / 2 * math.log(math.pi)


def reconstruction_nll(recon: torch.Tensor, x: torch.Tensor, likelihood: str = "gaussian") -> torch.Tensor:
    """-log p(x | z, y) per image, (N,), in loss units: for "gaussian" the summed squared error (nats less
    nll_constant), for "bernoulli" the summed binary cross-entropy of the pixel probabilities `recon` against binary
    x (nats; torch clamps each log at -100, so a confident wrong pixel costs 100 nats, not infinity)."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy(recon, x.reshape(recon.shape), reduction="none").sum(dim=1)
    return squared_error(recon, x)


def nll_constant(likelihood: str, pixels: int) -> float:
    """What reconstruction_nll leaves out of -log p(x | z, y): loss units + this = nats."""
    return gaussian_nll_constant(pixels) if likelihood == "gaussian" else 0.0


def elbo_loss(recon: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
              kl_weight: float = 1.0, free_bits: float = 0.0, likelihood: str = "gaussian"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO: (recon + kl_weight * kl, recon, kl), batch means of reconstruction_nll and summed kl_per_dim.

    kl_weight is beta (0: the original repo's plain-MSE autoencoder). free_bits (nats per latent dimension, Kingma
    et al. 2016) floors each dimension's batch-mean KL in the total only, against collapsed dimensions."""
    recon_loss = reconstruction_nll(recon, x, likelihood).mean()
    kl_dims = kl_per_dim(mean, logvar)  # (N, latent)
    kl = kl_dims.sum(dim=1).mean()
    kl_term = kl_dims.mean(dim=0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return recon_loss + kl_weight * kl_term, recon_loss, kl


def importance_log_weights(nll: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                           kl_weight: float = 1.0) -> torch.Tensor:
    """Log importance weights of K samples z (K, B, latent) from q(z | x, y) = N(mean, exp(logvar)) for B images,
    each sample's -log p(x | z, y) given as nll (K, B) (reconstruction_nll, loss units): (K, B),

        log w_k = log p(x | z_k, y) + kl_weight * (log p(z_k) - log q(z_k | x, y)),   p(z) = N(0, I).

    With kl_weight 1, log-mean-exp over k is the importance-weighted bound on log p(x | y) (Burda, Grosse and
    Salakhutdinov 2016); kl_weight is beta, as in elbo_loss, so the warm-up weighs the prior terms of the training
    bound."""
    log_px = -nll
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    return log_px + kl_weight * log_pz - kl_weight * log_qz  # as log_px + log_pz - log_qz, to the bit, at beta 1


def importance_weighted_loss(log_w: torch.Tensor) -> torch.Tensor:
    """The negative importance-weighted bound per image, -log (1/K) sum_k w_k, from log weights (K, B): (B,). One
    sample is a one-draw ELBO; the bound tightens as K grows."""
    return -(torch.logsumexp(log_w, dim=0) - math.log(len(log_w)))


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
        kl_warmup_epochs: float = 2.0,
        free_bits: float = 0.0,
        likelihood: str = "gaussian",
        lr_schedule: str = "constant",
        importance_samples: int = 1,
    ):
        super().__init__()
        if latent_dim < 1 or num_classes < 1 or image_size < 1:
            raise ValueError("latent_dim, num_classes and image_size must be positive")
        if kl_weight < 0 or free_bits < 0 or kl_warmup_epochs < 0:
            raise ValueError("kl_weight, free_bits and kl_warmup_epochs must be non-negative")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if importance_samples < 1:
            raise ValueError(f"importance_samples must be at least 1, got {importance_samples}")
        if importance_samples > 1 and (free_bits > 0 or kl_weight == 0):
            # The bound weighs whole samples, not dimensions (free bits), and without p(z) / q(z) (beta 0) it is
            # no bound on log p(x | y) at all.
            raise ValueError("importance_samples > 1 needs free_bits 0 and kl_weight > 0")
        # Lists, not tuples, so the hyper-parameters in a checkpoint are plain YAML/JSON types.
        encoder_dims, decoder_dims = list(encoder_dims), list(decoder_dims)
        self.save_hyperparameters()
        self.image_dim = image_size * image_size
        self.encoder = Encoder(self.image_dim, num_classes, encoder_dims, latent_dim, dropout)
        self.decoder = Decoder(latent_dim, num_classes, decoder_dims, self.image_dim, dropout)
        # The fitted prior's density (prior.py), fitted after training (prior.FitPrior); plain tensors, saved in the
        # checkpoint as "fitted_prior".
        self.fitted_prior: dict[str, Any] | None = None
        self.warmup_steps = 0.0  # the KL warm-up in training steps, set when training starts (on_train_start)
        # Running means of the loss terms, one per stage and term ("train_loss" ... "test_kl"), updated every step
        # and logged once per epoch: Lightning's self.log is slow enough to matter when called per term and step
        # (bench/README.md). A NaN loss stays NaN in the mean, so divergence shows. Not saved in checkpoints.
        self.epoch_means = nn.ModuleDict({name: MeanMetric(nan_strategy="disable") for name in metric_names(*STAGES)})

    # ----- input checks for the public entry points (encode, decode, sample) ----------------------------------
    # forward, the training pass, skips them: reading a label's range back from the device would stall a GPU's
    # queue of kernel launches at every step.
    def _onehot(self, labels: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """Integer labels -> (N, num_classes) one-hot floats; anything else is a ValueError, not a silent bug."""
        y = torch.as_tensor(labels, device=self.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.reshape(-1).long()
        num_classes = self.hparams.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must be in 0..{num_classes - 1}, got values in {int(y.min())}..{int(y.max())}")
        return F.one_hot(y, num_classes).to(self.dtype)

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
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + sigma * eps with eps ~ N(0, I) (drawn here unless given), so gradients flow through mean and
        logvar."""
        if eps is None:
            eps = torch.randn_like(mean)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Likelihood mean p(x | z, y): (N, 784) pixel intensities in [0, 1]."""
        z = torch.as_tensor(z, dtype=self.dtype, device=self.device).reshape(-1, self.hparams.latent_dim)
        y = self._onehot(y)
        if len(z) != len(y):
            raise ValueError(f"got {len(z)} latent vectors but {len(y)} labels")
        return self.decoder(z, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training pass: float images x (N, 1, 28, 28) or (N, 784) and int64 labels y (N,), unchecked (encode and
        decode check their inputs; the data module's batches need no check). Returns (recon (N, 784), mean, logvar)."""
        y_onehot = F.one_hot(y, self.hparams.num_classes).to(x.dtype)  # (N, num_classes)
        mean, logvar = self.encoder(x.flatten(1), y_onehot)  # (N, latent_dim) each
        z = self.reparameterize(mean, logvar)
        return self.decoder(z, y_onehot), mean, logvar

    @torch.no_grad()
    def sample_z(self, labels: torch.Tensor, prior: str = "auto", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Draw z for each label from the prior: "standard" N(0, I), "fitted" (the density fitted after training),
        or "auto" (fitted when the model has one). Returns (N, latent_dim)."""
        labels = torch.as_tensor(labels).reshape(-1).long()
        self._onehot(labels)  # validates the labels
        z = sample_z(prior, self.fitted_prior, labels, self.hparams.latent_dim, generator)
        return z.to(self.device, self.dtype)

    def resolve_prior(self, prior: str) -> str:
        """The prior `sample` uses for `prior` ("auto": the fitted one when the model has it); see prior.py."""
        return resolve_prior(prior, self.fitted_prior)

    @property
    def sees_binary_images(self) -> bool:
        """Whether this model scores binarized images (the Bernoulli decoder) or grey ones. The one owner of that
        choice: MNISTDataModule serves its batches by it, and `observe` applies it outside training."""
        return self.hparams.likelihood == "bernoulli"

    def observe(self, images: torch.Tensor) -> torch.Tensor:
        """Images (grey, in [0, 1]) as this model sees and scores them outside training: as they are for the Gaussian
        decoder, their fixed binarization (dataset.binarize) for the Bernoulli one."""
        return binarize(images) if self.sees_binary_images else images

    def describe_prior(self, prior: str = "auto") -> str:
        """The prior `sample` uses for `prior`, in words (e.g. "a Gaussian per digit, fitted to the training codes")."""
        return describe_prior(prior, self.fitted_prior)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], z: torch.Tensor | None = None, prior: str = "auto",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate one image per label: (N, 1, 28, 28) in [0, 1].

        z: (N, latent_dim) latent codes to decode; drawn from `prior` when None ("auto": the fitted density when the
        checkpoint has one, else N(0, I); "standard": N(0, I); "fitted": the density fitted after training).
        Runs in eval mode (no dropout) and restores the previous mode afterwards.
        """
        with eval_mode(self):
            labels = torch.as_tensor(labels).reshape(-1)
            if z is None:
                z = self.sample_z(labels, prior=prior, generator=generator)
            side = self.hparams.image_size
            return self.decode(z, labels).reshape(-1, 1, side, side)

    @torch.no_grad()
    def posterior(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2_000
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, y) for every image, in eval mode: (means, logvars), each (N, latent_dim) on the CPU.

        images: floats in [0, 1], or raw uint8 pixels (0..255), scaled batch by batch as training scaled them (so the
        55k training images never exist as one float tensor)."""
        def encode(x, y):  # one batch -> (means, logvars) on the CPU
            x = to_float_images(x) if x.dtype == torch.uint8 else x
            mean, logvar = self.encode(x.to(self.device), y.to(self.device))
            return mean.float().cpu(), logvar.float().cpu()

        with eval_mode(self):
            return batched(encode, images, labels, batch_size=batch_size)

    def posterior_means(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2_000) -> torch.Tensor:
        """The means of `posterior`: (N, latent_dim) on the CPU."""
        return self.posterior(images, labels, batch_size)[0]

    # ----- training -------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # The warm-up is given in epochs; its length in steps is known once the training batches are counted. It
        # depends on nothing else, so a resumed run gets the same schedule from its restored global_step.
        self.warmup_steps = self.hparams.kl_warmup_epochs * max(1, self.trainer.num_training_batches)

    def kl_weight_at(self, step: int) -> float:
        """beta at training step `step` (counted from 0): ramped linearly up to kl_weight over the first
        `kl_warmup_epochs` epochs, step by step, then kl_weight."""
        if self.warmup_steps <= 0:
            return self.hparams.kl_weight
        return self.hparams.kl_weight * min(1.0, (step + 1) / self.warmup_steps)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        if stage == "train":
            kl_weight, free_bits = self.kl_weight_at(self.global_step), self.hparams.free_bits
        else:  # validation and test report the plain ELBO, so runs with different recipes compare directly
            kl_weight, free_bits = self.hparams.kl_weight, 0.0
        if stage == "train" and self.hparams.importance_samples > 1:
            loss, recon_loss, kl = self.importance_weighted_step(x, y, kl_weight)
        else:
            recon, mean, logvar = self(x, y)
            loss, recon_loss, kl = elbo_loss(recon, x, mean, logvar, kl_weight, free_bits, self.hparams.likelihood)
        for term, value in zip(TERMS, (loss, recon_loss, kl)):
            self.epoch_means[metric_name(stage, term)].update(value.detach(), weight=len(x))  # a mean over images
        return loss

    def importance_weighted_step(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective with K = importance_samples samples of z per image (IWAE, Burda et al. 2016): the
        negative K-sample bound (importance_log_weights, beta weighing the prior terms) as the loss, with plain
        reparameterised gradients, beside the ELBO's terms for the log: reconstruction averaged over the K samples,
        and the closed-form KL. Returns (loss, recon, kl), batch means."""
        y_onehot = F.one_hot(y, self.hparams.num_classes).to(x.dtype)  # (B, num_classes)
        mean, logvar = self.encoder(x.flatten(1), y_onehot)  # (B, d) each
        eps = torch.randn(self.hparams.importance_samples, *mean.shape, dtype=mean.dtype, device=mean.device)
        log_w, nll = self.log_weights(x, y, mean, logvar, eps, kl_weight)
        kl = kl_per_dim(mean, logvar).sum(dim=1).mean()
        return importance_weighted_loss(log_w).mean(), nll.mean(), kl

    def log_weights(self, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                    eps: torch.Tensor, kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The importance weights of K samples z = mean + sigma * eps (eps: (K, B, latent)) from q(z | x, y) for B
        images x (as the model scores them) under integer labels y, decoded in the model's current mode: (log w, each
        sample's -log p(x | z, y)), both (K, B) (importance_log_weights). The training step and metrics.iw_bound both
        call this."""
        k, d = eps.shape[0], eps.shape[-1]
        z = self.reparameterize(mean, logvar, eps)  # (K, B, d)
        y_onehot = F.one_hot(y, self.hparams.num_classes).to(z.dtype).repeat(k, 1)  # sample-major, as z.reshape
        recon = self.decoder(z.reshape(-1, d), y_onehot)  # (K * B, 784)
        nll = reconstruction_nll(recon, x.flatten(1).repeat(k, 1), self.hparams.likelihood).reshape(k, -1)
        return importance_log_weights(nll, z, mean, logvar, kl_weight), nll

    def _log_epoch_means(self, stage: str) -> None:
        # Lightning computes each metric (averaged over all processes under DDP) and resets it for the next epoch.
        self.log_dict({name: self.epoch_means[name] for name in metric_names(stage)},
                      prog_bar=stage == "val")

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def _log_train_means(self) -> None:
        self._log_epoch_means("train")
        self.log("kl_weight", self.kl_weight_at(self.global_step - 1))  # beta at the epoch's last step

    def on_validation_epoch_end(self) -> None:
        # Validation runs after the epoch's last training batch, so the training means are final here. Logged with
        # the validation means, they make one log row per epoch, on disk before ModelCheckpoint writes the epoch's
        # checkpoint (at train epoch end): a crash can lose an unsaved epoch, never the log of a saved one.
        if not self.trainer.sanity_checking:
            self._log_train_means()
        self._log_epoch_means("val")

    def on_train_epoch_end(self) -> None:
        if not self.trainer.enable_validation:  # --limit-val-batches 0: no validation pass to log with
            self._log_train_means()

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def configure_optimizers(self):
        # The fused kernel does the same Adam update in one pass over the parameters, which is faster
        # (bench/README.md).
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused or None)
        schedule, lr = self.hparams.lr_schedule, self.hparams.lr
        if schedule == "constant":
            return optimizer
        steps = self.trainer.estimated_stepping_batches  # the whole run: max_epochs x the batches of an epoch
        if schedule == "one-cycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoint extras (plain tensors only, so weights_only loading works) ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.fitted_prior is not None:
            checkpoint["fitted_prior"] = self.fitted_prior

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.fitted_prior = load_density(checkpoint.get("fitted_prior"), self.hparams.num_classes,
                                         self.hparams.latent_dim)


def load_cvae(path: str | Path, map_location: Any = "cpu") -> CVAE:
    """Rebuild a CVAE from a checkpoint alone (its hyper-parameters), safely, in eval mode.

    Raises CheckpointError with a one-line message for anything that is not a loadable checkpoint of this model.
    """
    checkpoint = safe_torch_load(path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"checkpoint {path} has no hyper-parameters; it was not written by this repo's train.py")
    try:
        # First on the meta device, where nothing is allocated, so crafted sizes (a 10^6-wide layer) cannot exhaust
        # memory: the real model is built only once every shape in the file matches the hyper-parameters.
        with torch.device("meta"):
            skeleton = CVAE(**hparams)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not a CVAE checkpoint: {detail}") from None
    try:
        skeleton.load_state_dict(checkpoint["state_dict"], assign=True)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint {path} does not match the CVAE architecture: {detail[:300]}") from None
    model = CVAE(**hparams)
    model.load_state_dict(checkpoint["state_dict"])  # copied into float32, whatever dtype the file holds
    broken = [name for name, value in model.state_dict().items() if not torch.isfinite(value).all()]
    if broken:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights ({', '.join(broken[:3])}); "
                              f"the training run diverged or the file is damaged")
    try:
        model.on_load_checkpoint(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return model.to(map_location if map_location is not None else "cpu").eval()
