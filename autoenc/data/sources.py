"""The data sets: scikit-learn's digits, MNIST-format IDX files, CIFAR-10, folders of images and CelebA (decoded
once into a cache), your own arrays."""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from autoenc.data import cache
from autoenc.data.module import Rows, TensorDataModule, checked_test_fraction, subset
from autoenc.util.errors import UserError, is_integer, require


class Digits(TensorDataModule):
    """scikit-learn's 8×8 digits (1,797 images), shipped inside the package: works offline."""

    def __init__(self, test_fraction: float = 0.2, **kw):
        super().__init__(**kw)
        self.test_fraction = checked_test_fraction(test_fraction)

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
    """CIFAR-10 from its python batches under `<root>/cifar-10-batches-py` (data_batch_1…5, test_batch),
    read by an unpickler that admits only NumPy arrays, so that a batch file cannot run code."""

    FOLDER, TRAIN, TEST = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]

    def __init__(self, download: bool = False, **kw):
        super().__init__(**kw)
        self.download = download

    def load(self):
        folder = self.root / self.FOLDER
        if self.download and not folder.is_dir():
            import torchvision  # downloads and checks the archive's MD5; reading stays ours

            official = torchvision.datasets.CIFAR10
            torchvision.datasets.utils.download_and_extract_archive(official.url, str(self.root), md5=official.tgz_md5)
        missing = [n for n in self.TRAIN + self.TEST if not (folder / n).is_file()]
        if missing:
            raise UserError(f"CIFAR-10 not found under {folder} (missing {', '.join(missing)}); set data.root= or "
                            "AUTOENC_DATA_DIR, or pass data.download=true")
        (xtr, ytr), (xte, yte) = (read_cifar_batches([folder / n for n in names]) for names in (self.TRAIN, self.TEST))
        return xtr, ytr, xte, yte


def read_cifar_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels of CIFAR python batch files, concatenated."""
    xs, ys = [], []
    for path in paths:
        with open(path, "rb") as f:
            try:
                batch = ArraysOnly(f, encoding="bytes").load()
                x, y = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
                raise UserError(f"{path} is not a CIFAR-10 batch ({e}); it must be a pickle of data and labels "
                                "arrays, as in cifar-10-python.tar.gz") from None
        xs.append(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(y))
    return torch.cat(xs), torch.cat(ys)


class ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, strings and NumPy arrays: anything else a pickle
    names (a function to call, a class to build) is refused, so reading one runs no code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file has no need of")
        return super().find_class(module, name)


STREAM_ABOVE = 4 * 2**30  # bytes: a larger decoded set is streamed from its cache, a smaller one may go to the GPU


class Photos(TensorDataModule):
    """Images decoded once into an on-disk cache (autoenc.data.cache), keyed by the files and the decode settings
    (size, crop, channels). `stream`: auto (a set up to 4 GiB held on the GPU when training there; else
    batches read from the memory-mapped cache, which the page cache holds), true (always read from the
    cache), false (always held in memory)."""

    def __init__(self, size: int = 64, channels: int = 3, crop: int | None = None, cache_dir: str | None = None,
                 decode_workers: int | None = None, stream: bool | str = "auto", **kw):
        super().__init__(**kw)
        require(is_integer(size) and size >= 1, "data.size", size, "a positive integer")
        require(channels in (1, 3), "data.channels", channels, "1 or 3")
        if stream not in ("auto", True, False):
            raise UserError(f"data.stream={stream!r} is invalid: it must be auto, true or false")
        self.size, self.channels, self.crop, self.stream = size, channels, crop, stream
        self.cache_dir, self.decode_workers = cache_dir, decode_workers
        self.cache: cache.Cache | None = None

    def settings(self) -> dict:
        return {"size": [self.size, self.size], "channels": self.channels,
                "crop": [self.crop, self.crop] if self.crop else None}

    def open(self, files: list[str], source: Path, depends=(), extras=None) -> Rows:
        """The decoded images of `files` (those that decoded: `self.cache.valid`), as Rows of the cache."""
        self.cache = cache.open_cache(files, self.settings(), source, self.cache_dir, self.decode_workers,
                                      depends, extras)
        return Rows(self.cache.images, self.cache.valid)

    def load_splits(self):
        return self.gathered(super().load_splits())

    def gathered(self, splits: dict, device: torch.device = torch.device("cpu")) -> dict:
        """The splits as Rows of the cache, or each gathered once into a uint8 tensor: with stream=false, and
        with auto on a GPU when the set fits."""
        fits = self.stream == "auto" and device.type != "cpu" and self.cache.nbytes <= STREAM_ABOVE
        if self.stream is False or fits:
            return {k: (in_memory(x) if isinstance(x, Rows) else x, y) for k, (x, y) in splits.items()}
        return splits

    def setup(self, stage: str | None = None) -> None:
        if self.on_device:
            self._splits = self.gathered(self.splits, self._device())
        super().setup(stage)


def in_memory(rows: Rows) -> torch.Tensor:
    """The rows of a cache as one tensor in memory, gathered straight from the mapped file."""
    return torch.from_numpy(rows.array).view(len(rows.array), *rows.example_shape)[torch.from_numpy(rows.index)]


def read_images(path: Path, size: int, channels: int, crop: int | None = None,
                cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Every image under `path` in sorted path order, decoded (through the cache) at size × size: uint8
    (N, C, H, W), labels from sub-folder names, and the files (unreadable ones left out, with a warning)."""
    reader = Photos(size=size, channels=channels, crop=crop, cache_dir=cache_dir)
    files = cache.list_images(path)
    x = in_memory(reader.open(files, path))
    files = [Path(files[i]) for i in reader.cache.valid]
    classes = sorted({p.parent.name for p in files})
    return x, torch.tensor([classes.index(p.parent.name) for p in files]), files


