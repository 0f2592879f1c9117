"""data=celeba on a small CelebA-layout fixture built here (generated JPEGs and the three text files): official
partitions, PyTorch-VAE's preprocessing, attributes as labels by name, and the commands using them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoenc.data.sources import CelebA
from autoenc.util.errors import UserError
from conftest import compose, train_here

NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
PARTITION = [0] * 24 + [1] * 6 + [2] * 6  # the official files list train, then val, then test


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    """36 generated 178×218 JPEGs in torchvision's CelebA layout; returns (root, attributes, identities)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    attrs = rng.choice([-1, 1], size=(len(PARTITION), 40))
    ids = rng.integers(1, 10, len(PARTITION))
    files = [f"{i + 1:06d}.jpg" for i in range(len(PARTITION))]
    for i, name in enumerate(files):
        img = np.zeros((218, 178, 3), np.uint8)
        img[35:183, 15:163] = rng.integers(0, 256, 3)  # a coloured centre square of 148: what the crop keeps
        img[::7] = 255  # and stripes outside and across it
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=95)
    rows = [f"{n} " + " ".join(f"{v:2d}" for v in a) for n, a in zip(files, attrs)]
    (base / "list_attr_celeba.txt").write_text(f"{len(files)}\n{' '.join(NAMES)}\n" + "\n".join(rows) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(files, PARTITION)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {k}\n" for n, k in zip(files, ids)))
    return root, attrs, ids


def dm(root, tmp_path, **kw) -> CelebA:
    return CelebA(root=str(root), cache_dir=str(tmp_path / "cache"), decode_workers=0, **kw)


def test_official_partitions_and_pytorch_vae_preprocessing(celeba, tmp_path):
    from PIL import Image
    from torchvision.transforms import CenterCrop, Resize

    root, _, _ = celeba
    data = dm(root, tmp_path)
    assert {k: len(x) for k, (x, _) in data.splits.items()} == {"train": 24, "val": 6, "test": 6}
    assert data.shape == (3, 64, 64) and data.attribute_names == NAMES
    # PyTorch-VAE's transform (CenterCrop(148), Resize(64) on the PIL image), independently: image 25 is val's first
    with Image.open(root / "celeba" / "img_align_celeba" / "000025.jpg") as im:
        expected = torch.from_numpy(np.asarray(Resize(64)(CenterCrop(148)(im.convert("RGB"))))).permute(2, 0, 1)
    got = data.splits["val"][0][0]
    assert got.dtype == torch.uint8 and (got.int() - expected.int()).abs().float().mean() < 2.0
    assert dm(root, tmp_path, size=128).shape == (3, 128, 128)


def test_attributes_are_labels_by_name(celeba, tmp_path):
    root, attrs, ids = celeba
    train = lambda **kw: dm(root, tmp_path, **kw).splits["train"][1]  # noqa: E731
    assert torch.equal(train(target="Smiling"), torch.from_numpy(attrs[:24, NAMES.index("Smiling")] > 0).long())
    assert torch.equal(train(target="all"), torch.from_numpy(attrs[:24] > 0).long())
    assert torch.equal(train(target="identity"), torch.from_numpy(ids[:24]).long())
    assert (train() == -1).all()
    test = dm(root, tmp_path, target="Male").splits["test"][1]
    assert torch.equal(test, torch.from_numpy(attrs[30:, NAMES.index("Male")] > 0).long())
    with pytest.raises(UserError, match=r"^data.target=smiling is not a CelebA attribute; did you mean Smiling\? "):
        train(target="smiling")


def test_a_missing_celeba_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^missing .*celeba/list_attr_celeba.txt; put CelebA in torchvision's layout"):
        dm(tmp_path, tmp_path).shape


def test_a_vae_trains_on_celeba_and_scores_smiles_against_neutral_faces(celeba, tmp_path):
    from test_use import use

    root, attrs, _ = celeba
    run = tmp_path / "run"
    train_here(run, "data=celeba", f"data.root={root}", "data.target=Smiling", "data.size=16", "data.batch_size=8",
               "model=vae", "net=conv", "net.channels=[8,16,16]", "net.norm=BatchNorm2d", "model.latent_dim=4")
    (run / ".hydra").mkdir(exist_ok=True)
    (run / "config.yaml").rename(run / ".hydra" / "config.yaml")
    path = use("score", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "normal=[0]", "eval.iwae_samples=2")
    summary = json.loads(path.with_suffix(".json").read_text())
    smiling = attrs[30:, NAMES.index("Smiling")] > 0
    assert summary["normal"] == int((~smiling).sum()) and summary["anomalous"] == int(smiling.sum())


def test_evaluate_probes_all_forty_attributes(celeba, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from test_use import use

    root, attrs, _ = celeba
    run = tmp_path / "run"
    train_here(run, "data=celeba", f"data.root={root}", "data.target=all", "data.size=8", "data.batch_size=8",
               "net=conv", "net.channels=[8,16]", "model.latent_dim=4")
    (run / ".hydra").mkdir(exist_ok=True)
    (run / "config.yaml").rename(run / ".hydra" / "config.yaml")
    figures = use("evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "eval.iwae_samples=2")
    data = dm(root, tmp_path, size=8, target="all")
    pixels = {k: data.splits[k][0][:].flatten(1).double().numpy() / 255 for k in ("train", "test")}
    expected = np.mean([make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
                        .fit(pixels["train"], attrs[:24, j] > 0).score(pixels["test"], attrs[30:, j] > 0)
                        for j in range(40)])
    assert figures["probe_accuracy_pixels"] == pytest.approx(expected) and 0 <= figures["probe_accuracy"] <= 1


@pytest.mark.parametrize("recipe", ["vae_celeba64", "ae_faces64"])
def test_the_face_recipes_train_on_celeba(celeba, tmp_path, recipe):
    root, _, _ = celeba
    results = train_here(tmp_path / "run", f"experiment={recipe}", f"data.root={root}", "data.size=16",
                         "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                         "model.compile=null")  # (compiling is tested apart: here it would cost a minute a run)
    cfg = __import__("omegaconf").OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert cfg.model.latent_dim == 128 and cfg.data.crop == 148 and cfg.data.augment.flip == 0.5
    assert compose(f"experiment={recipe}").model.compile == ("loss" if recipe == "vae_celeba64" else None)
    assert np.isfinite(results["test/loss"])
