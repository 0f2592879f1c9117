"""Folders decoded once into the cache and streamed from it: reuse and invalidation, corrupt images, streamed
batches equal to in-memory ones, augmentation, exact resume and DDP on a streamed folder."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from autoenc.data import cache
from autoenc.data.module import Augment, StreamedBatches, TensorBatches
from autoenc.data.sources import ImageFolder, read_images
from autoenc.util.errors import UserError
from conftest import autoenc, train_here
from test_resume import assert_same_run


def make_folder(root, n: int = 60, seed: int = 0, kinds=("png", "jpg")):
    """n images of random sizes (and two formats) in two sub-folders, each a distinct random pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(10, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"{i:03d}.{kinds[i % len(kinds)]}")
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (in this process: decode_workers=0)."""
    count = {"n": 0}
    plain = cache.decode

    def counted(*args, **kwargs):
        count["n"] += 1
        return plain(*args, **kwargs)

    monkeypatch.setattr(cache, "decode", counted)
    return count


def folder(path, tmp, **kw) -> ImageFolder:
    return ImageFolder(path=str(path), size=8, channels=3, cache_dir=str(tmp / "cache"), decode_workers=0,
                       val_fraction=0.1, **kw)


def test_the_cache_is_built_once_reused_and_rebuilt_when_a_file_changes(tmp_path, decodes):
    images = make_folder(tmp_path / "img")
    first = folder(images, tmp_path).splits["train"][0][:]
    assert decodes["n"] == 60
    again = folder(images, tmp_path).splits["train"][0][:]
    assert decodes["n"] == 60 and torch.equal(first, again)  # opened, not decoded again
    folder(images, tmp_path, stream=True).shape  # streamed or held: the same cache
    assert decodes["n"] == 60 and len(list((tmp_path / "cache").glob("*-*"))) == 1
    target = images / "a" / "001.jpg"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed: a newer modification time
    folder(images, tmp_path).shape
    assert decodes["n"] == 120
    (images / "a" / "001.jpg").unlink()  # removed
    dm = folder(images, tmp_path)
    assert sum(len(x) for x, _ in dm.splits.values()) == 59 and decodes["n"] == 179
    assert len(list((tmp_path / "cache").glob("*-*"))) == 1  # older contents of the same folder are removed
    ImageFolder(path=str(images), size=6, channels=3, cache_dir=str(tmp_path / "cache"), decode_workers=0).shape
    # other settings: another cache beside it
    assert decodes["n"] == 238 and len(list((tmp_path / "cache").glob("*-*"))) == 2


def test_the_cache_holds_what_torchvision_decodes_and_workers_write_the_same(tmp_path):
    from torchvision.io import decode_image
    from torchvision.transforms.v2 import functional as F

    images = make_folder(tmp_path / "img", n=20)
    one = cache.open_cache(cache.list_images(images), {"size": [9, 7], "channels": 3, "crop": [8, 8]}, images,
                           tmp_path / "c1", workers=0)
    two = cache.open_cache(cache.list_images(images), {"size": [9, 7], "channels": 3, "crop": [8, 8]}, images,
                           tmp_path / "c2", workers=2)
    assert one.images.shape == (20, 3, 9, 7) and np.array_equal(one.images, two.images)
    for i, f in enumerate(one.files):
        expected = F.resize(F.center_crop(decode_image(f), [8, 8]), [9, 7], antialias=True)
        assert np.array_equal(one.images[i], expected.numpy()), f
    manifest = json.loads((one.dir / "manifest.json").read_text())
    assert manifest["files"] == [str(p) for p in sorted(images.rglob("*.*"))] and manifest["skipped"] == []


def test_corrupt_images_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    images = make_folder(tmp_path / "img", n=30)
    for name in ("a/001.jpg", "a/002.png", "b/003.jpg", "a/004.png"):
        (images / name).write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="autoenc"):
        dm = ImageFolder(path=str(images), size=8, channels=3, cache_dir=str(tmp_path / "c"), decode_workers=2,
                         val_fraction=0.0, test_fraction=0.2)
        x, y = dm.splits["train"]
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 4 unreadable images (left out of the data): ")
    assert all(str(images / n) in warnings[0] for n in ("a/001.jpg", "a/002.png", "a/004.png")) and "…" in warnings[0]
    assert len(x) + len(dm.splits["test"][0]) == 26
    xs, ys, files = read_images(images, 8, 3, cache_dir=str(tmp_path / "c"))  # what commands read with input=DIR
    assert len(xs) == len(files) == 26 and str(images / "a" / "001.jpg") not in map(str, files)


def test_a_folder_of_nothing_but_corrupt_images_is_refused_in_one_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"^cannot read image .*broken.png: .*none of the 1 images could be decoded"):
        ImageFolder(path=str(tmp_path), cache_dir=str(tmp_path / "c")).shape


@pytest.mark.parametrize("world", [1, 2])
def test_streamed_batches_equal_in_memory_batches_for_the_same_seed(tmp_path, world):
    images = make_folder(tmp_path / "img")
    held = folder(images, tmp_path, stream=False)
    streamed = folder(images, tmp_path, stream=True, workers=2)
    (xh, yh), (xs, ys) = held.splits["train"], streamed.splits["train"]
    assert isinstance(xh, torch.Tensor) and type(xs).__name__ == "Rows" and torch.equal(yh, ys)
    auto = folder(images, tmp_path)  # stream=auto: read from the cache on the CPU, held on a GPU when it fits
    assert type(auto.splits["train"][0]).__name__ == "Rows"
    assert torch.equal(auto.gathered(auto.splits, torch.device("cuda"))["train"][0], xh)
    for epoch in (0, 1):
        for rank in range(world):
            a = list(TensorBatches(xh, yh, 8, True, 3, lambda: epoch, rank, world))
            b = StreamedBatches(xs, ys, 8, True, 3, lambda: epoch, rank, world, lambda: 2, workers=2)
            assert len(b) == len(a) and len(list(b)) == len(a) - 2  # a resumed epoch starts at its position
            assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a[2:], b))


def test_augmentation_flips_and_crops_as_drawn_from_its_seed():
    x = torch.rand(16, 3, 6, 5)
    flip, crop = Augment(flip=0.5), Augment(crop=2)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(flip(x, g()), flip(x, g())) and torch.equal(crop(x, g()), crop(x, g()))
    flipped = flip(x, g())
    drawn = torch.rand(16, generator=g()) < 0.5  # the same draw, written out
    assert 0 < drawn.sum() < 16
    assert all(torch.equal(flipped[i], x[i].flip(-1) if drawn[i] else x[i]) for i in range(16))
    cropped, (dy, dx) = crop(x, g()), torch.randint(0, 5, (2, 16, 1), generator=g())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    assert all(torch.equal(cropped[i], padded[i, :, dy[i, 0]:dy[i, 0] + 6, dx[i, 0]:dx[i, 0] + 5]) for i in range(16))
    assert not Augment() and Augment(flip=0.5, crop=1)(x, g()).shape == x.shape
    with pytest.raises(UserError, match="data.augment.flip=2"):
        Augment(flip=2)


def test_augmentation_is_applied_to_training_batches_only(tmp_path):
    from lightning.pytorch.plugins.precision import Precision

    from conftest import compose
    from autoenc.training.runs import build

    cfg = compose("data.augment.flip=1.0", run_dir=tmp_path)
    datamodule, _, _ = build(cfg)
    x = torch.rand(4, 1, 8, 8)

    class Loop:
        total_batch_idx = 0

    class Trainer:
        training, global_rank, fit_loop = True, 0, Loop()
        precision_plugin = Precision()  # 32-true's: batches left as they are

    datamodule.trainer = Trainer()
    assert torch.equal(datamodule.on_after_batch_transfer((x, None))[0], x.flip(-1))
    Trainer.training = False  # validation, test, and the commands
    assert torch.equal(datamodule.on_after_batch_transfer((x, None))[0], x)


RANDOM = ["model=vae", "noise=masking", "trainer.max_epochs=2", "trainer.log_every_n_steps=5", "eval.iwae_samples=4",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "net=conv", "data=folder",
          "data.size=8", "data.channels=3", "data.batch_size=16", "data.stream=true", "data.workers=1",
          "data.augment.flip=0.5", "data.augment.crop=1", "trainer.limit_val_batches=2"]


def test_ctrl_c_mid_epoch_on_a_streamed_folder_then_resume_is_bit_identical(tmp_path):
    images = [f"data.path={make_folder(tmp_path / 'img', n=200)}"]
    full = train_here(tmp_path / "full", *RANDOM, *images, fast=False)
    with pytest.raises(SystemExit):
        train_here(tmp_path / "stopped", *RANDOM, *images, "+callbacks.ctrl_c._target_=helpers.CtrlC",
                   "+callbacks.ctrl_c.step=15", fast=False)
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    epoch, position = divmod(saved["global_step"], 11)  # 162 training images in batches of 16: 11 steps an epoch
    assert (epoch, position) == (1, 5)  # a mid-epoch state; the loader's state says where in the data:
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "position": 5, "seed": 0}]
    resumed = train_here(tmp_path / "resumed", *RANDOM, *images,
                         f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}", fast=False)
    assert_same_run(tmp_path / "resumed", resumed, tmp_path / "full", full)


@pytest.mark.slow
def test_ddp_on_two_processes_streaming_a_folder_equals_one_process(tmp_path):
    images = make_folder(tmp_path / "img", n=200)
    run = ["model=ae", "trainer.max_epochs=2", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1",
           "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "net=conv", "net.norm=GroupNorm", "data=folder", f"data.path={images}", "data.size=8", "data.channels=3",
           "data.stream=true", "data.workers=1"]
    autoenc("train", f"hydra.run.dir={tmp_path / 'ddp'}", "trainer=ddp_cpu", "data.batch_size=8", *run)
    one = train_here(tmp_path / "one", "trainer=cpu", "data.batch_size=16", *run, fast=False)
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert two.keys() == one.keys() and all(two[k] == pytest.approx(one[k], rel=1e-4) for k in one)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (tmp_path / "ddp", tmp_path / "one"))
    assert a["global_step"] == b["global_step"] == 10
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-4, atol=1e-6)
