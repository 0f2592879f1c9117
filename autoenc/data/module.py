"""Data modules: a data set held as tensors with batches cut by index on the device, or streamed from stored rows."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autoenc.util.errors import UserError, is_integer, is_number, require
from autoenc.util.seeds import Stream, derive



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

    def indices(self):
        """The positions of each of this rank's batches still to come in this epoch."""
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
            yield chunk[:len(chunk) - len(chunk) % self.world].view(self.world, -1)[self.rank]

    def __iter__(self):
        for idx in self.indices():
            yield self.x[idx], self.y[idx]


class StreamedBatches(TensorBatches):
    """The same batches as TensorBatches, read from stored rows (a memory-mapped cache) by `workers`
    DataLoader processes, into pinned memory when `pin` (a GPU is fed)."""

    def __init__(self, *args, workers: int = 1, pin: bool = False, **kw):
        super().__init__(*args, **kw)
        self.workers, self.pin = workers, pin

    def __iter__(self):
        batches = list(self.indices())  # decided here, where the epoch and position are known
        loader = torch.utils.data.DataLoader(Examples(self.x, self.y), sampler=batches, batch_size=None,
                                             num_workers=self.workers, pin_memory=self.pin,
                                             generator=torch.Generator())  # torch's global random state untouched
        yield from loader


class Examples(torch.utils.data.Dataset):
    """Whole batches of stored examples and their labels by positions (`dataset[positions]`)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


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

    def __getstate__(self) -> dict:
        """A memory-mapped array travels to worker processes as its file, never as a copy."""
        state, a = dict(self.__dict__), self.array
        if isinstance(a, np.memmap) and a.filename:
            state["array"] = ("memmap", a.filename, a.dtype.str, a.shape, a.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        a = state["array"]
        if isinstance(a, tuple):
            _, name, dtype, shape, offset = a
            state["array"] = np.memmap(name, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

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


class Augment:
    """Random horizontal flips (probability `flip`) and random crops (shifts of up to `crop` pixels, the
    image padded by reflection and cut back to its size) of training batches, on their device."""

    def __init__(self, flip: float = 0.0, crop: int = 0):
        if not 0 <= flip <= 1 or not isinstance(crop, int) or crop < 0:
            raise UserError(f"data.augment.flip={flip} must be a probability in [0, 1] and data.augment.crop={crop} "
                            "an integer ≥ 0 (pixels)")
        self.flip, self.crop = flip, crop

    def __bool__(self) -> bool:
        return self.flip > 0 or self.crop > 0

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise UserError(f"data.augment flips and crops images; these examples have shape {tuple(x.shape[1:])}")
        n, c, h, w = x.shape
        if self.flip:
            flip = torch.rand(n, generator=g, device=x.device) < self.flip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.crop:
            p = self.crop
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
            dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), generator=g, device=x.device)
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        return x


class Binarization:
    """How images become 0/1 samples (`data.binarize=null`: they do not): which splits are kept as one seeded
    sample, what evaluation sees of a split, and what a training batch becomes."""

    @classmethod
    def named(cls, name: str | None) -> "Binarization":
        """The binarization `data.binarize` names: null or one of the subclasses, by lower-case class name."""
        kinds = {k.__name__.lower(): k for k in cls.__subclasses__()}
        require(name is None or name in kinds, "data.binarize", name, f"null, {' or '.join(kinds)}")
        return cls() if name is None else kinds[name]()

    def stored(self, split: str, x: torch.Tensor, seed: int) -> torch.Tensor:
        """A split as the data module keeps it."""
        return x

    def evaluated(self, split: str, x: torch.Tensor, seed: int) -> torch.Tensor:
        """A kept split as evaluation should see it."""
        return x

    def training(self, x: torch.Tensor, generator: Callable[[], torch.Generator]) -> torch.Tensor:
        """A training batch (in [0, 1]) as the model sees it; `generator()` gives this batch's stream."""
        return x


class Static(Binarization):
    """One seeded Bernoulli sample of each image, kept for every split."""

    def stored(self, split, x, seed):
        return binarized(x, seed)


class Dynamic(Binarization):
    """A fresh Bernoulli sample of each training image every time it is seen; validation and test keep one
    seeded sample so that their figures compare, and evaluation binarizes the training split once in the
    same way, so that baselines fit on the kind of data they are scored on."""

    def stored(self, split, x, seed):
        return x if split == "train" else binarized(x, seed)

    def evaluated(self, split, x, seed):
        return binarized(x, seed) if split == "train" else x

    def training(self, x, generator):
        return torch.bernoulli(x, generator=generator())


