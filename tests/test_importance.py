"""train.py --importance-samples K: the K-sample importance-weighted bound as the training objective (Burda et al.
2016). K = 1 is today's ELBO to the bit; the bound is the one test.py scores with (model.importance_log_weights), it
equals a direct computation, tightens as K grows, and a K run trains, resumes after Ctrl-C and reaches test.py."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import metrics
import train
from checkpoint import safe_torch_load
from dataset import load_test_set
from model import CVAE, elbo_loss, importance_log_weights, importance_weighted_loss, load_cvae, reconstruction_nll
from test_schedule import ctrl_c_at_step  # Ctrl-C at an exact training step

ROOT = Path(__file__).resolve().parents[1]
K, EPOCHS, STEPS = 3, 2, 3
FLAGS = ["--epochs", str(EPOCHS), "--train-size", str(STEPS * 50), "--val-size", "100", "--batch-size", "50",
         "--likelihood", "bernoulli", "--dropout", "0", "--prior", "none", "--no-progress", "--accelerator", "cpu"]


def batch_of(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, 1, 28, 28, generator=gen), generator=gen), torch.arange(n) % 10


def test_one_sample_trains_todays_elbo_to_the_bit():
    """K = 1, the default, is the ELBO with its closed-form KL: the same loss, bit for bit, from the same noise."""
    torch.manual_seed(0)
    model = CVAE(likelihood="bernoulli", importance_samples=1).train()
    x, y = batch_of()
    torch.manual_seed(1)
    loss = model._shared_step((x, y), "train")
    torch.manual_seed(1)
    recon, mean, logvar = model(x, y)
    want, _, _ = elbo_loss(recon, x, mean, logvar, model.kl_weight_at(0), likelihood="bernoulli")
    assert torch.equal(loss, want)
    assert CVAE().hparams.importance_samples == 1


def direct_bound(model: CVAE, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, beta: float) -> float:
    """-(1/B) sum_i log (1/K) sum_k p(x_i | z_ik, y_i) (p(z_ik) / q(z_ik | x_i, y_i))^beta, written out image by image
    and sample by sample in float64, with z_ik = mean_i + sigma_i eps_ik."""
    with torch.no_grad():
        mean, logvar = model.encoder(x.flatten(1), F.one_hot(y, 10).float())
    total = 0.0
    for i in range(len(x)):
        log_w = []
        for k in range(len(eps)):
            sigma = torch.exp(0.5 * logvar[i]).double()
            z = mean[i].double() + sigma * eps[k, i].double()
            with torch.no_grad():
                p = model.decoder(z.float()[None], F.one_hot(y[i:i + 1], 10).float())[0].double()
            pixels = x[i].flatten().double()
            log_px = (pixels * torch.log(p) + (1 - pixels) * torch.log(1 - p)).sum()
            log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum()
            log_qz = (-0.5 * eps[k, i].double() ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()
            log_w.append(float(log_px + beta * (log_pz - log_qz)))
        top = max(log_w)
        total += top + math.log(sum(math.exp(w - top) for w in log_w) / len(log_w))
    return -total / len(x)


def test_the_k_sample_loss_is_the_bound_computed_by_hand():
    """On a tiny batch: the training loss with K samples (beta weighing the prior terms, as in the KL warm-up) equals
    the bound written out sample by sample; its noise is one (K, B, latent) draw from the global RNG."""
    torch.manual_seed(0)
    model = CVAE(latent_dim=3, likelihood="bernoulli", dropout=0.0, importance_samples=4)
    x, y = batch_of(4)
    torch.manual_seed(5)
    loss, recon, kl = model.importance_weighted_step(x, y, kl_weight=0.5)
    torch.manual_seed(5)
    eps = torch.randn(4, 4, 3)
    assert loss.item() == pytest.approx(direct_bound(model, x, y, eps, beta=0.5), rel=1e-5)
    with torch.no_grad():
        mean, logvar = model.encoder(x.flatten(1), F.one_hot(y, 10).float())
    want_kl = (-0.5 * (1 + logvar - mean ** 2 - logvar.exp())).sum(1).mean()
    torch.testing.assert_close(kl, want_kl)  # the log's KL is the closed form, whatever K


def test_the_metric_and_the_loss_share_the_log_weights():
    """metrics.iw_bound is the K-sample loss at beta 1 in eval mode: the same numbers from the same noise, and the
    same numbers as before the log weights moved into model.py (log p(x|z) + log p(z) - log q(z), to the bit)."""
    torch.manual_seed(0)
    model = CVAE(latent_dim=3, likelihood="bernoulli", dropout=0.0, importance_samples=6).eval()
    x, y = batch_of(5)
    means, logvars = model.posterior(x, y)
    got = metrics.iw_bound(model, x, y, means, logvars, iw_samples=6, seed=3)
    eps = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = model.reparameterize(means, logvars, eps)
        recon = model.decode(z.reshape(-1, 3), y.repeat(6))
        log_px = -reconstruction_nll(recon, x.flatten(1).repeat(6, 1), "bernoulli").reshape(6, 5)
        log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = Normal(means, torch.exp(0.5 * logvars)).log_prob(z).sum(-1)
        before = log_px + log_pz - log_qz  # the bound's log weights as metrics.iw_bound wrote them before
        shared = importance_log_weights(-log_px, z, means, logvars)
    assert torch.equal(shared, before)
    assert torch.equal(got, importance_weighted_loss(before))


@pytest.fixture(scope="module")
def bernoulli_ckpt(data_dir, tmp_path_factory) -> Path:
    """A Bernoulli model trained on 20 batches of binarized digits with the ELBO (seconds on a CPU)."""
    folder = tmp_path_factory.mktemp("bernoulli")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main(["--likelihood", "bernoulli", "--dropout", "0", "--prior", "none", "--no-progress",
                           "--epochs", "1", "--limit-train-batches", "20", "--val-size", "100", "--batch-size", "50",
                           "--data-dir", str(data_dir), "--ckpt", str(folder / "b.ckpt"),
                           "--run-dir", str(folder / "run")]) == 0
    return folder / "b.ckpt"


def test_the_bound_tightens_as_k_grows(bernoulli_ckpt, data_dir):
    """Averaged over 300 fixed test images (their fixed binarization) and fixed noise, the negative bound of a trained
    model falls with K: K = 20 below K = 5 below K = 1, each by more than 0.1 nats (measured: 0.29 and 0.17)."""
    model = load_cvae(bernoulli_ckpt)
    images, labels = (t[:300] for t in load_test_set(data_dir))
    observed = model.observe(images)
    means, logvars = model.posterior(observed, labels)
    bound = {k: metrics.iw_bound(model, observed, labels, means, logvars, k, seed=0).mean().item()
             for k in (1, 5, 20)}
    assert bound[20] < bound[5] - 0.1 < bound[1] - 0.2, bound


class Replay(train.Callback):
    """Every training step's loss, its batch, noise and beta (the step's RNG state replayed), and the one-draw ELBO
    of the same batch."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.rng, self.batch = torch.get_rng_state(), batch

    def on_before_backward(self, trainer, module, loss) -> None:
        after = torch.get_rng_state()
        x, y = self.batch
        beta = module.kl_weight_at(module.global_step)
        torch.set_rng_state(self.rng)
        eps = torch.randn(module.hparams.importance_samples, len(x), module.hparams.latent_dim)
        torch.set_rng_state(self.rng)
        with torch.no_grad():
            recon, mean, logvar = module(x, y)
            elbo, _, _ = elbo_loss(recon, x, mean, logvar, beta, likelihood="bernoulli")
        torch.set_rng_state(after)
        self.steps.append(dict(loss=loss.item(), elbo=elbo.item(),
                               bound=direct_bound(module, x, y, eps, beta) if not self.steps else None))


