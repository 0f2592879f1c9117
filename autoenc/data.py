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


class TensorDataModule(pl.LightningDataModule):
    """Base data module: `load()` returns uint8/float image tensors (N, C, H, W) and labels."""

    def __init__(self, root: str = "data", batch_size: int = 128, val_fraction: float = 0.1,
                 binarize: str | None = None, split_seed: int = 0, seed: int = 0,
                 on_device: bool = True):
        super().__init__()
        self.root = Path(root).expanduser()
        self.batch_size, self.val_fraction, self.binarize = batch_size, val_fraction, binarize
        self.split_seed, self.seed, self.on_device = split_seed, seed, on_device
        self._binarizer: Stream | None = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train / val / test tensors, loaded once; val is a seeded slice of the training set."""
        if self._splits is None:
            xtr, ytr, xte, yte = self.load()
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(self.split_seed))
            n_val = int(round(self.val_fraction * len(xtr)))
            val, train = order[:n_val], order[n_val:]
            self._splits = {"train": (xtr[train], ytr[train]), "val": (xtr[val], ytr[val]),
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
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one example; the backbone is built from it."""
        return tuple(self.splits["test"][0].shape[1:])

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.on_device and device.type != "cpu":
            self._splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

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
        x = to_unit(x)
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
    return torch.bernoulli(to_unit(x), generator=g)


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


class ImageFolder(TensorDataModule):
    """Any folder of images, resized to `size`; sub-folder names become labels."""

    def __init__(self, path: str = "images", size: int = 32, channels: int = 1,
                 test_fraction: float = 0.1, **kw):
        super().__init__(**kw)
        self.path, self.size, self.channels, self.test_fraction = Path(path).expanduser(), size, channels, test_fraction

    def load(self):
        from PIL import Image, UnidentifiedImageError

        if not self.path.is_dir():
            raise UserError(f"image folder {self.path} does not exist; set data.path= to a folder of images")
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {self.path}")
        mode = "L" if self.channels == 1 else "RGB"
        images = []
        for p in files:
            try:
                with Image.open(p) as im:
                    im = im.convert(mode).resize((self.size, self.size), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8).reshape(self.size, self.size, -1))
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"cannot read image {p}: {e}; remove or replace it") from None
        classes = sorted({p.parent.name for p in files})
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([classes.index(p.parent.name) for p in files])
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
        n_test = max(1, int(round(self.test_fraction * len(x))))
        return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]
