"""Images decoded once, in worker processes, into an on-disk cache: a uint8 .npy (memory-mapped) and a JSON
manifest, keyed by the files' names, sizes and modification times and by the decode settings."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoenc.util.errors import UserError

log = logging.getLogger("autoenc")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# what torchvision.io decodes to the asked channels; PIL the rest (torchvision's GIF and WEBP decoders ignore GRAY)
TORCHVISION_SUFFIXES = {".png", ".jpg", ".jpeg"}
VERSION = 2  # bumped when the decoding changes, so that older caches are rebuilt


def default_dir() -> Path:
    """$AUTOENC_CACHE_DIR, else ~/.cache/autoenc."""
    return Path(os.environ.get("AUTOENC_CACHE_DIR") or Path.home() / ".cache" / "autoenc").expanduser()


def list_images(root: Path) -> list[str]:
    """Every image file under root (any depth), as paths in sorted order (by component, as pathlib sorts)."""
    if Path(root).is_file():
        raise UserError(f"{root} is a file, not a folder of images; give the folder that holds the images")
    if not Path(root).is_dir():
        raise UserError(f"image folder {root} does not exist; give a folder of images")
    found = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
             if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    if not found:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    return sorted(found, key=lambda f: f.replace(os.sep, "\0"))  # "\0" sorts first: component by component


def decode(path: str, size: tuple[int, int], channels: int, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """One image as uint8 (C, H, W): centre-cropped to `crop` if given, then resized to `size` (antialiased)."""
    from torchvision.io import ImageReadMode, decode_image

    if os.path.splitext(path)[1].lower() in TORCHVISION_SUFFIXES:
        data = torch.from_numpy(np.fromfile(path, np.uint8))  # read here: a missing file is Python's plain OSError
        img = decode_image(data, ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    else:
        from PIL import Image

        with Image.open(path) as im:
            img = torch.from_numpy(np.array(im.convert("L" if channels == 1 else "RGB"))).view(im.height, im.width, -1)
        img = img.permute(2, 0, 1)
    return resize(img, size, crop)


def resize(img: torch.Tensor, size: tuple[int, int], crop: tuple[int, int] | None = None) -> torch.Tensor:
    """A uint8 (C, H, W) image centre-cropped to `crop` if given, then resized to `size` (antialiased)."""
    from torchvision.transforms.v2 import functional as F

    if crop:
        img = F.center_crop(img, list(crop))
    # as one channels-last image: torch's fast uint8 path for antialiased resizing
    return F.resize(img[None].contiguous(memory_format=torch.channels_last), list(size), antialias=True)[0]


class Decoding(torch.utils.data.Dataset):
    """Decodes file i straight into row i of the cache's array (opened once per worker); returns an error text."""

    def __init__(self, files: list[str], array: Path, size, channels: int, crop):
        self.files, self.array, self.size, self.channels, self.crop = files, array, size, channels, crop
        self.out = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        if self.out is None:
            self.out = np.load(self.array, mmap_mode="r+")
        try:
            self.out[i] = decode(self.files[i], self.size, self.channels, self.crop).numpy()
            return ""
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never raised from a worker
            return f"{type(e).__name__}: {reason(e)}"


def reason(error: Exception) -> str:
    """Why an image could not be read, in plain words: the OS's reason, or the decoder's first sentence
    without torchvision's C++ source line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = re.sub(r"^.*\.cpp:\d+, ", "", str(error).splitlines()[0] if str(error) else "")
    return text.split(". ")[0]


@dataclass
class Cache:
    """An opened cache: the array (memory-mapped), the rows that decoded, and the manifest's files and extras."""

    dir: Path
    images: np.ndarray
    valid: np.ndarray
    files: list[str]
    extras: dict

    @property
    def nbytes(self) -> int:
        return int(self.images[0].nbytes) * len(self.valid)


def fingerprint(files: list[str], depends: list[Path], settings: dict) -> str:
    """A hash of the decode settings and every file's name, size and modification time (no file is read)."""
    h = hashlib.sha256(json.dumps({**settings, "version": VERSION}, sort_keys=True).encode())
    for p in [*depends, *files]:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a listed file that is missing: it fails to decode and is skipped
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24]


