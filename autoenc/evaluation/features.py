"""The feature network FID, KID and rFID compare images in (`eval.features`): a small CNN classifier trained on
the run's own data (`autoenc classifier`, saved as safetensors beside a JSON of its shape), torchmetrics'
Inception-v3 where torch-fidelity and its weights are installed, or any nn.Module the user names by
`_target_`. Each is wrapped to take images in [0, 1] (N, C, H, W) and return (N, F)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from autoenc.util.errors import UserError

KIND = "autoenc-classifier"  # what the JSON beside a classifier's weights says it is


class SmallCNN(nn.Module):
    """Two 3×3 convolutions (each ReLU and 2×2 max-pooling), pooled to 4×4, a `features`-unit ReLU layer and
    a linear layer onto the classes: `features(x)` is the penultimate layer, what FID and KID compare."""

    def __init__(self, in_channels: int, height: int, width: int, classes: int, channels=(16, 32),
                 features: int = 128):
        super().__init__()
        self.shape = (in_channels, height, width)
        self.classes, self.channels, self.num_features = classes, tuple(channels), features
        c1, c2 = self.channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c2 * 16, features), nn.ReLU())
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def description(self) -> dict:
        c, h, w = self.shape
        return {"kind": KIND, "in_channels": c, "height": h, "width": w, "classes": self.classes,
                "channels": list(self.channels), "features": self.num_features}


class Features(nn.Module):
    """A feature network as torchmetrics' FID and KID take it: images in [0, 1] (clamped: an MSE model's means
    may stray past them) → float (N, num_features). `num_features` spares torchmetrics its dummy forward."""

    def __init__(self, net, num_features: int, name: str):
        super().__init__()
        self.net, self.num_features, self.name = net, num_features, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().clamp(0, 1)).float().flatten(1)


class Inception(nn.Module):
    """torchmetrics' Inception-v3 (torch-fidelity's FID weights): [0, 1] images, grey ones repeated into three
    channels, as uint8 → the 2048 pool features."""

    def __init__(self):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.inception((x * 255).round().to(torch.uint8))


def train_classifier(x_train, y_train, transform, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0, x_test=None, y_test=None, progress: bool = True) -> tuple[SmallCNN, dict]:
    """A SmallCNN trained (Adam, cross-entropy, seeded order) on stored examples x_train (made images in
    [0, 1] by `transform`, batch by batch) with class labels y_train; its test accuracy where a test split is
    given. Returns the network (eval mode, on the CPU) and {'train_accuracy', 'test_accuracy'}."""
    y_train = torch.as_tensor(y_train).long().cpu()
    first = transform(x_train[:1]).cpu()
    classes = int(y_train.max()) + 1
    torch.manual_seed(seed)
    net = SmallCNN(first.shape[1], first.shape[2], first.shape[3], classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order, total, right = torch.randperm(len(y_train), generator=g), 0.0, 0
        for start in range(0, len(order), batch_size):
            i = order[start:start + batch_size]
            x, y = transform(x_train[i]).cpu(), y_train[i]
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
            right += int((logits.argmax(1) == y).sum())
        if progress:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}, "
                  f"train accuracy {right / len(order):.4f}", flush=True)
    net.eval()
    figures = {"train_accuracy": right / max(len(order), 1)} if epochs else {}
    if x_test is not None and y_test is not None:
        figures["test_accuracy"] = accuracy(net, x_test, y_test, transform, batch_size)
    return net, figures


def accuracy(net: SmallCNN, x, y, transform, batch_size: int = 512) -> float:
    y = torch.as_tensor(y).long().cpu()
    right = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            right += int((net(transform(x[start:start + batch_size]).cpu()).argmax(1) == y[start:start + batch_size]).sum())
    return right / max(len(y), 1)


def save_classifier(net: SmallCNN, path: Path, extra: dict | None = None) -> Path:
    """The weights as safetensors at `path` and its shape (and `extra`: data, accuracy…) as JSON beside it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({**net.description(), **(extra or {})}, indent=2) + "\n")
    return path


def load_classifier(path) -> SmallCNN:
    """A SmallCNN from `autoenc classifier`'s FILE.safetensors and FILE.json (safetensors only: no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(str(path)).expanduser()
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise UserError(f"eval.features={path} does not exist; train one with `autoenc classifier data=<data> out={path}`")
    try:
        meta = json.loads(meta_path.read_text())
        assert meta.get("kind") == KIND
        net = SmallCNN(meta["in_channels"], meta["height"], meta["width"], meta["classes"], meta["channels"],
                       meta["features"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"eval.features={path} needs {meta_path.name} beside it, as `autoenc classifier` writes "
                        "(its shape); retrain with `autoenc classifier`") from None
    try:
        net.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise UserError(f"eval.features={path} is not the weights {meta_path.name} describes: "
                        f"{str(e).splitlines()[0]}") from None
    return net.eval()


def inception_refusal(reason: str) -> UserError:
    return UserError(f"eval.features=inception needs torch-fidelity and its Inception-v3 weights, which are not "
                     f"available here ({reason}): pip install torch-fidelity and evaluate once with a network (the "
                     f"weights are cached), or give eval.features=<FILE.safetensors> from `autoenc classifier`")


def inception() -> Features:
    """torchmetrics' Inception-v3, or the one-line refusal saying how to make it available."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise inception_refusal("no module torch_fidelity") from None
    try:
        net = Inception()
    except Exception as e:  # noqa: BLE001 — a failed download surfaces as URLError, HTTPError, OSError, RuntimeError…
        raise inception_refusal(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no weights'}") from None
    return Features(net.eval(), 2048, "inception")


def feature_network(spec, shape: tuple[int, ...]) -> Features | None:
    """The feature network `eval.features` names, checked against the model's image shape: None (FID and KID
    skipped), `inception`, a classifier's .safetensors file, or a node with `_target_` (an nn.Module taking
    images in [0, 1] and returning (N, F))."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec == "inception":
        return inception()
    if isinstance(spec, str):
        if not spec.endswith(".safetensors"):
            raise UserError(f"eval.features={spec} is not a feature network: give null, inception, a .safetensors "
                            "file from `autoenc classifier`, or {_target_: module.Class} (an nn.Module)")
        net = load_classifier(spec)
        if tuple(net.shape) != tuple(shape):
            raise UserError(f"eval.features={spec} was trained on {'×'.join(map(str, net.shape))} images and this "
                            f"model makes {'×'.join(map(str, shape))}; train one on the run's data "
                            "(`autoenc classifier data=<the run's data>`)")
        return Features(net.body, net.num_features, Path(spec).name)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    target = OmegaConf.select(spec, "_target_") if OmegaConf.is_config(spec) else (spec or {}).get("_target_")
    if not target:
        raise UserError(f"eval.features={spec} is not a feature network: give null, inception, a .safetensors file "
                        "from `autoenc classifier`, or {_target_: module.Class}")
    try:
        net = instantiate(spec)
    except Exception as e:  # noqa: BLE001 — Hydra wraps the user's import or constructor error
        raise UserError(f"eval.features: cannot build {target}: {str(e).splitlines()[0]}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"eval.features: {target} made a {type(net).__name__}, not an nn.Module")
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shape))
    if not isinstance(out, torch.Tensor) or len(out) != 2:
        raise UserError(f"eval.features: {target} must map images (N, {', '.join(map(str, shape))}) to (N, F)")
    return Features(net, int(out.flatten(1).shape[1]), str(target))


