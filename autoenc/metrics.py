"""Evaluation metrics on whole splits: reconstruction error, PSNR, the PCA baseline, a linear probe."""

from __future__ import annotations

import numpy as np
import torch

from autoenc.module import psnr  # noqa: F401  (mean per-image PSNR on [0, 1], shared with the module's logs)


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


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                   max_train: int | None = None, seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on (standardized) training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_y.dim() == 2:  # several labels (CelebA's 40 attributes): the mean accuracy of one probe per column
        return float(np.mean([probe_accuracy(train, train_y[:, j], test, test_y[:, j], max_train, seed)
                              for j in range(train_y.shape[1])]))
    a, ya = flat(train), train_y.cpu().numpy()
    if max_train and len(a) > max_train:  # a seeded subset keeps the fit to seconds on large sets
        keep = np.random.default_rng(seed).choice(len(a), max_train, replace=False)
        a, ya = a[keep], ya[keep]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(probe.fit(a, ya).score(flat(test), test_y.cpu().numpy()))
