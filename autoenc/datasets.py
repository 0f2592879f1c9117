"""The data sets: scikit-learn's digits, MNIST-format IDX files, CIFAR-10, folders of images, your own arrays."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from autoenc.data import IMAGE_SUFFIXES, Rows, TensorDataModule
from autoenc.errors import UserError


class Digits(TensorDataModule):
    """scikit-learn's 8×8 digits (1,797 images), shipped inside the package: works offline."""

    def __init__(self, test_fraction: float = 0.2, **kw):
        super().__init__(**kw)
        self.test_fraction = test_fraction

    def load(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).div_(16).unsqueeze(1)
        y = torch.tensor(d.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
        n_test = int(round(self.test_fraction * len(x)))
        test, train = order[:n_test], order[n_test:]
        return x[train], y[train], x[test], y[test]


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally .gz), checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; delete it and provide an intact copy") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; provide an intact copy")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise UserError(f"{path} holds {len(data)} bytes but its header says {expected}: "
                        "the file is truncated or corrupt; provide an intact copy")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class IDX(TensorDataModule):
    """MNIST-format data (MNIST, Fashion-MNIST) read from `<root>/<name>/raw/*-ubyte[.gz]`."""

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, name: str = "MNIST", download: bool = False, **kw):
        super().__init__(**kw)
        self.name, self.download = name, download

    def _find(self, stem: str) -> Path | None:
        raw = self.root / self.name / "raw"
        return next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)

    def load(self):
        missing = [s for s in self.FILES if self._find(s) is None]
        if missing and self.download:
            import torchvision

            try:
                getattr(torchvision.datasets, self.name)(str(self.root), train=True, download=True)
                getattr(torchvision.datasets, self.name)(str(self.root), train=False, download=True)
            except Exception as e:  # no network, or a mirror refused: say so in one line
                raise UserError(f"could not download {self.name} to {self.root}: {e}") from None
            missing = [s for s in self.FILES if self._find(s) is None]
        if missing:
            raw = self.root / self.name / "raw"
            raise UserError(f"missing {raw / missing[0]}(.gz); put the {self.name} IDX files in {raw} "
                            "(set data.root= or AUTOENC_DATA_DIR), or pass data.download=true")
        xtr, ytr, xte, yte = (torch.from_numpy(read_idx(self._find(s)).copy()) for s in self.FILES)
        return xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long()


class CIFAR10(TensorDataModule):
    """CIFAR-10 through torchvision (its python batches under `<root>/cifar-10-batches-py`)."""

    def __init__(self, download: bool = False, **kw):
        super().__init__(**kw)
        self.download = download

    def load(self):
        import torchvision

        try:
            sets = [torchvision.datasets.CIFAR10(str(self.root), train=t, download=self.download)
                    for t in (True, False)]
        except Exception as e:
            raise UserError(f"CIFAR-10 not found under {self.root / 'cifar-10-batches-py'} ({e}); "
                            "set data.root= or AUTOENC_DATA_DIR, or pass data.download=true") from None
        (xtr, ytr), (xte, yte) = ((torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                                   torch.tensor(s.targets)) for s in sets)
        return xtr, ytr, xte, yte


def read_images(path: Path, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Every image under `path` in sorted path order, resized to size × size: uint8 (N, C, H, W), labels
    from sub-folder names, and the files."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist; give a folder of images")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {path}")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((size, size), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8).reshape(size, size, -1))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read image {p}: {e}; remove or replace it") from None
    classes = sorted({p.parent.name for p in files})
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([classes.index(p.parent.name) for p in files]), files


def test_split(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (seeded) split of n examples into training and test positions."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    n_test = max(1, int(round(fraction * n)))
    return order[n_test:], order[:n_test]


class ImageFolder(TensorDataModule):
    """Any folder of images, resized to `size`; sub-folder names become labels."""

    def __init__(self, path: str | None = None, size: int = 32, channels: int = 1,
                 test_fraction: float = 0.1, **kw):
        super().__init__(**kw)
        self.path, self.size, self.channels, self.test_fraction = path, size, channels, test_fraction

    def load(self):
        if not self.path:
            raise UserError("data=folder needs the images' folder: data.path=DIR")
        x, y, _ = read_images(Path(self.path).expanduser(), self.size, self.channels)
        train, test = test_split(len(x), self.test_fraction)
        return x[train], y[train], x[test], y[test]


class Arrays(TensorDataModule):
    """Your own arrays from `path`: .npy (memory-mapped: larger than memory is fine), .npz (arrays `x`
    and optionally `y`) or .pt (a tensor, or a dict with `x` and optionally `y`); vectors (N, D) or images
    (N, H, W) / (N, C, H, W), uint8 (scaled to [0, 1]) or float (taken as they are)."""

    def __init__(self, path: str | None = None, test_fraction: float = 0.1, **kw):
        super().__init__(**kw)
        self.path, self.test_fraction = path, test_fraction

    def read(self) -> tuple[object, np.ndarray | None]:
        path = Path(str(self.path)).expanduser()
        if not self.path or not path.is_file():
            raise UserError(f"data=array needs a .npy, .npz or .pt file: data.path={self.path or '?'} "
                            f"{'is not a file' if self.path else 'is not set'}")
        try:
            if path.suffix == ".npy":
                return np.load(path, mmap_mode="r"), None
            if path.suffix == ".npz":
                with np.load(path) as z:
                    return _parts(dict(z), path)
            if path.suffix == ".pt":
                data = torch.load(path, map_location="cpu", weights_only=True)
                data = data if isinstance(data, dict) else {"x": data}
                return _parts({k: np.asarray(v) for k, v in data.items()}, path)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        raise UserError(f"data.path={path} must end in .npy, .npz or .pt")

    def examples(self) -> tuple[Rows, torch.Tensor | None]:
        """Every example in file order (checked: shape, type, finite values) and the labels, if any."""
        x, y = self.read()
        if x.ndim not in (2, 3, 4) or x.dtype != np.uint8 and x.dtype.kind != "f":
            raise UserError(f"{self.path} holds a {x.dtype} array of shape {tuple(x.shape)}: it must be uint8 or "
                            "float vectors (N, D) or images (N, H, W) or (N, C, H, W)")
        if y is not None and len(y) != len(x):
            raise UserError(f"{self.path}: y has {len(y)} labels for {len(x)} examples")
        if x.dtype.kind == "f":
            for start in range(0, len(x), 65536):  # in chunks: a memory-mapped file stays on disk
                bad = ~np.isfinite(x[start:start + 65536])
                if bad.any():
                    row = start + int(np.argwhere(bad)[0][0])
                    raise UserError(f"{self.path} has a NaN or infinite value in example {row}; clean the data")
        shape = (1, *x.shape[1:]) if x.ndim == 3 else x.shape[1:]
        return Rows(x, shape=shape), torch.as_tensor(np.asarray(y)).long() if y is not None else None

    def load(self):
        rows, labels = self.examples()
        train, test = test_split(len(rows), self.test_fraction)
        pick = (lambda i: labels[i]) if labels is not None else (lambda i: None)
        return rows.subset(train.numpy()), pick(train), rows.subset(test.numpy()), pick(test)


def _parts(arrays: dict, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if "x" not in arrays:
        raise UserError(f"{path} needs an array named x (and optionally y); it has: {', '.join(arrays) or 'none'}")
    return arrays["x"], arrays.get("y")
