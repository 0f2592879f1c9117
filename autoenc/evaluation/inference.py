"""A trained run's model applied to stored examples in batches, without gradients, gathered on the CPU: the
primitives that the evaluation figures and the Python API (autoenc.app.api) share."""

from __future__ import annotations

from typing import Callable

import torch

from autoenc.training.runs import Run
from autoenc.util.errors import UserError


def device(run: Run) -> torch.device:
    return next(run.autoencoder.parameters()).device


def split(run: Run, name: str = "test") -> tuple[object, torch.Tensor]:
    """A split of the run's data as stored (examples, labels; −1 where there are none)."""
    splits = run.datamodule.splits
    if name not in splits:
        raise UserError(f"split={name!r} is not one of {', '.join(splits)}")
    x, y = splits[name]
    return x, y.cpu()


def model_input(run: Run, x) -> torch.Tensor:
    """Model input on the model's device: the run's own transform (uint8 to [0, 1], standardization)."""
    return run.datamodule.transform(x).to(device(run))


def apply(run: Run, fn: Callable[[torch.Tensor], torch.Tensor], x, batch_size: int,
          prepared: bool = False) -> torch.Tensor:
    """fn over batches of stored examples x (model input already, if `prepared`)."""
    on = device(run)
    with torch.no_grad():
        outs = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            outs.append(fn(chunk.to(on) if prepared else model_input(run, chunk)).cpu())
        return torch.cat(outs) if outs else torch.empty(0)


def codes(run: Run, x, batch_size: int, prepared: bool = False) -> torch.Tensor:
    """The deterministic codes (the posterior mean for a gaussian bottleneck), (N, latent_dim)."""
    return apply(run, lambda b: run.autoencoder.encode(b).code, x, batch_size, prepared)


def decoded(run: Run, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Examples decoded from codes (N, latent_dim): the likelihood's mean, in the model's input space."""
    ae = run.autoencoder
    return apply(run, lambda b: ae.likelihood.mean(ae.decode(b)), z, batch_size, prepared=True)


def reconstructions(run: Run, x, batch_size: int) -> torch.Tensor:
    """x̂ from the deterministic code, in the model's input space."""
    return apply(run, run.autoencoder.reconstruct, x, batch_size)


def inputs(run: Run, x, batch_size: int) -> torch.Tensor:
    """Stored examples as model input, on the CPU (in batches: Rows are read batch by batch)."""
    return apply(run, lambda b: b, x, batch_size)
