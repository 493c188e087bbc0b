"""What beta, the size of z, training length and the decoder's likelihood do: a grid of training runs, each judged as
test.py judges.

    python bench/sweep.py                               # the whole grid on seeds 0 1 2 -> runs/sweep/
    python bench/sweep.py --grid beta --jobs 2          # only the beta cells, two runs at a time
    python bench/sweep.py --print-commands > jobs.txt   # the train.py commands, one per line, for a scheduler
                                                        # (run them in the repo's root); then a plain
                                                        # `python bench/sweep.py` judges the checkpoints they wrote
    python bench/sweep.py --grid beta --seeds 0 1 2 3   # adds seed 3 to the beta cells; reports on those runs
    python bench/sweep.py --grid beta --seeds 0 1 2 3 --betas 0.5 1    # ... to two of them
    python bench/sweep.py --report-only                 # the table and figures from results.csv, no training
    python bench/sweep.py --refit-priors --grid z       # refit every sampling prior to the z grid's checkpoints

The grid (GRIDS): beta 0.25 ... 2 at z size 2 and 10 epochs; z size 2, 4, 8, 16 at beta 1; 10, 20 and 40 epochs at
beta 1; the Bernoulli decoder at z 2 and 40, with dropout 0.25 and none (`--grid likelihood`; its rows are the
Bernoulli decoder's nats, not squared errors, so the rate-distortion figure leaves them out); one-cycle and cosine
learning-rate schedules at 1e-3 and 3e-3 (`--grid schedule`); the importance-weighted objective with K = 1, 5 and 20
samples of z per image, Bernoulli at z 40 without dropout (`--grid importance`). A run is one plain `python train.py
--kl-weight B --latent-dim D --epochs E [--likelihood L] [--dropout P] [--lr-schedule S --lr R]
[--importance-samples K] --seed S ...` (the default
recipe otherwise: KL warm-up, fitted prior), then metrics.evaluate() on its checkpoint. Each run adds a row to
OUT_DIR/results.csv when it is judged (its cell, then report.SUMMARY's numbers; a CSV written before a number
existed reads that column as missing); a run already there is skipped, so an interrupted sweep continues where it
stopped, and a run whose checkpoint exists is judged without training it again. From the CSV's rows of the chosen
grids and seeds (write_report): sweep.md, the medians and ranges per cell, and three figures (figures.py):
rate_distortion.png (Alemi et al. 2018), beta_metrics.png and beta_samples.png. --refit-priors refits the sampling
priors of bench/seeds.py's PRIOR_VARIANTS to trained runs, no training, into priors.csv and priors.md.
"""
from __future__ import annotations

import csv
import io
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules
sys.path.insert(1, str(ROOT / "bench"))

# After the path:
import figures  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from classifier import load_judge  # noqa: E402
from cli import ArgParser, bounded  # noqa: E402
from dataset import DEFAULT_DATA_DIR, load_test_set  # noqa: E402
from metrics import CLASSIFY_IW_SAMPLES, CLASSIFY_PER_DIGIT, IW_SAMPLES, model_outputs  # noqa: E402
from model import load_cvae  # noqa: E402
from report import SUMMARY, summary  # noqa: E402
from seeds import (PRIOR_HEADER, PRIOR_VARIANTS, RUN_COLUMNS, judge_checkpoint, prior_markdown,  # noqa: E402
                   refit_priors, row_header, row_markdown, train, train_command)


class Cell(NamedTuple):
    """One recipe of the grid; each runs on every seed."""

    kl_weight: float
    latent_dim: int
    epochs: int
    likelihood: str = "gaussian"
    dropout: float = 0.25
    lr_schedule: str = "constant"
    lr: float = 1e-3
    importance_samples: int = 1


DEFAULT = Cell(1.0, 2, 10)  # train.py's defaults; each grid varies some of these
BERNOULLI = DEFAULT._replace(likelihood="bernoulli")
# The settings a cell names only when they differ from DEFAULT: (train.py's flag, how the run's name shows the value).
OPTIONAL = {"likelihood": ("--likelihood", "-{}"), "dropout": ("--dropout", "-dropout{:g}"),
            "lr_schedule": ("--lr-schedule", "-{}"), "lr": ("--lr", "-lr{:g}"),
            "importance_samples": ("--importance-samples", "-iw{}")}
