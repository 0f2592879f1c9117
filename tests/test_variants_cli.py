"""Every family and the combinations train through `autoenc train -m` and report their figures."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, autoenc, tb_tags

# One process per sweep (Hydra runs its jobs in turn), so fifteen runs pay five start-ups.
SWEEPS = [
    ["model=sparse", "penalty=l1,kl,topk"],
    ["model=denoising", "noise=gaussian,masking,salt_pepper", "trainer.limit_test_batches=1.0"],
    ["model=contractive", "penalty.method=analytic,exact,estimate"],
    ["model=ae", "noise=none,masking", "penalty=none,kl"],
    ["model=denoising", "penalty=contractive"],
]
SPARSE, PSNR, JACOBIAN = {"test/l0", "test/dead_fraction"}, {"test/psnr_noisy", "test/psnr_denoised"}, {"test/jacobian_fro"}
# The choices of a run → the family figures its results.json must hold (and no others).
CASES = {
    "model=sparse penalty=l1": SPARSE, "model=sparse penalty=kl": SPARSE, "model=sparse penalty=topk": SPARSE,
    "model=denoising noise=gaussian": PSNR, "model=denoising noise=masking": PSNR,
    "model=denoising noise=salt_pepper": PSNR,
    "model=contractive penalty.method=analytic": JACOBIAN, "model=contractive penalty.method=exact": JACOBIAN,
    "model=contractive penalty.method=estimate": JACOBIAN,
    "model=ae noise=none penalty=none": set(), "model=ae noise=none penalty=kl": SPARSE,
    "model=ae noise=masking penalty=none": PSNR, "model=ae noise=masking penalty=kl": PSNR | SPARSE,
    "model=denoising penalty=contractive": PSNR | JACOBIAN,
}
NUMBERS = {"test/loss", "test/recon", "test/mse", "test/penalty"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """Runs the sweeps; maps each job's model/noise/penalty choices to (run dir, results)."""
    root = tmp_path_factory.mktemp("variants")
    jobs = {}
    for i, sweep in enumerate(SWEEPS):
        autoenc("train", "-m", f"hydra.sweep.dir={root / str(i)}", *FAST, *sweep)
        for run_dir in sorted((root / str(i)).glob("[0-9]*")):
            chosen = [o for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
                      if o.split("=")[0].split(".")[0] in ("model", "noise", "penalty")]
            jobs[" ".join(chosen)] = run_dir, json.loads((run_dir / "results.json").read_text())
    return jobs


def test_the_sweeps_cover_every_case(runs):
    assert CASES.keys() <= runs.keys()


@pytest.mark.parametrize("case", CASES)
def test_each_variant_writes_its_figures_to_results_json(runs, case):
    _, results = runs[case]
    family = SPARSE | PSNR | JACOBIAN
    assert NUMBERS | CASES[case] <= results.keys()
    assert not (family - CASES[case]) & results.keys()
    assert results["test/loss"] == pytest.approx(results["test/recon"] + results["test/penalty"], rel=1e-5)
    no_term = not CASES[case] & (SPARSE | JACOBIAN) or "topk" in case  # top-k: reconstruction alone
    assert (results["test/penalty"] == 0) == no_term


def test_sparse_run_writes_one_feature_tile_per_unit_and_a_frequency_histogram(runs):
    run_dir, results = runs["model=sparse penalty=l1"]
    # 128 units of 8×8 in a 12-wide grid, 2-pixel padding: 12 columns, 11 rows.
    assert Image.open(run_dir / "features.png").size == (2 + 12 * 10, 2 + 11 * 10)
    tags = tb_tags(run_dir)
    assert "val/activation_frequency" in tags["histograms"]
    assert {"val/l0", "val/dead_fraction"} <= tags["scalars"]
    assert 0 < results["test/l0"] <= 128


def tb_image_height(run_dir, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"images": 0})
        ea.Reload()
        if tag in ea.Tags()["images"]:
            return ea.Images(tag)[-1].height
    raise AssertionError(f"no image {tag} in {run_dir}")


def test_denoising_image_has_clean_noisy_denoised_rows(runs):
    # 8×8 tiles, 2-pixel padding: 3 rows are 32 pixels high, the plain AE's 2 rows 22.
    assert tb_image_height(runs["model=denoising noise=masking"][0], "val/reconstructions") == 32
    assert tb_image_height(runs["model=ae noise=none penalty=none"][0], "val/reconstructions") == 22


def test_psnr_equals_recomputation_from_the_best_checkpoint(runs):
    from autoenc.data import to_unit
    from autoenc.train import build

    run_dir, results = runs["model=denoising noise=gaussian"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    datamodule, model = build(cfg)
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    g = torch.Generator().manual_seed(cfg.model.noise_seed)  # test noise restarts from this seed
    noise = instantiate(cfg.noise)
    x = to_unit(datamodule.splits["test"][0])
    x_tilde = torch.cat([noise(b, g) for b in x.split(cfg.data.batch_size)])
    with torch.no_grad():
        x_hat = torch.sigmoid(model.decoder(model.encoder(x_tilde)))

    def mean_psnr(a):  # per image, then averaged over the test set
        return (10 * torch.log10(1 / ((a - x) ** 2).flatten(1).mean(1))).mean().item()

    assert results["test/psnr_noisy"] == pytest.approx(mean_psnr(x_tilde), rel=1e-4)
    assert results["test/psnr_denoised"] == pytest.approx(mean_psnr(x_hat), rel=1e-4)


def test_contractive_analytic_and_exact_runs_agree(runs):
    analytic = runs["model=contractive penalty.method=analytic"][1]
    exact = runs["model=contractive penalty.method=exact"][1]
    assert analytic["test/jacobian_fro"] > 0
    assert analytic["test/jacobian_fro"] == pytest.approx(exact["test/jacobian_fro"], rel=1e-4)
    assert analytic["test/loss"] == pytest.approx(exact["test/loss"], rel=1e-4)


def test_analytic_contractive_with_a_deep_encoder_is_a_one_line_error(tmp_path):
    proc = autoenc("train", f"hydra.run.dir={tmp_path}", *FAST, "model=contractive", "net=mlp",
                   "penalty.method=analytic", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("autoenc: error: penalty.method=analytic needs a one-layer sigmoid "
                                   "encoder (net.hidden=[]); use exact or estimate")
