"""The digit classifier that judges generated images: a small CNN trained on the MNIST training set, and FID.

Two numbers in test.py come from it: conditional accuracy (does a sample of digit k look like a k to a classifier
that never saw the CVAE?) and FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium"), computed in this network's penultimate layer instead of Inception's, as is usual for MNIST.
Inception features are tuned to ImageNet photographs; a network trained on digits measures what matters here.

The classifier is trained once (about a minute on one CPU core), seeded and deterministic, and cached next to the
data with a hash of what it was trained on; a changed data set or recipe retrains it. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import atomic_torch_save

CACHE_NAME = "digit_cnn.pt"
FORMAT_VERSION = 2  # bump when the architecture or the cache layout changes, so old caches count as stale


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides the trained weights, besides the data; part of the cache key."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 128
    dropout: float = 0.25
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # decayed linearly to 0 over training: +0.3 points of test accuracy over a constant rate
    seed: int = 0


class DigitCNN(nn.Module):
    """Two strided convolutions (28 -> 14 -> 7), a hidden layer (the FID features) and 10 logits.

    Strided convolutions instead of conv + max-pool: on a CPU the pooling layers cost more than the convolutions, and
    this net trains 3.5x faster for the same test accuracy. Input: (N, 1, 28, 28) in [0, 1], the CVAE's output range.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128, dropout: float = 0.25,
                 num_classes: int = 10, image_size: int = 28):
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.ReLU(),  # (N, c1, 14, 14)
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # (N, c2, 7, 7)
        )
        side = (image_size + 3) // 4
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (N, hidden): the space FID is computed in."""
        return self.hidden(self.conv(x.reshape(-1, 1, *x.shape[-2:])))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from `features(x)`, so one pass gives both FID features and predictions."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@torch.no_grad()
def features_and_predictions(model: DigitCNN, images: torch.Tensor, batch_size: int = 1_000
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode pass over float images (N, 1, 28, 28) in [0, 1] (dataset.to_float_images scales MNIST's uint8):
    (features (N, hidden) float64 on the CPU, predicted digits (N,))."""
    if not images.is_floating_point():
        raise TypeError(f"images must be floats in [0, 1], got {images.dtype}")
    model.eval()
    device = next(model.parameters()).device
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i:i + batch_size].to(device))
        feats.append(f.double().cpu())
        preds.append(model.classify(f).argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def fid(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64:

        |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD
    matrix with the same spectrum as S_a S_b; symmetric eigen-decompositions avoid the complex round-off a general
    matrix square root (scipy.linalg.sqrtm) produces on near-singular covariances.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"fid needs two (N, D) feature sets with N >= 2 and the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_a)
    sqrt_a = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(value, 0.0))  # round-off can leave -1e-12 for identical sets


# ----- training and the cache ----------------------------------------------------------------------------------------
def cache_key(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig) -> str:
    """sha256 of the training images, labels, recipe and format version: a cache with another key is stale."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, **asdict(config)}, sort_keys=True).encode())
    for t in (images, labels):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig = ClassifierConfig(),
                     device: str | torch.device = "cpu") -> DigitCNN:
    """Train DigitCNN with Adam on uint8 images (N, 28, 28) and int64 labels; seeded from config.seed alone.

    The global RNG is forked, so training neither depends on nor changes the caller's random state. It runs on one
    CPU thread: this net's operations are too small to share out, on a busy machine two threads waiting on each other
    ran 10x slower than one (measured on the project's shared 2-core machine), and the result no longer depends on
    the thread count.
    """
    from dataset import to_float_images  # here, like load_split below: keeps importing classifier light

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            model = DigitCNN(config.channels, config.hidden, config.dropout).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
            steps = config.epochs * -(-len(images) // config.batch_size)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
            x_all = to_float_images(images).to(device)  # (N, 1, 28, 28)
            y_all = labels.long().to(device)
            order_gen = torch.Generator().manual_seed(config.seed)
            model.train()
            for _ in range(config.epochs):
                for idx in torch.randperm(len(x_all), generator=order_gen).split(config.batch_size):
                    idx = idx.to(device)
                    loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def load_or_train_classifier(data_dir: str | Path, cache_path: str | Path | None = None,
                             device: str | torch.device = "cpu", config: ClassifierConfig = ClassifierConfig(),
                             log: Callable[[str], None] = print) -> DigitCNN:
    """The digit classifier for `data_dir`'s MNIST: loaded from `cache_path` (default data_dir/digit_cnn.pt) when its
    key matches the training data and recipe, otherwise trained on the training set and cached there.

    The cache holds only tensors and plain values and is read with torch.load(weights_only=True). A missing, stale or
    unreadable cache is rebuilt (said through `log`); raises dataset.DataError when the MNIST files are missing.
    """
    from dataset import load_split  # here: torchvision is only needed once data is read

    cache_path = Path(cache_path) if cache_path is not None else Path(data_dir) / CACHE_NAME
    images, labels = load_split(data_dir, train=True)
    key = cache_key(images, labels, config)
    model = DigitCNN(config.channels, config.hidden, config.dropout)
    if cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                model.load_state_dict(cached["state_dict"])
                return model.to(device).eval()
            reason = "stale (trained on other data or with another recipe)"
        except Exception as err:  # a damaged or foreign file is rebuilt, whatever torch raises for it
            reason = f"unreadable ({type(err).__name__})"
        log(f"Classifier cache {cache_path} is {reason}; retraining.")
    log(f"Training the digit classifier ({config.epochs} epochs on {len(images)} MNIST training images, "
        f"cached in {cache_path}) ...")
    start = time.perf_counter()
    model = train_classifier(images, labels, config, device)
    seconds = time.perf_counter() - start
    atomic_torch_save({"key": key, "config": asdict(config), "train_seconds": seconds,
                       "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, cache_path)
    log(f"Trained the digit classifier in {seconds:.0f}s.")
    return model
