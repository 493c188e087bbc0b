"""A live latent-space explorer for the trained CVAE, served with Gradio.

    python train.py && python gradio_test.py         # then open http://127.0.0.1:7860
    python gradio_test.py --ckpt other.ckpt --port 7861

Pick a digit and move the z sliders: the decoded image follows while the slider moves. The page also shows the same z
under all ten labels (style kept, digit changed), the digit's manifold (its decodes over the two main sliders' square)
with a marker at z, a button that samples z from the prior, and encodes a digit you draw or upload so the ten digits
come out in your handwriting. With a latent wider than 2, the main sliders set the two dimensions whose posterior
means vary most over the MNIST test set (--data-dir), and a panel below them has a slider for each other dimension.

Named API endpoints (for `gradio_client`; signatures in the README). The page runs on the whole code z0 ... z{d-1},
whatever the latent width:
    /generate_code (digit, z0, ..., z{d-1}) -> image     /style_row_code (z0, ..., z{d-1}) -> image
    /manifold_code (digit, z0, ..., z{d-1}) -> image     /random_code (digit) -> (z0, ..., z{d-1})
    /style_transfer_code (image, digit) -> (image, z0, ..., z{d-1})
and, for clients of the 2-D interface, the same on (z0, z1) in the main sliders' dimensions, every other dimension at
0 (z1 unused by a 1-D latent):
    /generate (digit, z0, z1) -> image     /style_row (z0, z1) -> image     /manifold (digit, z0, z1) -> image
    /random_z (digit) -> (z0, z1)           /style_transfer (image, digit) -> (image, z0, z1)

`build_app(model)` builds the page without serving it and `launch(app, host, port)` serves it, so tests and benchmarks
can run the app in-process.
"""
from __future__ import annotations

import errno
import functools
import inspect
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from checkpoint import CheckpointError, CheckpointNotFound
from cli import DEFAULT_CKPT, ArgParser, bounded, fail
from dataset import DEFAULT_DATA_DIR, DataError, load_test_set, prepare_mnist
from latent import informative_dims, latent_name
from model import load_cvae

if __name__ == "__main__" and not os.environ.get("GRADIO_SERVER_PORT", "7860").isdigit():
    # gradio parses this variable when imported and dies with a traceback on a non-number.
    fail(f"GRADIO_SERVER_PORT={os.environ['GRADIO_SERVER_PORT']!r} is not a port number", code=2)

import gradio as gr  # noqa: E402  (after the check above)

