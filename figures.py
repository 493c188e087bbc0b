"""Every figure the repo draws, from tensors and arrays: none of these functions runs a model, so the same picture can
be drawn from test.py's model outputs (metrics.py) or from a sweep's saved numbers (bench/sweep.py). The training
log's reader sits beside the figure that draws it (training_curves).

Each function returns a matplotlib Figure (the object API: no pyplot global state, no GUI backend); `save` writes it.
test.py's figures are exactly FIGSIZES[name] * DPI pixels (no tight bounding box), so tests can check their size.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

DPI = 100
FIGSIZES = {  # inches
    "samples.png": (6.2, 6.6),
    "manifold.png": (22.0, 10.0),
    "latent_scatter.png": (8.0, 8.6),
    "reconstructions.png": (7.4, 3.9),
    "analogies.png": (8.0, 6.7),
    "training_curves.png": (10.0, 4.2),
}
SCATTER_CAPTION = ("In a CVAE the decoder is given the label, so z need not encode which digit it is: the classes "
                   "overlap by design,\nand z carries the style (slant, width, stroke) shared across digits.")


# ----- helpers ------------------------------------------------------------------------------------------------------
def tile(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(R, C, H, W) images -> one (R*H + (R-1)*pad, C*W + (C-1)*pad) array with white lines between the tiles:
    torchvision's make_grid, less the white frame it draws around the whole grid."""
    r, c, h, w = images.shape
    grid = make_grid(images.reshape(r * c, 1, h, w), nrow=c, padding=pad, pad_value=1.0)[0]  # (3, ...) -> one channel
    return grid[pad:grid.shape[0] - pad, pad:grid.shape[1] - pad].numpy() if r * c > 1 else grid.numpy()


def tile_centres(n: int, size: int, pad: int = 2) -> list[float]:
    """Pixel coordinates of the centres of n tiles of `size` along one axis of a tile() image."""
    return [i * (size + pad) + (size - 1) / 2 for i in range(n)]


def new_figure(size: str | tuple[float, float]) -> Figure:
    """A figure of FIGSIZES[size] (a file name) or of `size` inches."""
    return Figure(figsize=FIGSIZES[size] if isinstance(size, str) else size, dpi=DPI)


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays what the figure was made with
    return path


