"""Groups combine freely: every noise × bottleneck × penalty either trains with its facts holding, or is
refused in one line; every preset trains; a typo in any group is refused naming the nearest key."""

from __future__ import annotations

import math

import pytest
import torch

from autoenc.util.errors import UserError
from autoenc.util.paths import CONFIGS
from autoenc.app.schema import validate
from conftest import FAST, cli_error, compose, rebuilt, train_here


def options(group: str) -> list[str]:
    """The configs directory is the registry: every option of a group."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


BOTTLENECKS, PENALTIES, NOISES, PRESETS = (options(g) for g in ("bottleneck", "penalty", "noise", "model"))


def refused(bottleneck: str, penalty: str) -> bool:
    """The pairs that make no sense, written out independently of the code's `accepts`."""
    return ((penalty == "kl" and bottleneck != "sigmoid") or (penalty == "contractive" and bottleneck in ("gaussian", "vq"))
            or (penalty == "l1" and bottleneck == "vq"))


def test_the_matrix_covers_every_option():
    assert BOTTLENECKS == ["gaussian", "linear", "relu", "sigmoid", "topk", "vq"]
    assert PENALTIES == ["contractive", "kl", "l1", "none"]
    assert NOISES == ["gaussian", "masking", "none", "salt_pepper"]
    assert PRESETS == ["ae", "contractive", "denoising", "sparse", "vae"]


def code_facts(run_dir, results: dict, bottleneck: str, penalty: str, noise: str) -> None:
    """What a trained combination must show, checked on its test set and its results."""
    assert math.isfinite(results["test/loss"]) and results["test/recon"] > 0
    assert ("test/penalty" in results) == (penalty != "none") and results.get("test/penalty", 1) > 0
    assert ({"test/psnr_noisy", "test/psnr_denoised"} <= results.keys()) == (noise != "none")
    assert ("test/jacobian_fro" in results) == (penalty == "contractive")
    datamodule, model = rebuilt(run_dir)
    with torch.no_grad():
        code = model.autoencoder.encode(datamodule.splits["test"][0]).code
    if bottleneck == "topk":
        assert ((code != 0).sum(1) <= model.autoencoder.bottleneck.k).all()  # l0 ≤ k on every example
        assert results["test/l0"] <= model.autoencoder.bottleneck.k
    if bottleneck in ("relu", "topk"):
        assert code.min() >= 0 and 0 <= results["test/dead_fraction"] <= 1
    if bottleneck == "sigmoid":
        assert 0 <= code.min() and code.max() <= 1
    if bottleneck == "vq":  # every code is a codebook vector, found independently as the nearest one
        book = model.autoencoder.bottleneck.codebook
        h = model.autoencoder.encoder(datamodule.splits["test"][0].float())
        torch.testing.assert_close(code, book[torch.cdist(h, book).argmin(1)], rtol=0, atol=1e-6)
        assert 0 < results["test/codes_used"] <= 1 and {"test/perplexity", "test/dead_codes"} <= results.keys()
    if bottleneck == "gaussian":
        assert {"test/kl", "test/nelbo", "test/active_units"} <= results.keys()
        assert results["test/nll_iwae"] <= results["test/nelbo"]
    else:
        assert "test/kl" not in results and "test/nll_iwae" not in results


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_every_combination_trains_or_is_refused_in_one_line(tmp_path, bottleneck, penalty, noise):
    choices = [f"bottleneck={bottleneck}", f"penalty={penalty}", f"noise={noise}", "eval.iwae_samples=64",
               "trainer.limit_test_batches=1.0"]
    if refused(bottleneck, penalty):
        with pytest.raises(UserError) as error:
            validate(compose(*choices))
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"penalty={penalty} needs ")
        fits = [b for b in BOTTLENECKS if not refused(b, penalty)]
        assert message.endswith(f"choose bottleneck={'|'.join(fits)}, or another penalty")
        return
    results = train_here(tmp_path, *choices)
    code_facts(tmp_path, results, bottleneck, penalty, noise)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_trains_with_its_family_figures(tmp_path, preset):
    cfg = compose(f"model={preset}")
    results = train_here(tmp_path, f"model={preset}", "eval.iwae_samples=64", "trainer.limit_test_batches=1.0")
    code_facts(tmp_path, results, *_choices(cfg))


def _choices(cfg) -> tuple[str, str, str]:
    """(bottleneck, penalty, noise) option names of a composed config, from their targets."""
    names = {g: {compose(f"{g}={o}")[g].get("_target_"): o for o in options(g)} for g in ("bottleneck", "penalty", "noise")}
    return tuple(names[g][cfg[g].get("_target_")] for g in ("bottleneck", "penalty", "noise"))


def test_presets_pick_the_seams_of_their_family():
    assert {p: _choices(compose(f"model={p}")) for p in PRESETS} == {
        "ae": ("linear", "none", "none"), "sparse": ("sigmoid", "kl", "none"), "denoising": ("linear", "none", "gaussian"),
        "contractive": ("sigmoid", "contractive", "none"), "vae": ("gaussian", "none", "none")}
    cfg = compose("model=vae", "data=mnist", fast=False)  # the README's first example composes
    assert cfg.bottleneck._target_ == "autoenc.model.bottlenecks.Gaussian" and cfg.data.name == "MNIST"


@pytest.mark.parametrize("group, option, typo, nearest", [
    ("model", "ae", "latnt_dim", "latent_dim"), ("data", "digits", "batchsize", "batch_size"),
    ("net", "mlp", "hiden", "hidden"), ("noise", "masking", "pp", "p"), ("penalty", "l1", "weigth", "weight"),
    ("bottleneck", "topk", "kk", "k"), ("likelihood", "gaussian", "sigm", "sigma"),
    ("trainer", "debug", "max_epoch", "max_epochs"),
])
def test_a_typo_in_any_group_is_refused_naming_the_nearest_key(group, option, typo, nearest):
    with pytest.raises(UserError, match=rf"^{group}\.{typo} is not a setting of {group} .*did you mean {group}\.{nearest}\?$"):
        validate(compose(f"{group}={option}", f"+{group}.{typo}=3"))


def test_a_setting_for_a_choice_without_settings_is_refused():
    with pytest.raises(UserError, match=r"^noise\.p is not a setting: this noise choice has none$"):
        validate(compose("noise=none", "+noise.p=0.5"))


def test_the_cli_refuses_a_pair_and_a_typo_with_exit_2_and_one_line(tmp_path, capsys):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", *FAST, "model=vae", "penalty=kl")
    assert line == ("autoenc: error: penalty=kl needs rates in [0, 1], which bottleneck=gaussian does not give; "
                    "choose bottleneck=sigmoid, or another penalty")
    for typo in ("+model.latnt_dim=3", "model.latnt_dim=3"):  # added with `+` or not: the nearest key, not Hydra's `+` hint
        line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", typo)
        assert line == ("autoenc: error: model.latnt_dim is not a setting of model (autoenc.training.module.AutoencoderModule); "
                        "did you mean model.latent_dim?")
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", "model=vae", "model.optimizer.lrr=1")
    assert line == ("autoenc: error: model.optimizer.lrr is not a setting of model.optimizer (torch.optim.Adam); "
                    "did you mean model.optimizer.lr?")
