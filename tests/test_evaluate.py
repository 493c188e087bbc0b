"""test.py and classifier.py: the files they write, and every reported number against an independent recomputation."""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import classifier
from classifier import DigitCNN, ClassifierConfig, cache_key, fid, load_or_train_classifier, train_classifier
from checkpoint import load_cvae
from dataset import load_split
from model import elbo_loss

ROOT = Path(__file__).resolve().parents[1]
SEED, PER_DIGIT, STEPS = 3, 30, 5


@pytest.fixture(scope="session")
def evaluation():
    """test.py, imported by path: `import test` could find the standard library's test package instead."""
    spec = importlib.util.spec_from_file_location("cvae_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digit_cnn(data_dir) -> DigitCNN:
    """The project's classifier from the shared cache (data/digit_cnn.pt), trained there on first use (~1 min)."""
    return load_or_train_classifier(data_dir)


@pytest.fixture(scope="session")
def test_set(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(data_dir, train=False)
    return images.float().div(255).unsqueeze(1), labels


@pytest.fixture(scope="session")
def results(evaluation, tiny_ckpt, data_dir, digit_cnn, tmp_path_factory) -> Path:
    """One real run of `python test.py` on the tiny checkpoint, with few samples."""
    out = tmp_path_factory.mktemp("results") / "out"
    code = evaluation.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--data-dir", str(data_dir),
                            "--seed", str(SEED), "--samples-per-digit", str(PER_DIGIT), "--manifold-steps", str(STEPS)])
    assert code == 0
    return out


def reference_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID the textbook way, with a general matrix square root."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples give singular covariances; sqrtm warns but stays accurate enough
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


# ----- the command and its files --------------------------------------------------------------------------------------
def test_every_file_is_written_as_a_png_of_the_expected_size(results, evaluation):
    from PIL import Image

    assert sorted(p.name for p in results.iterdir()) == sorted([*evaluation.FIGSIZES, "metrics.json"])
    for name, (w, h) in evaluation.FIGSIZES.items():
        with Image.open(results / name) as img:
            img.verify()  # a truncated or corrupt file raises here
        with Image.open(results / name) as img:
            assert img.format == "PNG"
            assert img.size == (round(w * evaluation.DPI), round(h * evaluation.DPI)), name
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{name} is nearly blank"


def test_metrics_match_an_independent_recomputation(results, tiny_ckpt, test_set, digit_cnn):
    metrics = json.loads((results / "metrics.json").read_text())
    model = load_cvae(tiny_ckpt)
    images, labels = test_set
    assert metrics["checkpoint"] == str(tiny_ckpt)
    assert metrics["prior_used"] == "fitted"  # train.py fits a prior by default
    assert set(metrics["generation"]) == {"standard", "fitted"}

    with torch.no_grad():
        # The ELBO terms as model.elbo_loss defines them, with the documented z: one eps per image from the seed.
        mean, logvar = model.encode(images, labels)
        eps = torch.randn(len(images), model.hparams.latent_dim, generator=torch.Generator().manual_seed(SEED))
        recon = model.decode(mean + torch.exp(0.5 * logvar) * eps, labels)
        total, rec, kl = elbo_loss(recon, images, mean, logvar, kl_weight=model.hparams.kl_weight)
        t = metrics["test"]
        assert t["images"] == 10_000
        assert t["recon_per_image"] == pytest.approx(rec.item(), rel=1e-4)
        assert t["kl_per_image"] == pytest.approx(kl.item(), rel=1e-4)
        assert t["loss_per_image"] == pytest.approx(total.item(), rel=1e-4)
        assert t["mse_per_pixel"] == pytest.approx(rec.item() / 784, rel=1e-4)
        assert sum(t["kl_per_dim"]) == pytest.approx(kl.item(), rel=1e-4)
        mean_recon = model.decode(mean, labels)
        assert t["mse_per_pixel_posterior_mean"] == pytest.approx(
            (mean_recon - images.flatten(1)).pow(2).mean().item(), rel=1e-4)

        test_feats = digit_cnn.eval().features(images)
        assert metrics["classifier"]["test_accuracy"] == pytest.approx(
            (digit_cnn.classify(test_feats).argmax(1) == labels).double().mean().item(), abs=1e-12)
        wanted = torch.arange(10).repeat_interleave(PER_DIGIT)
        for prior in ("standard", "fitted"):
            samples = model.sample(wanted, prior=prior, generator=torch.Generator().manual_seed(SEED))
            feats = digit_cnn.features(samples)
            hits = (digit_cnn.classify(feats).argmax(1) == wanted).double()
            g = metrics["generation"][prior]
            assert g["samples"] == 10 * PER_DIGIT
            assert g["conditional_accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
            assert g["per_digit"] == pytest.approx([hits[wanted == c].mean().item() for c in range(10)], abs=1e-12)
            assert g["fid"] == pytest.approx(reference_fid(feats, test_feats), rel=1e-4)
        assert metrics["reconstruction_fid"] == pytest.approx(
            reference_fid(digit_cnn.features(mean_recon.reshape(-1, 1, 28, 28)), test_feats), rel=1e-4)


def test_a_model_without_fitted_prior_reports_the_standard_prior(tiny_ckpt, data_dir, digit_cnn, evaluation):
    model = load_cvae(tiny_ckpt)
    model.fitted_prior = None
    metrics = evaluation.evaluate(model, data_dir, samples_per_digit=3, classifier=digit_cnn)
    assert metrics["prior_used"] == "standard" and list(metrics["generation"]) == ["standard"]
    json.dumps(metrics)  # plain JSON types only


@pytest.mark.parametrize("flag, value, hint", [("--ckpt", "missing.ckpt", "python train.py"),
                                               ("--data-dir", "no-such-dir", "prepare_mnist")])
def test_missing_checkpoint_or_data_gives_one_line_and_nonzero_exit(flag, value, hint, tiny_ckpt, data_dir,
                                                                    evaluation, tmp_path, capsys):
    args = {"--ckpt": str(tiny_ckpt), "--data-dir": str(data_dir), "--out-dir": str(tmp_path / "out")}
    args[flag] = str(tmp_path / value)
    with pytest.raises(SystemExit) as exc:
        evaluation.main([x for pair in args.items() for x in pair])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hint in err, err
    assert not (tmp_path / "out").exists()


# ----- what the figures show ------------------------------------------------------------------------------------------
def test_analogy_row_decodes_one_z_under_all_ten_labels(tiny_ckpt, test_set, evaluation):
    model = load_cvae(tiny_ckpt)
    images, labels = test_set[0][:4], test_set[1][:4]
    grid = evaluation.analogies(model, images, labels)
    assert grid.shape == (4, 10, 28, 28)
    with torch.no_grad():
        for i in range(4):
            z = model.encode(images[i:i + 1], labels[i:i + 1])[0]  # (1, latent_dim): one style
            expected = model.decode(z.expand(10, -1), torch.arange(10)).reshape(10, 28, 28)
            torch.testing.assert_close(grid[i], expected)
    # Different labels give different digits from the same z (the label is really used).
    assert (grid[:, 0] - grid[:, 1]).abs().mean() > 1e-3


def test_manifold_decodes_the_quantile_grid(tiny_ckpt, evaluation):
    model = load_cvae(tiny_ckpt)
    images, q = evaluation.manifold(model, steps=STEPS)
    assert images.shape == (10, STEPS, STEPS, 28, 28)
    torch.testing.assert_close(q, torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, STEPS)))
    with torch.no_grad():
        # Top-left tile: the smallest z1 and the largest z2 (z2 grows upwards, like a plot's y axis).
        top_left = model.decode(torch.tensor([[q[0], q[-1]]]), torch.tensor([7])).reshape(28, 28)
    torch.testing.assert_close(images[7, 0, 0], top_left)


