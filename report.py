"""How each number test.py reports is named, formatted and carried: to the printed report, and, for the numbers with a
`key`, to bench/seeds.py's rows and bench/sweep.py's results.csv and tables.

metrics.py computes the numbers (metrics.evaluate, a JSON-ready dict: metrics.json); this module only reads that dict.
A new number is a function in metrics.py, its key in metrics.evaluate, and one `Entry` in `REPORT` here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from latent import ACTIVITY_THRESHOLD, latent_name


class Entry(NamedTuple):
    """One number of the printed report. With a `key` it is also a column of bench/seeds.py's rows and of
    bench/sweep.py's results.csv and tables (`summary`)."""

    label: str                    # the report's words for it
    read: Callable[[dict], Any]   # where it sits in evaluate()'s dict (metrics.json); a list prints as one row
    fmt: str = ".2f"              # format of the value (each item of a list)
    scale: float = 1.0            # 100, with unit "%", for a share
    unit: str = ""
    key: str | None = None        # the column's name in results.csv
    header: str | None = None     # the column's title in markdown tables (default: the label)
    kind: type = float            # how results.csv's text reads back: float, int, str or list (of floats)
    median: bool = False          # also a column of the sweep's table of medians


NATS = {"gaussian": "nats = loss units + 392 ln(pi)", "bernoulli": "loss units are nats"}  # the report's reminder


def _used(m: dict) -> dict:
    """The generation numbers of the prior samples.png uses."""
    return m["generation"][m["prior_used"]]


def _fid_gap(m: dict) -> float:
    """How far the sample FID lies above the reconstruction FID, the floor a sampler can reach, as a share."""
    return _used(m)["fid"] / m["reconstruction_fid"] - 1 if m["reconstruction_fid"] > 0 else math.nan


