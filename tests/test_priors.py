"""The fitted sampling priors (prior.py): each density's samples match what it was fitted to, per label; sampling is
seeded by the caller's generator alone; --prior flow and --prior codes reach the checkpoint, which loads with
weights_only and refuses a damaged or oversized flow in one line."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import train
from checkpoint import CheckpointError, safe_torch_load
from model import load_cvae
from prior import FLOW_BOUNDS, check_density, describe_prior, fit_density, sample_density


def clusters(per_label: int = 400, latent_dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of 10 labels, each label two blobs of unequal size (2:1) with their own spread, far from the others'."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_label)
    blob = (torch.rand(len(labels), generator=gen) < 1 / 3).long()  # a third in the second blob
    centre = torch.stack([labels.float() / 3, 2.0 * blob - 1, labels.float() % 2], dim=1)[:, :latent_dim]
    spread = (0.1 + 0.05 * blob.float() + 0.02 * labels.float())[:, None]
    return centre + spread * torch.randn(len(labels), latent_dim, generator=gen), labels


def per_label_moments(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([z[labels == c].mean(0) for c in range(10)]),
            torch.stack([z[labels == c].std(0) for c in range(10)]))


def test_a_per_digit_mixture_draws_its_components_in_their_shares_with_their_moments():
    z, labels = clusters()
    prior = fit_density(z, labels, 10, "per-class", components=2, seed=0)
    draws_labels = torch.arange(10).repeat_interleave(4000)
    draws = sample_density(prior, draws_labels, torch.Generator().manual_seed(1))
    for c in range(10):
        weights, means = prior["weights"][c], prior["means"][c]  # (2,), (2, D)
        mine = draws[draws_labels == c]
        nearest = torch.cdist(mine, means).argmin(dim=1)  # the blobs are far apart: the component that drew it
        shares = torch.bincount(nearest, minlength=2).float() / len(mine)
        torch.testing.assert_close(shares, weights, atol=0.03, rtol=0)
        assert sorted(weights.tolist()) == pytest.approx([1 / 3, 2 / 3], abs=0.05)  # the data's shares
        for k in range(2):
            cov = prior["scale_tril"][c, k] @ prior["scale_tril"][c, k].T
            torch.testing.assert_close(mine[nearest == k].mean(0), means[k], atol=0.02, rtol=0)
            torch.testing.assert_close(torch.cov(mine[nearest == k].T), cov, atol=0.005, rtol=0.1)


def test_a_digit_with_few_codes_gets_fewer_components_the_rest_never_drawn():
    """Ten Gaussians asked for, five codes of digit 3: two components for it (two codes each at least), eight at
    weight 0; every other digit gets all ten, and digit 3's draws come from its two."""
    z, labels = clusters(per_label=60)
    keep = (labels != 3) | (torch.arange(len(labels)) % 60 < 5)
    prior = fit_density(z[keep], labels[keep], 10, "per-class", components=10, seed=0)
    assert prior["weights"].shape == (10, 10)
    assert int((prior["weights"][3] > 0).sum()) == 2 and (prior["weights"][[0, 9]] > 0).all()
    check_density(prior, 10, 3)
    draws = sample_density(prior, torch.full((2000,), 3), torch.Generator().manual_seed(0))
    used = torch.cdist(draws, prior["means"][3]).argmin(dim=1).unique()
    assert set(used.tolist()) <= set((prior["weights"][3] > 0).nonzero().flatten().tolist())


def test_a_flow_draws_each_digits_codes_with_their_mean_and_spread():
    """The flow is conditioned on the digit: each label's samples have that label's mean and spread (the labels'
    means lie apart and their spreads differ, so one density for all would fail)."""
    z, labels = clusters(latent_dim=2)
    prior = fit_density(z, labels, 10, "flow", seed=0)
    draws_labels = torch.arange(10).repeat_interleave(2000)
    draws = sample_density(prior, draws_labels, torch.Generator().manual_seed(1))
    (mean, std), (want_mean, want_std) = per_label_moments(draws, draws_labels), per_label_moments(z, labels)
    torch.testing.assert_close(mean, want_mean, atol=0.08, rtol=0)
    torch.testing.assert_close(std, want_std, atol=0.06, rtol=0.15)
    assert (want_mean[9] - want_mean[0]).norm() > 2  # the test could tell the labels apart


