"""Every option a user sets reaches what it controls: the flags of train.py, test.py and gradio_test.py, the numbers in
metrics.json, the figures and the UI's events. Each test here fails when an option is silently ignored (its default
used instead) or misapplied, not only when it crashes.

One training run sets every model and data flag to a value other than its default (RICH); one test.py run on its
checkpoint sets every test.py flag (EVAL). Both run in an empty working folder, so a flag that fell back to its
relative default (data/, cvae.ckpt, runs/cvae, results/) would leave a trace there.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import figures
import gradio_test as ui
import metrics
import train
from checkpoint import safe_torch_load
from model import load_cvae
from classifier import JUDGE_PATH, features_and_predictions, fid, load_judge, sha256_of
from dataset import load_split
from latent import informative_dims
from model import CVAE
from prior import fit_mixture
from test_gradio import assert_same_pixels, decoded, digit_picture, free_port, read_png, save_untrained

ROOT = Path(__file__).resolve().parents[1]

# ----- the training run: every model and data flag away from its default ------------------------------------------
EPOCHS, TRAIN_SIZE, VAL_SIZE, BATCH = 2, 300, 120, 60   # 5 training and 2 validation batches per epoch
LIMIT_TRAIN, LIMIT_VAL = 4, 1                           # ... of which 4 and 1 are used
LATENT, KL_WEIGHT, WARMUP, FREE_BITS, LR, SEED = 3, 0.5, 0.5, 0.3, 4e-3, 11
PRIOR, COMPONENTS = "global", 2
TRAIN_THREADS = 1
RICH = ["--epochs", str(EPOCHS), "--train-size", str(TRAIN_SIZE), "--val-size", str(VAL_SIZE),
        "--batch-size", str(BATCH), "--limit-train-batches", str(LIMIT_TRAIN), "--limit-val-batches", str(LIMIT_VAL),
        "--latent-dim", str(LATENT), "--kl-weight", str(KL_WEIGHT), "--kl-warmup-epochs", str(WARMUP),
        "--free-bits", str(FREE_BITS), "--lr", str(LR), "--seed", str(SEED), "--prior", PRIOR,
        "--prior-components", str(COMPONENTS), "--num-threads", str(TRAIN_THREADS), "--accelerator", "cpu",
        "--no-progress"]


class Probe(train.Callback):
    """Records what the run really used: the data splits, the initial weights, the thread count, the learning rate
    and, for every training step, the loss that was backpropagated with the forward pass replayed (same dropout and
    z noise) so the test can recompute that loss from the flags."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.val_batches = 0

    def on_fit_start(self, trainer, module) -> None:
        self.trainer, self.splits = trainer, trainer.datamodule.splits
        self.initial = {k: v.clone() for k, v in module.state_dict().items()}
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.rng, self.batch = torch.get_rng_state(), batch

    def on_before_backward(self, trainer, module, loss) -> None:
        after = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        with torch.no_grad():
            x, y = self.batch
            recon, mean, logvar = module(x, y)
        torch.set_rng_state(after)
        self.steps.append(dict(loss=loss.item(), x=x, recon=recon, mean=mean, logvar=logvar, step=module.global_step,
                               lr=trainer.optimizers[0].param_groups[0]["lr"]))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val_batches += 1


