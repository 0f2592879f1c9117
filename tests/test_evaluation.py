"""The evaluation layer's plain functions on tensors and arrays, without a trained run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoenc.evaluation import anomaly, baselines
from autoenc.util.errors import UserError


def test_the_score_summary_names_its_score_and_separates_anomalies_it_ranks_higher():
    labels = np.array([0, 0, 1, 1])
    scores = {"mse": np.array([0.1, 0.2, 0.8, 0.9]), "score": np.array([0.1, 0.2, 0.8, 0.9])}
    assert anomaly.summary(scores, labels) == {"score": "mse", "examples": 4, "mean": pytest.approx(0.5)}
    found = anomaly.summary({**scores, "nll_iwae": scores["score"]}, labels, [0])
    assert found["score"] == "nll_iwae" and found["roc_auc"] == 1.0 and found["average_precision"] == 1.0
    assert (found["normal"], found["anomalous"]) == (2, 2)
    with pytest.raises(UserError, match="must name some but not all of the labels"):
        anomaly.summary(scores, labels, [0, 1])


def test_pca_is_also_fitted_with_as_many_components_as_active_units_when_fewer():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert set(baselines.pca_figures(x[:30], x[30:], 3, 3)) == {"pca_mse", "pca_components"}
    fewer = baselines.pca_figures(x[:30], x[30:], 3, 1)
    assert fewer["pca_components"] == 3 and fewer["pca_mse_active_units"] > fewer["pca_mse"]