def test_the_codes_prior_draws_training_codes_of_the_requested_digit_uniformly():
    z, labels = clusters(per_label=50)
    prior = fit_density(z, labels, 10, "codes")
    draws_labels = torch.tensor([3] * 5000 + [7] * 10)
    draws = sample_density(prior, draws_labels, torch.Generator().manual_seed(0))
    index = {tuple(code.tolist()): i for i, code in enumerate(z)}
    picked = torch.tensor([index[tuple(code.tolist())] for code in draws])
    assert torch.equal(labels[picked], draws_labels)
    counts = torch.bincount(picked[:5000], minlength=len(z))[labels == 3]
    assert counts.min() > 60 and counts.max() < 145  # 100 each expected, every code of the digit drawn


@pytest.mark.parametrize("kind", ["per-class", "global", "flow", "codes"])
def test_sampling_is_seeded_by_the_generator_and_leaves_the_global_rng_alone(kind):
    z, labels = clusters(per_label=60)
    prior = fit_density(z, labels, 10, kind, components=2, seed=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    asked = torch.arange(10).repeat(3)
    first = sample_density(prior, asked, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, sample_density(prior, asked, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, sample_density(prior, asked, torch.Generator().manual_seed(2)))
    assert describe_prior("fitted", prior).endswith(("training codes", "at random"))


# ----- through train.py and the checkpoint ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_ckpt(data_dir, tmp_path_factory):
    """Two tiny runs (a few batches) with --prior flow and --prior codes."""
    tmp = tmp_path_factory.mktemp("priors")
    for kind in ("flow", "codes"):
        with contextlib.redirect_stdout(io.StringIO()):
            assert train.main(["--epochs", "1", "--train-size", "500", "--val-size", "100", "--batch-size", "100",
                               "--latent-dim", "3", "--prior", kind, "--no-progress", "--accelerator", "cpu",
                               "--data-dir", str(data_dir), "--ckpt", str(tmp / f"{kind}.ckpt"),
                               "--run-dir", str(tmp / kind)]) == 0
    return tmp


@pytest.mark.parametrize("kind", ["flow", "codes"])
def test_prior_flag_reaches_the_checkpoint_which_loads_with_weights_only(kind, flow_ckpt):
    path = flow_ckpt / f"{kind}.ckpt"
    saved = safe_torch_load(path)  # weights_only=True: tensors and plain containers only
    assert saved["fitted_prior"]["kind"] == kind
    model = load_cvae(path)
    assert model.resolve_prior("auto") == "fitted" and model.describe_prior().startswith(("a normalizing", "the tr"))
    images = model.sample(torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 1, 28, 28)
    if kind == "codes":
        assert len(saved["fitted_prior"]["codes"]) == 500  # the training split's codes


@pytest.mark.parametrize("damage, words", [
    (lambda p: p["settings"].update(hidden=FLOW_BOUNDS["hidden"][1] + 1), "hidden must be an integer"),
    (lambda p: p["settings"].update(transforms="5"), "transforms must be an integer"),
    (lambda p: p["settings"].update(latent_dim=4), "is for latent_dim 4"),
    (lambda p: p["state"].popitem(), "do not fit its settings"),
    (lambda p: next(v for v in p["state"].values() if v.is_floating_point()).fill_(float("nan")), "non-finite"),
])
def test_a_damaged_or_oversized_flow_is_refused_in_one_line(damage, words, flow_ckpt, tmp_path):
    saved = safe_torch_load(flow_ckpt / "flow.ckpt")
    damage(saved["fitted_prior"])
    torch.save(saved, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=words) as err:
        load_cvae(tmp_path / "bad.ckpt")
    assert "\n" not in str(err.value)
    check_density(safe_torch_load(flow_ckpt / "flow.ckpt")["fitted_prior"], 10, 3)  # the undamaged one passes


def test_a_mixture_saved_before_priors_had_kinds_loads_as_one_per_digit(tiny_ckpt, tmp_path):
    """A checkpoint whose fitted mixture has no "kind" (written before the flow and the codes existed) loads as the
    per-digit mixture it was: described, sampled and reported as one, with the same draws as the file's own."""
    checkpoint = safe_torch_load(tiny_ckpt)
    del checkpoint["fitted_prior"]["kind"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old, new = load_cvae(tmp_path / "old.ckpt"), load_cvae(tiny_ckpt)
    assert old.fitted_prior["kind"] == new.fitted_prior["kind"] == "per-class"
    assert old.describe_prior() == new.describe_prior()
    labels = torch.arange(10).repeat(5)
    torch.testing.assert_close(old.sample_z(labels, generator=torch.Generator().manual_seed(3)),
                               new.sample_z(labels, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
