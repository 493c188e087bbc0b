"""How the latent code is read: which dimensions carry information, and what each is called.

The evaluation (metrics.py, test.py's figures) and the UI (gradio_test.py) share these, so a dimension has one name on
the figure's axis, in the printed table and on the UI's slider. The model itself needs none of them.
"""
from __future__ import annotations

import torch

ACTIVITY_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Var_x E_q[z_i] exceeds this


def activity(means: torch.Tensor) -> torch.Tensor:
    """How much each latent dimension's posterior mean varies over a data set: (N, latent) means -> (latent,)
    variances (Burda et al. 2016, section 5.2). A dimension the encoder does not use has a mean that does not
    depend on x, and variance near 0."""
    return means.double().var(dim=0)


def active_units(means: torch.Tensor) -> int:
    """The number of latent dimensions whose posterior mean varies more than ACTIVITY_THRESHOLD over `means`."""
    return int((activity(means) > ACTIVITY_THRESHOLD).sum())


def informative_dims(means: torch.Tensor) -> tuple[int, ...]:
    """The latent dimensions a 2-D picture of z shows: all of them when there are at most two, otherwise the two with
    the largest activity (posterior-mean variance over `means`), in index order. test.py's latent_scatter.png and
    manifold.png and the UI's main sliders use these."""
    d = means.shape[1]
    if d <= 2:
        return tuple(range(d))
    return tuple(sorted(activity(means).topk(2).indices.tolist()))


def latent_name(dim: int, latent_dim: int) -> str:
    """What the figures, the printed table and the UI's sliders call latent dimension `dim`: z0 and z1 when they are
    the whole code, z[i] in a wider one."""
    return f"z{dim}" if latent_dim <= 2 else f"z[{dim}]"