GRIDS = {
    "beta": [DEFAULT._replace(kl_weight=b) for b in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)],
    "z": [DEFAULT._replace(latent_dim=d) for d in (2, 4, 8, 16)],
    "epochs": [DEFAULT._replace(epochs=e) for e in (10, 20, 40)],
    # The Bernoulli decoder at the seed's z and the papers' (40), with and without dropout (the papers have none).
    "likelihood": [BERNOULLI._replace(latent_dim=d, dropout=p) for d in (2, 40) for p in (0.25, 0.0)],
    # The learning rate over a run: one-cycle and cosine peaking at 3e-3 over 10 and 20 epochs, and at the default
    # 1e-3 over 10.
    "schedule": [DEFAULT._replace(lr_schedule=schedule, lr=3e-3, epochs=epochs) for epochs in (10, 20)
                 for schedule in ("one-cycle", "cosine")]
    + [DEFAULT._replace(lr_schedule=schedule) for schedule in ("one-cycle", "cosine")],
    # The training objective: K samples of z per image in the importance-weighted bound (K = 1: the ELBO), on the
    # papers' Bernoulli z 40 without dropout.
    "importance": [BERNOULLI._replace(latent_dim=40, dropout=0.0, importance_samples=k) for k in (1, 5, 20)],
}
# The CSV: the cell, the seed and its train.py time, report.SUMMARY's numbers (a list space-separated), the checkpoint
# and any extra flags; K, a cell's setting and a seed row's column, once.
FIELDS = tuple(dict.fromkeys(("name", *Cell._fields, *(key for key, _ in RUN_COLUMNS),
                              *(entry.key for entry in SUMMARY), "ckpt", "train_args")))
# priors.csv (--refit-priors): a refitted sampling prior of a run, once per sample seed (bench/seeds.py refit_priors).
PRIOR_FIELDS = ("name", *Cell._fields, "seed", "prior", "sample_seed", "accuracy", "fid", "recon_accuracy",
                "recon_fid", "fit_s")
SAMPLE_SEEDS = (0, 1)  # two draws of samples per prior: a difference smaller than theirs is a tie
KINDS = {"name": str, **{name: type(value) for name, value in DEFAULT._asdict().items()}, "seed": int,
         "train_s": float, **{entry.key: entry.kind for entry in SUMMARY}, "ckpt": str, "train_args": str,
         "prior": str, "sample_seed": int, "fit_s": float}
SAMPLE_SEED = 0  # the codes beta_samples.png decodes under every beta


class Run(NamedTuple):
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        """e.g. beta1-z2-e10-seed0; the OPTIONAL settings are named where they differ from the default, e.g.
        beta1-z2-e10-one-cycle-lr0.003-seed0."""
        b, d, e = self.cell[:3]
        named = "".join(suffix.format(getattr(self.cell, field)) for field, (_, suffix) in OPTIONAL.items()
                        if getattr(self.cell, field) != getattr(DEFAULT, field))
        return f"beta{b:g}-z{d}-e{e}{named}-seed{self.seed}"


def grid_runs(grids: list[str], seeds: list[int], betas: list[float] | None = None) -> list[Run]:
    """Every run of the chosen grids, each cell once (the default cell is in all three), cell by cell; only the cells
    whose beta is in `betas`, when given."""
    cells = dict.fromkeys(cell for grid in grids for cell in GRIDS[grid] if betas is None or cell.kl_weight in betas)
    return [Run(cell, seed) for cell in cells for seed in seeds]


def paths(run: Run, out_dir: Path) -> tuple[Path, Path, Path]:
    """(final checkpoint, train.py's --run-dir, the log of its output) of a run."""
    return out_dir / "ckpts" / f"{run.name}.ckpt", out_dir / "runs" / run.name, out_dir / "logs" / f"{run.name}.log"


def command(run: Run, args) -> list[str]:
    """The train.py command of a run."""
    ckpt, run_dir, _ = paths(run, args.out_dir)
    b, d, e = run.cell[:3]
    flags = ["--kl-weight", f"{b:g}", "--latent-dim", str(d), "--epochs", str(e)]
    for field, (flag, _) in OPTIONAL.items():
        if getattr(run.cell, field) != getattr(DEFAULT, field):
            value = getattr(run.cell, field)
            flags += [flag, value if isinstance(value, str) else f"{value:g}"]
    return train_command(ckpt, run_dir, [*flags, "--seed", str(run.seed), "--data-dir", str(args.data_dir),
                                         "--num-threads", str(args.num_threads), *shlex.split(args.train_args)])


