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


def apply(run: Run, fn: Callable[..., torch.Tensor], x, batch_size: int, prepared: bool = False,
          y: torch.Tensor | None = None) -> torch.Tensor:
    """fn over batches of stored examples x (model input already, if `prepared`), with the batch's labels y
    (fn(batch, labels)) where they are given: what a conditional model needs."""
    on = device(run)
    with torch.no_grad():
        outs = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            chunk = chunk.to(on) if prepared else model_input(run, chunk)
            outs.append((fn(chunk) if y is None else fn(chunk, y[start:start + batch_size].to(on))).cpu())
        return torch.cat(outs) if outs else torch.empty(0)


def labels(run: Run, y) -> torch.Tensor | None:
    """The labels a conditional model is given (None for another model, which needs none)."""
    return None if run.autoencoder.condition.width == 0 or y is None else torch.as_tensor(y)


def codes(run: Run, x, batch_size: int, prepared: bool = False, y=None) -> torch.Tensor:
    """The deterministic codes (the posterior mean for a gaussian bottleneck), one vector per example
    (N, code_size): a grid's map (latent_dim, H, W) flattened channel by channel."""
    return apply(run, lambda b, yb=None: run.autoencoder.encode(b, y=yb).code.flatten(1), x, batch_size, prepared,
                 labels(run, y))


def indices(run: Run, x, batch_size: int, y=None) -> torch.Tensor:
    """A quantized code's indices into its codebook, (N,) or (N, H, W) on a grid (bottleneck=vq)."""
    return apply(run, lambda b, yb=None: run.autoencoder.encode(b, y=yb).indices, x, batch_size, y=labels(run, y))


def decoded(run: Run, z: torch.Tensor, batch_size: int, y=None) -> torch.Tensor:
    """Examples decoded from codes (N, code_size) or (N, *code_shape): the likelihood's mean, in the model's
    input space."""
    ae = run.autoencoder
    return apply(run, lambda b, yb=None: ae.likelihood.mean(ae.decode(b.view(len(b), *ae.code_shape), yb)), z,
                 batch_size, True, labels(run, y))


def looked_up(run: Run, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The codes (N, *code_shape) that codebook indices stand for (bottleneck=vq)."""
    return apply(run, run.autoencoder.bottleneck.lookup, indices.long(), batch_size, prepared=True)


def reconstructions(run: Run, x, batch_size: int, y=None) -> torch.Tensor:
    """x̂ from the deterministic code, in the model's input space."""
    return apply(run, run.autoencoder.reconstruct, x, batch_size, y=labels(run, y))


def inputs(run: Run, x, batch_size: int) -> torch.Tensor:
    """Stored examples as model input, on the CPU (in batches: Rows are read batch by batch)."""
    return apply(run, lambda b: b, x, batch_size)
