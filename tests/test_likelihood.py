"""The Bernoulli decoder and the likelihood in nats: the loss, the binarization of what the model sees (training
batches drawn afresh, everything else one fixed draw), --likelihood, --dropout and --keep-every reaching the run,
test.py's numbers for a Bernoulli model, the marginal -log p(x), and a resumed Bernoulli run."""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import pytorch_lightning as pl
import torch.nn.functional as F
from torch import nn

import metrics
import train
from classifier import features_and_predictions, fid, load_judge
from dataset import DataError, MNISTDataModule, TensorPairDataset, binarize, load_split, load_test_set, to_float_images
from model import CVAE, elbo_loss, load_cvae, reconstruction_nll
from prior import fit_mixture
from test_options import Probe  # records every training step's loss and a replay of its forward pass

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, KEEP_EVERY, STEPS, BATCH, SEED = 3, 2, 4, 50, 5
FLAGS = ["--likelihood", "bernoulli", "--dropout", "0", "--keep-every", str(KEEP_EVERY), "--epochs", str(EPOCHS),
         "--train-size", str(STEPS * BATCH), "--val-size", "100", "--batch-size", str(BATCH), "--seed", str(SEED),
         "--kl-warmup-epochs", "0", "--no-progress", "--accelerator", "cpu"]


# ----- the loss and the binarization ---------------------------------------------------------------------------------
def test_the_bernoulli_loss_is_the_summed_binary_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    recon, x = torch.rand(5, 784, generator=gen), (torch.rand(5, 784, generator=gen) < 0.3).float()
    want = F.binary_cross_entropy(recon, x, reduction="none").sum(dim=1)
    torch.testing.assert_close(reconstruction_nll(recon, x, "bernoulli"), want)
    torch.testing.assert_close(reconstruction_nll(recon, x.reshape(5, 1, 28, 28), "bernoulli"), want)
    mean, logvar = torch.randn(5, 2, generator=gen), torch.randn(5, 2, generator=gen)
    total, rec, kl = elbo_loss(recon, x, mean, logvar, kl_weight=0.5, likelihood="bernoulli")
    assert rec.item() == pytest.approx(F.binary_cross_entropy(recon, x, reduction="sum").item() / 5, rel=1e-6)
    assert total.item() == pytest.approx(rec.item() + 0.5 * kl.item(), rel=1e-6)
    torch.testing.assert_close(elbo_loss(recon, x, mean, logvar)[1], (recon - x).pow(2).sum(1).mean())  # gaussian


def test_the_fixed_binarization_draws_each_pixel_with_its_grey_level(data_dir):
    """One draw over the whole set in order, from a fixed seed: the same for uint8 pixels and float images, the same
    at every call; blank pixels stay blank, full ones ink, and ink appears as often as the grey level says."""
    pixels, _ = load_split(data_dir, train=False)
    drawn = binarize(pixels)
    assert drawn.dtype == torch.uint8 and set(drawn.unique().tolist()) <= {0, 255}
    torch.testing.assert_close(to_float_images(drawn), binarize(to_float_images(pixels)), rtol=0, atol=0)
    assert torch.equal(drawn, binarize(pixels)) and not torch.equal(drawn, binarize(pixels, seed=1))
    assert (drawn[pixels == 0] == 0).all() and (drawn[pixels == 255] == 255).all()
    middle = (pixels > 100) & (pixels < 155)  # about half ink
    assert drawn[middle].float().mean().item() / 255 == pytest.approx(pixels[middle].float().mean().item() / 255,
                                                                      abs=0.01)
    assert not torch.equal(drawn, (pixels > 127).to(torch.uint8) * 255)  # a draw, not a threshold


def test_training_batches_are_drawn_afresh_from_the_seeded_global_rng(data_dir):
    pixels, labels = load_split(data_dir, train=False)
    served = TensorPairDataset(pixels[:100], labels[:100], binarize=True)
    index = torch.arange(100)
    torch.manual_seed(3)
    first, second = served[index][0], served[index][0]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(served[index][0], first)  # the global RNG decides: --seed and --resume reproduce it
    grey = TensorPairDataset(pixels[:100], labels[:100])[index][0]
    draws = torch.stack([served[index][0] for _ in range(200)]).mean(0)
    assert (draws - grey).abs().max() < 0.15  # each pixel is ink as often as its grey level