# ----- running ------------------------------------------------------------------------------------------------------
def run_one(run: Run, args, judge, test_set) -> dict[str, Any]:
    """Train a run (unless its checkpoint exists) and judge it: its CSV row."""
    ckpt, _, log = paths(run, args.out_dir)
    train_s = math.nan if ckpt.is_file() else train(command(run, args), log)
    numbers, _ = judge_checkpoint(load_cvae(ckpt), judge, test_set, args.samples_per_digit,
                                  iw_samples=args.iw_samples, classify_per_digit=args.classify_per_digit,
                                  classify_iw_samples=args.classify_iw_samples)
    return {"name": run.name, **run.cell._asdict(), "seed": run.seed, "train_s": train_s, **summary(numbers),
            "ckpt": str(ckpt), "train_args": args.train_args}


def to_text(value: Any) -> str:
    """A value as the CSV holds it: a list space-separated."""
    return " ".join(f"{v:.4f}" for v in value) if isinstance(value, list) else "" if value is None else str(value)


def from_text(kind: type, text: str) -> Any:
    """The CSV's text read back as `kind`; an empty cell (a column the run's row did not have) is NaN or None."""
    if text == "":
        return math.nan if kind is float else None
    if kind is list:
        return [float(v) for v in text.split()]
    return kind(text)


