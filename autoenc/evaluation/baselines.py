"""What a trained model's figures are measured against: the test split's figures beside the reconstruction
of PCA with as many components as the code can have non-zero values, and linear probes on the codes and
on the input, all fitted on a seeded subset of the training split of the same kind of data they score."""

from __future__ import annotations

import numpy as np
import torch

from autoenc.model.bottlenecks import Stochastic
from autoenc.model.conditions import Label
from autoenc.data.module import subset
from autoenc.evaluation import features, images, inference
from autoenc.model import metrics
from autoenc.training.runs import Run


def training_sample(run: Run, x, n: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of at most n training examples (positions in order) and their model inputs: what
    PCA and the linear probes are fitted on."""
    keep = torch.as_tensor(np.sort(np.random.default_rng(seed).permutation(len(x))[:n]))
    return keep, inference.inputs(run, subset(x, keep), batch_size)


def run_test_loop(run: Run, progress: bool = True) -> dict[str, float]:
    """The test split's figures from Lightning's test loop, with the model left on the device it was on."""
    import lightning.pytorch as pl

    from autoenc.training.datamodule import lightning_data

    on = inference.device(run)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, inference_mode=False)
    trainer.test(run.module, datamodule=lightning_data(run.datamodule), verbose=False)
    figures = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("test/") and v.numel() == 1}
    run.module.to(on)  # Lightning's teardown moved the model to the CPU
    return figures


def pca_figures(x_train: torch.Tensor, x_test: torch.Tensor, components: int, active: int) -> dict[str, float]:
    """Test MSE of PCA with `components` (and, for fewer `active` units, with that many) fitted on x_train."""
    figures = {}
    figures["pca_mse"], figures["pca_components"] = metrics.pca_mse(x_train, x_test, components)
    if 0 < active < components:
        figures["pca_mse_active_units"], _ = metrics.pca_mse(x_train, x_test, active)
    return figures


def probe_figures(codes_train, y_train, codes_test, y_test, x_train, x_test, pixels=None) -> dict[str, float]:
    """Test accuracy of linear probes of the labels fitted on the codes and on the input (`pixels`: that
    probe, already fitted)."""
    on_pixels = (metrics.probe_accuracy(x_train, y_train, x_test, y_test) if pixels is None
                 else float(pixels.score(metrics.flat(x_test), y_test.numpy())))
    return {"probe_accuracy": metrics.probe_accuracy(codes_train, y_train, codes_test, y_test),
            "probe_accuracy_pixels": on_pixels}


def sample_label_accuracy(run: Run, probe, per_label: int = 100, seed: int = 0) -> dict[str, float]:
    """How well a conditional model's samples carry their label: `probe`, a logistic regression fitted on
    real training examples' pixels, names the class of `per_label` prior samples drawn with each label; the
    share it calls right, per label and averaged over the labels."""
    ae = run.autoencoder
    g = torch.Generator(device=inference.device(run)).manual_seed(seed)
    right = {}
    for name, y in ae.condition.rows():
        x = ae.sample(per_label, generator=g, y=y.to(inference.device(run)))
        right[name] = float((probe.predict(metrics.flat(x)) == int(y)).mean())
    return {"sample_label_accuracy": sum(right.values()) / len(right),
            **{f"sample_label_accuracy_{name}": share for name, share in right.items()}}


def image_figures(run: Run, x_hat: torch.Tensor, x_te_in: torch.Tensor, y_te: torch.Tensor,
                  net: features.Features | None, samples: int, seed: int, batch_size: int) -> dict[str, float]:
    """SSIM, MS-SSIM and per-image PSNR of the test reconstructions; with a feature network, their rFID and,
    for a model with a prior, FID and KID of `samples` seeded prior samples (a conditional model's with the
    labels of seeded test examples), all against the test split."""
    ae = run.autoencoder
    figures = images.reconstruction_figures(x_hat, x_te_in, batch_size)
    if net is None:
        print("fid, kid, rfid: skipped (eval.features=null); give eval.features=<FILE.safetensors> from "
              "`autoenc classifier`, or inception")
        return figures
    drawn = None
    if isinstance(ae.bottleneck, Stochastic):
        g = torch.Generator(device=inference.device(run)).manual_seed(seed)
        pick = torch.randint(len(y_te), (samples,), generator=torch.Generator().manual_seed(seed))
        y = y_te[pick] if ae.condition.width else None
        with torch.no_grad():
            drawn = torch.cat([ae.sample(min(batch_size, samples - s), generator=g,
                                         y=None if y is None else y[s:s + batch_size].to(inference.device(run))).cpu()
                               for s in range(0, samples, batch_size)])
    else:
        print(f"fid, kid: skipped: bottleneck={ae.bottleneck.name} has no prior to sample from (rfid only)")
    print(f"fid/kid/rfid in the features of {net.name} ({net.num_features} per image)"
          + (f": {samples} prior samples against {len(x_te_in)} test images" if drawn is not None else ""), flush=True)
    net.to(inference.device(run))
    return figures | images.generative_figures(net, x_te_in, x_hat, drawn, seed, batch_size)


def evaluate(run: Run, probe_examples: int = 10_000, seed: int = 0, progress: bool = True,
             batch_size: int = 1024, features_spec=None, samples: int = 1000) -> dict[str, float]:
    """The test loop's figures, the reconstruction of clean test examples through the deterministic code
    against PCA, the linear probes where every test example has a label, and for images in [0, 1] the
    image figures (image_figures; FID, KID and rFID in the features `features_spec` names)."""
    dm, ae = run.datamodule, run.autoencoder
    pictures = len(ae.shape) == 3 and dm.standardize is False
    net = features.feature_network(features_spec, ae.shape) if pictures else None  # refused before any work
    figures = run_test_loop(run, progress)
    x_tr, y_tr = dm.evaluation_split("train")
    x_te, y_te = dm.evaluation_split("test")
    x_te_in = inference.inputs(run, x_te, batch_size)
    # mse and psnr of clean test examples through the deterministic code: the figures PCA competes with
    x_hat = inference.reconstructions(run, x_te, batch_size, y_te)
    figures["mse"] = metrics.mse(x_hat, x_te_in)
    if pictures:
        figures |= image_figures(run, x_hat, x_te_in, y_te.cpu(), net, samples, seed, batch_size)
        figures["psnr"] = figures["psnr_per_image"]  # one figure, under the name the training logs give it too
    elif features_spec is not None:
        print("fid, kid, rfid: skipped: the model's examples are not images in [0, 1]")
    keep, x_tr_in = training_sample(run, x_tr, probe_examples, seed, batch_size)
    y_tr = y_tr.cpu()[keep]
    components = ae.bottleneck.active_size(ae.code_size)
    print(f"fitting PCA ({components} components) and linear probes on {len(x_tr_in)} training examples…", flush=True)
    active = int(figures.get("active_units", components))  # a VAE's units that carry information
    figures |= pca_figures(x_tr_in, x_te_in, components, active)
    y_te = y_te.cpu()
    if bool((y_te >= 0).all()):
        codes_tr = inference.codes(run, x_tr_in, batch_size, prepared=True, y=y_tr)
        codes_te = inference.codes(run, x_te_in, batch_size, prepared=True, y=y_te)
        judged = isinstance(ae.condition, Label) and isinstance(ae.bottleneck, Stochastic)
        pixels = metrics.fit_probe(x_tr_in, y_tr) if judged else None  # one probe for both figures
        figures |= probe_figures(codes_tr, y_tr, codes_te, y_te, x_tr_in, x_te_in, pixels)
        if judged:
            figures |= sample_label_accuracy(run, pixels, seed=seed)
    return figures
