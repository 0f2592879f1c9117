"""Data modules: the real IDX files, folders of images, and rank sharding of in-memory batches."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from autoenc.data.module import TensorBatches
from autoenc.data.sources import IDX, Digits, ImageFolder, read_idx
from autoenc.util.errors import UserError


def test_mnist_test_set_reads_from_gz_with_shape_count_and_range(shared_data):
    x = torch.from_numpy(read_idx(shared_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").copy())
    y = read_idx(shared_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8 and y.shape == (10000,)
    assert int(x.max()) == 255 and int(x.min()) == 0 and set(np.unique(y)) == set(range(10))


def test_mnist_without_training_images_names_the_missing_file(shared_data, tmp_path):
    raw = tmp_path / "MNIST" / "raw"  # a partial download: every file but the training images
    raw.mkdir(parents=True)
    for f in (shared_data / "MNIST" / "raw").iterdir():
        if not f.name.startswith("train-images"):
            (raw / f.name).symlink_to(f)
    with pytest.raises(UserError, match=r"missing .*MNIST/raw/train-images-idx3-ubyte\(\.gz\)"):
        IDX(root=str(tmp_path), name="MNIST").shape


def test_fashion_mnist_splits_and_batches_are_unit_floats(shared_data):
    dm = IDX(root=str(shared_data), name="FashionMNIST", val_fraction=5000 / 60000)
    sizes = {k: len(v[0]) for k, v in dm.splits.items()}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000} and dm.shape == (1, 28, 28)
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())))
    assert x.dtype == torch.float32 and x.shape == (128, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert x.max() == 1.0 and y.dtype == torch.int64


def test_truncated_idx_file_is_refused(tmp_path, shared_data):
    data = gzip.open(shared_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read()
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_idx(bad)


def test_digits_are_embedded_with_fixed_test_split():
    dm = Digits(val_fraction=0.1)
    assert dm.shape == (1, 8, 8)
    assert sum(len(v[0]) for v in dm.splits.values()) == 1797
    assert torch.equal(dm.splits["test"][0], Digits(val_fraction=0.3, seed=5).splits["test"][0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shards_are_disjoint_and_equal(world):
    x = torch.arange(100).view(100, 1, 1, 1)
    seen = [torch.cat([b[0].flatten() for b in TensorBatches(x, x, 16, True, 0, lambda: 3, r, world)])
            for r in range(world)]
    assert all(len(s) == 100 // world for s in seen)
    allseen = torch.cat(seen)
    assert len(allseen.unique()) == len(allseen)


def test_image_folder_resizes_any_size_and_labels_by_subfolder(tmp_path):
    from PIL import Image

    for i, (cls, size) in enumerate([("a", (20, 30)), ("a", (64, 64)), ("b", (7, 9)), ("b", (40, 12))] * 3):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(np.full(size[::-1] + (3,), 40 * i % 255, np.uint8)).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolder(path=str(tmp_path), size=16, channels=3, test_fraction=0.25, val_fraction=0.0)
    assert dm.shape == (3, 16, 16) and len(dm.splits["test"][0]) == 3
    assert set(torch.cat([dm.splits["train"][1], dm.splits["test"][1]]).tolist()) == {0, 1}


def test_empty_image_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no images"):
        ImageFolder(path=str(tmp_path)).shape


def test_unreadable_image_is_a_user_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        ImageFolder(path=str(tmp_path)).shape


def test_a_file_as_the_image_folder_is_named_as_a_file(tmp_path, capsys):
    from PIL import Image

    from conftest import cli_error

    Image.new("L", (4, 4)).save(tmp_path / "one.png")
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "data=folder", f"data.path={tmp_path / 'one.png'}")
    assert line == (f"autoenc: error: {tmp_path / 'one.png'} is a file, not a folder of images; give the folder that "
                    "holds the images")


def test_gif_and_webp_are_converted_to_grey_like_a_png_and_all_are_used(tmp_path, caplog):
    """data.channels=1 (the default) on RGB images of three formats: each decodes to the grey PIL makes of it."""
    import logging

    from PIL import Image, features

    from conftest import FAST, cli_here, rebuilt

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    suffixes = ("png", "gif", "webp") if features.check("webp") else ("png", "gif")  # a Pillow built without WEBP
    files = [tmp_path / "images" / f"img.{suffix}" for suffix in suffixes]
    for f in files:
        Image.fromarray(rgb).save(f, **({"lossless": True} if f.suffix == ".webp" else {}))
    with caplog.at_level(logging.WARNING, logger="autoenc"):
        cli_here("train", f"hydra.run.dir={tmp_path / 'run'}", *FAST, "data=folder", f"data.path={tmp_path / 'images'}",
                 "data.size=8", "data.val_fraction=0", f"data.test_fraction={1 / len(files) + 0.01:.2f}")
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]
    datamodule, _ = rebuilt(tmp_path / "run", "last.ckpt")
    x = torch.cat([torch.as_tensor(datamodule.splits[k][0][:]) for k in ("train", "test")])
    assert x.shape == (len(files), 1, 8, 8)
    greys = [torch.from_numpy(np.array(Image.open(f).convert("L"))) for f in files]
    assert all(any((xi[0].int() - g.int()).abs().max() <= 1 for xi in x) for g in greys)  # libpng's grey may round otherwise


def test_streams_of_randomness_never_coincide():
    """Shuffle, noise, binarization and model sampling draw from distinct seeds for every (seed, epoch, rank),
    and seed 1 / epoch 0 is not seed 0 / epoch 1."""
    from autoenc.util.seeds import derive

    keys = [(s, stream, e, r) for s in range(3) for stream in ("shuffle", "noise", "binarize", "model")
            for e in range(4) for r in range(2)]
    seeds = [derive(s, stream, e, r) for s, stream, e, r in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= v < 2**63 for v in seeds)
    assert derive(1, "shuffle", 0) != derive(0, "shuffle", 1) and derive(5, "noise", 2, 1) == derive(5, "noise", 2, 1)
    orders = [list(TensorBatches(torch.arange(50).view(50, 1, 1, 1), torch.arange(50), 50, True, s, lambda e=e: e))[0][1]
              for s, e in ((0, 1), (1, 0), (0, 0))]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
