"""Small torch helpers that know nothing of the CVAE, shared by the model, the judge and the evaluation."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block in eval mode (no dropout) and give the module its previous mode back afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
