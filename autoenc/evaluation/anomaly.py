"""Anomaly detection with a trained run: per-example scores, how well they tell anomalies (labels outside
`normal`) from normal examples (ROC-AUC, average precision), and their histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autoenc.evaluation import inference
from autoenc.training.runs import Run
from autoenc.util.errors import UserError


def scores(run: Run, x, k: int = 100, seed: int = 0, batch_size: int = 1024, y=None) -> dict[str, torch.Tensor]:
    """Per-example scores of stored examples: `mse` (of the reconstruction), `recon_nll` (−log p(x|code)),
    and a Stochastic bottleneck's own (`nll_iwae`: −log p(x), k importance samples); `score` is the last of these, else `mse`."""
    ae = run.autoencoder
    g = torch.Generator(device=inference.device(run)).manual_seed(seed)

    def columns(b, yb=None):
        logits = ae.decode(ae.encode(b, y=yb).code, yb)
        cols = {"mse": (ae.likelihood.mean(logits) - b).pow(2).flatten(1).mean(1),
                "recon_nll": ae.likelihood.nll(logits, b),
                **ae.bottleneck.scores(ae, b, k, g, run.iwae_chunk, yb)}
        return torch.stack([cols[name] for name in names], 1)

    extra = ae.bottleneck.score_names
    names = ["mse", "recon_nll", *extra]
    table = inference.apply(run, columns, x, batch_size, y=inference.labels(run, y))
    out = {name: table[:, i] for i, name in enumerate(names)}
    out["score"] = out[extra[-1] if extra else "mse"]
    return out


def detection(scores: np.ndarray, labels: np.ndarray, normal: list) -> dict:
    """How well the scores tell anomalies (labels not in `normal`) from normal examples: ROC-AUC, AP."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    anomalous = ~np.isin(labels, normal)
    if anomalous.all() or not anomalous.any():
        raise UserError(f"normal={normal} must name some but not all of the labels here ({sorted(set(labels.tolist()))})")
    return {"roc_auc": float(roc_auc_score(anomalous, scores)), "average_precision": float(average_precision_score(anomalous, scores)),
            "normal": int((~anomalous).sum()), "anomalous": int(anomalous.sum())}


def summary(scores: dict[str, np.ndarray], labels: np.ndarray, normal=None) -> dict:
    """Which score was used, over how many examples, its mean, and with `normal` labels the detection figures."""
    found = {"score": "nll_iwae" if "nll_iwae" in scores else "mse", "examples": len(scores["score"]),
             "mean": float(scores["score"].mean())}
    return found | detection(scores["score"], labels, list(normal)) if normal is not None else found


def histogram(scores, labels, normal, kind: str, path: Path) -> None:
    """Histogram of the scores, normal and anomalous apart when `normal` names the normal labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=60)
    if normal is None:
        ax.hist(scores, bins=bins)
    else:
        anomalous = ~np.isin(labels, list(normal))
        ax.hist(scores[~anomalous], bins=bins, alpha=0.6, label=f"normal (labels {list(normal)})")
        ax.hist(scores[anomalous], bins=bins, alpha=0.6, label="anomalous (other labels)")
        ax.legend()
    ax.set(xlabel=f"anomaly score ({kind})", ylabel="examples")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