REPORT: tuple[tuple[Callable[[dict], str], tuple[Entry, ...]], ...] = (
    (lambda m: f"Test set: {m['test']['images']} images, per image (z: one draw from q(z|x,y), seed {m['seed']})", (
        Entry("reconstruction, -log p(x|z,y) in loss units", lambda m: m["test"]["recon_per_image"],
              key="recon", header="distortion", median=True),
        Entry("KL (nats)", lambda m: m["test"]["kl_per_image"], key="kl", header="KL (rate)", median=True),
        Entry("loss (recon + β × KL)", lambda m: m["test"]["loss_per_image"]),
        Entry("MSE per pixel against the grey image", lambda m: m["test"]["mse_per_pixel"], fmt=".4f"),
        Entry("MSE per pixel, z = posterior mean", lambda m: m["test"]["mse_per_pixel_posterior_mean"], fmt=".4f",
              key="mse", header="MSE/pixel"),
    )),
    (lambda m: "Latent dimensions " + " ".join(latent_name(i, m["model"]["latent_dim"])
                                                for i in range(m["model"]["latent_dim"])) + " over the test images", (
        Entry(f"active units (posterior-mean variance > {ACTIVITY_THRESHOLD:g})",
              lambda m: m["latent"]["active_units"], fmt="g", key="active_units", header="active units", kind=int,
              median=True),
        Entry("KL per dimension (nats)", lambda m: m["test"]["kl_per_dim"], fmt=".2f", key="kl_dims",
              header="KL per dim", kind=list),
        Entry("posterior-mean variance", lambda m: m["latent"]["posterior_mean_variance"], fmt=".2f"),
    )),
    (lambda m: f"Negative log-likelihood per image, lower is better ({m['model']['likelihood']} decoder: "
               f"{NATS[m['model']['likelihood']]})", (
        Entry("-ELBO (recon + KL), loss units", lambda m: m["likelihood"]["neg_elbo_per_image"], key="neg_elbo",
              header="−ELBO", median=True),
        Entry("importance-weighted bound, loss units", lambda m: m["likelihood"]["iw_bound_per_image"],
              key="iw_bound", header="IW bound", median=True),
        Entry("-ELBO, nats", lambda m: m["likelihood"]["neg_elbo_nats_per_image"]),
        Entry("-log p(x | y), nats (the bound)", lambda m: m["likelihood"]["iw_bound_nats_per_image"], key="nll",
              header="−log p(x|y), nats"),
        Entry("  its samples of z per image", lambda m: m["likelihood"]["iw_samples"], fmt="d"),
        Entry("-log p(x), nats (sum over y, uniform p(y))", lambda m: m["likelihood"]["marginal_nll_nats"],
              key="marginal_nll", header="−log p(x), nats", median=True),
        Entry("  its images, and samples of z per label", lambda m: (f"{m['likelihood']['marginal_images']}, "
                                                                     f"{m['likelihood']['marginal_iw_samples']}"),
              fmt="s"),
    )),
    (lambda m: f"The CVAE as a classifier, argmax_y log p(x|y) (IW bound, {m['generative_classification']['iw_samples']}"
               f" samples per label), {m['generative_classification']['images']} test images", (
        Entry("accuracy (a decoder that ignores y: 10%)", lambda m: m["generative_classification"]["accuracy"],
              fmt=".1f", scale=100, unit="%", key="class_accuracy", header="as a classifier", median=True),
        Entry("per digit", lambda m: m["generative_classification"]["per_digit"], fmt=".0f", scale=100, unit="%"),
    )),
    (lambda m: f"Generated digits, {_used(m)['samples']} per prior; samples.png uses the {m['prior_used']} prior, "
               f"{m['model']['sampling_prior']}", (
        Entry("prior", lambda m: m["prior_used"], fmt="s", key="prior", kind=str),
        Entry("conditional accuracy", lambda m: _used(m)["conditional_accuracy"], fmt=".2f", scale=100, unit="%",
              key="accuracy", header="cond. acc.", median=True),
        Entry("FID against the test images", lambda m: _used(m)["fid"], fmt=".1f", key="fid", header="sample FID",
              median=True),
        Entry("accuracy per digit", lambda m: _used(m)["per_digit"], fmt=".1f", scale=100, unit="%"),
        Entry("reconstruction FID (posterior means decoded)", lambda m: m["reconstruction_fid"], fmt=".1f",
              key="recon_fid", header="recon FID"),
        Entry("the judge's accuracy on the reconstructions", lambda m: m["reconstruction_accuracy"], fmt=".2f",
              scale=100, unit="%", key="recon_accuracy", header="recon acc."),
        Entry("sample FID over reconstruction FID", _fid_gap,
              fmt="+.1f", scale=100, unit="%", key="fid_gap", header="FID gap"),
        Entry("conditional accuracy, N(0, I)", lambda m: m["generation"]["standard"]["conditional_accuracy"],
              fmt=".2f", scale=100, unit="%", key="standard_accuracy", header="N(0,I) acc."),
        Entry("FID, N(0, I)", lambda m: m["generation"]["standard"]["fid"], fmt=".1f", key="standard_fid",
              header="N(0,I) FID"),
    )),
)
ENTRIES = tuple(entry for _, entries in REPORT for entry in entries)
SUMMARY = tuple(entry for entry in ENTRIES if entry.key)  # the columns of bench/'s rows and results.csv


def format_value(entry: Entry, value: Any) -> str:
    """A value as the report and the markdown tables print it; "–" for one that is missing (NaN or None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, list):
        return ", ".join(format_value(entry, v) for v in value)
    if isinstance(value, str):
        return value
    return f"{value * entry.scale if entry.scale != 1 else value:{entry.fmt}}{entry.unit}"


def report(m: dict[str, Any]) -> str:
    """evaluate()'s numbers as a plain-text report, section by section, a line per REPORT entry."""
    lines = [f"Digit classifier: {100 * m['classifier']['test_accuracy']:.2f}% on the MNIST test set"]
    for title, entries in REPORT:
        lines += ["", title(m)]
        for entry in entries:
            lines.append(f"  {entry.label:<48}{format_value(entry, entry.read(m)):>12}")
    return "\n".join(lines)


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The SUMMARY numbers of evaluate()'s dict, by key: one row of bench/seeds.py and bench/sweep.py."""
    return {entry.key: entry.read(m) for entry in SUMMARY}