def leftovers(folder: Path) -> list[str]:
    """What a script left in its working folder: the relative defaults of a flag it ignored."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def rich_run(data_dir, tmp_path_factory) -> SimpleNamespace:
    """train.main with RICH, started from an empty working folder, with a Probe added to its trainer."""
    tmp = tmp_path_factory.mktemp("rich")
    work, ckpt, run_dir = tmp / "cwd", tmp / "rich.ckpt", tmp / "run"
    work.mkdir()
    probe = Probe()
    build_trainer = train.build_trainer
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(train, "build_trainer",
                   lambda args, callbacks=None: build_trainer(args, [*(callbacks or []), probe]))
        torch.set_num_threads(TRAIN_THREADS + 1)  # so that --num-threads has something to change
        try:
            code = train.main([*RICH, "--data-dir", str(data_dir), "--ckpt", str(ckpt), "--run-dir", str(run_dir)])
        finally:
            torch.set_num_threads(threads)
    assert code == 0
    return SimpleNamespace(ckpt=ckpt, run_dir=run_dir, work=work, probe=probe)


def test_train_writes_where_its_flags_say_and_nowhere_else(rich_run):
    """--ckpt, --run-dir and --data-dir ignored would write cvae.ckpt, runs/ or a fresh data/ into the working
    folder."""
    assert leftovers(rich_run.work) == []
    assert rich_run.ckpt.is_file() and train.last_checkpoint(rich_run.run_dir).is_file()
    assert (rich_run.run_dir / "logs" / "version_0" / "metrics.csv").is_file()


def test_model_flags_reach_the_checkpoint(rich_run):
    """--latent-dim, --lr, --kl-weight, --kl-warmup-epochs and --free-bits are stored with the weights (test.py and
    the UI rebuild the model from them); --latent-dim also sizes the layers."""
    saved = safe_torch_load(rich_run.ckpt)
    hp = saved["hyper_parameters"]
    assert (hp["latent_dim"], hp["lr"], hp["kl_weight"], hp["kl_warmup_epochs"], hp["free_bits"]) == \
        (LATENT, LR, KL_WEIGHT, WARMUP, FREE_BITS)
    assert saved["state_dict"]["encoder.mean.weight"].shape[0] == LATENT
    assert saved["state_dict"]["decoder.body.0.0.weight"].shape[1] == LATENT + 10


def test_epochs_batches_and_limits_shape_the_run(rich_run):
    """--epochs, --batch-size, --limit-train-batches and --limit-val-batches: the number of steps, the images per
    step and the validation batches per epoch (without the limits: 5 and 2 per epoch)."""
    probe, saved = rich_run.probe, safe_torch_load(rich_run.ckpt)
    assert (saved["epoch"], saved["global_step"]) == (EPOCHS, EPOCHS * LIMIT_TRAIN)
    assert [s["step"] for s in probe.steps] == list(range(EPOCHS * LIMIT_TRAIN))
    assert all(len(s["x"]) == BATCH for s in probe.steps)
    assert probe.val_batches == EPOCHS * LIMIT_VAL


def test_split_sizes_and_seed_reach_the_data(rich_run, data_dir):
    """--train-size, --val-size and --seed decide the split: the validation images are the first VAL_SIZE of a
    permutation drawn from the seed, the training images the first TRAIN_SIZE of the rest."""
    splits = rich_run.probe.splits
    images, labels = load_split(data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    val_idx, train_idx = order[:VAL_SIZE], order[VAL_SIZE:VAL_SIZE + TRAIN_SIZE]
    assert torch.equal(splits["val"].pixels, images[val_idx]) and torch.equal(splits["val"].labels, labels[val_idx])
    assert torch.equal(splits["train"].pixels, images[train_idx])
    assert torch.equal(splits["train"].labels, labels[train_idx])


def test_seed_reaches_the_initial_weights(rich_run):
    """--seed seeds the weights: the run started from the weights torch draws after manual_seed(SEED)."""
    torch.manual_seed(SEED)
    expected = CVAE(latent_dim=LATENT).state_dict()
    assert all(torch.equal(rich_run.probe.initial[k], v) for k, v in expected.items())


def test_lr_reaches_the_optimizer_and_threads_reach_torch(rich_run):
    probe = rich_run.probe
    assert {s["lr"] for s in probe.steps} == {LR}
    assert probe.threads == TRAIN_THREADS


def test_the_optimised_loss_uses_kl_weight_warmup_and_free_bits(rich_run):
    """The loss each step backpropagates is recon + beta(step) * sum_d max(FREE_BITS, batch-mean KL_d), with beta
    ramped to KL_WEIGHT over WARMUP epochs of LIMIT_TRAIN steps. Recomputed from the replayed forward pass; the run is
    chosen so that another beta or free-bits value would give another loss."""
    warmup_steps = WARMUP * LIMIT_TRAIN
    clamped = 0
    for s in rich_run.probe.steps:
        recon_loss = (s["recon"] - s["x"].flatten(1)).pow(2).sum(1).mean()
        kl_dims = (-0.5 * (1 + s["logvar"] - s["mean"].pow(2) - s["logvar"].exp())).mean(0)  # (latent,)
        beta = KL_WEIGHT * min(1.0, (s["step"] + 1) / warmup_steps)
        expected = recon_loss + beta * kl_dims.clamp(min=FREE_BITS).sum()
        assert s["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-4), s["step"]
        clamped += bool((kl_dims < FREE_BITS).any() and beta * (FREE_BITS - kl_dims).clamp(min=0).sum() > 1e-2)
    assert clamped > 0, "no step where free bits changed the loss: the check could not fail"
    assert rich_run.probe.steps[0]["step"] + 1 < warmup_steps  # the first step is inside the warm-up


def test_prior_kind_components_and_seed_reach_the_fitted_prior(rich_run):
    """--prior global --prior-components 2 gives one mixture of two Gaussians, fitted by EM with random_state=SEED to
    the posterior means of the training split."""
    model = load_cvae(rich_run.ckpt)
    prior = model.fitted_prior
    assert prior["kind"] == PRIOR and prior["weights"].shape == (1, COMPONENTS)
    assert prior["means"].shape == (1, COMPONENTS, LATENT)
    train_set = rich_run.probe.splits["train"]
    z = model.posterior_means(train_set.pixels, train_set.labels)
    expected = fit_mixture(z, train_set.labels, 10, PRIOR, COMPONENTS, seed=SEED)
    for name in ("weights", "means", "scale_tril"):
        torch.testing.assert_close(prior[name], expected[name], rtol=1e-4, atol=1e-5)


def test_prior_none_fits_no_prior(short_run):
    """short_run trains with --prior none: its checkpoint has no fitted prior (a prior fitted anyway would be used
    by test.py and the UI for sampling)."""
    assert "fitted_prior" not in safe_torch_load(short_run / "short.ckpt")
    assert load_cvae(short_run / "short.ckpt").fitted_prior is None


def test_sample_grid_uses_the_runs_seed(rich_run):
    """The TensorBoard grid decodes z drawn from --seed (test_core checks the default seed, where 0 would pass)."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.utils import make_grid

    events = EventAccumulator(str(rich_run.run_dir / "logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("samples_by_digit")
    assert len(grids) == EPOCHS
    logged = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("L"), dtype=np.float32)
    model = load_cvae(rich_run.ckpt)
    z = torch.randn(100, LATENT, generator=torch.Generator().manual_seed(SEED))
    expected = make_grid(model.sample(torch.arange(10).repeat_interleave(10), z=z), nrow=10, padding=2, pad_value=1)
    assert np.abs(logged - expected[0].numpy() * 255).max() <= 1.0


def test_no_progress_hides_the_bar_and_its_absence_shows_it(rich_run, tmp_path):
    assert rich_run.probe.trainer.progress_bar_callback is None
    args = train.parse_args(["--ckpt", str(tmp_path / "c.ckpt"), "--run-dir", str(tmp_path / "run"),
                             "--data-dir", str(tmp_path / "data")])  # a read-only checkout has no room for data/
    bar = train.build_trainer(args).progress_bar_callback
    assert isinstance(bar, train.TQDMProgressBar) and bar.refresh_rate == 50


def test_hardware_flags_reach_the_trainer(tmp_path):
    """--accelerator, --devices, --strategy, --num-nodes and --precision configure Lightning's Trainer (built, not
    started: no processes)."""
    from pytorch_lightning.accelerators import CPUAccelerator
    from pytorch_lightning.strategies import DDPStrategy

    args = train.parse_args(["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn", "--num-nodes", "2",
                             "--precision", "bf16-mixed", "--ckpt", str(tmp_path / "c.ckpt"),
                             "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")])
    trainer = train.build_trainer(args)
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert (trainer.num_devices, trainer.num_nodes, trainer.precision) == (2, 2, "bf16-mixed")
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._start_method == "spawn"