def show_grid(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for spine in ax.spines.values():
        spine.set_visible(False)


# ----- test.py's figures --------------------------------------------------------------------------------------------
def samples(images: torch.Tensor, seed: int, prior: str) -> Figure:
    """samples.png: images (num_classes, per_row, 28, 28), row k = samples of digit k, drawn from `seed` with the
    prior described in words by `prior`."""
    num_classes, per_row, side, _ = images.shape
    fig = new_figure("samples.png")
    ax = fig.add_axes((0.1, 0.02, 0.87, 0.83))
    show_grid(ax, tile(images))
    ax.set_yticks(tile_centres(num_classes, side), [str(c) for c in range(num_classes)], fontsize=12)
    ax.set_ylabel("requested digit", fontsize=12)
    ax.set_xticks([])
    ax.tick_params(length=0)
    fig.suptitle(f"Samples of each digit, seed {seed}\nz from {prior}", fontsize=11, y=0.975)
    return fig


def manifold(images: torch.Tensor, quantiles: torch.Tensor, names: Sequence[str], latent_dim: int,
             quantile_range: tuple[float, float]) -> Figure:
    """manifold.png: one panel per digit from images (num_classes, rows, steps, 28, 28), decoded over a grid of
    `quantiles` (steps,) of N(0, 1) in the latent dimensions called `names` (columns left to right, rows bottom to
    top; one row when latent_dim is 1)."""
    num_classes, rows, steps, side, _ = images.shape
    fig = new_figure("manifold.png")
    ncols = math.ceil(num_classes / 2) if num_classes > 1 else 1
    axes = fig.subplots(math.ceil(num_classes / ncols), ncols, squeeze=False,
                        gridspec_kw=dict(left=0.03, right=0.99, bottom=0.05, top=0.85, wspace=0.12, hspace=0.2))
    marks = [0, steps // 2, steps - 1]  # ticks at both ends and the middle of the grid
    for digit, ax in enumerate(axes.flat):
        if digit >= num_classes:
            ax.set_visible(False)
            continue
        show_grid(ax, tile(images[digit], pad=0))
        ax.set_title(f"digit {digit}", fontsize=14)
        ax.set_xticks([tile_centres(steps, side, 0)[i] for i in marks], [f"{quantiles[i]:.2f}" for i in marks])
        ax.set_xlabel(names[0], labelpad=1)
        if rows > 1:
            ax.set_yticks([tile_centres(rows, side, 0)[i] for i in marks],
                          [f"{quantiles.flip(0)[i]:.2f}" for i in marks])
            ax.set_ylabel(names[1], labelpad=1)
        else:
            ax.set_yticks([])
    what = (f"{names[0]} (left to right) and {names[1]} (bottom to top)" if latent_dim >= 2
            else f"{names[0]} (left to right; latent_dim is 1)")
    rest = f"; the other {latent_dim - 2} dimensions are fixed at 0" if latent_dim > 2 else ""
    lo, hi = quantile_range
    fig.suptitle(f"Decoded latent manifold for each digit\n{what} at the {lo:g}...{hi:g} quantiles of N(0, 1), "
                 f"{steps} steps{rest}", fontsize=16)
    return fig


def latent_scatter(points: torch.Tensor, labels: torch.Tensor, names: Sequence[str], latent_dim: int) -> Figure:
    """latent_scatter.png: posterior means (N, 2) in the latent dimensions called `names` ((N, 1) for a 1-D latent,
    plotted against the digit), coloured by their digit."""
    z, digits = points.numpy(), labels.numpy()
    num_classes = int(digits.max()) + 1
    fig = new_figure("latent_scatter.png")
    ax = fig.add_axes((0.11, 0.17, 0.85, 0.74))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(z))  # plot in random order so no digit is painted over all the others
    x_vals = z[order, 0]
    y_vals = z[order, 1] if z.shape[1] >= 2 else digits[order] + rng.uniform(-0.3, 0.3, len(z))
    colours = np.asarray([colormaps["tab10"](c % 10) for c in range(num_classes)])
    ax.scatter(x_vals, y_vals, c=colours[digits[order]], s=3, alpha=0.6, linewidths=0)
    for c in range(num_classes):  # legend entries with readable markers
        ax.scatter([], [], color=colours[c], s=30, label=str(c))
    ax.legend(title="digit", loc="upper right", fontsize=9, ncols=2, framealpha=0.9)
    if z.shape[1] >= 2:
        ax.add_patch(Circle((0, 0), 2.0, fill=False, ls="--", color="0.3", lw=1))
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_ylabel(f"{names[1]} (posterior mean)")
        ax.text(0.02, 0.02, "dashed circle: radius 2, holds 86% of N(0, I)", transform=ax.transAxes, fontsize=9,
                color="0.3")
    else:
        ax.set_ylabel("digit (jittered)")
    ax.set_xlabel(f"{names[0]} (posterior mean)")
    which = f", the 2 of {latent_dim} latent dimensions whose means vary most" if latent_dim > 2 else ""
    ax.set_title(f"Posterior means of the {len(z):,} test images{which}", fontsize=12)
    fig.text(0.5, 0.025, SCATTER_CAPTION, ha="center", va="bottom", fontsize=9.5, wrap=False)
    return fig


def reconstructions(originals: torch.Tensor, decoded: torch.Tensor) -> Figure:
    """reconstructions.png: blocks of (test images, their reconstructions), originals and decoded (blocks,
    num_classes, 28, 28); block b shows one example of every digit."""
    blocks, num_classes, side, _ = originals.shape
    fig = new_figure("reconstructions.png")
    axes = fig.subplots(blocks, 1, squeeze=False,
                        gridspec_kw=dict(left=0.2, right=0.98, bottom=0.02, top=0.78, hspace=0.12))[:, 0]
    for block, ax in enumerate(axes):
        show_grid(ax, tile(torch.stack([originals[block], decoded[block]])))
        ax.set_yticks(tile_centres(2, side), ["test image", "reconstruction"], fontsize=10)
        ax.set_xticks(tile_centres(num_classes, side), [str(c) for c in range(num_classes)] if block == 0 else [])
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
    fig.suptitle("Test images above their reconstructions\n(decoded from the posterior mean under the true label)",
                 fontsize=12)
    return fig


def analogies(inputs: torch.Tensor, input_labels: torch.Tensor, grid: torch.Tensor) -> Figure:
    """analogies.png: inputs (n, 28, 28) with their labels, each followed by its row of `grid` (n, num_classes, 28,
    28): its posterior mean decoded under every label."""
    n, num_classes, side, _ = grid.shape
    fig = new_figure("analogies.png")
    left, right = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1, num_classes], left=0.1, right=0.98,
                                                      bottom=0.02, top=0.82, wspace=0.04))
    show_grid(left, tile(inputs.unsqueeze(1)))
    left.set_yticks(tile_centres(n, side), [str(int(y)) for y in input_labels])
    left.set_ylabel("label of the input")
    left.set_xticks([tile_centres(1, side)[0]], ["input"])
    show_grid(right, tile(grid))
    right.set_yticks([])
    right.set_xticks(tile_centres(num_classes, side), [str(c) for c in range(num_classes)])
    right.set_xlabel("decoded under label", labelpad=4)
    for ax in (left, right):
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.tick_params(length=0)
    fig.suptitle("One handwriting style, ten digits\neach row: z = posterior mean of the test image on the left, "
                 "decoded under every label", fontsize=12)
    return fig