class Served(pl.Callback):
    """Whether every training and validation batch a Trainer takes is binary (0s and 1s only)."""

    def __init__(self) -> None:
        self.binary: dict[str, list[bool]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.binary["train"].append(bool(((batch[0] == 0) | (batch[0] == 1)).all()))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.binary["val"].append(bool(((batch[0] == 0) | (batch[0] == 1)).all()))


def fit_as_in_a_notebook(model: CVAE, data: MNISTDataModule) -> Served:
    served = Served()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False, callbacks=[served],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return served


@pytest.mark.parametrize("likelihood, binary", [("bernoulli", True), ("gaussian", False)])
def test_a_default_data_module_serves_the_images_the_model_scores(likelihood, binary, data_dir):
    """As a notebook user would write it: CVAE(likelihood=...), MNISTDataModule() and a Trainer. The data follows the
    model: a Bernoulli model trains and validates on binary images, a Gaussian one on grey images."""
    served = fit_as_in_a_notebook(CVAE(likelihood=likelihood), MNISTDataModule(data_dir, train_size=500))
    assert served.binary["train"] == [binary] * 3
    assert served.binary["val"] and set(served.binary["val"]) == {binary}  # the sanity check's batches and the epoch's


@pytest.mark.parametrize("likelihood, binarize", [("bernoulli", False), ("gaussian", True)])
def test_a_data_module_that_contradicts_the_model_stops_fit_in_one_line(likelihood, binarize, data_dir):
    with pytest.raises(DataError) as err:
        fit_as_in_a_notebook(CVAE(likelihood=likelihood), MNISTDataModule(data_dir, train_size=500,
                                                                         binarize=binarize))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and f"pass binarize={not binarize}" in message, message


# ----- a Bernoulli run: flags, data, loss, prior, checkpoints ---------------------------------------------------------
@pytest.fixture(scope="module")
def bernoulli_run(data_dir, tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("bernoulli")
    probe, build_trainer = Probe(), train.build_trainer
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(train, "build_trainer", lambda args, callbacks=None: build_trainer(args, [probe]))
        code = train.main([*FLAGS, "--data-dir", str(data_dir), "--ckpt", str(tmp / "b.ckpt"),
                           "--run-dir", str(tmp / "run")])
    assert code == 0
    return SimpleNamespace(ckpt=tmp / "b.ckpt", run_dir=tmp / "run", probe=probe, out=out.getvalue())


def test_likelihood_and_dropout_reach_the_model(bernoulli_run):
    """--likelihood bernoulli and --dropout 0 are stored with the weights, and no Dropout layer is left."""
    model = load_cvae(bernoulli_run.ckpt)
    assert (model.hparams.likelihood, model.hparams.dropout) == ("bernoulli", 0.0)
    assert not any(isinstance(layer, nn.Dropout) for layer in model.modules())
    assert any(isinstance(layer, nn.Dropout) for layer in CVAE().modules())  # the default has them
    assert "(binary cross-entropy, nats)" in bernoulli_run.out


def test_the_run_trains_on_fresh_binary_batches_with_the_bernoulli_loss(bernoulli_run, data_dir):
    """Every step optimised the summed binary cross-entropy (plus KL) of binary images drawn afresh: an image served
    in two epochs was drawn twice; validation and test hold their one fixed draw."""
    steps = bernoulli_run.probe.steps
    assert len(steps) == EPOCHS * STEPS
    for s in steps:
        assert set(s["x"].unique().tolist()) == {0.0, 1.0}
        kl = (-0.5 * (1 + s["logvar"] - s["mean"].pow(2) - s["logvar"].exp())).sum(1).mean()
        bce = F.binary_cross_entropy(s["recon"], s["x"].flatten(1), reduction="sum") / len(s["x"])
        assert s["loss"] == pytest.approx((bce + kl).item(), rel=1e-5)
    # An epoch serves the same 200 training images as the one before, each drawn anew: no drawn image repeats.
    drawn = [{tuple(image.flatten().nonzero().flatten().tolist()) for s in steps[e * STEPS:(e + 1) * STEPS]
              for image in s["x"]} for e in range(EPOCHS)]
    assert len(drawn[0]) == STEPS * BATCH and not drawn[0] & drawn[1]
    data = bernoulli_run.probe.trainer.datamodule
    assert data.splits["train"].binarize and data.splits["train"].pixels.unique().numel() > 2  # held grey
    for split in ("val", "test"):
        held = data.splits[split]
        assert not held.binarize and set(held.pixels.unique().tolist()) == {0, 255}
    test_pixels, _ = load_split(data_dir, train=False)
    assert torch.equal(data.splits["test"].pixels, binarize(test_pixels))  # test.py scores the same draw


def test_the_prior_is_fitted_to_the_fixed_binarization_of_the_training_images(bernoulli_run):
    model, data = load_cvae(bernoulli_run.ckpt), bernoulli_run.probe.trainer.datamodule
    labels = data.splits["train"].labels
    binary = model.posterior_means(binarize(data.splits["train"].pixels), labels)
    expected = fit_mixture(binary, labels, 10, "per-class", 10, seed=SEED)  # the default, 10 per digit
    torch.testing.assert_close(model.fitted_prior["means"], expected["means"], rtol=1e-4, atol=1e-5)
    grey = fit_mixture(model.posterior_means(data.splits["train"].pixels, labels), labels, 10)
    assert not torch.allclose(model.fitted_prior["means"], grey["means"], atol=1e-3)


def test_keep_every_keeps_every_nth_epochs_weights(bernoulli_run):
    """--keep-every 2 over 3 epochs: epoch=2.ckpt alone beside last.ckpt, holding the weights after two epochs."""
    from checkpoint import safe_torch_load

    folder = train.last_checkpoint(bernoulli_run.run_dir).parent
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=2.ckpt", "last.ckpt"]
    kept = safe_torch_load(folder / "epoch=2.ckpt")
    assert kept["global_step"] == 2 * STEPS and "optimizer_states" not in kept
    assert load_cvae(folder / "epoch=2.ckpt").hparams.likelihood == "bernoulli"
    final = safe_torch_load(bernoulli_run.ckpt)["state_dict"]
    assert any(not torch.equal(kept["state_dict"][k], v) for k, v in final.items())  # one more epoch since


# ----- test.py's numbers for a Bernoulli model ------------------------------------------------------------------------
def test_a_bernoulli_model_is_scored_in_nats_on_the_fixed_binarization(bernoulli_run, data_dir):
    """The ELBO and the bound score the fixed binarization of the test set with the binary cross-entropy (nats, no
    constant); the judge compares samples and reconstructions with the grey test images."""
    model, judge = load_cvae(bernoulli_run.ckpt), load_judge()[0]
    images, labels = (t[:500] for t in load_test_set(data_dir))
    outputs = metrics.model_outputs(model, judge, images, labels, samples_per_digit=5, seed=2)
    assert torch.equal(outputs.observed, binarize(images)) and torch.equal(outputs.images, images)
    numbers = metrics.evaluate(model, outputs, seed=2, iw_samples=4, classify_per_digit=2, classify_iw_samples=3)
    t, lk = numbers["test"], numbers["likelihood"]
    with torch.no_grad():
        mean, logvar = model.encode(binarize(images), labels)
        eps = torch.randn(len(images), 2, generator=torch.Generator().manual_seed(2))
        decoded = model.decode(mean + torch.exp(0.5 * logvar) * eps, labels)
        bce = F.binary_cross_entropy(decoded, binarize(images).flatten(1), reduction="sum").item() / len(images)
        at_mean = model.decode(mean, labels)
    assert t["recon_per_image"] == pytest.approx(bce, rel=1e-5)
    assert t["mse_per_pixel"] == pytest.approx((decoded - images.flatten(1)).pow(2).mean().item(), rel=1e-5)
    assert lk["neg_elbo_nats_per_image"] == lk["neg_elbo_per_image"]
    assert lk["iw_bound_nats_per_image"] == lk["iw_bound_per_image"] < lk["neg_elbo_per_image"] + 1
    assert "binary cross-entropy" in lk["units"] and numbers["model"]["likelihood"] == "bernoulli"
    grey_features = features_and_predictions(judge, images)[0]
    recon_features = features_and_predictions(judge, at_mean.reshape(-1, 1, 28, 28))[0]
    assert numbers["reconstruction_fid"] == pytest.approx(fid(recon_features, grey_features), rel=1e-5)


def test_the_marginal_is_the_sum_over_labels_and_equals_the_conditional_when_y_is_ignored():
    """-log p(x) = -log sum_y p(y) p(x | y): for a model whose encoder and decoder ignore y, every p(x | y) is the same
    (the same noise for every label), so -log p(x) = -log p(x | y) exactly; for a model that reads y it lies between
    the best label's -log p(x | y) and that plus ln 10 (p(x) is at most the best p(x | y), at least a tenth of it)."""
    torch.manual_seed(0)
    model = CVAE(likelihood="bernoulli").eval()
    images = binarize(torch.rand(6, 1, 28, 28))
    log_p = metrics.log_likelihood_per_label(model, images, iw_samples=5)
    nll = metrics.marginal_nll(log_p)
    best = -log_p.max(dim=1).values.double()
    assert (nll >= best - 1e-9).all() and (nll <= best + math.log(10) + 1e-9).all()
    assert log_p.std(dim=1).min() > 1e-4  # this model reads y: the labels differ
    with torch.no_grad():
        model.encoder.body[0][0].weight[:, 784:] = 0  # the encoder's columns for the one-hot y
        model.decoder.body[0][0].weight[:, 2:] = 0   # the decoder's
    log_p = metrics.log_likelihood_per_label(model, images, iw_samples=5)
    assert all(torch.equal(log_p[:, 0], log_p[:, y]) for y in range(10))
    torch.testing.assert_close(metrics.marginal_nll(log_p), -log_p[:, 0].double(), rtol=1e-12, atol=1e-9)


def test_the_ui_encodes_an_upload_as_a_bernoulli_model_sees_it(bernoulli_run, tmp_path):
    import gradio_test as ui
    from PIL import Image
    from test_gradio import digit_picture

    model = load_cvae(bernoulli_run.ckpt)
    path = digit_picture(tmp_path / "seven.png")
    _, z0, z1 = ui.Explorer(model).style_transfer(str(path), 7)
    x = torch.from_numpy(ui.to_mnist(Image.open(path))).reshape(1, -1)
    with torch.no_grad():
        binary = model.encode(binarize(x), torch.tensor([7]))[0][0]
        grey = model.encode(x, torch.tensor([7]))[0][0]
    assert (z0, z1) == (ui.to_slider(binary[0]), ui.to_slider(binary[1]))
    assert not np.allclose(binary.numpy(), grey.numpy(), atol=1e-4)  # the binarization mattered


# ----- resume ----------------------------------------------------------------------------------------------------------
def test_a_resumed_bernoulli_run_ends_with_the_weights_of_an_uninterrupted_one(data_dir, tmp_path):
    """Two epochs in one go, or one and then --resume to two: the fresh binarizations come from the restored RNG, so
    the weights are bit-identical."""
    common = ["--likelihood", "bernoulli", "--train-size", "200", "--val-size", "100", "--batch-size", "50",
              "--prior", "none", "--no-progress", "--accelerator", "cpu", "--data-dir", str(data_dir)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main([*common, "--epochs", "2", "--ckpt", str(tmp_path / "a.ckpt"),
                           "--run-dir", str(tmp_path / "a")]) == 0
        b = ["--ckpt", str(tmp_path / "b.ckpt"), "--run-dir", str(tmp_path / "b")]
        assert train.main([*common, "--epochs", "1", *b]) == 0
        assert train.main([*common, "--epochs", "2", "--resume", *b]) == 0
    a, b = load_cvae(tmp_path / "a.ckpt").state_dict(), load_cvae(tmp_path / "b.ckpt").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


# ----- bench/likelihood.py ---------------------------------------------------------------------------------------------
def test_the_bench_refines_only_the_labels_close_to_the_best_and_prints_a_row_per_sample_count(
        bernoulli_run, data_dir, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import likelihood as bench

    model = load_cvae(bernoulli_run.ckpt)
    images = model.observe(load_test_set(data_dir)[0][:12])
    screened = metrics.log_likelihood_per_label(model, images, iw_samples=3)
    margin = float((screened.max(dim=1).values - screened.median(dim=1).values).median())  # about half the labels
    refined, count = bench.refine(model, images, screened, samples=40, margin=margin, seed=1)
    close = screened >= screened.max(dim=1, keepdim=True).values - margin
    assert count == int(close.sum()) and 12 < count < 120
    assert torch.equal(refined[~close], screened[~close]) and (refined[close] != screened[close]).all()
    pairs = images[close.nonzero()[:, 0]]
    labels = close.nonzero()[:, 1]
    want = -metrics.iw_bound(model, pairs, labels, *model.posterior(pairs, labels), 40, 1, batch_size=500)
    torch.testing.assert_close(refined[close], want)  # batches of 20,000 decodes: 500 pairs of 40 samples

    assert bench.main(["--ckpt", str(bernoulli_run.ckpt), "--data-dir", str(data_dir), "--images", "12",
                       "--screen-samples", "3", "--compare", "10", "20", "--margin", "1e9"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {bernoulli_run.ckpt}")]
    assert [row.split(" | ")[4:6] for row in rows] == [["1", "10"], ["1", "20"]]  # K (trained with the ELBO), samples
    assert all(row.split(" | ")[8] == "10.00" for row in rows)  # a margin that large refines every label
    subset = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:12]
    observed = model.observe(load_test_set(data_dir)[0])[subset]
    screened = metrics.log_likelihood_per_label(model, observed, iw_samples=3)
    all_refined, _ = bench.refine(model, observed, screened, 10, 1e9, 1)
    marginal, se = (float(v) for v in rows[0].split(" | ")[6].split(" ± "))
    per_image = metrics.marginal_nll(all_refined)
    assert marginal == pytest.approx(per_image.mean().item(), abs=0.006)
    assert se == pytest.approx(per_image.std().item() / 12 ** 0.5, abs=0.006)  # the standard error over the images