# ----- test.py: every flag, every number, every figure ---------------------------------------------------------------
EVAL_SEED, PER_DIGIT, STEPS, IW_K, EVAL_THREADS = 5, 4, 3, 3, 2
# test.py reads the whole test set; here it gets the first TEST_IMAGES of it (two of every digit are among them, as the
# reconstructions figure needs), which keeps this run to seconds.
TEST_IMAGES = 1_000
PIXELS = 28 * 28


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"options_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluation():
    return load_script("test")


@pytest.fixture(scope="module")
def other_judge(tmp_path_factory) -> Path:
    """The shipped judge with its first convolution scaled: other features, so other FIDs."""
    saved = safe_torch_load(JUDGE_PATH)
    saved["state_dict"]["conv.0.weight"] *= 1.5
    path = tmp_path_factory.mktemp("judge") / "other_judge.pt"
    torch.save(saved, path)
    return path


@pytest.fixture(scope="module")
def evaluated(rich_run, evaluation, other_judge, data_dir, tmp_path_factory) -> SimpleNamespace:
    """test.main on the rich checkpoint with every flag set, from an empty working folder; every figure saved and the
    pictures it shows are kept, by file name."""
    tmp = tmp_path_factory.mktemp("eval")
    work, out = tmp / "cwd", tmp / "out"
    work.mkdir()
    grids, drawn = {}, {}
    save, load_test_set = figures.save, evaluation.load_test_set

    def spy_save(fig, path):
        # The pictures the figure shows, panel by panel: what show_grid drew.
        grids[path.name] = [np.array(image.get_array()) for ax in fig.axes for image in ax.images]
        drawn[path.name] = fig
        return save(fig, path)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(figures, "save", spy_save)
        mp.setattr(evaluation, "load_test_set", lambda d: tuple(t[:TEST_IMAGES] for t in load_test_set(d)))
        torch.set_num_threads(EVAL_THREADS - 1)
        try:
            code = evaluation.main(["--ckpt", str(rich_run.ckpt), "--out-dir", str(out), "--data-dir", str(data_dir),
                                    "--seed", str(EVAL_SEED), "--device", "cpu", "--num-threads", str(EVAL_THREADS),
                                    "--samples-per-digit", str(PER_DIGIT), "--manifold-steps", str(STEPS),
                                    "--iw-samples", str(IW_K), "--run-dir", str(rich_run.run_dir),
                                    "--judge", str(other_judge)])
            used_threads = torch.get_num_threads()
        finally:
            torch.set_num_threads(threads)
    assert code == 0
    return SimpleNamespace(out=out, work=work, metrics=json.loads((out / "metrics.json").read_text()), grids=grids,
                           figures=drawn, threads=used_threads, model=load_cvae(rich_run.ckpt))