def first_of_each_digit(labels: torch.Tensor, num_classes: int, block: int = 0) -> torch.Tensor:
    """The index of the (block + 1)-th image of every digit, digit 0's first: (num_classes,). reconstructions.png
    shows these."""
    return torch.stack([torch.nonzero(labels == c)[block, 0] for c in range(num_classes)])


def read_training_log(run_dir: str | Path, names: Sequence[str]) -> dict[str, dict[int, float]]:
    """The per-epoch values of the columns `names` (e.g. "train_recon") in RUN_DIR/logs/version_*/metrics.csv, as
    {name: {epoch: value}}; empty when the run has no log.

    Every train.py process logs to a new version. A version whose first epoch is 0 starts a run, and replaces what the
    versions before it hold; a later one is that run resumed and continues it (its values win for an epoch logged
    twice: one logged after the last checkpoint of a killed process and trained again), so a resumed run gives one
    continuous curve."""
    versions = {p: p.parent.name.removeprefix("version_") for p in Path(run_dir).glob("logs/version_*/metrics.csv")}
    curves: dict[str, dict[int, float]] = {}
    for path in sorted((p for p, n in versions.items() if n.isdigit()), key=lambda p: int(versions[p])):
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if any(row.get(name) for name in names)]
        if rows and min(int(row["epoch"]) for row in rows) == 0:
            curves = {}
        for row in rows:
            for name in names:
                if row.get(name):
                    curves.setdefault(name, {})[int(row["epoch"])] = float(row[name])
    return curves


def training_curves(curves: dict[str, dict[int, float]], warmup_epochs: float, run_name: str) -> Figure:
    """training_curves.png: reconstruction and KL per epoch ({"train_recon": {epoch: value}, ...}: train and
    validation), with the KL warm-up shaded. An epoch's point sits at its end (epoch 1 at x = 1); training values are
    means over the epoch, with dropout on, validation values are measured after it, with dropout off."""
    fig = new_figure("training_curves.png")
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.13, top=0.82, wspace=0.2))
    titles = {"recon": "reconstruction (summed squared error per image)", "kl": "KL(q(z|x,y) || N(0, I)), nats"}
    for ax, (term, title) in zip(axes, titles.items()):
        if warmup_epochs > 0:
            ax.axvspan(0, warmup_epochs, color="tab:orange", alpha=0.15, lw=0,
                       label=f"KL warm-up: beta 0 -> 1 over {warmup_epochs:g} epochs")
        for stage, style, name in (("train", "-o", "train"), ("val", "--s", "validation")):
            points = sorted(curves.get(f"{stage}_{term}", {}).items())
            if points:
                epochs, values = zip(*points)
                ax.plot([e + 1 for e in epochs], values, style, ms=4, label=name)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"Training curves of {run_name}: epoch means (training with dropout, validation without)",
                 fontsize=13)
    return fig


# ----- bench/sweep.py's figures -------------------------------------------------------------------------------------
def beta_colours(betas: Sequence[float]) -> dict[float, Any]:
    cmap = colormaps["viridis"]
    return {b: cmap(i / max(1, len(betas) - 1)) for i, b in enumerate(sorted(betas))}


