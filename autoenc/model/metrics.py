"""Evaluation metrics on whole splits: reconstruction error, PSNR, the PCA baseline, a linear probe."""

from __future__ import annotations

import numpy as np
import torch



def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR, 10·log10(1/MSE) dB on [0, 1] pixels (capped at 100 dB)."""
    # Per image, not per set: logged with batch_size weights, the epoch value is the split's mean
    # per-image PSNR whatever the batching (the figure denoising papers report).
    mse = (x_hat - x).flatten(1).pow(2).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


class SplitStatistics:
    """Sums over a whole split of what its figures need: the code's first and second moments and each
    unit's active count (dead and active units), and the reconstruction's squared error against the
    data's own spread (the fraction of variance unexplained)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.sums = {}

    def update(self, code: torch.Tensor, tally: dict[str, torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Adds a batch: its code, the bottleneck's own sums (Bottleneck.tally), the input and reconstruction."""
        code, x, x_hat = code.detach().float(), x.flatten(1).float(), x_hat.detach().flatten(1).float()
        parts = {"n": torch.tensor(float(len(code)), device=code.device), "sum": code.sum(0),
                 "sq": code.pow(2).sum(0), "sse": (x - x_hat).pow(2).sum(), "x_sum": x.sum(0), "x_sq": x.pow(2).sum(),
                 **{k: v.detach() for k, v in tally.items()}}
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def figures(self, bottleneck, reduce=lambda v: v) -> dict[str, torch.Tensor]:
        """The bottleneck's split figures and the FVU, the sums first combined by `reduce` (DDP: a sum over ranks)."""
        if not self.sums:
            return {}
        stats = {k: reduce(v) for k, v in self.sums.items()}
        figures = bottleneck.split_figures(stats)
        # fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the split's mean example
        spread = stats["x_sq"] - stats["x_sum"].pow(2).sum() / stats["n"]
        figures["fvu"] = stats["sse"] / spread.clamp_min(1e-12)
        return figures


def flat(x: torch.Tensor) -> np.ndarray:
    """Images (N, …) as a float64 matrix (N, D), the form scikit-learn expects."""
    return x.detach().flatten(1).double().cpu().numpy()


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error per pixel."""
    return float((x_hat.double() - x.double()).pow(2).mean())


def pca_mse(train: torch.Tensor, test: torch.Tensor, components: int) -> tuple[float, int]:
    """Per-pixel test MSE of PCA fitted on `train`: the best linear autoencoder of that latent size."""
    from sklearn.decomposition import PCA

    a, b = flat(train), flat(test)
    k = min(components, *a.shape)  # a code at least as wide as the input reconstructs it exactly
    pca = PCA(n_components=k, svd_solver="full").fit(a)
    return float(((pca.inverse_transform(pca.transform(b)) - b) ** 2).mean()), k


def fit_probe(train: torch.Tensor, train_y: torch.Tensor):
    """A logistic regression on standardized features, fitted (scikit-learn's pipeline: predict, score)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(flat(train), train_y.cpu().numpy())


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of a logistic regression fitted on (standardized) training features; with several labels
    per example (CelebA's 40 attributes), the mean accuracy of one probe per column."""
    if train_y.dim() == 2:
        return float(np.mean([probe_accuracy(train, train_y[:, j], test, test_y[:, j]) for j in range(train_y.shape[1])]))
    return float(fit_probe(train, train_y).score(flat(test), test_y.cpu().numpy()))