@pytest.fixture(scope="module")
def test_images(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(data_dir, train=False)
    return images[:TEST_IMAGES].float().div(255).unsqueeze(1), labels[:TEST_IMAGES]


def test_eval_writes_into_out_dir_only_and_sets_threads(evaluated, evaluation):
    """--out-dir, --data-dir and --run-dir ignored would read or write results/, data/ or runs/ in the working
    folder (and miss training_curves.png); --num-threads sets torch's thread count."""
    assert leftovers(evaluated.work) == []
    assert sorted(p.name for p in evaluated.out.iterdir()) == sorted([*figures.FIGSIZES, "metrics.json"])
    assert evaluated.threads == EVAL_THREADS


def test_metrics_name_the_checkpoint_seed_judge_and_model(evaluated, rich_run, other_judge):
    m = evaluated.metrics
    assert m["checkpoint"] == str(rich_run.ckpt)
    assert m["judge"] == {"weights": str(other_judge), "sha256": sha256_of(other_judge)}
    assert m["seed"] == EVAL_SEED and f"seed {EVAL_SEED}" in m["test"]["z"]
    assert m["model"] == {"latent_dim": LATENT, "kl_weight": KL_WEIGHT, "fitted_prior": PRIOR,
                          "sampling_prior": f"one mixture of {COMPONENTS} Gaussians for all digits, fitted to the "
                                            f"training codes", "likelihood": "gaussian", "importance_samples": 1}
    assert m["prior_used"] == "fitted" and set(m["generation"]) == {"standard", "fitted"}
    assert m["classifier"]["features"].startswith("DigitCNN penultimate layer (128-d)")


def test_test_terms_use_the_seed_and_the_models_kl_weight(evaluated, test_images):
    """The test ELBO draws eps from --seed and weights KL by the checkpoint's kl_weight (0.5 here, not 1). A briefly
    trained decoder barely depends on z, so the reconstruction term must sit far closer to the one from --seed's eps
    than another seed's eps would put it (the two differ by about 1e-4 relative)."""
    model, t = evaluated.model, evaluated.metrics["test"]
    images, labels = test_images

    def sse(seed: int) -> float:
        eps = torch.randn(len(images), LATENT, generator=torch.Generator().manual_seed(seed))
        recon = model.decode(mean + torch.exp(0.5 * logvar) * eps, labels)
        return (recon - images.flatten(1)).pow(2).sum(1).mean().item()

    with torch.no_grad():
        mean, logvar = model.encode(images, labels)
        seeded, other = sse(EVAL_SEED), sse(EVAL_SEED + 1)
        kl_dims = (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp())).mean(0)
    assert t["kl_weight"] == KL_WEIGHT
    assert abs(t["recon_per_image"] - seeded) < abs(other - seeded) / 10
    assert t["kl_per_dim"] == pytest.approx(kl_dims.tolist(), rel=1e-4) and len(t["kl_per_dim"]) == LATENT
    assert t["loss_per_image"] == pytest.approx(seeded + KL_WEIGHT * kl_dims.sum().item(), rel=1e-4)
    # for a Gaussian model the same squared errors, summed in another order
    assert t["mse_per_pixel"] == pytest.approx(t["recon_per_image"] / PIXELS, rel=1e-6)
    with torch.no_grad():
        at_mean = (model.decode(mean, labels) - images.flatten(1)).pow(2).mean().item()
    assert t["mse_per_pixel_posterior_mean"] == pytest.approx(at_mean, rel=1e-4)
    assert t["images"] == TEST_IMAGES