def held_out_split(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (seeded) split of n examples into training and test positions."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    n_test = max(1, int(round(fraction * n)))
    return order[n_test:], order[:n_test]


class ImageFolder(Photos):
    """Any folder of images, resized to `size` (after a centre crop to `crop`, if set); sub-folder names
    become labels."""

    def __init__(self, path: str | None = None, size: int = 32, channels: int = 1, test_fraction: float = 0.1, **kw):
        super().__init__(size=size, channels=channels, **kw)
        self.path, self.test_fraction = path, checked_test_fraction(test_fraction)

    def load(self):
        if not self.path:
            raise UserError("data=folder needs the images' folder: data.path=DIR")
        root = Path(self.path).expanduser()
        files = cache.list_images(root)
        x = self.open(files, root)
        names = [os.path.basename(os.path.dirname(files[i])) for i in self.cache.valid]
        classes = {n: k for k, n in enumerate(sorted(set(names)))}
        y = torch.tensor([classes[n] for n in names])
        train, test = held_out_split(len(x), self.test_fraction)
        return subset(x, train), y[train], subset(x, test), y[test]


class CelebA(Photos):
    """CelebA in torchvision's layout under `<root>/celeba`: img_align_celeba/*.jpg, list_attr_celeba.txt,
    list_eval_partition.txt (the official train / val / test) and optionally identity_CelebA.txt. Labels:
    `target` = an attribute's name (1 where it is present), `all` (the 40 as columns), `identity`, or null."""

    FILES = ("list_attr_celeba.txt", "list_eval_partition.txt")

    def __init__(self, target: str | None = None, download: bool = False, size: int = 64, crop: int | None = 148,
                 channels: int = 3, **kw):
        super().__init__(size=size, crop=crop, channels=channels, **kw)
        self.target, self.download = target, download
        self.attribute_names: list[str] = []

    def load_splits(self):
        base = self.root / "celeba"
        missing = [f for f in self.FILES if not (base / f).is_file()]
        if missing and self.download:
            import torchvision

            try:
                torchvision.datasets.CelebA(str(self.root), split="all", download=True)
            except Exception as e:  # no network, or Google Drive's quota: say so in one line
                raise UserError(f"could not download CelebA to {base}: {e}") from None
            missing = [f for f in self.FILES if not (base / f).is_file()]
        if missing:
            raise UserError(f"missing {base / missing[0]}; put CelebA in torchvision's layout under {base} "
                            "(img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt; set data.root= or "
                            "AUTOENC_DATA_DIR), or pass data.download=true")
        names, partition = read_columns(base / "list_eval_partition.txt", header=0)
        files = [os.path.join(base, "img_align_celeba", n) for n in names]
        lost = next((f for f in files[:1] + files[-1:] if not os.path.isfile(f)), None)
        if lost is not None:
            raise UserError(f"{lost} is listed in list_eval_partition.txt but missing; unpack img_align_celeba.zip "
                            f"into {base}")
        identity = base / "identity_CelebA.txt"
        depends = (base / "list_attr_celeba.txt", base / "list_eval_partition.txt",
                   *([identity] if identity.is_file() else []))

        def extras() -> dict:  # parsed once, at build time, and stored with the cache
            attr_names, attrs = read_columns(base / "list_attr_celeba.txt", header=2)
            if list(attr_names) != list(names):
                raise UserError(f"list_attr_celeba.txt and list_eval_partition.txt list different images; "
                                f"provide intact copies in {base}")
            out = {"partition": partition.astype(np.int8), "attributes": attrs.astype(np.int8),
                   "attribute_names": np.array(read_header(base / "list_attr_celeba.txt"))}
            if identity.is_file():
                out["identity"] = read_columns(identity, header=0)[1]
            return out

        x = self.open(files, base, depends, extras)
        found = self.cache.extras
        self.attribute_names = [str(n) for n in found["attribute_names"]]
        labels = self.labels(found)
        part = found["partition"][self.cache.valid]
        out = {}
        for split, code in (("train", 0), ("val", 1), ("test", 2)):
            at = np.flatnonzero(part == code)
            xs, ys = subset(x, at), None if labels is None else labels[torch.from_numpy(at)]
            out[split] = (xs, ys) if split == "test" else self.only_classes(xs, ys)
        return self.gathered(out)

    def labels(self, found: dict) -> torch.Tensor | None:
        """The labels `target` names, for the images that decoded."""
        valid = self.cache.valid
        if self.target is None:
            return None
        if self.target == "all":
            return torch.from_numpy(found["attributes"][valid] > 0).long()
        if self.target == "identity" and "identity" in found:
            return torch.from_numpy(found["identity"][valid]).long()
        if self.target not in self.attribute_names:
            import difflib

            close = difflib.get_close_matches(str(self.target), self.attribute_names, n=1)
            raise UserError(f"data.target={self.target} is not a CelebA attribute; "
                            + (f"did you mean {close[0]}? " if close else "")
                            + f"choose one of {', '.join(self.attribute_names)}, all, identity (with "
                            "identity_CelebA.txt) or null")
        j = self.attribute_names.index(self.target)
        return torch.from_numpy(found["attributes"][valid, j] > 0).long()


def read_header(path: Path) -> list[str]:
    """The attribute names: the second line of list_attr_celeba.txt."""
    with open(path) as f:
        f.readline()
        return f.readline().split()


def read_columns(path: Path, header: int) -> tuple[np.ndarray, np.ndarray]:
    """A CelebA text file after `header` lines: its first column (file names) and the integer columns."""
    with open(path) as f:
        lines = f.read().splitlines()[header:]
    rows = [line.split() for line in lines if line.strip()]
    try:
        values = np.array([r[1:] for r in rows], dtype=np.int64)
    except ValueError:
        raise UserError(f"{path} is not in CelebA's format (a file name, then integers, on each line); "
                        "provide an intact copy") from None
    return np.array([r[0] for r in rows]), values.squeeze(1) if values.shape[1] == 1 else values


class Arrays(TensorDataModule):
    """Your own arrays from `path`: .npy (memory-mapped: larger than memory is fine), .npz (arrays `x`
    and optionally `y`) or .pt (a tensor, or a dict with `x` and optionally `y`); vectors (N, D) or images
    (N, H, W) / (N, C, H, W), uint8 (scaled to [0, 1]) or float (taken as they are)."""

    def __init__(self, path: str | None = None, test_fraction: float = 0.1, **kw):
        super().__init__(**kw)
        self.path, self.test_fraction = path, checked_test_fraction(test_fraction)

    def read(self) -> tuple[object, np.ndarray | None]:
        path = Path(str(self.path)).expanduser()
        if not self.path or not path.is_file():
            raise UserError(f"data=array needs a .npy, .npz or .pt file: data.path={self.path or '?'} "
                            f"{'is not a file' if self.path else 'is not set'}")
        try:
            if path.suffix == ".npy":
                return _memmap(path), None
            if path.suffix == ".npz":
                with np.load(path) as z:
                    return _parts(dict(z), path)
            if path.suffix == ".pt":
                with warnings.catch_warnings():  # "Detected pickle protocol 4": a plain pickle, refused below
                    warnings.filterwarnings("ignore", "Detected pickle protocol")
                    data = torch.load(path, map_location="cpu", weights_only=True)
                data = data if isinstance(data, dict) else {"x": data}
                return _parts({k: np.asarray(v) for k, v in data.items()}, path)
        except pickle.UnpicklingError:
            raise UserError(f"cannot read {path}: it is not a torch.save of tensors (a tensor, or a dict of x and y); "
                            "it was opened with weights_only=True, which refuses anything else, such as objects "
                            "that could run code") from None
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            raise UserError(f"cannot read {path}: {' '.join(str(e).split())}") from None
        raise UserError(f"data.path={path} must end in .npy, .npz or .pt")

    def examples(self) -> tuple[Rows, torch.Tensor | None]:
        """Every example in file order (checked: shape, type, finite values) and the labels, if any."""
        x, y = self.read()
        if x.ndim not in (2, 3, 4) or x.dtype != np.uint8 and x.dtype.kind != "f":
            raise UserError(f"{self.path} holds a {x.dtype} array of shape {tuple(x.shape)}: it must be uint8 or "
                            "float vectors (N, D) or images (N, H, W) or (N, C, H, W)")
        if 0 in x.shape[1:]:
            raise UserError(f"{self.path} holds an array of shape {tuple(x.shape)}: its examples have no features; "
                            "give each example at least one value")
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
        train, test = held_out_split(len(rows), self.test_fraction)
        pick = (lambda i: labels[i]) if labels is not None else (lambda i: None)
        return rows.subset(train.numpy()), pick(train), rows.subset(test.numpy()), pick(test)


def _memmap(path: Path) -> np.ndarray:
    """A .npy memory-mapped, or refused in one line when the file is shorter than its header declares."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, _, dtype = read(f) if read else ((), False, np.dtype("u1"))  # a newer format: np.load checks it
        need = f.tell() + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise UserError(f"{path} is truncated: its header declares a {dtype} array of shape {shape} "
                        f"({need:,} bytes), the file has {path.stat().st_size:,}; copy or save it again")
    return np.load(path, mmap_mode="r")


def _parts(arrays: dict, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if "x" not in arrays:
        raise UserError(f"{path} needs an array named x (and optionally y); it has: {', '.join(arrays) or 'none'}")
    y = arrays.get("y")
    if y is not None and (y.ndim != 1 or not (y.dtype.kind in "iub" or y.dtype.kind == "f" and np.all(y == np.round(y)))):
        raise UserError(f"{path}: y must hold one whole-number label per example; it is a {y.dtype} array "
                        f"of shape {tuple(y.shape)}")
    return arrays["x"], y
