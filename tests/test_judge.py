"""Judging: SSIM, MS-SSIM, per-image PSNR, FID, KID and rFID of `autoenc evaluate` (through torchmetrics),
checked against hand computations on constructed images; the classifier that gives FID its features;
seeding; the refusal of Inception without its weights; no FID or KID without a prior."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoenc.evaluation import features, images
from autoenc.util.errors import UserError
from conftest import cli_error, cli_here, train_here


def smooth_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """Blobs in [0.1, 0.8] with structure at several scales: what SSIM and a blur can tell apart."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, side // 4, side // 4, generator=g)
    fine = torch.rand(n, 1, side, side, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False) * 0.7 + 0.3 * fine
    return 0.1 + 0.7 * (x - x.amin()) / (x.amax() - x.amin())


def blur(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


# ---- reconstruction figures on constructed images ----------------------------------------------------
def test_identical_images_score_ssim_and_ms_ssim_one_and_the_psnr_cap():
    x = smooth_images(6, 64)
    figures = images.reconstruction_figures(x.clone(), x)
    assert figures["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert figures["ms_ssim"] == pytest.approx(1.0, abs=1e-6) and figures["ms_ssim_scales"] == 3
    assert figures["psnr_per_image"] == images.PSNR_CAP == 100.0  # MSE 0 would be +∞ dB


def test_a_constant_shift_gives_the_psnr_computed_by_hand():
    x = smooth_images(5, 28)
    for shift in (0.1, 0.05, 0.02):
        figures = images.reconstruction_figures(x + shift, x)
        assert figures["psnr_per_image"] == pytest.approx(10 * math.log10(1 / shift ** 2), abs=1e-3)
    # one image off by 0.1, one by 0.01: the mean of 20 dB and 40 dB, not the PSNR of the pooled MSE
    two = x[:2]
    figures = images.reconstruction_figures(two + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1), two)
    assert figures["psnr_per_image"] == pytest.approx(30.0, abs=1e-3)
    assert 10 * math.log10(1 / ((0.01 + 0.0001) / 2)) < 23  # what a whole-set PSNR would say


def test_a_blur_lowers_ssim_and_ms_ssim_and_more_blur_lowers_them_further():
    x = smooth_images(8, 64)
    once, twice = images.reconstruction_figures(blur(x), x), images.reconstruction_figures(blur(blur(x)), x)
    assert once["ssim"] < 0.95 and twice["ssim"] < once["ssim"]
    assert once["ms_ssim"] < 1 - 1e-3 and twice["ms_ssim"] < once["ms_ssim"]


def test_ms_ssim_uses_the_scales_the_size_allows_and_skips_tiny_images_with_a_reason(capsys):
    assert [images.ms_ssim_scales(s, s) for s in (8, 11, 12, 28, 32, 44, 64, 175, 176)] == [0, 0, 2, 2, 2, 3, 3, 4, 5]
    assert sum(images.truncated_betas(2)) == pytest.approx(1.0)
    assert images.truncated_betas(5) == images.MS_SSIM_BETAS
    x = smooth_images(3, 8)
    figures = images.reconstruction_figures(x, x)
    assert "ms_ssim" not in figures and figures["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "ms_ssim: skipped: 8×8 images are too small for two scales of an 11-px window" in capsys.readouterr().out
    images.reconstruction_figures(smooth_images(2, 28), smooth_images(2, 28))
    assert "ms_ssim: 2 of 5 scales" in capsys.readouterr().out


# ---- the classifier and FID / KID ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """`autoenc classifier` on the embedded digits (a few seconds) and the digits' test images."""
    from autoenc.data.sources import Digits

    path = tmp_path_factory.mktemp("judge") / "digits_cnn.safetensors"
    cli_here("classifier", f"out={path}", "epochs=8")
    dm = Digits()
    x, y = dm.evaluation_split("test")
    return path, dm.transform(x), y


def test_the_classifier_command_writes_safetensors_and_its_shape_and_loads_back_the_same(digits_classifier):
    path, x, y = digits_classifier
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "autoenc-classifier" and (meta["height"], meta["width"], meta["features"]) == (8, 8, 128)
    assert meta["test_accuracy"] > 0.8 and meta["data"] == "digits"
    net = features.load_classifier(path)
    assert features.accuracy(net, x, y, lambda b: b) == pytest.approx(meta["test_accuracy"])
    f = features.feature_network(str(path), (1, 8, 8))
    assert f(x[:5]).shape == (5, 128) and f.num_features == 128
    with open(path, "rb") as fh:
        assert fh.read(8) != b"\x80\x02\x8a\x0a" + b"\x00" * 4  # safetensors, not a pickle


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_positive(digits_classifier):
    path, x, _ = digits_classifier
    f = features.feature_network(str(path), (1, 8, 8))
    same = images.generative_figures(f, x, x.clone(), x.clone())
    assert abs(same["rfid"]) < 1e-3 and abs(same["fid"]) < 1e-3
    shifted = images.generative_figures(f, x, (x + 0.2).clamp(0, 1), (x * 0.5))
    assert shifted["rfid"] > 1 and shifted["fid"] > 1 and shifted["kid"] > 0
    # KID's unbiased estimate of a set against itself is not exactly 0 (the cross term keeps the diagonal
    # the others drop) but small beside a real difference
    assert abs(same["kid"]) < 0.02 * shifted["kid"], (same, shifted)
    # FID written out: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) on the same features, in float64
    with torch.no_grad():
        a, b = f(x).double(), f(x * 0.5).double()
    ma, mb, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    assert shifted["fid"] == pytest.approx(float((ma - mb).pow(2).sum() + ca.trace() + cb.trace() - 2 * eig), rel=1e-3)


def test_a_classifier_of_other_images_and_an_unknown_feature_network_are_refused(digits_classifier):
    path, _, _ = digits_classifier
    with pytest.raises(UserError, match=r"was trained on 1×8×8 images and this model makes 1×28×28"):
        features.feature_network(str(path), (1, 28, 28))
    with pytest.raises(UserError, match="does not exist; train one with `autoenc classifier"):
        features.feature_network(str(path.with_name("none.safetensors")), (1, 8, 8))
    with pytest.raises(UserError, match="is not a feature network"):
        features.feature_network("weights.pt", (1, 8, 8))
    f = features.feature_network({"_target_": "torch.nn.Flatten"}, (1, 8, 8))  # any nn.Module by _target_
    assert f.num_features == 64


# ---- evaluate on trained runs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_runs")
    train_here(root / "vae", "model=vae", "model.latent_dim=4")
    train_here(root / "ae", "model.latent_dim=4")
    train_here(root / "cvae", "model=vae", "model.latent_dim=4", "model.condition=label")
    return root


def evaluate(ckpt, *overrides):
    from hydra import compose, initialize_config_dir

    from autoenc.app import commands
    from autoenc.util.paths import CONFIGS

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return commands.evaluate(compose("command/evaluate", overrides=[f"ckpt={ckpt}", "eval.probe_examples=200",
                                                                       *overrides]))


def test_evaluate_reports_seeded_fid_and_kid_for_a_prior_and_twice_gives_the_same(runs, digits_classifier, tmp_path):
    path = digits_classifier[0]
    first = evaluate(runs / "vae", f"eval.features={path}", "eval.samples=300", f"out={tmp_path / 'a.json'}")
    again = evaluate(runs / "vae", f"eval.features={path}", "eval.samples=300", f"out={tmp_path / 'b.json'}")
    assert {"ssim", "psnr_per_image", "fid", "kid", "kid_std", "rfid"} <= first.keys()
    assert first == again and json.loads((tmp_path / "b.json").read_text()) == first
    other = evaluate(runs / "vae", f"eval.features={path}", "eval.samples=300", "seed=1", f"out={tmp_path / 'c.json'}")
    assert other["fid"] != first["fid"] and other["rfid"] == first["rfid"]  # other prior draws; the same reconstructions
    assert first["psnr_per_image"] == pytest.approx(first["psnr"], abs=1e-4)  # both the mean of per-image PSNRs


def test_a_conditional_models_samples_carry_test_labels_and_are_seeded(runs, digits_classifier, tmp_path):
    args = (f"eval.features={digits_classifier[0]}", "eval.samples=200", f"out={tmp_path / 'e.json'}")
    first, again = evaluate(runs / "cvae", *args), evaluate(runs / "cvae", *args)
    assert {"fid", "kid", "rfid"} <= first.keys() and first == again


def test_a_model_without_a_prior_reports_rfid_but_no_fid_or_kid(runs, digits_classifier, tmp_path, capsys):
    figures = evaluate(runs / "ae", f"eval.features={digits_classifier[0]}", f"out={tmp_path / 'e.json'}")
    assert "rfid" in figures and figures["rfid"] > 0 and not {"fid", "kid", "kid_std"} & figures.keys()
    assert "fid, kid: skipped: bottleneck=linear has no prior to sample from (rfid only)" in capsys.readouterr().out


def test_no_feature_network_skips_fid_kid_and_rfid_in_one_note(runs, tmp_path, capsys):
    figures = evaluate(runs / "vae", f"out={tmp_path / 'e.json'}")
    assert "ssim" in figures and not {"fid", "kid", "rfid"} & figures.keys()
    assert "fid, kid, rfid: skipped (eval.features=null)" in capsys.readouterr().out


def test_inception_without_its_weights_is_refused_in_one_line(runs, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fidelity(name, *args, **kw):  # as on a machine without torch-fidelity, whatever this one has
        if name == "torch_fidelity":
            raise ModuleNotFoundError("No module named 'torch_fidelity'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    written = runs / "vae" / "evaluation.json"
    before = written.read_bytes() if written.exists() else None
    line = cli_error(capsys, "evaluate", f"ckpt={runs / 'vae'}", "eval.features=inception")
    assert line.startswith("autoenc: error: eval.features=inception needs torch-fidelity and its Inception-v3 weights")
    assert "pip install torch-fidelity" in line and "eval.features=<FILE.safetensors> from `autoenc classifier`" in line
    assert (written.read_bytes() if written.exists() else None) == before  # refused before anything is written


def test_compare_shows_the_new_figures(runs, digits_classifier, tmp_path, capsys):
    for name in ("vae", "ae", "cvae"):
        evaluate(runs / name, f"eval.features={digits_classifier[0]}", "eval.samples=100")
    capsys.readouterr()
    cli_here("compare", f"runs=[{runs}]", "sort=rfid", f"out={tmp_path / 'cmp'}", "metrics=[ssim,psnr_per_image,fid,rfid]")
    header = capsys.readouterr().out.splitlines()[0]
    assert all(f"eval/{k}" in header for k in ("rfid", "ssim", "psnr_per_image", "fid"))
    rows = (tmp_path / "cmp.csv").read_text().splitlines()
    assert rows[0] == "run,eval/rfid,eval/ssim,eval/psnr_per_image,eval/fid" and len(rows) == 4
    assert [r for r in rows if r.startswith("ae,")][0].endswith(",")  # no prior: no FID, an empty cell


def test_the_classifier_command_refuses_vectors_and_a_wrong_suffix(capsys, tmp_path):
    assert "must end in .safetensors" in cli_error(capsys, "classifier", f"out={tmp_path / 'c.pt'}")
    assert "positive integer" in cli_error(capsys, "classifier", "epochs=0")
    line = cli_error(capsys, "classifier", "data.standardize=true", f"out={tmp_path / 'c.safetensors'}")
    assert line.endswith("`autoenc classifier` needs images in [0, 1] and data=digits gives standardized values")
    assert not (tmp_path / "c.safetensors").exists()
