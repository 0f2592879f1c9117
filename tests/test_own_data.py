"""Your own data in, results out: data=array (vectors, images, memory-mapped), standardization, anomaly
scores, and comparing a sweep."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from autoenc.util.errors import UserError
from conftest import FAST, autoenc, rebuilt, tb_hparams, train_here
from test_use import use

FAST_ARRAY = ["data=array", "data.batch_size=16", "model.latent_dim=3"]


def vectors(n: int = 300, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unbounded vectors near a 3-d subspace, with a class label."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    x = z @ rng.normal(size=(3, d)) * 4 + 7 + 0.05 * rng.normal(size=(n, d))
    return x.astype(np.float32), (z[:, 0] > 0).astype(np.int64)


def test_float_vectors_with_labels_from_npz_train_with_the_mse_likelihood(tmp_path):
    x, y = vectors()
    np.savez(tmp_path / "v.npz", x=x, y=y)
    results = train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'v.npz'}", "likelihood=mse")
    datamodule, model = rebuilt(tmp_path / "run")
    assert datamodule.shape == (12,) and len(datamodule.splits["test"][0]) == 30
    assert set(datamodule.splits["test"][1].tolist()) <= {0, 1} and results["test/loss"] > 0


def test_unbounded_values_are_refused_by_a_bounded_likelihood(tmp_path):
    x, _ = vectors()
    np.save(tmp_path / "v.npy", x)
    with pytest.raises(UserError, match=r"^the training data spans \[.*\], outside the \[0, 1\] that likelihood=bernoulli "
                                        r"models; use likelihood=mse or likelihood=gaussian likelihood.bounded=false$"):
        train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'v.npy'}", "likelihood=bernoulli")


@pytest.mark.parametrize("layout", ["NHW", "NCHW"])
def test_uint8_images_from_a_memory_mapped_npy_train_unlabelled(tmp_path, layout):
    x = np.random.default_rng(1).integers(0, 256, size=(200, 6, 5) if layout == "NHW" else (200, 2, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "img.npy", x)
    train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'img.npy'}", "net=conv")
    datamodule, _ = rebuilt(tmp_path / "run")
    train = datamodule.splits["train"][0]
    assert isinstance(train.array, np.memmap)  # read from disk batch by batch, never loaded whole
    assert datamodule.shape == ((1, 6, 5) if layout == "NHW" else (2, 6, 5))
    first = train[torch.tensor([0])]
    assert first.dtype == torch.uint8 and torch.equal(first[0].flatten(), torch.from_numpy(x[train.index[0]]).flatten())
    assert (datamodule.splits["test"][1] == -1).all()  # no labels


def test_a_pt_dict_of_float_images_in_unit_range_trains_with_bernoulli(tmp_path):
    torch.save({"x": torch.rand(120, 1, 4, 4)}, tmp_path / "img.pt")
    results = train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'img.pt'}")
    assert results["test/recon"] > 0


@pytest.mark.parametrize("content, message", [
    (np.zeros(10, np.float32), r"holds a float32 array of shape \(10,\): it must be uint8 or float vectors"),
    (np.zeros((10, 3), np.int32), r"holds a int32 array of shape \(10, 3\)"),
    (np.where(np.eye(10, 3) > 0, np.nan, 0).astype(np.float32), r"has a NaN or infinite value in example 0; clean the data"),
])
def test_bad_arrays_are_refused_in_one_line(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(UserError, match=message):
        train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'bad.npy'}", "likelihood=mse")


def test_standardization_uses_training_statistics_only_and_encode_reapplies_them(tmp_path):
    x, _ = vectors()
    np.save(tmp_path / "v.npy", x)
    train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'v.npy'}", "data.standardize=true",
               "likelihood=mse")
    datamodule, model = rebuilt(tmp_path / "run")
    train_rows = np.sort(datamodule.splits["train"][0].index)
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    stored = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["Arrays"]
    assert np.allclose(stored["mean"], mean, atol=1e-4) and np.allclose(stored["std"], std, rtol=1e-4)
    assert not np.allclose(stored["mean"], x.mean(0), atol=1e-4)  # the test rows are left out
    (tmp_path / "run" / ".hydra").mkdir(exist_ok=True)  # what `autoenc train` writes: the use commands read it
    (tmp_path / "run" / "config.yaml").rename(tmp_path / "run" / ".hydra" / "config.yaml")
    np.save(tmp_path / "new.npy", x[:5] + 1.0)  # data after training: standardized with the stored stats
    codes = np.load(use("encode", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", f"input={tmp_path / 'new.npy'}"))
    with torch.no_grad():
        expected = model.autoencoder.encode(torch.from_numpy((x[:5] + 1.0 - mean) / std).float()).code.numpy()
    assert np.allclose(codes["code"], expected, atol=1e-4) and (codes["index"] == np.arange(5)).all()


def test_anomaly_scores_of_a_model_trained_on_one_class_find_the_others(tmp_path):
    """Digits 0 only in training: the other digits reconstruct worse, so they score higher."""
    run = tmp_path / "zeros"
    autoenc("train", f"hydra.run.dir={run}", "data.classes=[0]", "model.latent_dim=4", "trainer.max_epochs=40",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    path = use("score", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "normal=[0]")
    summary = __import__("json").loads(path.with_suffix(".json").read_text())
    with open(path) as f:
        rows = list(csv.DictReader(f))
    from sklearn.metrics import roc_auc_score

    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert summary["roc_auc"] == pytest.approx(roc_auc_score(labels != 0, scores)) and summary["roc_auc"] > 0.9
    assert summary["normal"] == (labels == 0).sum() and path.with_suffix(".png").is_file()


def test_compare_keeps_swept_choices_apart_from_figures_of_the_same_name(tmp_path):
    sweep = tmp_path / "sweep"
    autoenc("train", "-m", "bottleneck=sigmoid", "penalty=l1,kl", f"hydra.sweep.dir={sweep}", *FAST)
    out = autoenc("compare", f"runs=[{sweep}]", "sort=test/loss").stdout
    with open(sweep / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["penalty"] for r in rows) == ["kl", "l1"]  # the choice, not the metric
    assert all(float(r["test/penalty"]) > 0 for r in rows) and sorted(r["run"] for r in rows) == ["0", "1"]
    assert float(rows[0]["test/loss"]) <= float(rows[1]["test/loss"])
    assert "Warning" not in out and (sweep / "comparison.png").stat().st_size > 0
    single = autoenc("compare", f"runs=[{sweep / '0'}]", "sort=mse").stdout  # a short name, unambiguous
    assert "| 0 |" in single
    from test_scale import hparams_entry  # TensorBoard's HParams view shows the swept choice of each run

    assert sorted(hparams_entry(sweep / job)[0]["choice/penalty"] for job in ("0", "1")) == ["kl", "l1"]
    trials = [e.session_start_info.group_name for job in ("0", "1") for e in tb_hparams(sweep / job) if e.HasField("session_start_info")]
    assert [t.split()[:3] for t in trials] == [["sweep/0", "bottleneck=sigmoid", "penalty=l1"], ["sweep/1", "bottleneck=sigmoid", "penalty=kl"]]


def test_mistakes_with_own_data_are_refused_in_one_line(tmp_path):
    x, y = vectors()
    np.savez(tmp_path / "v.npz", x=x, y=y)
    data = [*FAST_ARRAY, f"data.path={tmp_path / 'v.npz'}", "likelihood=mse"]
    with pytest.raises(UserError, match=r"^net=conv needs images \(C, H, W\); this data's examples have shape \(12,\): use net=mlp$"):
        train_here(tmp_path / "conv", *data, "net=conv")
    with pytest.raises(UserError, match=r"^data.classes=\[7\] selects no training example \(the labels are \[0, 1\]\)"):
        train_here(tmp_path / "classes", *data, "data.classes=[7]")
    train_here(tmp_path / "run", *data)
    (tmp_path / "run" / ".hydra").mkdir(exist_ok=True)
    (tmp_path / "run" / "config.yaml").rename(tmp_path / "run" / ".hydra" / "config.yaml")
    ckpt = f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}"
    with pytest.raises(UserError, match=r"^`reconstruct` draws pictures and this model takes vectors of shape \(12,\)"):
        use("reconstruct", ckpt)
    with pytest.raises(UserError, match=r"^normal=\[0, 1\] must name some but not all of the labels here"):
        use("score", ckpt, "normal=[0,1]")


@pytest.mark.parametrize("unbounded, chosen", [(True, "SquaredError"), (False, "Bernoulli")])
def test_likelihood_auto_picks_from_the_training_range_and_the_loaded_run_reproduces_it(tmp_path, unbounded, chosen):
    import autoenc

    x, _ = vectors()
    x = x if unbounded else (x - x.min()) / (x.max() - x.min())
    np.save(tmp_path / "v.npy", x)
    train_here(tmp_path / "run", *FAST_ARRAY, f"data.path={tmp_path / 'v.npy'}")  # likelihood=auto, the default
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["autoenc_config"]["likelihood"]["_target_"] == f"autoenc.model.likelihoods.{chosen}"
    (tmp_path / "run" / ".hydra").mkdir(exist_ok=True)  # the run directory as `autoenc train` leaves it: config says auto
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    model = autoenc.load(tmp_path / "run")
    assert type(model.autoencoder.likelihood).__name__ == chosen