class TensorDataModule:
    """Base data module: `load()` returns uint8/float image tensors (N, C, H, W) (or Rows) and labels;
    `workers` > 0 reads the batches of stored Rows in that many DataLoader processes. A plain object, so that
    using a model needs no Lightning; a Trainer sees it through autoenc.training.datamodule, which sets
    `trainer` (the batches' epoch, rank and position come from it)."""

    trainer = None

    def __init__(self, root: str = "data", batch_size: int = 128, val_fraction: float = 0.1,
                 binarize: str | None = None, split_seed: int = 0, seed: int = 0,
                 on_device: bool = True, classes: list[int] | None = None, standardize: bool = False,
                 augment: Augment | None = None, workers: int = 0):
        require(is_integer(batch_size) and batch_size >= 1, "data.batch_size", batch_size, "a positive integer")
        require(is_number(val_fraction) and 0 <= val_fraction < 1, "data.val_fraction", val_fraction, "a fraction in [0, 1)")
        self.binarize = Binarization.named(binarize)
        require(standardize in (True, False), "data.standardize", standardize, "true or false")
        if binarize and standardize:
            raise UserError("data.binarize and data.standardize exclude each other: binarization needs values in [0, 1]")
        self.root = Path(root).expanduser()
        self.batch_size, self.val_fraction = batch_size, val_fraction
        self.split_seed, self.seed, self.on_device = split_seed, seed, on_device
        self.classes, self.standardize = (list(classes) if classes is not None else None), standardize
        self.augment, self.workers = augment if augment else None, workers
        self._binarizer: Stream | None = None
        self._augmenter: Stream | None = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.stats: dict[str, torch.Tensor] = {}  # standardization: per-feature mean and std of the train split

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_splits(self) -> dict[str, tuple[object, torch.Tensor | None]]:
        """Train / val / test: val a seeded slice of the training set (of its `classes`, if given)."""
        xtr, ytr, xte, yte = self.load()
        xtr, ytr = self.only_classes(xtr, ytr)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(xtr)))
        val, train = order[:n_val], order[n_val:]
        pick = (lambda i: None) if ytr is None else (lambda i: ytr[i])
        return {"train": (subset(xtr, train), pick(train)), "val": (subset(xtr, val), pick(val)), "test": (xte, yte)}

    def only_classes(self, x, y):
        """The examples whose label is one of `classes` (all when classes is None)."""
        if self.classes is None:
            return x, y
        if y is None or not bool(torch.isin(y, torch.tensor(self.classes)).any()):
            raise UserError(f"data.classes={self.classes} selects no training example (the labels are "
                            f"{'missing' if y is None else sorted(set(y.tolist()))}); fix data.classes")
        keep = torch.isin(y, torch.tensor(self.classes)).nonzero().flatten()
        return subset(x, keep), y[keep]

    @property
    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train / val / test examples and labels (−1: none), loaded once; the test keeps every class."""
        if self._splits is None:
            self._splits = {k: (x, y if y is not None else torch.full((len(x),), -1))
                            for k, (x, y) in self.load_splits().items()}
            self._splits = {k: (self.binarize.stored(k, x, self.split_seed), y) for k, (x, y) in self._splits.items()}
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
        """A split as evaluation should see it (Binarization.evaluated)."""
        x, y = self.splits[split]
        return self.binarize.evaluated(split, x, self.split_seed), y

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
        device = self._device()
        if self.on_device and device.type != "cpu":
            self._splits = {k: (x if isinstance(x, Rows) else x.to(device), y.to(device))
                            for k, (x, y) in self.splits.items()}

    def teardown(self, stage: str) -> None:
        """Back to the CPU after fit or test, as Lightning moves the model: the device's memory is freed."""
        if self._splits is not None:
            self._splits = {k: (x if isinstance(x, Rows) else x.cpu(), y.cpu()) for k, (x, y) in self._splits.items()}

    def _batches(self, split: str, shuffle: bool) -> TensorBatches:
        x, y = self.splits[split]
        trainer = self.trainer
        streamed = isinstance(x, Rows) and self.workers > 0
        kind = partial(StreamedBatches, workers=self.workers, pin=self._device().type == "cuda") if streamed else TensorBatches
        if trainer is None:
            return kind(x, y, self.batch_size, shuffle, self.seed, lambda: 0)

        def processed() -> int:  # batches the training loop has processed this epoch
            # the batches taken; where this is read (a pass's start, a checkpoint) the last one is processed
            return trainer.fit_loop.batch_idx + 1 if shuffle else 0

        return kind(x, y, self.batch_size, shuffle, self.seed, lambda: trainer.current_epoch,
                    trainer.global_rank, trainer.world_size, processed)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self):
        return self._batches("train", shuffle=True)

    def val_dataloader(self):
        return self._batches("val", shuffle=False)

    def test_dataloader(self):
        return self._batches("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        x, y = batch
        x = self.transform(x)
        if self.trainer is not None and self.trainer.training:
            if self.augment is not None:  # training batches only: val and test are seen as they are
                if self._augmenter is None:
                    self._augmenter = Stream(self.seed, "augment", self.trainer.global_rank)
                x = self.augment(x, self._augmenter.at(self.trainer.fit_loop.total_batch_idx, x.device))
            x = self.binarize.training(x, lambda: self._binarizing(x.device))
        return x, y

    def _binarizing(self, device) -> torch.Generator:
        """The dynamic binarization's own stream, reseeded at every batch from (seed, rank, batch index)."""
        t = self.trainer
        if self._binarizer is None:
            self._binarizer = Stream(self.seed, "binarize", t.global_rank)
        return self._binarizer.at(t.fit_loop.total_batch_idx, device)


def checked_test_fraction(value) -> float:
    """A held-out test share in (0, 1), for the sources that cut their own test split."""
    require(is_number(value) and 0 < value < 1, "data.test_fraction", value, "a fraction in (0, 1)")
    return value


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]; uint8 storage is converted per batch on its device."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def binarized(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One seeded Bernoulli sample of each image (stored as 0/1 floats)."""
    p = to_unit(x[:])  # drawn on the CPU: the same images whatever device the split is on
    return torch.bernoulli(p.cpu(), generator=torch.Generator().manual_seed(seed)).to(p.device)
