"""bench/sweep.py's bookkeeping on tiny grids (which runs it trains, skips and prints) and its report from a small
handmade results CSV. The training and judging of a run is faked here; test_evaluate.py checks evaluate()."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from model import CVAE

sys.path.insert(0, str(ROOT / "bench"))
import sweep  # noqa: E402

BETAS = ("0.25", "0.5", "0.75", "1", "1.5", "2")


def train_line(out: Path, data: Path, beta: str, latent: int, epochs: int, seed: int, extra: str = "",
               suffix: str = "") -> str:
    """The command sweep.py should print for one run, spelled out by hand; `extra` flags after --epochs, `suffix`
    in the run's name."""
    name = f"beta{beta}-z{latent}-e{epochs}{suffix}-seed{seed}"
    return (f"python train.py --kl-weight {beta} --latent-dim {latent} --epochs {epochs} {extra}--seed {seed} "
            f"--data-dir {data} --num-threads 1 --no-progress --ckpt {out}/ckpts/{name}.ckpt "
            f"--run-dir {out}/runs/{name}")


def result_row(beta: float, latent: int, epochs: int, seed: int, ckpt: Path | str = "none.ckpt", **numbers) -> dict:
    """A CSV row as sweep.py writes it, with made-up numbers (overridden by `numbers`)."""
    row = {"name": sweep.Run(sweep.Cell(beta, latent, epochs), seed).name, "kl_weight": beta, "latent_dim": latent,
           "epochs": epochs, "likelihood": "gaussian", "dropout": 0.25, "lr_schedule": "constant", "lr": 1e-3,
           "importance_samples": 1, "seed": seed, "train_s": 60.0, "recon": 27.0,
           "kl": 3.0, "mse": 0.03, "active_units": latent, "kl_dims": "1.5 1.5", "neg_elbo": 30.0,
           "iw_bound": 29.5, "nll": 478.2, "marginal_nll": 480.5, "class_accuracy": 0.9,
           "prior": "fitted", "accuracy": 0.99, "fid": 70.0, "recon_fid": 69.0, "recon_accuracy": 0.995,
           "fid_gap": 70 / 69 - 1,
           "standard_accuracy": 0.98, "standard_fid": 75.0, "ckpt": str(ckpt), "train_args": ""}
    row.update(numbers)
    assert list(row) == list(sweep.FIELDS)
    return row


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def median_lines(out: Path) -> list[str]:
    """The lines of sweep.md's first table, the medians per cell (the per-run listing follows a blank line)."""
    return (out / "sweep.md").read_text().split("\n\n")[0].splitlines()


def test_print_commands_prints_the_train_commands_of_the_runs_not_yet_done(tmp_path, capsys):
    out, data = tmp_path / "sweep", tmp_path / "mnist"
    write_csv(out / "results.csv", [result_row(0.25, 2, 10, 1)])  # judged already
    (out / "ckpts").mkdir()
    (out / "ckpts" / "beta0.5-z2-e10-seed0.ckpt").touch()  # trained (by a scheduler), not judged yet
    assert sweep.main(["--grid", "beta", "--seeds", "0", "1", "--out-dir", str(out), "--data-dir", str(data),
                       "--num-threads", "1", "--print-commands"]) == 0
    expected = [train_line(out, data, b, 2, 10, s) for b in BETAS for s in (0, 1)
                if (b, s) not in (("0.25", 1), ("0.5", 0))]
    assert capsys.readouterr().out.splitlines() == expected
    assert sorted(p.name for p in out.iterdir()) == ["ckpts", "results.csv"]  # printing writes nothing