Z_RANGE = 3.0          # the sliders span +-3 standard deviations of the N(0, I) prior
Z_STEP = 0.01
ROW_SCALE = 4          # "same style" row: ten 112 px digits
GRID = 15              # manifold: GRID x GRID decodes over the slider square
MARKER = (255, 87, 34)  # the manifold's marker colour (orange; the digits are grey, so any R != G pixel is marker)
MIN_SIDE, MAX_SIDE = 8, 4096   # accepted upload sizes, pixels per side
# Model events running at once; the rest wait in the queue. A request's model work is a millisecond, so more slots
# only add threads fighting over the GIL (bench/README.md).
CONCURRENCY = 2
QUEUE_SIZE = 1024      # waiting events before new ones are turned away
MAX_UPLOAD = "10mb"
MANIFOLDS_KEPT = 64    # manifold grids kept per explorer (digits x values of the other dimensions)

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="orange",
                       # Local fonts: the page must not fetch Google Fonts (no outbound calls).
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "Consolas", "monospace"])
CSS = """
.pixelated img { image-rendering: pixelated; }
/* The decoded digit arrives at the model's 28 x 28 pixels: fill the frame, keep it square. */
#digit-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def bad_input(message: str) -> gr.Error:
    """A visible one-line error for the user; not logged with a stack trace (it is their input, not our bug)."""
    return gr.Error(message, print_exception=False)


def check_digit(digit: Any, num_classes: int = 10) -> int:
    """Accept an integer label 0..num_classes-1 (3 or 3.0); reject 3.5, True, "3", None with a gr.Error."""
    if isinstance(digit, bool) or not isinstance(digit, (int, float, np.integer, np.floating)):
        raise bad_input(f"digit must be an integer 0-{num_classes - 1}, got {digit!r}")
    if not float(digit).is_integer() or not 0 <= digit < num_classes:
        raise bad_input(f"digit must be an integer 0-{num_classes - 1}, got {digit!r}")
    return int(digit)


def check_z(value: Any, name: str) -> float:
    """Accept a finite number within the slider range (a hair of slack for rounding)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise bad_input(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise bad_input(f"{name} must be a finite number, got {value}")
    if abs(value) > Z_RANGE + 1e-6:
        raise bad_input(f"{name} = {value:g} is outside the slider range -{Z_RANGE:g}..{Z_RANGE:g}")
    return value


def to_slider(value: float) -> float:
    """Clamp to the slider range and round to its step, so the slider shows exactly the z that was decoded (0, not -0,
    for a value that rounds to it)."""
    return round(min(max(float(value), -Z_RANGE), Z_RANGE), 2) + 0.0


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: (H, W) -> (H * factor, W * factor)."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Pixel intensities in [0, 1] -> uint8 0..255 (round to nearest), the values a PNG carries."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> (28, 28) float32 in [0, 1], framed the way MNIST was made.

    Light ink on a dark ground (MNIST) or dark on light (a drawing, a scan): the border decides which, and the
    picture is inverted when needed. The ink's bounding box is scaled to fit 20 x 20 and placed so its centre of
    mass sits at the centre of the 28 x 28 field (LeCun et al., the MNIST database description).
    """
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        # Transparent pixels (an untouched sketchpad) count as white paper.
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 0.5:
        gray, background = 1.0 - gray, 1.0 - background
    ink = np.clip((gray - background) / max(1.0 - background, 1e-3), 0.0, 1.0)
    mask = ink > 0.2
    if mask.sum() < 4 or ink.max() - ink.min() < 0.2:
        raise bad_input("the image is empty: draw or upload a digit first")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = ink.shape
    fit = 20.0 / max(h, w)
    size = (max(1, round(w * fit)), max(1, round(h * fit)))
    box = np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    box = np.clip(box, 0.0, 1.0)
    # Centre of mass to (14, 14), kept inside the field.
    ys, xs = np.indices(box.shape)
    total = float(box.sum()) or 1.0
    cy, cx = float((ys * box).sum()) / total, float((xs * box).sum()) / total
    top = int(np.clip(round(14 - cy), 0, 28 - box.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - box.shape[1]))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top:top + box.shape[0], left:left + box.shape[1]] = box
    return out


def open_image(path: str | Path) -> Image.Image:
    """Open an uploaded file as an image, or raise a gr.Error that says what is wrong with it."""
    try:
        image = Image.open(path)
        width, height = image.size
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise bad_input(f"the image is {width} x {height} pixels; expected {MIN_SIDE} to {MAX_SIDE} per side")
        image.load()
    except gr.Error:
        raise
    except Exception as err:  # PIL raises many kinds: UnidentifiedImageError, OSError, DecompressionBombError...
        raise bad_input(f"could not read the upload as an image ({type(err).__name__})") from None
    return image


class DigitRadio(gr.Radio):
    """gr.Radio that hands any value to the handler, whose check_digit answers a bad one with a clear gr.Error
    (gr.Radio's own check names Python types and logs a stack trace per bad request)."""

    is_template = True  # rendered by gr.Radio's frontend

    def preprocess(self, payload: Any) -> Any:
        return payload

    def api_info(self) -> dict[str, Any]:
        # gr.Radio documents its choices as strings; the endpoints take the digit as an integer.
        values = [value for _, value in self.choices]
        return {"type": "integer", "minimum": min(values), "maximum": max(values), "title": "Digit"}


class ZSlider(gr.Slider):
    """gr.Slider that leaves range checks to the handler's check_z (one message for NaN, inf and out of range)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class ImageUpload(gr.Image):
    """gr.Image whose unreadable uploads (not an image, damaged) end in a one-line gr.Error, not a stack trace."""

    # Defining a component makes Gradio write a type stub, gradio_test.pyi, beside this file (git ignores it; on a
    # read-only checkout Gradio skips it).
    is_template = True  # rendered by gr.Image's frontend

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:
            raise bad_input(f"could not read the upload as an image ({type(err).__name__})") from None


class Explorer:
    """Every picture the page shows, as a plain function of the digit and the latent code, for one model.

    The code path takes the whole code, one value per latent dimension (the page has a slider for each; its endpoints
    end in _code). The endpoints of (digit, z0, z1) are adapters of it: z0 and z1 set the dimensions `dims` (default:
    the first two; slider_dims picks the two most informative ones), every other dimension sits at 0, the prior's
    mean. All decoding runs under inference_mode on a model in eval mode and never changes its mode, so concurrent
    requests are safe.
    """

    def __init__(self, model, dims: tuple[int, ...] | None = None):
        self.model = model.eval()
        self.latent_dim: int = model.hparams.latent_dim
        self.dims = tuple(range(min(self.latent_dim, 2)) if dims is None else dims)
        # The main sliders' names: z0 and z1 when they are the whole code, else the index they set, e.g. z[3] (a 1-D
        # latent's z1 slider is hidden).
        self.names = tuple(latent_name(i, self.latent_dim) for i in (self.dims if len(self.dims) == 2 else (0, 1)))
        self.others = tuple(i for i in range(self.latent_dim) if i not in self.dims)  # dimensions without z0, z1
        self.num_classes: int = model.hparams.num_classes
        self.side: int = model.hparams.image_size
        self.prior: str = model.resolve_prior("auto")  # where Random z comes from: "fitted" or "standard"
        self._manifolds: dict[tuple, np.ndarray] = {}  # (digit, the other dimensions' values) -> unmarked manifold

    # ----- the code path: every event of the page, any latent width ------------------------------------------------
    def generate_code(self, digit: int, *code: float) -> np.ndarray:
        """Decode one digit at the code z0 ... z{d-1}: the model's own (28, 28) uint8 image. The page scales it up
        with CSS (pixelated, so every model pixel is a crisp square): a slider drag streams these, and a small PNG is
        quicker to encode and send (bench/README.md)."""
        digit = check_digit(digit, self.num_classes)
        return self.picture(self.checked_code(code)[None], [digit])

    def style_row_code(self, *code: float) -> np.ndarray:
        """The code decoded under every label, left to right 0..9: a (28 * 4, 10 * 28 * 4) uint8 image."""
        z = self.checked_code(code)
        labels = list(range(self.num_classes))
        return upscale(self.picture(z.repeat(self.num_classes, 1), labels, self.num_classes), ROW_SCALE)

    def manifold_code(self, digit: int, *code: float) -> np.ndarray:
        """The digit's manifold: its decodes over the main sliders' square (z0 left to right, z1 bottom to top), every
        other dimension at the code's value, with a marker at the code: a (GRID * 28, GRID * 28, 3) uint8 RGB image."""
        digit = check_digit(digit, self.num_classes)
        z = self.checked_code(code)
        return self.marked(self.unmarked_manifold(digit, z), *self.pair_of_code(z))

    def random_code(self, digit: int) -> tuple[float, ...]:
        """A code for this digit from the model's prior (the fitted density when the checkpoint has one, else
        N(0, I)), every value clamped to the slider range."""
        return tuple(to_slider(v) for v in self.sample_code(digit).tolist())

    def style_transfer_code(self, image: str | None, digit: int) -> tuple:
        """Encode a picture of `digit` (a file path): (the style row at its code, one slider value per dimension), the
        values clamped to the slider range, with a warning when that moved them."""
        return self.transfer(self.encode_file(image, digit))

    def style_transfer_sketch_code(self, sketch: dict | None, digit: int) -> tuple:
        """The same for the sketchpad's drawing: its value is {"background", "layers", "composite"} as numpy arrays."""
        return self.transfer(self.encode_sketch(sketch, digit))

    # ----- the endpoints of (digit, z0, z1): adapters of the code path ----------------------------------------------
    def generate(self, digit: int, z0: float, z1: float) -> np.ndarray:
        """Decode one digit at (z0, z1), every other dimension at 0: the model's own (28, 28) uint8 image."""
        return self.generate_code(check_digit(digit, self.num_classes), *self.code_of_pair(z0, z1))

    def style_row(self, z0: float, z1: float) -> np.ndarray:
        """(z0, z1), every other dimension at 0, decoded under every label, left to right 0..9: a (28 * 4,
        10 * 28 * 4) uint8 image."""
        return self.style_row_code(*self.code_of_pair(z0, z1))

    def manifold(self, digit: int, z0: float, z1: float) -> np.ndarray:
        """The digit's manifold over the slider square (z0 left to right, z1 bottom to top), every other dimension at
        0, with a marker at (z0, z1): a (GRID * 28, GRID * 28, 3) uint8 RGB image."""
        return self.manifold_code(check_digit(digit, self.num_classes), *self.code_of_pair(z0, z1))

    def random_z(self, digit: int) -> tuple[float, float]:
        """A code for this digit from the model's prior, on the main sliders: (z0, z1), clamped to the slider range."""
        return self.pair_of_code(self.random_code(digit))

    def style_transfer(self, image: str | None, digit: int) -> tuple[np.ndarray, float, float]:
        """Encode a picture of `digit` (a file path): (the style row at its (z0, z1), every other dimension at 0, z0,
        z1), z0 and z1 clamped to the slider range, with a warning when that moved them."""
        z0, z1 = on_sliders(self.pair_of_code(self.encode_file(image, digit)))
        return self.style_row(z0, z1), z0, z1

    def code_of_pair(self, z0: float, z1: float) -> list[float]:
        """The whole code of (z0, z1), each checked under its name: z0 and z1 in the main sliders' dimensions, every
        other dimension at 0 (z1 unused by a 1-D latent)."""
        code = [0.0] * self.latent_dim
        for dim, value in zip(self.dims, (check_z(z0, "z0"), check_z(z1, "z1"))):
            code[dim] = value
        return code

    def pair_of_code(self, code) -> tuple[float, float]:
        """A code's values in the main sliders' dimensions: (z0, z1), z1 0 for a 1-D latent."""
        return float(code[self.dims[0]]), float(code[self.dims[1]]) if self.latent_dim > 1 else 0.0

    # ----- the parts the endpoints share -----------------------------------------------------------------------------
    def checked_code(self, values: tuple) -> torch.Tensor:
        """One value per latent dimension, each checked as a slider's, as a (latent_dim,) code."""
        if len(values) != self.latent_dim:
            raise bad_input(f"expected {self.latent_dim} values of z, one per dimension, got {len(values)}")
        return torch.tensor([check_z(v, latent_name(i, self.latent_dim)) for i, v in enumerate(values)])

    def picture(self, z: torch.Tensor, labels: list[int], columns: int = 1) -> np.ndarray:
        """Decode (N, latent_dim) codes under N labels and lay the images out `columns` to a row, edge to edge: a
        (rows * side, columns * side) uint8 image."""
        with torch.inference_mode():
            x = self.model.decode(z.to(self.model.device), torch.tensor(labels))
        grid = make_grid(x.reshape(-1, 1, self.side, self.side), nrow=columns, padding=0)  # (3, H, W), grey
        return to_uint8(grid[0])

    def unmarked_manifold(self, digit: int, code: torch.Tensor) -> np.ndarray:
        """The manifold without its marker, (GRID * 28, GRID * 28) uint8: cell (row i, column j) decodes z0 = centre of
        column j, z1 = centre of row i counted from the bottom, every other dimension at the code's value; the cells
        tile the slider square exactly. One row for a 1-D latent. Kept per digit and values of the other dimensions."""
        key = (digit, tuple(code[list(self.others)].tolist()))
        if key not in self._manifolds:  # a race here only computes the same picture twice
            centres = torch.from_numpy((np.arange(GRID) + 0.5) / GRID * 2 * Z_RANGE - Z_RANGE).float()
            rows = centres.flip(0) if self.latent_dim > 1 else torch.zeros(1)
            z = code.reshape(1, -1).repeat(len(rows) * GRID, 1)  # (cells, latent_dim), row 0 = highest z1
            z[:, self.dims[0]] = centres.repeat(len(rows))
            if self.latent_dim > 1:
                z[:, self.dims[1]] = rows.repeat_interleave(GRID)
            if len(self._manifolds) >= MANIFOLDS_KEPT:
                self._manifolds.clear()
            self._manifolds[key] = self.picture(z, [digit] * len(z), columns=GRID)
        return self._manifolds[key]

    def marked(self, manifold: np.ndarray, z0: float, z1: float) -> np.ndarray:
        """The manifold in RGB with a marker at (z0, z1)."""
        picture = Image.fromarray(manifold).convert("RGB")
        height, width = manifold.shape
        x = (z0 + Z_RANGE) / (2 * Z_RANGE) * width
        y = (Z_RANGE - z1) / (2 * Z_RANGE) * height if self.latent_dim > 1 else height / 2
        draw = ImageDraw.Draw(picture)
        r = 10  # a ring with four ticks, open in the middle so the digit under it stays visible
        draw.ellipse((x - r, y - r, x + r, y + r), outline=MARKER, width=3)
        for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            draw.line((x + dx * r, y + dy * r, x + 2 * dx * r, y + 2 * dy * r), fill=MARKER, width=2)
        return np.asarray(picture)

    def sample_code(self, digit: int) -> torch.Tensor:
        """A code (latent_dim,) for this digit from the model's prior, "auto": the fitted density when the checkpoint
        has one, else N(0, I)."""
        digit = check_digit(digit, self.num_classes)
        return self.model.sample_z(torch.tensor([digit]), prior="auto")[0].cpu()

    def encode_file(self, image: str | None, digit: int) -> torch.Tensor:
        digit = check_digit(digit, self.num_classes)
        if image is None:
            raise bad_input("no image: upload a picture of a digit first")
        return self.encode_picture(open_image(image), digit)

    def encode_sketch(self, sketch: dict | None, digit: int) -> torch.Tensor:
        digit = check_digit(digit, self.num_classes)
        composite = sketch.get("composite") if isinstance(sketch, dict) else None
        if composite is None:
            raise bad_input("the drawing is empty: draw a digit first")
        return self.encode_picture(Image.fromarray(np.asarray(composite, dtype=np.uint8)), digit)

    def encode_picture(self, image: Image.Image, digit: int) -> torch.Tensor:
        """The posterior mean (latent_dim,) of the picture as `digit`. A Bernoulli model encodes the picture's fixed
        binarization, as it sees every image outside training."""
        x = self.model.observe(torch.from_numpy(to_mnist(image)).reshape(1, -1))
        with torch.inference_mode():
            mean, _ = self.model.encode(x.to(self.model.device), torch.tensor([digit]))
        return mean[0].cpu()

    def transfer(self, z: torch.Tensor) -> tuple:
        """(the style row, one slider value per dimension) of an encoded code, as the sliders show it (on_sliders)."""
        values = on_sliders(z.tolist())
        return (self.style_row_code(*values), *values)


def on_sliders(code) -> tuple[float, ...]:
    """A code as the sliders show it: each value clamped to their range and rounded to their step, with a warning
    when a value lay outside the range."""
    values = tuple(to_slider(v) for v in code)
    if max(abs(v) for v in code) > Z_RANGE:
        gr.Warning(f"Its z = ({', '.join(f'{v:.2f}' for v in code)}) lies outside the sliders' range; "
                   f"shown at the nearest edge ({', '.join(f'{v:.2f}' for v in values)}).")
    return values


def page_notes(explorer: Explorer) -> tuple[str, str]:
    """(where Random z takes its codes from, how the sliders map onto z) in words."""
    prior = f"**Random z** samples from {explorer.model.describe_prior()}"
    if explorer.prior == "fitted":
        prior += ", so it lands where that digit's real handwriting lives."
    else:
        prior += " (this checkpoint has no fitted density)."
    d = explorer.latent_dim
    if d == 1:
        dims = "This checkpoint has a 1-D latent: only z0 exists, the z1 slider is hidden."
    elif d == 2:
        dims = "z is 2-D here: the two sliders are the whole latent code."
    else:
        dims = (f"This checkpoint has a {d}-D latent: the sliders set {' and '.join(explorer.names)}, the two "
                f"dimensions whose posterior means vary most over the MNIST test set; the other {d - 2} have "
                f"sliders of their own under *{OTHERS_TITLE}*. **Random z** draws a whole code, and encoding a "
                f"digit sets every dimension.")
    return prior, dims


def slider_dims(model, data_dir: Path) -> tuple[int, ...] | None:
    """The latent dimensions the main sliders set: for a latent wider than 2, the two whose posterior means vary most
    over the MNIST test set in `data_dir` (latent.informative_dims, the two test.py's latent_scatter.png shows),
    written there first when it is missing, as train.py and test.py do; None (the first dimensions, no data needed)
    otherwise. Raises DataError when the test set is missing and cannot be written."""
    if model.hparams.latent_dim <= 2:
        return None
    prepare_mnist(data_dir)
    images, labels = load_test_set(data_dir)
    return informative_dims(model.posterior_means(model.observe(images), labels))


@dataclass
class Page:
    """The components that events read and write; the rest of the page is static."""

    digit: gr.Radio
    z0: gr.Slider  # the main sliders, of Explorer.dims (z1 hidden for a 1-D latent: only the 2-D endpoints have it)
    z1: gr.Slider
    sliders: list[gr.Slider]  # the code: one slider per latent dimension, the slider of z[i] at index i
    random_button: gr.Button
    image: gr.Image
    manifold: gr.Image
    row: gr.Image
    sketch: gr.Sketchpad
    encode_sketch: gr.Button
    upload: gr.Image
    encode_upload: gr.Button
    label: gr.Radio


START_DIGIT = 7  # the digit the page opens with, at the code 0
OTHERS_TITLE = "The other dimensions of z"


def build_app(model, dims: tuple[int, ...] | None = None) -> gr.Blocks:
    """The explorer page for a loaded CVAE, its main sliders in the latent dimensions `dims` (see Explorer), not yet
    served (see launch)."""
    explorer = Explorer(model, dims)
    with gr.Blocks(title="CVAE latent explorer", analytics_enabled=False, delete_cache=(600, 600)) as app:
        wire(explorer, lay_out(explorer))
    return app


def lay_out(explorer: Explorer) -> Page:
    """The page's components, top to bottom; call inside a gr.Blocks."""
    digits = list(range(explorer.num_classes))
    start = [0.0] * explorer.latent_dim
    prior_note, dims_note = page_notes(explorer)
    slider = dict(minimum=-Z_RANGE, maximum=Z_RANGE, step=Z_STEP, value=0.0)
    gr.Markdown("# Conditional VAE: latent-space explorer\n"
                "The decoder turns a digit label and a latent code **z** into an image. The label fixes "
                "*which* digit; z carries the *handwriting*: slant, width, stroke. Move the sliders and "
                "watch the digit change as you drag.", elem_id="title")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=260):
            digit = DigitRadio(digits, value=START_DIGIT, label="Digit", elem_id="digit")
            z0 = ZSlider(label=explorer.names[0], elem_id="z0", **slider)
            z1 = ZSlider(label=explorer.names[1], elem_id="z1", visible=explorer.latent_dim > 1, **slider)
            by_dim = dict(zip(explorer.dims, (z0, z1)))
            if explorer.others:
                with gr.Accordion(OTHERS_TITLE, open=False, elem_id="others"):
                    by_dim.update({i: ZSlider(label=latent_name(i, explorer.latent_dim), elem_id=f"z-{i}", **slider)
                                   for i in explorer.others})
            random_button = gr.Button("Random z", variant="primary", elem_id="random")
            gr.Markdown(f"{prior_note}\n\nThe sliders span ±{Z_RANGE:g} standard deviations of N(0, I). "
                        f"{dims_note}")
        with gr.Column(scale=4, min_width=360):
            image = gr.Image(explorer.generate_code(START_DIGIT, *start), label="Decoded digit", format="png",
                             height=360, interactive=False, buttons=["download"], elem_id="digit-image",
                             elem_classes=["pixelated"])
        with gr.Column(scale=5, min_width=360):
            x_name, y_name = explorer.names
            manifold = gr.Image(explorer.manifold_code(START_DIGIT, *start),
                                label=f"Manifold of this digit ({x_name} →, {y_name} ↑)", format="png", height=360,
                                interactive=False, buttons=["download"], elem_id="manifold",
                                elem_classes=["pixelated"])
    row = gr.Image(explorer.style_row_code(*start), label="Same style, all ten digits", format="png",
                   interactive=False, buttons=["download"], elem_id="style-row", elem_classes=["pixelated"])
    sketch, encode_sketch, upload, encode_upload, label = lay_out_handwriting(digits)
    return Page(digit, z0, z1, [by_dim[i] for i in range(explorer.latent_dim)], random_button, image, manifold, row,
                sketch, encode_sketch, upload, encode_upload, label)


def lay_out_handwriting(digits: list[int]) -> tuple:
    """The panel that encodes the user's digit: (sketchpad, its button, upload, its button, the label they name)."""
    with gr.Accordion("Your handwriting: draw or upload a digit, see all ten in that style", open=True):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Draw"):
                        # A white page as the background: the editor then opens with the brush in hand. PNG like
                        # the other images (Gradio's default, WebP, is missing from Pillows built without libwebp).
                        sketch = gr.Sketchpad(np.full((280, 280, 3), 255, np.uint8), label="Draw one digit",
                                              canvas_size=(280, 280), height=320, format="png",
                                              layers=False, transforms=(), type="numpy",
                                              brush=gr.Brush(default_size=14, colors=["#000000"],
                                                             color_mode="fixed"), elem_id="sketch")
                        encode_sketch = gr.Button("Encode my drawing", variant="primary")
                    with gr.Tab("Upload"):
                        upload = ImageUpload(label="A picture of one digit", type="filepath", image_mode=None,
                                             sources=["upload", "clipboard"], height=320, elem_id="upload")
                        encode_upload = gr.Button("Encode this picture", variant="primary")
            with gr.Column(scale=2):
                label = DigitRadio(digits, value=START_DIGIT, label="It is a …", elem_id="label")
                gr.Markdown("The encoder finds the z of your digit; the sliders jump there and the row above "
                            "shows the ten digits in your handwriting. Dark-on-light and light-on-dark both "
                            "work; the digit is centred and scaled the way MNIST was.")
    return sketch, encode_sketch, upload, encode_upload, label


# One queue slot pool for everything that runs the model; the live pictures follow every change of digit or z (a slider
# drag sends a stream of changes; "always_last" drops the ones that pile up while a request is running).
MODEL_EVENT = dict(concurrency_limit=CONCURRENCY, concurrency_id="model")
LIVE = dict(trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)


def wire(explorer: Explorer, page: Page) -> None:
    """Connect the page to the explorer and name the API endpoints; call inside the gr.Blocks. Every event reads or
    sets the whole code, a slider per dimension (the endpoints ending in _code, their parameters z0 ... z{d-1}). The
    endpoints of (digit, z0, z1) are the adapters, on the main sliders; no event of the page runs them."""
    digit, sliders = page.digit, page.sliders
    code = [f"z{i}" for i in range(explorer.latent_dim)]
    moves = [slider.change for slider in sliders]
    gr.on([digit.change, *moves], handler(explorer.generate_code, "digit", *code), [digit, *sliders], page.image,
          api_name="generate_code", **LIVE)
    gr.on(moves, handler(explorer.style_row_code, *code), sliders, page.row, api_name="style_row_code", **LIVE)
    gr.on([digit.change, *moves], handler(explorer.manifold_code, "digit", *code), [digit, *sliders], page.manifold,
          api_name="manifold_code", **LIVE)
    page.random_button.click(handler(explorer.random_code, "digit"), digit, sliders, api_name="random_code",
                             **MODEL_EVENT)
    # Encoding sets the sliders (which redraw the pictures) and then shows the digit the user said it was.
    for button, picture, encode, api in (
            (page.encode_upload, page.upload, explorer.style_transfer_code, dict(api_name="style_transfer_code")),
            (page.encode_sketch, page.sketch, explorer.style_transfer_sketch_code, dict(api_visibility="private"))):
        button.click(encode, [picture, page.label], [page.row, *sliders], **api, **MODEL_EVENT
                     ).success(lambda label: label, page.label, digit, api_visibility="private", queue=False)
    # gr.on with no trigger: an endpoint of the API alone, its parameters and answers the main sliders' components'.
    z0, z1 = page.z0, page.z1
    for adapter, inputs, outputs in ((explorer.generate, [digit, z0, z1], page.image),
                                     (explorer.style_row, [z0, z1], page.row),
                                     (explorer.manifold, [digit, z0, z1], page.manifold),
                                     (explorer.random_z, digit, [z0, z1]),
                                     (explorer.style_transfer, [page.upload, page.label], [page.row, z0, z1])):
        gr.on([], adapter, inputs, outputs, api_name=adapter.__name__, **MODEL_EVENT)


def handler(method, *names: str):
    """`method` as an event's function: under a signature with these parameter names, which the API page and
    gradio_client show (a method of *code would show param_1, param_2, ...), and with a one-value answer unpacked
    (Gradio hands a lone output the whole answer: a 1-D latent's Random z sets its one slider to a number)."""
    @functools.wraps(method)
    def call(*args):
        answer = method(*args)
        return answer[0] if isinstance(answer, tuple) and len(answer) == 1 else answer

    call.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                            for n in names])
    return call


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve `app` on host:port (no share link) and return its local URL. block=True prints the URL and serves until
    Ctrl-C; block=False returns at once and leaves the server running in a thread (stop it with app.close()).
    main() also sets torch.set_num_threads(1); do the same when timing the app in-process."""
    # Gradio rebuilds its monitoring summary (a pandas DataFrame of recent events) after every event by default, a
    # large share of the server's work per call (bench/README.md). Every 1000 events is plenty for a dashboard.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    # Queue-position estimates once a second rather than after every job: jobs take milliseconds.
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE, status_update_rate=1.0)
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                           prevent_thread_lock=True, show_error=True, quiet=True, max_file_size=MAX_UPLOAD,
                           footer_links=["api", "settings"], run_history=False, theme=THEME, css=CSS)
    if block:
        print(f"Running on {url} (listening on {host}:{port}; Ctrl-C to stop)", flush=True)
        app.block_thread()
    return url


def listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port right now (one line), or None when it could."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        return f"cannot listen on host {host!r}: {err.strerror}; check --host (or GRADIO_SERVER_NAME)"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closing socket is no obstacle
        try:
            s.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use; choose another with --port (or GRADIO_SERVER_PORT)"
            return f"cannot listen on {host}:{port}: {err.strerror}"
    return None


def env_default(name: str, default: str) -> str:
    return os.environ.get(name) or default


def build_parser() -> ArgParser:
    p = ArgParser(description="Serve the CVAE latent-space explorer (Gradio) on localhost.")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint written by train.py")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="MNIST, whose test set picks the sliders' dimensions when z has more than 2")
    p.add_argument("--host", default=env_default("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (env GRADIO_SERVER_NAME); 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=env_default("GRADIO_SERVER_PORT", "7860"),
                   help="port to listen on (env GRADIO_SERVER_PORT)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry calls, whatever else gradio builds
    try:
        model = load_cvae(args.ckpt, map_location="cpu")  # a tiny MLP: the CPU answers in a millisecond
    except CheckpointNotFound as err:
        fail(str(err))  # says how to train one
    except CheckpointError as err:
        fail(f"{err}; train one with `python train.py`")
    try:
        dims = slider_dims(model, args.data_dir)
    except DataError as err:
        fail(f"{err}; the sliders of a {model.hparams.latent_dim}-D latent follow the test set (--data-dir)")
    problem = listen_problem(args.host, args.port)
    if problem:
        fail(problem)
    # Requests are tiny and run side by side in the server's threads; intra-op threads only contend with each other
    # (bench/README.md).
    torch.set_num_threads(1)
    hp = model.hparams
    print(f"Loaded {args.ckpt}: latent_dim {hp.latent_dim}, prior {model.resolve_prior('auto')}, "
          f"device cpu, 1 torch thread per request", flush=True)
    app = build_app(model, dims)
    try:
        launch(app, args.host, args.port)
    except OSError as err:  # e.g. the port was taken between the check and the launch, or no such interface
        fail(f"cannot serve on {args.host}:{args.port}: {err}; choose another with --port")
    return 0


if __name__ == "__main__":
    sys.exit(main())