def rate_distortion(runs: Sequence[dict[str, Any]], default_epochs: int) -> Figure:
    """rate_distortion.png: each run's rate ("kl") against its distortion ("recon"), coloured by its "kl_weight",
    marked by its "latent_dim", sized by its "epochs" (relative to default_epochs), with dashed lines of equal
    -ELBO = distortion + rate (Alemi et al. 2018, "Fixing a Broken ELBO")."""
    fig = new_figure((8.0, 6.5))
    ax = fig.add_axes((0.1, 0.1, 0.86, 0.8))
    colours = beta_colours(sorted({run["kl_weight"] for run in runs}))
    markers = {2: "o", 4: "s", 8: "^", 16: "D"}
    for run in runs:
        ax.scatter(run["recon"], run["kl"], color=colours[run["kl_weight"]], marker=markers.get(run["latent_dim"], "P"),
                   s=30 * run["epochs"] / default_epochs, edgecolors="0.2", linewidths=0.5, zorder=3)
    for b, colour in colours.items():
        ax.scatter([], [], color=colour, label=f"β = {b:g}")
    for d in sorted({run["latent_dim"] for run in runs}):
        ax.scatter([], [], color="white", edgecolors="0.2", marker=markers.get(d, "P"), label=f"z size {d}")
    x_lim, y_lim = ax.get_xlim(), ax.get_ylim()
    sums = [run["recon"] + run["kl"] for run in runs]
    for total in MaxNLocator(6).tick_values(min(sums), max(sums)):  # distortion + rate = total
        ax.plot([total - y_lim[0], total - y_lim[1]], y_lim, "--", color="0.6", lw=0.8, zorder=1)
        x, y = total - y_lim[0], y_lim[0]  # label it where it leaves the plot: the bottom edge, else the right one
        if x > x_lim[1]:
            x, y = x_lim[1], total - x_lim[1]
        ax.annotate(f"{total:g}", (x, y), xytext=(-2, 2), textcoords="offset points", fontsize=8, color="0.4",
                    ha="right", va="bottom", annotation_clip=True)
    ax.set_xlim(x_lim)
    ax.set_ylim(y_lim)
    ax.set_xlabel("distortion: summed squared error per test image (one z draw)")
    ax.set_ylabel("rate: KL(q(z|x,y) || N(0, I)) per test image, nats")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.grid(alpha=0.3)
    fig.suptitle("Rate against distortion, one point per run (larger markers: longer training)\n"
                 "dashed: equal −ELBO = distortion + rate, its value at the line's end", fontsize=11)
    return fig


def against_beta(betas: Sequence[float], panels: dict[str, list[list[float]]], title: str) -> Figure:
    """beta_metrics.png: one panel per entry of `panels` ({title: one list of values per beta, a value per seed}):
    the median over seeds joined by a line, every seed a dot, the bar from the smallest to the largest."""
    fig = new_figure((10.0, 7.0))
    axes = fig.subplots(2, 2, gridspec_kw=dict(left=0.08, right=0.98, bottom=0.08, top=0.88, wspace=0.22,
                                               hspace=0.35))
    for ax, (panel, values) in zip(axes.flat, panels.items()):
        medians = [statistics.median(v) for v in values]
        ax.errorbar(betas, medians, yerr=[[m - min(v) for m, v in zip(medians, values)],
                                          [max(v) - m for m, v in zip(medians, values)]],
                    fmt="-o", capsize=3, color="tab:blue", zorder=2)
        for b, v in zip(betas, values):
            ax.scatter([b] * len(v), v, s=8, color="0.5", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.minorticks_off()
        ax.set_xlabel("β (KL weight)")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig


def rows_of_samples(images: torch.Tensor, row_names: Sequence[str], title: str) -> Figure:
    """beta_samples.png: one row of images (rows, per_row, 28, 28) per name, columns labelled by digit (i % 10)."""
    rows, per_row, side, _ = images.shape
    height = 0.8 + 0.75 * rows  # inches: title and labels, then a row each
    fig = new_figure((8.0, height))
    ax = fig.add_axes((0.12, 0.02, 0.86, 0.75 * rows / height))
    show_grid(ax, tile(images))
    ax.set_yticks(tile_centres(rows, side), list(row_names))
    ax.set_xticks(tile_centres(per_row, side), [str(c % 10) for c in range(per_row)])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    fig.suptitle(title, fontsize=10)
    return fig
