"""Data modules that hold a whole data set as tensors and cut batches by index on the device."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import numpy as np
import torch

from autoenc.errors import UserError
from autoenc.seeds import Stream, derive

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class TensorBatches:
    """Batches `(x, y)` cut from in-memory tensors by a per-epoch permutation; one shard per rank."""

    def __init__(self, x, y, batch_size: int, shuffle: bool, seed: int, epoch: Callable[[], int],
                 rank: int = 0, world: int = 1, position: Callable[[], int] = lambda: 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.seed, self.epoch, self.rank, self.world, self.position = seed, epoch, rank, world, position

    def state_dict(self) -> dict:
        """Where training is in the data, stored in checkpoints: the epoch and the batches of it that the
        training loop has processed (not the ones prefetched)."""
        return {"epoch": self.epoch(), "position": self.position(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: a pass starts at the training loop's own count of processed batches, which
        Lightning restores from the checkpoint (also when it sets the data up before restoring, as
        `Trainer.estimated_stepping_batches` makes it do)."""

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return len(self.x) // step + (len(self.x) % step >= self.world)

    def __iter__(self):
        # Every rank draws the same permutation and takes its equal share of each global batch of
        # batch_size · world examples, so the global batches are those of one process with batch
        # size batch_size · world, and DDP's mean of the ranks' gradients is the global batch's
        # gradient. Up to world − 1 examples at the end are dropped, never repeated.
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive(self.seed, "shuffle", self.epoch()))  # the same on every rank
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order, step = order.to(self.x.device), self.batch_size * self.world
        for k in range(self.position(), len(self)):  # a run resumed inside an epoch continues it
            chunk = order[k * step:(k + 1) * step]
            idx = chunk[:len(chunk) - len(chunk) % self.world].view(self.world, -1)[self.rank]
            yield self.x[idx], self.y[idx]


class Rows:
    """Rows of an array read on demand as tensors (a memory-mapped .npy larger than memory is never
    copied whole): `rows[i]` gathers the rows at positions i of this selection, `subset(i)` selects."""

    def __init__(self, array, index: np.ndarray | None = None, shape: tuple[int, ...] | None = None):
        self.array, self.index = array, np.arange(len(array)) if index is None else np.asarray(index)
        self.example_shape = tuple(shape or array.shape[1:])
        self.dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.example_shape)

    def subset(self, i) -> Rows:
        return Rows(self.array, self.index[np.asarray(i)], self.example_shape)

    def __getitem__(self, i) -> torch.Tensor:
        rows = self.index[i.cpu().numpy() if isinstance(i, torch.Tensor) else i]
        rows = np.atleast_1d(rows)
        order = np.argsort(rows, kind="stable")  # read the file forwards, then restore the asked order
        data = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
        data[order] = self.array[rows[order]]
        return torch.from_numpy(data).view(len(rows), *self.example_shape)


def subset(x, i):
    """The examples at positions i of a tensor or of Rows (lazily)."""
    return x.subset(i) if isinstance(x, Rows) else x[i]