def test_iw_bound_uses_iw_samples(evaluated, evaluation, test_images):
    """--iw-samples is the k the bound is computed with, not only the number reported beside it."""
    lk = evaluated.metrics["likelihood"]
    model, (images, labels) = evaluated.model, test_images
    bound = metrics.iw_bound(model, images, labels, *model.posterior(images, labels), IW_K, EVAL_SEED).mean().item()
    assert lk["iw_samples"] == IW_K
    # The -ELBO is recon + KL whatever beta trained the model (here 0.5: the loss would be smaller).
    t = evaluated.metrics["test"]
    assert lk["neg_elbo_per_image"] == pytest.approx(t["recon_per_image"] + t["kl_per_image"], rel=1e-9)
    assert lk["neg_elbo_nats_per_image"] == pytest.approx(lk["neg_elbo_per_image"] + metrics.GAUSSIAN_CONSTANT)
    assert lk["iw_bound_per_image"] == pytest.approx(bound, rel=1e-6)
    assert lk["iw_bound_nats_per_image"] == pytest.approx(bound + metrics.GAUSSIAN_CONSTANT, rel=1e-6)
    assert f"{metrics.GAUSSIAN_CONSTANT:.2f}" in lk["units"]


def test_generation_uses_the_judge_seed_and_samples_per_digit(evaluated, other_judge, test_images):
    """Samples come from --seed, PER_DIGIT per digit, and are judged by the --judge weights (whose FIDs differ from
    the shipped judge's, so the shipped one would not pass)."""
    model, m = evaluated.model, evaluated.metrics
    judge, shipped = load_judge(other_judge)[0], load_judge()[0]
    images, labels = test_images
    test_feats, test_preds = features_and_predictions(judge, images)
    assert m["classifier"]["test_accuracy"] == pytest.approx((test_preds == labels).double().mean().item(), abs=1e-12)
    wanted = torch.arange(10).repeat_interleave(PER_DIGIT)
    for prior in ("standard", "fitted"):
        samples = model.sample(wanted, prior=prior, generator=torch.Generator().manual_seed(EVAL_SEED))
        feats, preds = features_and_predictions(judge, samples)
        g = m["generation"][prior]
        assert g["samples"] == 10 * PER_DIGIT
        hits = (preds == wanted).double()
        assert g["conditional_accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
        assert g["per_digit"] == pytest.approx([hits[wanted == c].mean().item() for c in range(10)], abs=1e-12)
        assert g["fid"] == pytest.approx(fid(feats, test_feats), rel=1e-6)
        shipped_fid = fid(features_and_predictions(shipped, samples)[0], features_and_predictions(shipped, images)[0])
        assert g["fid"] != pytest.approx(shipped_fid, rel=1e-3)
    recon = model.decode(model.posterior_means(images, labels), labels).reshape(images.shape)
    assert m["reconstruction_fid"] == pytest.approx(fid(features_and_predictions(judge, recon)[0], test_feats),
                                                    rel=1e-5)


def tile(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(R, C, H, W) -> one picture with `pad` white lines between tiles, as test.py lays out its grids."""
    r, c, h, w = images.shape
    out = np.ones((r * (h + pad) - pad, c * (w + pad) - pad), dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = images[i, j].numpy()
    return out


def test_samples_figure_shows_the_seeded_samples_of_each_digit(evaluated):
    """samples.png: row k = ten samples of digit k from the fitted prior, drawn from --seed."""
    (grid,) = evaluated.grids["samples.png"]
    labels = torch.arange(10).repeat_interleave(10)
    samples = evaluated.model.sample(labels, prior="fitted", generator=torch.Generator().manual_seed(EVAL_SEED))
    np.testing.assert_allclose(grid, tile(samples.reshape(10, 10, 28, 28)), atol=1e-6)
    title = evaluated.figures["samples.png"]._suptitle.get_text()
    assert f"seed {EVAL_SEED}" in title and "z from one mixture of 2 Gaussians for all digits" in title


def test_manifold_figure_has_manifold_steps_and_decodes_the_quantile_grid(evaluated, test_images):
    """manifold.png: one --manifold-steps x --manifold-steps panel per digit; its corners decode the 0.05 and 0.95
    quantiles of the two most informative dimensions (left to right, bottom to top), the other one at 0."""
    panels = evaluated.grids["manifold.png"]
    assert len(panels) == 10 and all(p.shape == (STEPS * 28, STEPS * 28) for p in panels)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.05, 0.95]))
    across, up = informative_dims(evaluated.model.posterior_means(*test_images))
    corners = torch.zeros(2, LATENT)  # top-left, bottom-right
    corners[0, across], corners[0, up], corners[1, across], corners[1, up] = q[0], q[1], q[1], q[0]
    with torch.no_grad():
        for digit in (0, 7):
            want = evaluated.model.decode(corners, torch.tensor([digit, digit])).reshape(2, 28, 28).numpy()
            np.testing.assert_allclose(panels[digit][:28, :28], want[0], atol=1e-5)
            np.testing.assert_allclose(panels[digit][-28:, -28:], want[1], atol=1e-5)


def test_latent_scatter_plots_the_test_posterior_means(evaluated, test_images):
    """latent_scatter.png: one point per test image at its posterior mean in the two most informative dimensions,
    coloured by its digit."""
    means = evaluated.model.posterior_means(*test_images)
    z = means[:, list(informative_dims(means))].numpy()
    points = evaluated.figures["latent_scatter.png"].axes[0].collections[0]
    plotted = np.asarray(points.get_offsets())
    order, want = np.lexsort(plotted.T), np.lexsort(z.T)
    np.testing.assert_allclose(plotted[order], z[want], atol=1e-6)
    colours = np.asarray(points.get_facecolors())[order]
    # The same digit, the same colour; two digits, two colours.
    labels = test_images[1].numpy()[want]
    assert len({tuple(c) for c in colours[labels == 3]}) == 1
    assert tuple(colours[labels == 3][0]) != tuple(colours[labels == 8][0])


def test_reconstructions_figure_pairs_test_images_with_their_reconstructions(evaluated, test_images):
    """reconstructions.png: block b holds the (b+1)-th test image of every digit above its decoded posterior mean."""
    images, labels = test_images
    blocks = evaluated.grids["reconstructions.png"]
    assert len(blocks) == 2
    for b, grid in enumerate(blocks):
        idx = torch.stack([torch.nonzero(labels == c)[b, 0] for c in range(10)])
        with torch.no_grad():
            mean = evaluated.model.encode(images[idx], labels[idx])[0]
            recon = evaluated.model.decode(mean, labels[idx]).reshape(10, 28, 28)
        np.testing.assert_allclose(grid, tile(torch.stack([images[idx, 0], recon])), atol=1e-5)


def test_analogies_figure_decodes_each_style_under_every_label(evaluated, test_images):
    """analogies.png: the first eight test images, and each one's posterior mean decoded under the labels 0..9."""
    images, labels = test_images[0][:8], test_images[1][:8]
    left, right = evaluated.grids["analogies.png"]
    np.testing.assert_allclose(left, tile(images[:, 0].unsqueeze(1)), atol=0)
    with torch.no_grad():
        mean = evaluated.model.encode(images, labels)[0]
        rows = evaluated.model.decode(mean.repeat_interleave(10, 0), torch.arange(10).repeat(8)).reshape(8, 10, 28, 28)
    np.testing.assert_allclose(right, tile(rows), atol=1e-5)


def test_training_curves_figure_plots_the_runs_log_and_its_warmup(evaluated, rich_run):
    """training_curves.png: --run-dir's per-epoch recon and KL (train and validation) at x = epoch + 1, and the
    checkpoint's warm-up (WARMUP epochs, not the default 2) shaded."""
    with open(rich_run.run_dir / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fig = evaluated.figures["training_curves.png"]
    for ax, term in zip(fig.axes, ("recon", "kl")):
        for line, stage in zip(ax.lines, ("train", "val")):
            want = {int(r["epoch"]) + 1: float(r[f"{stage}_{term}"]) for r in rows if r[f"{stage}_{term}"]}
            assert dict(zip(line.get_xdata(), line.get_ydata())) == pytest.approx(want), (term, stage)
        assert len(ax.lines) == 2
        (span,) = ax.patches
        (x0, _), (x1, _) = span.get_path().get_extents(span.get_patch_transform()).get_points()
        assert (x0, x1) == pytest.approx((0.0, WARMUP))
    assert str(rich_run.run_dir) in fig._suptitle.get_text()


@pytest.mark.parametrize("device, word", [("cuda", "CUDA"), ("nonsense", "not a torch device")])
def test_eval_refuses_a_device_it_cannot_use(device, word, evaluation, data_dir, tmp_path, capsys):
    """--device is parsed and checked before anything is loaded: a device that is not there is one line and exit 2
    (ignored, the missing checkpoint would be reported instead, with exit 1)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--data-dir", str(data_dir),
                         "--out-dir", str(tmp_path / "out"),
                         "--device", device])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_cuda_gives_the_cpu_numbers(evaluation, tiny_ckpt, data_dir, tmp_path, capsys):
    """--device cuda runs the model and the judge there, and reports what the CPU reports (to float tolerance)."""
    common = ["--ckpt", str(tiny_ckpt), "--data-dir", str(data_dir), "--samples-per-digit", "20",
              "--manifold-steps", "2", "--iw-samples", "4"]
    numbers = {}
    for device in ("cpu", "cuda"):
        torch.cuda.reset_peak_memory_stats()
        assert evaluation.main([*common, "--device", device, "--out-dir", str(tmp_path / device)]) == 0
        assert f"Device: {device}" in capsys.readouterr().out
        assert (torch.cuda.max_memory_allocated() > 0) == (device == "cuda")
        numbers[device] = json.loads((tmp_path / device / "metrics.json").read_text())
    for key in ("recon_per_image", "kl_per_image"):
        assert numbers["cuda"]["test"][key] == pytest.approx(numbers["cpu"]["test"][key], rel=1e-3)


# ----- gradio_test.py: its flags and the page's events ---------------------------------------------------------------
LIVE = ("digit", "z0", "z1")
# handler -> (the events that run it, its inputs, its outputs), components named by elem_id (buttons by their text)
WIRING = {  # at z 2 the whole code is (z0, z1): the page runs the code endpoints (gradio_test.wire)
    "generate_code": ({(name, "change") for name in LIVE}, ["digit", "z0", "z1"], ["digit-image"]),
    "style_row_code": ({("z0", "change"), ("z1", "change")}, ["z0", "z1"], ["style-row"]),
    "manifold_code": ({(name, "change") for name in LIVE}, ["digit", "z0", "z1"], ["manifold"]),
    "random_code": ({("random", "click")}, ["digit"], ["z0", "z1"]),
    "style_transfer_code": ({("Encode this picture", "click")}, ["upload", "label"], ["style-row", "z0", "z1"]),
    "style_transfer_sketch_code": ({("Encode my drawing", "click")}, ["sketch", "label"], ["style-row", "z0", "z1"]),
}


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> SimpleNamespace:
    """The page built (not served) for a checkpoint with a fitted prior: its model, its event handlers by name, and a
    way to name its components."""
    model = load_cvae(save_untrained(tmp_path_factory.mktemp("page") / "cvae.ckpt"))
    app = ui.build_app(model)

    def name(block_id) -> str:
        block = app.blocks[block_id]
        return block.elem_id or block.value

    return SimpleNamespace(model=model, app=app, name=name, fns=list(app.fns.values()))


def test_every_event_runs_its_handler_on_its_inputs_into_its_outputs(page):
    """The live pictures follow digit, z0 and z1 (a missing trigger leaves a stale picture; 'always_last' keeps the
    last value of a drag); the buttons run their handlers; every handler decodes with this page's model."""
    handlers = {fn.fn.__name__: fn for fn in page.fns if fn.fn.__name__ in WIRING}
    assert set(handlers) == set(WIRING)
    for handler, (triggers, inputs, outputs) in WIRING.items():
        fn = handlers[handler]
        assert {(page.name(i), event) for i, event in fn.targets} == triggers, handler
        assert [page.name(b._id) for b in fn.inputs] == inputs, handler
        assert [page.name(b._id) for b in fn.outputs] == outputs, handler
        assert getattr(fn.fn, "__wrapped__", fn.fn).__self__.model is page.model, handler
        assert fn.trigger_mode == ("always_last" if handler in ("generate_code", "style_row_code", "manifold_code")
                                   else "once")


def test_encoding_then_shows_the_digit_it_was_told(page):
    """After a successful encode (upload or drawing), the digit selector is set to the label the user gave; after a
    failed one it stays."""
    ids = {fn.fn.__name__: fn._id for fn in page.fns if fn.fn.__name__ in WIRING}
    for handler in ("style_transfer_code", "style_transfer_sketch_code"):
        (then,) = [fn for fn in page.fns if fn.trigger_after == ids[handler]]
        assert then.trigger_only_on_success, handler
        assert [page.name(b._id) for b in then.inputs] == ["label"] and [page.name(b._id) for b in then.outputs] == \
            ["digit"], handler
        assert then.fn(4) == 4


def test_the_first_pictures_are_the_handlers_at_the_first_controls(page):
    """Before any event the page shows what the live handlers give for the controls' starting values (7, 0, 0): a
    picture built from other values would sit there until the user moves something."""
    live = [fn for fn in page.fns if fn.fn.__name__ in ("generate_code", "style_row_code", "manifold_code")]
    assert {page.name(b._id): b.value for fn in live for b in fn.inputs} == {"digit": 7, "z0": 0.0, "z1": 0.0}
    for fn in live:
        want = fn.fn(*[block.value for block in fn.inputs])
        (shown,) = fn.outputs
        np.testing.assert_array_equal(read_png(shown.value["path"]), want, err_msg=fn.fn.__name__)


def test_sketch_encodes_the_drawing_under_the_chosen_label(page, tmp_path):
    """The drawing's composite (not its empty background) is encoded under the label picked beside it (3 here, not
    the 7 the picture shows or the label's starting value), like an upload of the same picture."""
    from PIL import Image

    explorer = ui.Explorer(page.model)
    path = digit_picture(tmp_path / "seven.png")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    blank = np.full_like(rgb, 255)
    sketch = {"background": blank, "layers": [rgb], "composite": rgb}
    row, z0, z1 = explorer.style_transfer_sketch_code(sketch, 3)
    x = torch.from_numpy(ui.to_mnist(Image.open(path))).reshape(1, -1)
    with torch.no_grad():
        mean = page.model.encode(x, torch.tensor([3]))[0][0]
    assert (z0, z1) == (ui.to_slider(mean[0]), ui.to_slider(mean[1]))
    upload_row, *upload_z = explorer.style_transfer(str(path), 3)
    assert upload_z == [z0, z1] and np.array_equal(row, upload_row)
    with torch.no_grad():
        other = page.model.encode(x, torch.tensor([7]))[0][0]
    assert (ui.to_slider(other[0]), ui.to_slider(other[1])) != (z0, z1)  # the label matters for this picture


def can_connect(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) == 0


def test_ui_serves_the_checkpoint_on_the_host_and_port_it_was_given(tmp_path, monkeypatch, data_dir):
    """gradio_test.main with --ckpt, --host and --port: the page decodes with that checkpoint's model (latent 3, not
    a default cvae.ckpt), and the server listens on exactly that address: 127.0.0.2 is a loopback address of its own,
    so a server on the default 127.0.0.1 or on 0.0.0.0 would answer (or not) where this one must not (or must)."""
    from gradio_client import Client

    monkeypatch.chdir(tmp_path)  # no cvae.ckpt here to fall back on
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    ckpt = save_untrained(tmp_path / "wide.ckpt", latent_dim=3, fitted_prior=False)
    host, port = "127.0.0.2", free_port()
    served = {}
    real_launch = ui.launch

    def launch_in_background(app, host, port, block=True):
        served["app"] = app
        served["url"] = real_launch(app, host, port, block=False)
        return served["url"]

    monkeypatch.setattr(ui, "launch", launch_in_background)
    threads = torch.get_num_threads()
    try:
        assert ui.main(["--ckpt", str(ckpt), "--host", host, "--port", str(port), "--data-dir", str(data_dir)]) == 0
        assert can_connect(host, port) and not can_connect("127.0.0.1", port)
        client = Client(f"http://{host}:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        try:
            png = read_png(client.predict(4, 1.0, -0.5, api_name="/generate"))
        finally:
            client.close()
        # The sliders set the two dimensions that vary most over the test set; the third stays at 0.
        model = load_cvae(ckpt)
        z = torch.zeros(1, 3)
        dims = informative_dims(model.posterior_means(*load_split(data_dir, train=False)))
        z[0, list(dims)] = torch.tensor([1.0, -0.5])
        assert_same_pixels(png, decoded(model, z.tolist(), [4])[0])
    finally:
        torch.set_num_threads(threads)
        if "app" in served:
            served["app"].close()
