"""The judge of generated digits: a small CNN trained on the MNIST training set, its shipped weights, and FID.

Two numbers in test.py come from it: conditional accuracy (does a sample of digit k look like a k to a classifier
that never saw the CVAE?) and FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium"), computed in this network's penultimate layer instead of Inception's, as is usual for MNIST.
Inception features are tuned to ImageNet photographs; a network trained on digits measures what matters here.

FID is comparable between runs and machines only if the network's weights are fixed, so they ship with the repo
(weights/digit_cnn.pt, 0.8 MB) and are checked against JUDGE_SHA256 before use. They were made by this file:

    python classifier.py                      # retrain (about a minute on one core) -> weights/digit_cnn.pt

The same recipe on another machine rounds differently and gives slightly different weights, hence other FIDs; a
retrained judge is therefore a new judge: record its hash in JUDGE_SHA256, and re-measure the README's numbers.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from torch_utils import batched, eval_mode

JUDGE_FILE = "weights/digit_cnn.pt"  # relative to the repo
JUDGE_PATH = Path(__file__).resolve().parent / JUDGE_FILE
JUDGE_SHA256 = "9b60d41339cd7a094d808b2159bf1d2fea42853919ff7e2497089edf4c1b5404"  # of the shipped file


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides the trained weights, besides the data; saved with them."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 128
    dropout: float = 0.25
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # decayed linearly to 0 over training: more accurate than a constant rate (bench/README.md)
    seed: int = 0


class DigitCNN(nn.Module):
    """Two strided convolutions (28 -> 14 -> 7), a hidden layer (the FID features) and 10 logits.

    Strided convolutions instead of conv + max-pool: on a CPU the pooling layers cost more than the convolutions
    (bench/README.md). Input: (N, 1, 28, 28) in [0, 1], the CVAE's output range.
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
    device = next(model.parameters()).device

    def judge(x):  # one batch -> (features, predictions) on the CPU
        f = model.features(x.to(device))
        return f.double().cpu(), model.classify(f).argmax(dim=1).cpu()

    with eval_mode(model):
        return batched(judge, images, batch_size=batch_size)


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


# ----- the shipped judge and how it was made -------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[DigitCNN, str]:
    """The judge and the sha256 of its file. By default the shipped weights, which must match JUDGE_SHA256; a `path`
    of your own (a retrained judge) is loaded as it is. Read with weights_only, like every checkpoint here; raises
    CheckpointError with a one-line message."""
    path = Path(path) if path is not None else JUDGE_PATH
    saved = safe_torch_load(path, make_one=f"`python classifier.py --out {path}` trains one")
    digest = sha256_of(path)
    if path == JUDGE_PATH and digest != JUDGE_SHA256:
        raise CheckpointError(f"judge {path} does not match its recorded hash (sha256 {digest[:12]}..., expected "
                              f"{JUDGE_SHA256[:12]}...); restore the shipped file with git, or pass weights of your "
                              f"own with --judge")
    try:
        config = ClassifierConfig(**saved.get("config", {}))
        model = DigitCNN(config.channels, config.hidden, config.dropout)
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"judge {path} does not fit DigitCNN: {' '.join(str(err).split())[:300]}") from None
    return model.to(device).eval(), digest


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig = ClassifierConfig(),
                     device: str | torch.device = "cpu") -> DigitCNN:
    """Train DigitCNN with Adam on uint8 images (N, 28, 28) and int64 labels; seeded from config.seed alone.

    The global RNG is forked, so training neither depends on nor changes the caller's random state. It runs on one
    CPU thread: this net's operations are too small to share out (bench/README.md), and the result no longer depends
    on the thread count.
    """
    from dataset import ceil_div, to_float_images  # here: importing classifier for the judge needs no data code

    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            model = DigitCNN(config.channels, config.hidden, config.dropout).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
            steps = config.epochs * ceil_div(len(images), config.batch_size)
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


def main(argv: list[str] | None = None) -> int:
    """Retrain the judge on the MNIST training set and write its weights (atomically) with their hash."""
    from cli import ArgParser
    from dataset import DEFAULT_DATA_DIR, load_split, prepare_mnist, to_float_images

    p = ArgParser(description="Retrain the digit classifier that judges samples (test.py's FID and accuracy).")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is (or is written)")
    p.add_argument("--out", type=Path, default=JUDGE_PATH, help="where the weights go")
    args = p.parse_args(argv)
    prepare_mnist(args.data_dir)
    images, labels = load_split(args.data_dir, train=True)
    config = ClassifierConfig()
    print(f"Training the digit classifier ({config.epochs} epochs on {len(images)} MNIST training images) ...",
          flush=True)
    start = time.perf_counter()
    model = train_classifier(images, labels, config)
    seconds = time.perf_counter() - start
    test_images, test_labels = load_split(args.data_dir, train=False)
    _, preds = features_and_predictions(model, to_float_images(test_images))
    accuracy = (preds == test_labels).double().mean().item()
    atomic_torch_save({"config": asdict(config), "test_accuracy": accuracy, "torch": str(torch.__version__),
                       "state_dict": model.state_dict()}, args.out)
    print(f"Wrote {args.out} in {seconds:.0f}s: test accuracy {100 * accuracy:.2f}%, sha256 {sha256_of(args.out)}")
    if args.out.resolve() == JUDGE_PATH:
        print("This is a new judge: put its sha256 in classifier.JUDGE_SHA256 and re-measure the README's numbers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