def run(data_dir, folder: Path, *flags: str, callbacks=()) -> tuple[int, str]:
    build_trainer, out = train.build_trainer, io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(train, "build_trainer", lambda args, extra=None: build_trainer(args, list(callbacks)))
        code = train.main([*FLAGS, *flags, "--data-dir", str(data_dir), "--ckpt", str(folder / "c.ckpt"),
                           "--run-dir", str(folder / "run")])
    return code, out.getvalue()


def test_a_k_sample_run_trains_its_bound_resumes_after_ctrl_c_and_reaches_test_py(data_dir, tmp_path, restore_sigint):
    """--importance-samples reaches the loss (each step's loss is the K-sample bound of its own noise, not the ELBO),
    the epoch line names it, K is saved with the weights; Ctrl-C in the second epoch and --resume give the
    uninterrupted run's weights; test.py reports K."""
    replay = Replay()
    code, out = run(data_dir, tmp_path / "whole", "--importance-samples", str(K), callbacks=[replay])
    assert code == 0 and len(replay.steps) == EPOCHS * STEPS
    assert replay.steps[0]["loss"] == pytest.approx(replay.steps[0]["bound"], rel=1e-5)  # its own noise's bound
    assert all(abs(step["loss"] - step["elbo"]) > 1e-3 for step in replay.steps)  # not the ELBO
    assert f"train_loss (-{K}-sample bound)" in out and "val_loss" in out
    assert load_cvae(tmp_path / "whole" / "c.ckpt").hparams.importance_samples == K

    with ctrl_c_at_step(STEPS + 2):  # in the second epoch
        assert run(data_dir, tmp_path / "cut", "--importance-samples", str(K))[0] == 130
    assert safe_torch_load(train.last_checkpoint(tmp_path / "cut" / "run"))["epoch"] == 0
    assert run(data_dir, tmp_path / "cut", "--importance-samples", str(K), "--resume")[0] == 0
    whole, cut = (load_cvae(path / "c.ckpt").state_dict() for path in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(whole[name], cut[name]) for name in whole)

    spec = importlib.util.spec_from_file_location("cvae_test_script", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with contextlib.redirect_stdout(io.StringIO()):
        assert script.main(["--ckpt", str(tmp_path / "cut" / "c.ckpt"), "--data-dir", str(data_dir),
                            "--out-dir", str(tmp_path / "eval"), "--samples-per-digit", "2", "--iw-samples", "2",
                            "--classify-per-digit", "1", "--classify-iw-samples", "1", "--manifold-steps", "2",
                            "--run-dir", str(tmp_path / "cut" / "run")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"]["importance_samples"] == K


@pytest.mark.parametrize("flags", [["--free-bits", "0.5"], ["--kl-weight", "0"]])
def test_settings_without_meaning_under_k_samples_are_refused_in_one_line(flags, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(data_dir, tmp_path, "--importance-samples", "5", *flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--importance-samples 5" in err, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_k_loads_and_resumes_as_one_sample_and_another_k_is_refused(data_dir, tmp_path,
                                                                                             capsys):
    """A run saved before importance_samples existed (its hyper-parameters lack it) loads as K = 1 and resumes as
    one; resuming it with another K is refused in one line, like any other changed setting."""
    assert run(data_dir, tmp_path, "--epochs", "1")[0] == 0
    last = train.last_checkpoint(tmp_path / "run")
    checkpoint = safe_torch_load(last)
    del checkpoint["hyper_parameters"]["importance_samples"]
    torch.save(checkpoint, last)
    assert load_cvae(last).hparams.importance_samples == 1
    with pytest.raises(SystemExit) as exit_info:
        run(data_dir, tmp_path, "--resume", "--importance-samples", "4")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert "importance_samples 1 in the checkpoint, 4 now" in err, err
    assert run(data_dir, tmp_path, "--resume")[0] == 0  # EPOCHS > 1: the old run continues as K = 1
