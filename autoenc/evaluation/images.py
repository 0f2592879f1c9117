"""Image figures of `autoenc evaluate`, all computed by torchmetrics: SSIM, MS-SSIM and per-image PSNR of test
reconstructions (images in [0, 1]); FID and KID of prior samples against the test split and rFID of the test
reconstructions, in the features of a chosen network (autoenc.evaluation.features)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autoenc.evaluation.features import Features

PSNR_CAP = 100.0  # dB: a per-image PSNR is capped here, so that an exact reconstruction (MSE 0, PSNR ∞) keeps a finite mean
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003: finest scale first
WINDOW = 11  # the Gaussian window of SSIM and MS-SSIM (σ 1.5)
KID_SUBSET = 1000  # KID's subset size (fewer where either set is smaller), over 100 subsets


def ms_ssim_scales(height: int, width: int) -> int:
    """The most scales (of 5) whose MS-SSIM torchmetrics computes on height × width images with the 11-pixel
    window (asking torchmetrics itself, on a blank pair); 0 if not even two (sides under 12 px)."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    probe = torch.zeros(1, 1, height, width)
    for k in range(len(MS_SSIM_BETAS), 1, -1):
        try:
            MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=WINDOW,
                                                       betas=truncated_betas(k))(probe, probe)
            return k
        except (ValueError, RuntimeError):  # torchmetrics' size checks; a window's padding wider than a scale
            continue
    return 0


def truncated_betas(k: int) -> tuple[float, ...]:
    """The first k of MS-SSIM's five scale exponents, rescaled to sum to 1 (a weighted geometric mean, so that
    identical images still score 1 and fewer scales do not inflate the figure toward it); all five as
    published (and torchmetrics' defaults) where the images allow five."""
    if k == len(MS_SSIM_BETAS):
        return MS_SSIM_BETAS
    kept = MS_SSIM_BETAS[:k]
    return tuple(b / sum(kept) for b in kept)


def reconstruction_figures(x_hat: torch.Tensor, x: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """SSIM, MS-SSIM (with as many of its five scales as the image size allows; skipped, with the reason
    printed, below two) and the mean of per-image PSNRs (each capped at PSNR_CAP dB) of reconstructions x_hat
    of images x in [0, 1], (N, C, H, W), data_range 1."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, StructuralSimilarityIndexMeasure

    h, w = x.shape[-2:]
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=WINDOW)
    scales = ms_ssim_scales(h, w)
    ms_ssim = (MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=WINDOW,
                                                          betas=truncated_betas(scales)) if scales else None)
    psnrs = []
    for start in range(0, len(x), batch_size):
        a, b = x_hat[start:start + batch_size].float(), x[start:start + batch_size].float()
        ssim.update(a, b)
        if ms_ssim is not None:
            ms_ssim.update(a, b)
        psnrs.append(peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).reshape(-1))
    figures = {"ssim": float(ssim.compute()),
               "psnr_per_image": float(torch.cat(psnrs).clamp(max=PSNR_CAP).mean())}
    if ms_ssim is not None:
        figures["ms_ssim"], figures["ms_ssim_scales"] = float(ms_ssim.compute()), float(scales)
        if scales < len(MS_SSIM_BETAS):
            print(f"ms_ssim: {scales} of 5 scales ({h}×{w} images are too small for more with an {WINDOW}-px window; "
                  f"the first {scales} exponents, rescaled to sum to 1)")
    else:
        print(f"ms_ssim: skipped: {h}×{w} images are too small for two scales of an {WINDOW}-px window "
              "(sides of 12 px or more)")
    return figures


class _Given(nn.Module):
    """Features already computed, as torchmetrics' FID and KID take a feature network: each set goes through
    the real network once, for every figure."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _features(net: Features, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([net(x[start:start + batch_size].to(device)) for start in range(0, len(x), batch_size)])


def generative_figures(features: Features, real: torch.Tensor, reconstructions: torch.Tensor,
                       samples: torch.Tensor | None, seed: int = 0, batch_size: int = 1024) -> dict[str, float]:
    """rFID (reconstructions against the real images) and, where prior samples are given, FID and KID
    (mean and standard deviation over 100 subsets) of the samples against the real images, in the feature
    network's space. KID's subsets are drawn under torch.manual_seed(seed), the global generator put back."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    device = next(features.parameters(), torch.empty(0)).device
    figures, given = {}, _Given(features.num_features)
    with torch.no_grad():
        real_f = _features(features, real, batch_size, device)
        fid = FrechetInceptionDistance(feature=given, reset_real_features=False).to(device)
        fid.update(real_f, real=True)
        fid.update(_features(features, reconstructions, batch_size, device), real=False)
        figures["rfid"] = float(fid.compute())
        if samples is not None:
            samples_f = _features(features, samples, batch_size, device)
            fid.reset()  # the real features stay (reset_real_features=False)
            fid.update(samples_f, real=False)
            figures["fid"] = float(fid.compute())
            subset = min(KID_SUBSET, len(real), len(samples))
            with warnings.catch_warnings():  # that KID keeps every feature: 128 or 2048 floats an image, known
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                kid = KernelInceptionDistance(feature=given, subset_size=subset).to(device)
            kid.update(real_f, real=True)
            kid.update(samples_f, real=False)
            with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm
                torch.manual_seed(seed)
                mean, std = kid.compute()
            figures["kid"], figures["kid_std"] = float(mean), float(std)
    return figures