# ----- the classifier and FID ---------------------------------------------------------------------------------------
def test_classifier_reaches_its_accuracy_bar(digit_cnn, test_set):
    images, labels = test_set
    subset = torch.arange(0, len(images), 2)  # every other test image: 5,000
    _, preds = classifier.features_and_predictions(digit_cnn, images[subset])
    assert (preds == labels[subset]).double().mean().item() >= 0.985


def test_fid_matches_the_textbook_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    mix = torch.rand(8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(400, 8, generator=gen, dtype=torch.float64) @ mix + 0.5  # other mean and covariance
    assert fid(a, b) == pytest.approx(reference_fid(a, b), rel=1e-8)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid(a, a + 2.0) == pytest.approx(8 * 4.0, rel=1e-9)  # a shift adds |mu_a - mu_b|^2 only
    # Rank-deficient covariances (fewer samples than dimensions, as with few samples in a quick run) stay finite.
    assert np.isfinite(fid(a[:5], b[:6]))


def test_classifier_training_is_seeded_and_leaves_the_global_rng_alone(data_dir):
    images, labels = load_split(data_dir, train=True)
    images, labels = images[:512], labels[:512]
    config = ClassifierConfig(epochs=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = train_classifier(images, labels, config).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    second = train_classifier(images, labels, config).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cache_is_reused_when_fresh_and_rebuilt_when_missing_stale_or_damaged(data_dir, digit_cnn, tmp_path,
                                                                              monkeypatch):
    trained = []

    def fake_train(images, labels, config, device="cpu"):
        trained.append(len(images))
        return DigitCNN(config.channels, config.hidden, config.dropout)

    monkeypatch.setattr(classifier, "train_classifier", fake_train)
    cache = tmp_path / "cnn.pt"
    load_or_train_classifier(data_dir, cache, log=lambda msg: None)  # missing -> trained
    assert trained == [60_000] and cache.is_file()
    load_or_train_classifier(data_dir, cache, log=lambda msg: None)  # fresh -> loaded
    assert len(trained) == 1
    load_or_train_classifier(data_dir, cache, config=ClassifierConfig(seed=1), log=lambda msg: None)  # stale
    assert len(trained) == 2
    cache.write_bytes(b"not a checkpoint")
    load_or_train_classifier(data_dir, cache, log=lambda msg: None)  # damaged -> trained
    assert len(trained) == 3

    # The key covers the data and the recipe.
    images, labels = torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(4)
    key = cache_key(images, labels, ClassifierConfig())
    changed = images.clone()
    changed[0, 0, 0] = 1
    assert cache_key(changed, labels, ClassifierConfig()) != key
    assert cache_key(images, labels, ClassifierConfig(seed=1)) != key
    assert cache_key(images, labels.flip(0), ClassifierConfig()) != key