def open_cache(files: list[str], settings: dict, source: Path, cache_dir: str | Path | None = None,
               workers: int | None = None, depends: tuple[Path, ...] = (), extras=None) -> Cache:
    """The cache of these files decoded with these settings (size, channels, crop): opened if it exists and
    the files are unchanged, else built (one builder at a time; other processes wait and open it).
    `extras()` gives small arrays (labels) stored with it. A source (folder) keeps one cache per settings."""
    root = Path(cache_dir).expanduser() if cache_dir else default_dir()
    source = hashlib.sha256(json.dumps([str(Path(source).resolve()), settings], sort_keys=True).encode()).hexdigest()[:12]
    key = fingerprint(files, list(depends), settings)
    target = root / f"{source}-{key}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{source}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not (target / "manifest.json").is_file():
                build(files, settings, target, workers, extras)
                for stale in root.glob(f"{source}-*"):  # the same source and settings, older contents
                    if stale != target:
                        shutil.rmtree(stale, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write the decoded-image cache in {root} ({e}); set data.cache_dir= to a "
                        "writable folder with room for it") from None
    return load(target)


def load(target: Path) -> Cache:
    manifest = json.loads((target / "manifest.json").read_text())
    extras = dict(np.load(target / "extras.npz")) if (target / "extras.npz").is_file() else {}
    images = np.load(target / "images.npy", mmap_mode="c")  # copy-on-write: writable, so torch maps it as it is
    return Cache(target, images, np.asarray(manifest["valid"], np.int64),
                 manifest["files"], extras)


def build(files: list[str], settings: dict, target: Path, workers: int | None, extras) -> None:
    """Decodes every file in `workers` processes (default: all cores) into target (written beside it, then
    renamed into place); unreadable files are left out with one warning naming them."""
    from tqdm import tqdm

    size, channels, crop = settings["size"], settings["channels"], settings.get("crop")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    need = len(files) * channels * size[0] * size[1]
    free = shutil.disk_usage(tmp).free
    if need > free:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"the decoded images need {need / 2**30:.1f} GiB and {tmp.parent} has {free / 2**30:.1f} GiB free; "
                        "set data.cache_dir= to a folder with room, or a smaller data.size")
    np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(files), channels, *size)).flush()
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    dataset = Decoding([str(f) for f in files], tmp / "images.npy", size, channels, crop)
    # its own generator: building the cache leaves torch's global random state (the model's initialization) alone
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=list,
                                         generator=torch.Generator())
    errors, start = [], time.perf_counter()
    with tqdm(total=len(files), unit="img", desc=f"decoding {len(files)} images once into {target.parent}",
              dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for batch in loader:
            errors += [(bar.n + j, e) for j, e in enumerate(batch) if e]
            bar.update(len(batch))
    took = time.perf_counter() - start
    bad = {i for i, _ in errors}
    valid = [i for i in range(len(files)) if i not in bad]
    if not valid:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot read image {files[errors[0][0]]}: {errors[0][1]}; none of the {len(files)} images "
                        "could be decoded: remove or replace them")
    if errors:
        log.warning("skipped %d unreadable image%s (left out of the data): %s", len(errors), "s" * (len(errors) > 1),
                    "; ".join(f"{files[i]} ({e})" for i, e in errors[:3]) + (" …" if len(errors) > 3 else ""))
    with open(tmp / "images.npy", "rb+") as f:
        os.fsync(f.fileno())  # the workers' writes are on disk before the manifest says the cache is whole
    if extras is not None:
        np.savez(tmp / "extras.npz", **extras())
    manifest = {"files": [str(f) for f in files], "valid": valid, "skipped": [str(files[i]) for i in sorted(bad)],
                "settings": settings, "decode_seconds": took, "workers": workers}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(target, ignore_errors=True)  # an incomplete one, without its manifest
    os.replace(tmp, target)
    print(f"decoded {len(valid)} images in {took:.1f} s ({len(files) / took:.0f} images/s, {workers} workers) "
          f"into {target}", flush=True)
