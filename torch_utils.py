"""Small torch helpers that know nothing of the CVAE, shared by the model, the judge and the evaluation."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
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


def batched(fn: Callable[..., Any], *tensors: torch.Tensor, batch_size: int) -> Any:
    """fn over consecutive slices of `tensors` (all of one length), batch_size rows at a time, in order, with its
    outputs concatenated along the first dimension: what fn(*tensors) returns, without holding every intermediate at
    once. fn may return a tensor or a tuple of tensors (each concatenated); noise it draws from a generator is drawn
    batch by batch in the rows' order."""
    n = len(tensors[0])
    outputs = [fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, n, batch_size)] or [fn(*tensors)]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)