def append_row(path: Path, row: dict[str, Any], fields: tuple[str, ...] = FIELDS) -> None:
    """Add a row to the CSV of `fields` (results.csv's by default), rewriting it whole (atomically: a crash leaves the
    old file or the new one). A CSV written before a column existed gets that column at the end, empty in its old
    rows, so no column shifts under its header."""
    rows, header = [], list(fields)
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
        header += [name for name in fields if name not in header]
    rows.append({name: to_text(row.get(name)) for name in header})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def read_results(path: Path, fields: tuple[str, ...] = FIELDS) -> list[dict[str, Any]]:
    """The CSV's rows with numbers as numbers (by KINDS; a column the code no longer knows stays text); none when
    there is no CSV yet. A column the CSV lacks reads as missing in every row, a cell setting as its default."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [{name: from_text(KINDS.get(name, str), row.get(name) or "") for name in dict.fromkeys([*fields, *row])}
            for row in rows]
    for row in rows:  # a cell setting newer than the CSV had its default in every run of it
        for name, default in DEFAULT._asdict().items():
            if row[name] is None or row[name] != row[name]:  # None, or NaN
                row[name] = default
    return rows


def run_grid(runs: list[Run], args) -> int:
    """Train and judge `runs`, args.jobs at a time, appending each row to the CSV as it comes; returns how many
    failed (their train.py logs say why)."""
    for folder in ("ckpts", "runs", "logs"):
        (args.out_dir / folder).mkdir(parents=True, exist_ok=True)
    judge, _ = load_judge()
    test_set = load_test_set(args.data_dir) if runs else None
    failed = 0
    # Threads suffice: training runs in its own process and evaluation in torch, which releases the GIL.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, run, args, judge, test_set): run for run in runs}
        for future in as_completed(futures):
            run = futures[future]
            try:
                row = future.result()
            except subprocess.CalledProcessError:
                failed += 1
                print(f"{run.name}: train.py failed, see {paths(run, args.out_dir)[2]}", file=sys.stderr)
                continue
            append_row(args.out_dir / "results.csv", row)
            print(f"{run.name}: KL {row['kl']:.2f}, distortion {row['recon']:.2f}, "
                  f"cond. acc. {100 * row['accuracy']:.2f}%, FID {row['fid']:.1f}", flush=True)
    return failed


def refit_run(run: Run, args, judge, test_set) -> list[dict[str, Any]]:
    """The priors.csv rows of one trained run: every PRIOR_VARIANTS density refitted to its training codes and judged
    with SAMPLE_SEEDS, no retraining."""
    model = load_cvae(paths(run, args.out_dir)[0])
    outputs = model_outputs(model, judge, *test_set, samples_per_digit=2)  # the test set's side, computed once
    rows = refit_priors(model, outputs, run.seed, args.data_dir, judge, args.samples_per_digit, PRIOR_VARIANTS,
                        SAMPLE_SEEDS)
    return [{"name": run.name, **run.cell._asdict(), **row} for row in rows]


def refit_grid(runs: list[Run], args) -> int:
    """--refit-priors: refit_run for each of `runs` with a checkpoint and no rows in priors.csv yet, appending its rows
    as they come; returns how many runs were refitted."""
    path = args.out_dir / "priors.csv"
    done = {row["name"] for row in read_results(path, PRIOR_FIELDS)}
    todo = [run for run in runs if run.name not in done and paths(run, args.out_dir)[0].is_file()]
    print(f"{len(todo)} runs to refit, {len(done)} in {path}", flush=True)
    judge, _ = load_judge()
    test_set = load_test_set(args.data_dir) if todo else None
    for run in todo:
        for row in refit_run(run, args, judge, test_set):
            append_row(path, row, PRIOR_FIELDS)
        print(f"{run.name}: refitted {len(PRIOR_VARIANTS)} priors", flush=True)
    return len(todo)


def write_prior_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """priors.md: per cell and prior, over its seeds, how far the samples lie from the reconstructions, the marks a
    prior aims for: the sample FID over the reconstruction FID (median, and the worst seed's), the conditional accuracy
    less the reconstructions' accuracy (median, worst), and the spread between the two sample seeds' FIDs (median, as
    a share of the reconstruction FID: a smaller difference is a tie); then every row."""
    lines = [f"{CELL_HEADER} prior | seeds | FID gap, median (worst) | accuracy − recon acc., median (worst) "
             "| sample-seed spread | fit (s) |", "|" + "---|" * (CELL_COLUMNS + 6)]
    order = list(PRIOR_VARIANTS)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell, cell_rows in cells_of(rows).items():
        for row in sorted(cell_rows, key=lambda row: order.index(row["prior"])):
            groups.setdefault((cell, row["prior"]), []).append(row)
    for (cell, prior), group in groups.items():
        per_seed: dict[int, list[dict]] = {}
        for row in group:
            per_seed.setdefault(row["seed"], []).append(row)
        gaps = [statistics.mean(r["fid"] / r["recon_fid"] - 1 for r in rs) for rs in per_seed.values()]
        margins = [statistics.mean(r["accuracy"] - r["recon_accuracy"] for r in rs) for rs in per_seed.values()]
        spreads = [(max(r["fid"] for r in rs) - min(r["fid"] for r in rs)) / rs[0]["recon_fid"]
                   for rs in per_seed.values()]
        lines.append(f"{cell_columns(cell)} {prior} | {len(per_seed)} "
                     f"| {100 * statistics.median(gaps):+.1f}% ({100 * max(gaps):+.1f}%) "
                     f"| {100 * statistics.median(margins):+.2f} ({100 * min(margins):+.2f}) "
                     f"| {100 * statistics.median(spreads):.1f}% "
                     f"| {statistics.median(r['fit_s'] for r in group):.1f} |")
    header, rule = PRIOR_HEADER.splitlines()
    lines += ["", "| run " + header, "|---" + rule] + [f"| {row['name']} " + prior_markdown(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----- the report ---------------------------------------------------------------------------------------------------
def cells_of(rows: list[dict[str, Any]]) -> dict[Cell, list[dict[str, Any]]]:
    """The rows grouped by cell, in the grid's order: the Gaussian beta cells, then wider z, then longer training;
    then the Bernoulli cells, dropout before none."""
    groups: dict[Cell, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(Cell(*(row[name] for name in Cell._fields)), []).append(row)
    return dict(sorted(groups.items(), key=lambda item: (item[0].likelihood != "gaussian",
                                                         item[0].lr_schedule != "constant", item[0].epochs,
                                                         item[0].latent_dim, item[0].kl_weight, -item[0].dropout,
                                                         item[0].lr_schedule, item[0].lr)))


# A cell's settings, the first columns of sweep.md and priors.md.
CELL_HEADER = "| β | z | epochs | decoder | dropout | lr schedule | lr | K |"
CELL_COLUMNS = CELL_HEADER.count("|") - 1


def cell_columns(cell: Cell) -> str:
    return (f"| {cell.kl_weight:g} | {cell.latent_dim} | {cell.epochs} | {cell.likelihood} | {cell.dropout:g} "
            f"| {cell.lr_schedule} | {cell.lr:g} | {cell.importance_samples} |")


def spread(values: list[float], fmt: str, scale: float = 1.0) -> str:
    """'median (min–max)' of the values over seeds; NaN (a train time not measured, a number the run's row lacks)
    left out."""
    v = [scale * x for x in values if x is not None and not math.isnan(x)]
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})" if v else "–"


# The table of medians: report.SUMMARY's entries marked `median`, then the train.py time.
MEDIAN_COLUMNS = [(f"{e.header or e.label}{' (%)' if e.unit == '%' else ''}", e.key, e.fmt, e.scale)
                  for e in SUMMARY if e.median] + [("train.py (s)", "train_s", ".0f", 1)]


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """sweep.md: per cell, the median over its seeds and (in brackets) the smallest and largest value; then every
    run, cell by cell, one row per seed as seeds.py prints it."""
    lines = [f"{CELL_HEADER} seeds | " + " | ".join(name for name, *_ in MEDIAN_COLUMNS) + " |",
             "|" + "---|" * (CELL_COLUMNS + 1 + len(MEDIAN_COLUMNS))]
    groups = cells_of(rows)
    for cell, group in groups.items():
        values = " | ".join(spread([row[key] for row in group], fmt, scale) for _, key, fmt, scale in MEDIAN_COLUMNS)
        lines.append(f"{cell_columns(cell)} {len(group)} | {values} |")
    for cell, group in groups.items():
        lines += ["", f"β {cell.kl_weight:g}, z size {cell.latent_dim}, {cell.epochs} epochs, {cell.likelihood} "
                      f"decoder, dropout {cell.dropout:g}, {cell.lr_schedule} learning rate {cell.lr:g}:", "",
                  row_header()]
        lines += [row_markdown(row) for row in sorted(group, key=lambda row: row["seed"])]
    path.write_text("\n".join(lines) + "\n")
    return path


BETA_PANELS = (  # CSV field, title, scale
    ("fid", "sample FID (lower is better)", 1),
    ("accuracy", "conditional accuracy of samples (%)", 100),
    ("class_accuracy", "accuracy as a classifier, argmax_y log p(x|y) (%)", 100),
    ("iw_bound", "importance-weighted bound on −log p(x|y)", 1),
)


def gaussian_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose distortion is a summed squared error (the Gaussian decoder): the rate-distortion plane's."""
    return [row for row in rows if row["likelihood"] == "gaussian"]


def beta_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the beta grid: every setting but beta at its default."""
    fixed = [field for field in Cell._fields if field != "kl_weight"]
    return [row for row in rows if all(row[field] == getattr(DEFAULT, field) for field in fixed)]


def beta_metrics(rows: list[dict[str, Any]]):
    """beta_metrics.png's data: (the betas, {panel title: per beta, the value of each seed}) for BETA_PANELS."""
    groups = {cell.kl_weight: group for cell, group in cells_of(beta_rows(rows)).items()}
    betas = sorted(groups)
    return betas, {title: [[scale * row[key] for row in groups[b]] for b in betas] for key, title, scale in BETA_PANELS}


def beta_samples(rows: list[dict[str, Any]], per_row: int = 10):
    """For every beta of the beta grid with a checkpoint on disk (its lowest seed's): digits 0, 1, ... decoded from
    the same codes z ~ N(0, I), drawn from SAMPLE_SEED. Returns (betas, images (len(betas), per_row, 28, 28))."""
    chosen = {}
    for row in sorted(beta_rows(rows), key=lambda row: row["seed"]):
        if Path(row["ckpt"]).is_file():
            chosen.setdefault(row["kl_weight"], row["ckpt"])
    betas = sorted(chosen)
    z = torch.randn(per_row, DEFAULT.latent_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    labels = torch.arange(per_row) % 10
    images = [load_cvae(chosen[b]).sample(labels, z=z)[:, 0] for b in betas]
    return betas, torch.stack(images) if images else torch.empty(0, per_row, 28, 28)


def write_report(csv_path: Path, out_dir: Path, runs: list[Run] | None = None) -> list[Path]:
    """The table and figures from a results CSV: its rows of `runs` (default: all of them); a figure with nothing to
    show is left out."""
    rows = read_results(csv_path)
    if runs is not None:
        names = {run.name for run in runs}
        rows = [row for row in rows if row["name"] in names]
    written = [write_table(rows, out_dir / "sweep.md")]
    if gaussian_rows(rows):
        written.append(figures.save(figures.rate_distortion(gaussian_rows(rows), DEFAULT.epochs),
                                    out_dir / "rate_distortion.png"))
    if beta_rows(rows):
        seeds = ", ".join(map(str, sorted({row["seed"] for row in beta_rows(rows)})))
        title = (f"What β does (z size {DEFAULT.latent_dim}, {DEFAULT.epochs} epochs): median over seeds {seeds}, "
                 f"bars from the smallest to the largest")
        written.append(figures.save(figures.against_beta(*beta_metrics(rows), title), out_dir / "beta_metrics.png"))
        betas, images = beta_samples(rows)
        if betas:
            fig = figures.rows_of_samples(images, [f"β = {b:g}" for b in betas],
                                          f"The same codes z ~ N(0, I) (seed {SAMPLE_SEED}) decoded by each β's "
                                          f"model (its lowest seed)")
            written.append(figures.save(fig, out_dir / "beta_samples.png"))
    return written


# ----- command line -------------------------------------------------------------------------------------------------
def build_parser() -> ArgParser:
    p = ArgParser(description="Train and judge a grid of recipes (beta, z size, epochs) on several seeds; write "
                              "results.csv, sweep.md and three figures.")
    p.add_argument("--grid", nargs="+", choices=list(GRIDS), default=list(GRIDS), help="which grids to run")
    p.add_argument("--seeds", type=bounded(int, 0), nargs="+", default=[0, 1, 2], help="seeds of every cell")
    p.add_argument("--betas", type=bounded(float, 0), nargs="+", default=None,
                   help="only the cells of these betas (default: all)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/sweep"),
                   help="results.csv, the report, and the runs' checkpoints, run folders and logs")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is")
    p.add_argument("--jobs", type=bounded(int, 1), default=1, help="runs trained and judged at the same time")
    p.add_argument("--num-threads", type=bounded(int, 1), default=None,
                   help="torch threads of each train.py (default: CPU cores / jobs)")
    p.add_argument("--train-args", default="",
                   help="extra flags for every train.py, e.g. \"--train-size 1000\" (kept in the CSV; give another "
                        "recipe its own --out-dir)")
    p.add_argument("--samples-per-digit", type=bounded(int, 2), default=1_000,
                   help="prior samples per digit for conditional accuracy and FID")
    p.add_argument("--iw-samples", type=bounded(int, 1), default=IW_SAMPLES,
                   help="samples of z per test image for the likelihood bound")
    p.add_argument("--classify-per-digit", type=bounded(int, 1), default=CLASSIFY_PER_DIGIT,
                   help="test images per digit the CVAE classifies")
    p.add_argument("--classify-iw-samples", type=bounded(int, 1), default=CLASSIFY_IW_SAMPLES,
                   help="samples of z for the bound on each log p(x|y) of that classifier")
    p.add_argument("--print-commands", action="store_true",
                   help="print the train.py commands of the runs not yet trained, one per line, and exit")
    p.add_argument("--report-only", action="store_true",
                   help="write the table and figures from results.csv (its runs of --grid and --seeds), and exit")
    p.add_argument("--refit-priors", action="store_true",
                   help="refit every sampling prior of bench/seeds.py's PRIOR_VARIANTS to the trained runs of --grid "
                        "and --seeds (no training), judge each with two sample seeds, and write priors.csv and "
                        "priors.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out_dir = args.out_dir.resolve()  # train.py runs in the repo's root
    args.data_dir = args.data_dir.resolve()
    args.num_threads = args.num_threads or max(1, (os.cpu_count() or 1) // args.jobs)
    csv_path = args.out_dir / "results.csv"
    runs = grid_runs(args.grid, args.seeds, args.betas)  # the report, too, covers these runs only
    if args.report_only:
        print("Wrote", ", ".join(str(p) for p in write_report(csv_path, args.out_dir, runs)))
        return 0
    if args.refit_priors:
        torch.set_num_threads(args.num_threads)  # nothing else runs beside the refits
        refit_grid(runs, args)
        names = {run.name for run in runs}
        rows = [row for row in read_results(args.out_dir / "priors.csv", PRIOR_FIELDS) if row["name"] in names]
        print("Wrote", write_prior_table(rows, args.out_dir / "priors.md"))
        return 0
    done = {row["name"] for row in read_results(csv_path)}
    todo = [run for run in runs if run.name not in done]
    if args.print_commands:
        for run in todo:
            if not paths(run, args.out_dir)[0].is_file():
                print(shlex.join(command(run, args)))
        return 0
    torch.set_num_threads(1)  # evaluation; training runs in its own processes with --num-threads each
    print(f"{len(todo)} runs to go, {len(done)} in {csv_path}; {args.jobs} at a time", flush=True)
    failed = run_grid(todo, args)
    print("Wrote", ", ".join(str(p) for p in write_report(csv_path, args.out_dir, runs)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