def test_the_whole_grid_is_twenty_three_cells_on_three_seeds(tmp_path, capsys):
    """beta (6 cells at z 2, 10 epochs), z (2, 4, 8, 16 at beta 1) and epochs (10, 20, 40): the default cell once;
    then the Bernoulli decoder at z 2 and 40, with dropout 0.25 and 0; then one-cycle and cosine peaking at 3e-3
    over 10 and 20 epochs, and at 1e-3 over 10; then K = 5 and 20 samples of z in the training bound at Bernoulli z 40
    without dropout (its K = 1 is the likelihood grid's cell)."""
    out, data = tmp_path / "sweep", tmp_path / "mnist"
    assert sweep.main(["--out-dir", str(out), "--data-dir", str(data), "--num-threads", "1",
                       "--print-commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = ([train_line(out, data, b, 2, 10, s) for b in BETAS for s in (0, 1, 2)]
                + [train_line(out, data, "1", d, 10, s) for d in (4, 8, 16) for s in (0, 1, 2)]
                + [train_line(out, data, "1", 2, e, s) for e in (20, 40) for s in (0, 1, 2)]
                + [train_line(out, data, "1", d, 10, s, f"--likelihood bernoulli {drop}",
                              "-bernoulli" + ("-dropout0" if drop else ""))
                   for d in (2, 40) for drop in ("", "--dropout 0 ") for s in (0, 1, 2)]
                + [train_line(out, data, "1", 2, e, s, f"--lr-schedule {schedule} --lr 0.003 ", f"-{schedule}-lr0.003")
                   for e in (10, 20) for schedule in ("one-cycle", "cosine") for s in (0, 1, 2)]
                + [train_line(out, data, "1", 2, 10, s, f"--lr-schedule {schedule} ", f"-{schedule}")
                   for schedule in ("one-cycle", "cosine") for s in (0, 1, 2)]
                + [train_line(out, data, "1", 40, 10, s,
                              f"--likelihood bernoulli --dropout 0 --importance-samples {k} ",
                              f"-bernoulli-dropout0-iw{k}")
                   for k in (5, 20) for s in (0, 1, 2)])
    assert printed == expected


def test_a_sweep_skips_the_runs_in_its_csv_and_retries_the_failed_ones(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls, fails_once = [], {"beta1-z2-e40-seed1"}

    def fake_run_one(run, args, judge, test_set):
        calls.append(run.name)
        if run.name in fails_once:
            fails_once.remove(run.name)
            raise subprocess.CalledProcessError(1, "train.py")
        b, d, e, *_ = run.cell
        return result_row(b, d, e, run.seed, kl=float(len(calls)))

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    monkeypatch.setattr(sweep, "load_judge", lambda: (None, ""))
    monkeypatch.setattr(sweep, "load_test_set", lambda data_dir: None)
    argv = ["--grid", "epochs", "--out-dir", str(out), "--data-dir", str(tmp_path), "--jobs", "2"]
    assert sweep.main([*argv, "--seeds", "0"]) == 0
    assert sorted(calls) == ["beta1-z2-e10-seed0", "beta1-z2-e20-seed0", "beta1-z2-e40-seed0"]
    assert sorted(row["name"] for row in sweep.read_results(out / "results.csv")) == sorted(calls)

    calls.clear()
    assert sweep.main([*argv, "--seeds", "0"]) == 0  # all done: nothing runs
    assert calls == []
    assert sweep.main([*argv, "--seeds", "0", "1"]) == 1  # three new runs, one fails
    assert sorted(calls) == ["beta1-z2-e10-seed1", "beta1-z2-e20-seed1", "beta1-z2-e40-seed1"]
    assert len(sweep.read_results(out / "results.csv")) == 5
    calls.clear()
    assert sweep.main([*argv, "--seeds", "0", "1"]) == 0  # only the failed run again
    assert calls == ["beta1-z2-e40-seed1"]
    rows = sweep.read_results(out / "results.csv")
    assert len(rows) == 6 and len({row["name"] for row in rows}) == 6
    assert (out / "sweep.md").is_file() and (out / "rate_distortion.png").is_file()


def save_untrained(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = CVAE()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture
def handmade(tmp_path) -> tuple[Path, list[dict]]:
    """A results CSV of three betas on three seeds (seed 0 with a checkpoint on disk), a z = 4 and a 20-epoch run."""
    rows = []
    for i, beta in enumerate((0.5, 1.0, 2.0)):
        ckpt = save_untrained(tmp_path / f"beta{beta:g}.ckpt", seed=i)
        for seed in (0, 1, 2):
            rows.append(result_row(beta, 2, 10, seed, ckpt if seed == 0 else tmp_path / "gone.ckpt",
                                   kl=1.0 + i + seed ** 2, recon=30.0 - 2 * i + seed / 10,
                                   fid=60.0 + 10 * i + seed ** 2,
                                   accuracy=0.9 + 0.01 * seed, class_accuracy=0.5 + 0.1 * i,
                                   iw_bound=31.0 - i, active_units=2 - (seed == 2)))
    rows += [result_row(1.0, 4, 10, 0, kl=5.0, recon=25.0, active_units=3),
             result_row(1.0, 2, 20, 0, kl=3.5, recon=26.0, train_s=float("nan"))]
    return write_csv(tmp_path / "out" / "results.csv", rows), rows


def test_the_report_writes_the_table_and_three_figures(handmade, monkeypatch):
    csv_path, rows = handmade
    out = csv_path.parent
    figures = {}
    real_save = sweep.figures.save

    def keep(fig, path):
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(sweep.figures, "save", keep)
    written = sweep.write_report(csv_path, out)
    assert [p.name for p in written] == ["sweep.md", "rate_distortion.png", "beta_metrics.png", "beta_samples.png"]
    for path in written[1:]:
        with Image.open(path) as img:
            assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10, path.name

    # The table: one line per cell, beta grid first; medians over seeds with the smallest and largest value.
    medians, *per_cell = (out / "sweep.md").read_text().split("\n\n")
    lines = medians.splitlines()
    assert len(lines) == 2 + 5
    assert lines[0].startswith("| β | z | epochs | decoder | dropout | lr schedule | lr | K | seeds | distortion "
                               "| KL (rate) | active units | −ELBO | IW bound | −log p(x), nats | as a classifier (%) "
                               "| cond. acc. (%) | sample FID | train.py (s) |")
    cell = "gaussian | 0.25 | constant | 0.001 | 1"
    assert lines[2].startswith(f"| 0.5 | 2 | 10 | {cell} | 3 | 30.10 (30.00–30.20) | 2.00 (1.00–5.00) |")  # medians
    assert "| 71.0 (70.0–74.0) |" in lines[3] and "| 2 (1–2) |" in lines[3]  # beta 1: FID, active units
    assert lines[5].startswith(f"| 1 | 4 | 10 | {cell} | 1 | 25.00 (25.00–25.00) | 5.00 (5.00–5.00) |")
    assert lines[6].startswith(f"| 1 | 2 | 20 | {cell} | 1 |") and lines[6].endswith("| – |")  # no time
    # Then every run, cell by cell, a row per seed as bench/seeds.py prints it.
    assert per_cell[0] == "β 0.5, z size 2, 10 epochs, gaussian decoder, dropout 0.25, constant learning rate 0.001:"
    assert per_cell[8] == "β 1, z size 2, 20 epochs, gaussian decoder, dropout 0.25, constant learning rate 0.001:"
    beta_half = per_cell[1].splitlines()
    assert len(beta_half) == 2 + 3 and [row.split(" | ")[0] for row in beta_half[2:]] == ["| 0", "| 1", "| 2"]
    assert beta_half[0] == ("| seed | K | train.py (s) | distortion | KL (rate) | MSE/pixel | active units | KL per dim "
                            "| −ELBO | IW bound | −log p(x|y), nats | −log p(x), nats | as a classifier | prior "
                            "| cond. acc. | sample FID | recon FID | recon acc. | FID gap | N(0,I) acc. | N(0,I) FID |")
    assert beta_half[3].startswith("| 1 | 1 | 60.0 | 30.10 | 2.00 | 0.0300 | 2 | 1.50, 1.50 | 30.00 | 31.00 | 478.20 "
                                   "| 480.50 | 50.0% | fitted | 91.00% | 61.0 | 69.0 | 99.50% | +1.4% |")  # seed 1's

    # Rate against distortion: every run a point, and dashed lines of equal distortion + rate.
    ax = figures["rate_distortion.png"].axes[0]
    points = sorted(tuple(p) for c in ax.collections for p in np.asarray(c.get_offsets()))
    assert points == sorted((row["recon"], row["kl"]) for row in rows)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) >= 3
    for line in dashed:
        x, y = line.get_data()
        assert x[0] + y[0] == pytest.approx(x[1] + y[1])

    # Against beta: the beta grid's medians over seeds, FID panel first.
    fid_line = figures["beta_metrics.png"].axes[0].get_lines()[0]
    assert list(fid_line.get_xdata()) == [0.5, 1.0, 2.0]
    assert list(fid_line.get_ydata()) == [61.0, 71.0, 81.0]


def test_the_sample_rows_decode_the_same_codes_under_every_beta(handmade):
    _, rows = handmade
    betas, images = sweep.beta_samples(sweep.read_results(handmade[0]))
    assert betas == [0.5, 1.0, 2.0] and images.shape == (3, 10, 28, 28)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(sweep.SAMPLE_SEED))
    for i, beta in enumerate(betas):
        model = sweep.load_cvae(rows[3 * i]["ckpt"])  # the seed-0 checkpoint of that beta
        torch.testing.assert_close(images[i], model.sample(torch.arange(10), z=z)[:, 0])
    assert (images[0] - images[1]).abs().mean() > 1e-3  # three different models


def test_the_report_covers_only_the_runs_of_the_grids_and_seeds_asked_for(handmade):
    """`--grid beta --seeds 0 1 --report-only`: the z = 4 and 20-epoch runs and seed 2 stay out of table and figures."""
    csv_path, rows = handmade
    out = csv_path.parent
    assert sweep.main(["--report-only", "--grid", "beta", "--seeds", "0", "1", "--out-dir", str(out)]) == 0
    lines = median_lines(out)
    assert [line.split(" | ")[:9] for line in lines[2:]] == [
        [f"| {beta}", "2", "10", "gaussian", "0.25", "constant", "0.001", "1", "2"] for beta in ("0.5", "1", "2")]
    assert "| 60.5 (60.0–61.0) |" in lines[2]  # beta 0.5: the FID of seeds 0 and 1 only (seed 2's is 64)
    assert sweep.main(["--report-only", "--out-dir", str(out)]) == 0  # the default: every grid on seeds 0 1 2
    assert len(median_lines(out)) == 2 + 5


def test_betas_picks_cells_for_the_commands_and_the_report(handmade, capsys):
    csv_path, rows = handmade
    out, data = csv_path.parent, Path("/mnist")
    assert sweep.main(["--grid", "beta", "--seeds", "3", "--betas", "1", "0.75", "--out-dir", str(out),
                       "--data-dir", str(data), "--num-threads", "1", "--print-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == [train_line(out, data, "0.75", 2, 10, 3),
                                                    train_line(out, data, "1", 2, 10, 3)]
    assert sweep.main(["--report-only", "--betas", "2", "--out-dir", str(out)]) == 0
    lines = median_lines(out)
    assert [line.split(" | ")[:9] for line in lines[2:]] == [["| 2", "2", "10", "gaussian", "0.25", "constant",
                                                             "0.001", "1", "3"]]


NEWER = ("likelihood", "dropout", "lr_schedule", "lr", "importance_samples", "nll", "marginal_nll", "fid_gap", "recon_accuracy")  # since


def test_a_csv_from_before_a_column_existed_still_reads_and_grows_without_shifting(tmp_path):
    """A results.csv written before the decoder's likelihood, its dropout and some numbers were columns: its rows read
    those numbers as missing and those settings as the defaults they had (the Gaussian decoder, dropout 0.25); a new
    row adds the columns at the end (the old rows empty there, every other cell under its own header), and the report
    still writes."""
    path = tmp_path / "results.csv"
    old = result_row(1.0, 2, 10, 0, fid=70.0)
    old_fields = [name for name in sweep.FIELDS if name not in NEWER]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(old)
    (before,) = sweep.read_results(path)
    assert np.isnan(before["fid_gap"]) and before["fid"] == 70.0 and before["kl_dims"] == [1.5, 1.5]
    assert (before["likelihood"], before["dropout"]) == ("gaussian", 0.25)
    assert list(sweep.cells_of([before])) == [sweep.DEFAULT]

    new = result_row(2.0, 2, 10, 1, fid=80.0, fid_gap=0.25, likelihood="bernoulli", dropout=0.0)
    sweep.append_row(path, {**new, "kl_dims": [1.25, 2.0]})
    assert path.read_text().splitlines()[0].split(",") == [*old_fields, *[f for f in sweep.FIELDS if f in NEWER]]
    first, second = sweep.read_results(path)
    assert {k: v for k, v in first.items() if k not in NEWER} == {k: v for k, v in before.items() if k not in NEWER}
    assert np.isnan(first["fid_gap"]) and (first["likelihood"], first["dropout"]) == ("gaussian", 0.25)
    assert (second["likelihood"], second["dropout"], second["kl_weight"]) == ("bernoulli", 0.0, 2.0)
    assert (second["seed"], second["fid"], second["fid_gap"], second["kl_dims"]) == (1, 80.0, 0.25, [1.25, 2.0])
    assert sweep.write_table([first, second], tmp_path / "sweep.md").is_file()
    assert "| 0 | 1 | 60.0 |" in (tmp_path / "sweep.md").read_text()  # the old row, its missing gap shown as "–"


def test_the_schedule_grid_names_its_learning_rate_in_the_commands(tmp_path, capsys):
    out, data = tmp_path / "sweep", tmp_path / "mnist"
    assert sweep.main(["--grid", "schedule", "--seeds", "3", "--out-dir", str(out), "--data-dir", str(data),
                       "--num-threads", "1", "--print-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        train_line(out, data, "1", 2, epochs, 3, f"--lr-schedule {schedule} --lr 0.003 ", f"-{schedule}-lr0.003")
        for epochs in (10, 20) for schedule in ("one-cycle", "cosine")] + [
        train_line(out, data, "1", 2, 10, 3, f"--lr-schedule {schedule} ", f"-{schedule}")
        for schedule in ("one-cycle", "cosine")]


def test_refit_priors_refits_each_prior_on_the_trained_checkpoint_without_training(tiny_ckpt, data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """--refit-priors: each variant refitted to the run's training codes and judged with two sample seeds; the
    checkpoint's own kind of prior, refitted, gives exactly the samples (and FID) test.py reports for it; a second
    call finds nothing left to do."""
    import json
    import shutil

    import prior

    out = tmp_path / "sweep"
    (out / "ckpts").mkdir(parents=True)
    shutil.copy(tiny_ckpt, out / "ckpts" / "beta1-z2-e10-seed0.ckpt")  # the default cell's run on seed 0
    monkeypatch.setattr(sweep, "PRIOR_VARIANTS", {"10 Gaussians per digit": ("per-class", 10), "flow": ("flow", 1)})
    monkeypatch.setattr(prior, "FLOW_SETTINGS", {**prior.FLOW_SETTINGS, "steps": 30})
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("--refit-priors trained"))
    argv = ["--refit-priors", "--grid", "z", "--seeds", "0", "--out-dir", str(out), "--data-dir", str(data_dir),
            "--samples-per-digit", "20", "--num-threads", "1"]
    assert sweep.main(argv) == 0
    rows = sweep.read_results(out / "priors.csv", sweep.PRIOR_FIELDS)
    assert [(row["prior"], row["sample_seed"]) for row in rows] == [
        ("10 Gaussians per digit", 0), ("10 Gaussians per digit", 1), ("flow", 0), ("flow", 1)]
    assert all(row["name"] == "beta1-z2-e10-seed0" and row["latent_dim"] == 2 for row in rows)
    assert rows[0]["fid"] != rows[1]["fid"] and rows[0]["fid"] != rows[2]["fid"]  # other seeds, another density

    spec = importlib.util.spec_from_file_location("cvae_test_script", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--ckpt", str(tiny_ckpt), "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "eval"),
                        "--samples-per-digit", "20", "--iw-samples", "1", "--classify-per-digit", "1",
                        "--classify-iw-samples", "1", "--manifold-steps", "2", "--run-dir", str(tmp_path)]) == 0
    reported = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows[0]["fid"] == pytest.approx(reported["generation"]["fitted"]["fid"], rel=1e-9)
    assert rows[0]["accuracy"] == pytest.approx(reported["generation"]["fitted"]["conditional_accuracy"])
    assert rows[0]["recon_fid"] == pytest.approx(reported["reconstruction_fid"], rel=1e-9)
    assert rows[0]["recon_accuracy"] == pytest.approx(reported["reconstruction_accuracy"])

    table = (out / "priors.md").read_text().split("\n\n")[0].splitlines()
    assert [line.split(" | ")[8] for line in table[2:]] == ["10 Gaussians per digit", "flow"]
    assert all(line.startswith("| 1 | 2 | 10 | gaussian | 0.25 | constant | 0.001 | 1 | ") for line in table[2:])
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert "0 runs to refit" in capsys.readouterr().out
    assert len(sweep.read_results(out / "priors.csv", sweep.PRIOR_FIELDS)) == 4