class TensorDataModule(pl.LightningDataModule):
    """Base data module: `load()` returns uint8/float image tensors (N, C, H, W) and labels."""

    def __init__(self, root: str = "data", batch_size: int = 128, val_fraction: float = 0.1,
                 binarize: str | None = None, split_seed: int = 0, seed: int = 0,
                 on_device: bool = True, classes: list[int] | None = None, standardize: bool = False):
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size, self.val_fraction, self.binarize = batch_size, val_fraction, binarize
        self.split_seed, self.seed, self.on_device = split_seed, seed, on_device
        self.classes, self.standardize = (list(classes) if classes is not None else None), standardize
        self._binarizer: Stream | None = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.stats: dict[str, torch.Tensor] = {}  # standardization: per-feature mean and std of the train split

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train / val / test tensors, loaded once; val is a seeded slice of the training set."""
        if self._splits is None:
            xtr, ytr, xte, yte = self.load()
            if self.classes is not None:  # train and validate on these classes; the test keeps every class
                if ytr is None or not bool(torch.isin(ytr, torch.tensor(self.classes)).any()):
                    raise UserError(f"data.classes={self.classes} selects no training example (the labels are "
                                    f"{'missing' if ytr is None else sorted(set(ytr.tolist()))}); fix data.classes")
                keep = torch.isin(ytr, torch.tensor(self.classes)).nonzero().flatten()
                xtr, ytr = subset(xtr, keep), ytr[keep]
            ytr = ytr if ytr is not None else torch.full((len(xtr),), -1)
            yte = yte if yte is not None else torch.full((len(xte),), -1)
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(self.split_seed))
            n_val = int(round(self.val_fraction * len(xtr)))
            val, train = order[:n_val], order[n_val:]
            self._splits = {"train": (subset(xtr, train), ytr[train]), "val": (subset(xtr, val), ytr[val]),
                            "test": (xte, yte)}
            if self.binarize == "static":
                self._splits = {k: (_binarize(x, self.split_seed), y) for k, (x, y) in self._splits.items()}
            elif self.binarize == "dynamic":
                # Evaluation uses one fixed binarization so that val/test figures are comparable.
                for k in ("val", "test"):
                    x, y = self._splits[k]
                    self._splits[k] = (_binarize(x, self.split_seed), y)
        return self._splits

    @property
    def shape(self) -> tuple[int, ...]:
        """(channels, height, width) of an image, (values,) of a vector; the backbone is built from it."""
        return tuple(self.splits["test"][0].shape[1:])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Model input from storage: float32, uint8 scaled to [0, 1], standardized when asked (train stats)."""
        x = to_unit(x)
        if self.standardize:
            stats = self.statistics()
            x = (x - stats["mean"].to(x.device)) / stats["std"].to(x.device)
        return x

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per-feature mean and standard deviation of the training split (read in chunks), once per run;
        stored in checkpoints, so that the commands using a model standardize as its training did."""
        if not self.stats:
            x = self.splits["train"][0]
            total, sq = torch.zeros(x.shape[1:], dtype=torch.float64), torch.zeros(x.shape[1:], dtype=torch.float64)
            for start in range(0, len(x), 4096):
                chunk = to_unit(x[start:start + 4096]).double()
                total += chunk.sum(0)
                sq += chunk.pow(2).sum(0)
            mean = total / len(x)
            std = (sq / len(x) - mean ** 2).clamp_min(0).sqrt()
            self.stats = {"mean": mean.float(), "std": std.clamp_min(1e-6).float()}
        return self.stats

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.statistics().items()} if self.standardize else {}

    def load_state_dict(self, state: dict) -> None:
        self.stats = dict(state)

    def evaluation_split(self, split: str) -> tuple[object, torch.Tensor]:
        """A split as evaluation should see it: with dynamic binarization the training split binarized once
        (seeded), like val and test, so that baselines fit on the kind of data they are scored on."""
        x, y = self.splits[split]
        return (_binarize(x, self.split_seed) if self.binarize == "dynamic" and split == "train" else x), y

    def value_range(self) -> tuple[float, float]:
        """The smallest and largest value the model sees, from the training split (uint8: [0, 1])."""
        x = self.splits["train"][0]
        if x.dtype == torch.uint8 and not self.standardize:
            return 0.0, 1.0
        lo, hi = float("inf"), float("-inf")
        for start in range(0, len(x), 4096):
            chunk = self.transform(x[start:start + 4096])
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
        return lo, hi

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.on_device and device.type != "cpu":
            self._splits = {k: (x if isinstance(x, Rows) else x.to(device), y.to(device))
                            for k, (x, y) in self.splits.items()}

    def _batches(self, split: str, shuffle: bool) -> TensorBatches:
        x, y = self.splits[split]
        trainer = self.trainer
        if trainer is None:
            return TensorBatches(x, y, self.batch_size, shuffle, self.seed, lambda: 0)
        def processed() -> int:  # batches the training loop has processed this epoch
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed if shuffle else 0

        return TensorBatches(x, y, self.batch_size, shuffle, self.seed, lambda: trainer.current_epoch,
                             trainer.global_rank, trainer.world_size, processed)

    def train_dataloader(self):
        return self._batches("train", shuffle=True)

    def val_dataloader(self):
        return self._batches("val", shuffle=False)

    def test_dataloader(self):
        return self._batches("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        x, y = batch
        x = self.transform(x)
        if self.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            x = torch.bernoulli(x, generator=self._binarizing(x.device))  # a fresh sample each time seen
        return x, y

    def _binarizing(self, device) -> torch.Generator:
        """The dynamic binarization's own stream, reseeded at every batch from (seed, rank, batch index)."""
        t = self.trainer
        if self._binarizer is None:
            self._binarizer = Stream(self.seed, "binarize", t.global_rank)
        return self._binarizer.at(t.fit_loop.total_batch_idx, device)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]; uint8 storage is converted per batch on its device."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One seeded Bernoulli sample of each image (stored as 0/1 floats)."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(to_unit(x[:]), generator=g)


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
