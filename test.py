"""Judge a trained CVAE on the MNIST test set and draw the figures people look at.

    python test.py                                   # cvae.ckpt (and its run, runs/cvae) -> results/
    python test.py --ckpt runs/a.ckpt --run-dir runs/a --out-dir results/a --device cuda

Writes into --out-dir: metrics.json, samples.png, manifold.png, latent_scatter.png, reconstructions.png, analogies.png
and training_curves.png (from the run's metrics.csv), and prints the metrics as a report. It loads the checkpoint,
runs the model once (metrics.model_outputs: the test set, the samples and the decodes the figures show), computes every
number from those outputs (metrics.evaluate; how each is computed is documented there), prints them (report.py) and
draws the figures from the same outputs (figures.py), without running the model again.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import figures
import metrics
from checkpoint import CheckpointError
from classifier import JUDGE_FILE, load_judge
from cli import DEFAULT_CKPT, DEFAULT_RUN_DIR, ArgParser, UsageError, bounded, check_output_file, fail, parse_device
from dataset import DEFAULT_DATA_DIR, DataError, load_test_set, prepare_mnist
from latent import latent_name
from model import load_cvae, metric_names
from report import report


def build_parser() -> ArgParser:
    p = ArgParser(description="Evaluate a trained CVAE on the MNIST test set and write figures and metrics.json.")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint written by train.py")
    p.add_argument("--out-dir", type=Path, default=Path("results"), help="where the figures and metrics.json go")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where MNIST is (or is written)")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seed for samples and the test ELBO's z draws")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    # One thread by default: the batches here are small, and on a shared machine two torch threads wait on each other
    # (bench/README.md).
    p.add_argument("--num-threads", type=bounded(int, 1), default=1, help="CPU threads for torch")
    p.add_argument("--samples-per-digit", type=bounded(int, 2), default=1_000,
                   help="prior samples per digit for conditional accuracy and FID")
    p.add_argument("--manifold-steps", type=bounded(int, 2, 50), default=metrics.MANIFOLD_STEPS, help="grid size of each manifold panel")
    p.add_argument("--iw-samples", type=bounded(int, 1, 10_000), default=metrics.IW_SAMPLES,
                   help="samples of z per test image for the importance-weighted likelihood bound")
    p.add_argument("--classify-per-digit", type=bounded(int, 1), default=metrics.CLASSIFY_PER_DIGIT,
                   help="test images per digit (a seeded, class-balanced subset) whose log p(x|y) is bounded under "
                        "every label: the CVAE classifies them by argmax_y, and -log p(x) sums over y")
    p.add_argument("--classify-iw-samples", type=bounded(int, 1, 10_000), default=metrics.CLASSIFY_IW_SAMPLES,
                   help="samples of z for the importance-weighted bound on each of those log p(x|y)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help="train.py's --run-dir of this checkpoint, for training_curves.png")
    p.add_argument("--judge", type=Path, default=None,
                   help="digit classifier weights for FID and accuracy (default: the shipped weights/digit_cnn.pt, "
                        "checked against its recorded hash)")
    return p


def draw_figures(outputs: metrics.Outputs, out_dir: Path, seed: int, prior: str, curves: dict,
                 kl_warmup_epochs: float, run_name: str) -> list[Path]:
    """Write the figures into out_dir, each drawn from the evaluation's outputs (the model is not run here); `prior`
    is the samples' prior in words; training_curves.png from `curves` (the run's log), when it has any."""
    decodes, dims, latent_dim = outputs.decodes, outputs.decodes.dims, outputs.means.shape[1]
    num_classes = len(decodes.sample_grid)  # a row of samples per digit
    names = [latent_name(i, latent_dim) for i in dims]
    pairs = torch.stack([figures.first_of_each_digit(outputs.labels, num_classes, block) for block in (0, 1)])
    shown = len(decodes.analogies)  # analogies.png's rows: the first test images
    drawn = {
        "samples.png": figures.samples(decodes.sample_grid, seed, prior),
        "manifold.png": figures.manifold(decodes.manifold, decodes.manifold_values, names, latent_dim,
                                         metrics.MANIFOLD_QUANTILES),
        "latent_scatter.png": figures.latent_scatter(outputs.means[:, list(dims)], outputs.labels, names, latent_dim),
        "reconstructions.png": figures.reconstructions(outputs.images[pairs, 0], outputs.reconstructions[pairs, 0]),
        "analogies.png": figures.analogies(outputs.images[:shown, 0], outputs.labels[:shown], decodes.analogies),
    }
    if curves:
        drawn["training_curves.png"] = figures.training_curves(curves, kl_warmup_epochs, run_name)
    return [figures.save(fig, out_dir / name) for name, fig in drawn.items()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.num_threads)
    try:
        device = parse_device(args.device)
        check_output_file(args.out_dir / "metrics.json", "out dir")
        # Load on the CPU, then move: the fitted prior stays on the CPU, where its sampler's generator lives.
        model = load_cvae(args.ckpt, map_location="cpu").to(device)
        judge, judge_sha256 = load_judge(args.judge, device=device)
        source = prepare_mnist(args.data_dir)
        images, labels = load_test_set(args.data_dir)
    except UsageError as err:
        fail(str(err), code=2)
    except (CheckpointError, DataError) as err:
        fail(str(err))
    if source != "existing files":
        print(f"MNIST written to {args.data_dir} from {source}")
    print(f"Device: {device}; checkpoint {args.ckpt} (latent_dim {model.hparams.latent_dim}, samples from "
          f"{model.describe_prior()})", flush=True)

    outputs = metrics.model_outputs(model, judge, images, labels, args.samples_per_digit, args.seed,
                                    args.manifold_steps)
    numbers = {"checkpoint": str(args.ckpt), "judge": {"weights": str(args.judge or JUDGE_FILE), "sha256": judge_sha256},
               **metrics.evaluate(model, outputs, args.seed, args.iw_samples, args.classify_per_digit,
                                  args.classify_iw_samples)}
    print(report(numbers))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    curves = figures.read_training_log(args.run_dir, metric_names("train", "val"))
    if not curves:
        print(f"No training log in {args.run_dir} (logs/version_*/metrics.csv); training_curves.png not written "
              f"(pass the run's --run-dir)")
    written = draw_figures(outputs, args.out_dir, args.seed, model.describe_prior(), curves,
                           model.hparams.kl_warmup_epochs, str(args.run_dir))
    metrics_path = args.out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"\nWrote {', '.join(p.name for p in written)} and {metrics_path.name} to {args.out_dir}/ "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
