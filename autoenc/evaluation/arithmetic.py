"""Latent arithmetic on a trained run's codes: straight paths between codes, traversals of each dimension,
attribute vectors ("smiling face − neutral face = smile vector") and how far adding one moves examples."""

from __future__ import annotations

import torch

from autoenc.evaluation import inference
from autoenc.evaluation.baselines import training_sample
from autoenc.model import metrics
from autoenc.training.runs import Run
from autoenc.util.errors import UserError


def interpolation(run: Run, a, b, steps: int, batch_size: int, ya=None, yb=None) -> torch.Tensor:
    """Decoded straight latent paths from each stored example of `a` to the one of `b`: (N, steps, *shape).
    A conditional model decodes each path with the labels of its start, `ya`."""
    za, zb = inference.codes(run, a, batch_size, y=ya), inference.codes(run, b, batch_size, y=yb)
    if len(za) != len(zb):
        raise UserError(f"interpolate needs as many examples in a as in b ({len(za)} vs {len(zb)})")
    t = torch.linspace(0, 1, steps).view(1, -1, 1)
    z = (1 - t) * za[:, None] + t * zb[:, None]
    along = None if ya is None else torch.as_tensor(ya).repeat_interleave(steps, 0)
    x = inference.decoded(run, z.flatten(0, 1), batch_size, along)
    return x.view(len(za), steps, *x.shape[1:])


def traversal(run: Run, x, steps: int, span: float, batch_size: int, y=None) -> torch.Tensor:
    """Row i sweeps dimension i of the first stored example's code over [−span, span]: (d, steps, *shape)."""
    y0 = None if y is None else torch.as_tensor(y)[:1]
    z0 = inference.codes(run, x[:1], batch_size, y=y0)[0]
    d = len(z0)
    z = z0.expand(d, steps, d).clone()
    z[torch.arange(d), :, torch.arange(d)] = torch.linspace(-span, span, steps)
    decoded = inference.decoded(run, z.flatten(0, 1), batch_size, None if y0 is None else y0.expand(d * steps, *y0.shape[1:]))
    return decoded.view(d, steps, *decoded.shape[1:])


def members(run: Run, name, split: str = "train") -> torch.Tensor:
    """Which examples of a split carry `name`: a class label (y == name), or an attribute of the data
    (e.g. CelebA's Smiling) where the data module names them."""
    _, y = inference.split(run, split)
    names = list(getattr(run.datamodule, "attribute_names", []) or []) if y.dim() == 2 else []
    if names:  # attributes as label columns (CelebA with data.target=all)
        if str(name) not in names:
            raise UserError(f"{name!r} is not an attribute of this data; use one of: {', '.join(names)}")
        return y[:, names.index(str(name))] > 0
    labels = sorted(set(y.flatten().tolist()))
    try:
        label = int(name)
    except (TypeError, ValueError):
        raise UserError(f"{name!r} is neither a label nor an attribute of this data; its labels are "
                        f"{', '.join(map(str, labels))} (CelebA's attributes by name need data.target=all)") from None
    found = y == label
    if not found.any():
        raise UserError(f"no {split} example has label {label}; the labels are {', '.join(map(str, labels))}")
    return found


def attribute_vector(run: Run, to, from_=None, split: str = "train", batch_size: int = 1024) -> torch.Tensor:
    """The mean code of the examples with `to` minus the mean code of those with `from_` (default: all the
    others), over a split."""
    with_to = members(run, to, split)
    with_from = ~with_to if from_ is None else members(run, from_, split)
    if torch.equal(with_from, with_to):
        raise UserError(f"from={from_} and to={to} name the same group, whose attribute vector is zero; choose "
                        "two different labels or attributes, or leave from= out (all the others)")
    x, y = inference.split(run, split)
    codes = inference.codes(run, x, batch_size, y=y)
    return codes[with_to].mean(0) - codes[with_from].mean(0)


def shift(run: Run, x, vector, strengths, batch_size: int, y=None) -> torch.Tensor:
    """The codes of stored examples x moved along `vector` by each strength, decoded: (N, len(strengths), *shape)
    (a conditional model keeps each example's own labels y)."""
    z = inference.codes(run, x, batch_size, y=y)
    s = torch.as_tensor(list(strengths), dtype=z.dtype).view(1, -1, 1)
    along = None if y is None else torch.as_tensor(y).repeat_interleave(len(strengths), 0)
    moved = inference.decoded(run, (z[:, None] + s * torch.as_tensor(vector)[None, None]).flatten(0, 1).float(),
                              batch_size, along)
    return moved.view(len(z), len(strengths), *moved.shape[1:])


def attribute_transfer(run: Run, to, from_=None, strengths=(-2, -1, 0, 1, 2), n: int = 8,
                       probe_examples: int = 10_000, seed: int = 0, batch_size: int = 1024) -> dict:
    """Adds the `from_` → `to` attribute vector (fitted on the training split) to n test examples that
    have `from_` (default: lack `to`) at each strength, and measures how far they moved: the share of the
    shifted, decoded examples that a linear probe fitted on real training examples (input space, `to`
    against the rest) assigns to `to`. Returns the vector, the examples, the shifted decodings, shares."""
    vector = attribute_vector(run, to, from_, "train", batch_size)
    x_te, y_te = inference.split(run, "test")
    chosen = (~members(run, to, "test") if from_ is None else members(run, from_, "test")).nonzero().flatten()
    if not len(chosen):
        raise UserError(f"no test example has {from_!r} to move toward {to!r}")
    chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    stored = x_te[chosen]  # (Rows gather the rows of a tensor of positions too)
    x = inference.model_input(run, stored).cpu()
    moved = shift(run, stored, vector, strengths, batch_size, y_te[chosen])  # (stored: shift transforms them once)
    x_tr, _ = inference.split(run, "train")
    keep, x_tr_in = training_sample(run, x_tr, probe_examples, seed, batch_size)
    target = members(run, to, "train")[keep]
    probe = metrics.fit_probe(x_tr_in, target.long())
    shares = [float(probe.predict(metrics.flat(moved[:, i])).mean()) for i in range(len(strengths))]
    return {"vector": vector, "examples": chosen, "input": x, "shifted": moved, "share_to": shares,
            "strengths": list(strengths)}
