"""Commands that use a trained model: evaluate, sample, reconstruct, denoise, encode, decode, interpolate, score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from autoenc import metrics
from autoenc.data import subset
from autoenc.errors import UserError
from autoenc.train import build, configure_lightning, load_checkpoint, restore, write_json
from autoenc.viz import picture, save_png, square

ARRAY_SUFFIXES = (".npy", ".npz", ".pt")


def device() -> str:
    """Where the commands that use a trained model run it: the GPU if there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Run:
    """A trained model rebuilt from its run: directory, config, data module and model (eval mode)."""

    dir: Path
    cfg: DictConfig
    datamodule: object
    model: torch.nn.Module

    @property
    def images(self) -> bool:
        return len(self.model.shape) == 3


@dataclass
class Inputs:
    """What a command works on: examples as stored (tensor or Rows), labels (−1: none), and a name per
    example (file paths for input=, indices into the split otherwise), with a short name for outputs."""

    x: object
    y: torch.Tensor
    names: np.ndarray
    source: str


def load_run(cfg: DictConfig) -> Run:
    """Rebuilds the model of `cfg.ckpt` from its run's config and loads the weights (weights_only), and
    the data's standardization statistics stored with them."""
    if not cfg.ckpt:
        raise UserError("name the checkpoint to use: ckpt=<run>/checkpoints/best.ckpt")
    path = Path(str(cfg.ckpt)).expanduser()
    ckpt = load_checkpoint(path)
    # the run directory: the nearest folder above the checkpoint that holds the run's .hydra/
    run_dir = next((d for d in path.resolve().parents if (d / ".hydra").is_dir()),
                   path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        run_cfg = OmegaConf.load(saved)
    elif "autoenc_config" in ckpt:
        run_cfg = OmegaConf.create(ckpt["autoenc_config"])
    else:
        raise UserError(f"{path} stores no config and {saved} is missing; use a checkpoint inside "
                        "the run directory that `autoenc train` wrote")
    run_cfg.paths.output_dir = str(run_dir)
    run_cfg.model.iwae_samples = cfg.eval.iwae_samples
    configure_lightning()
    datamodule, model = build(run_cfg)
    restore(model, ckpt, path)  # the checkpoint already read above, not read again
    if type(datamodule).__qualname__ in ckpt:
        datamodule.load_state_dict(ckpt[type(datamodule).__qualname__])
    return Run(run_dir, run_cfg, datamodule, model.eval().to(device()))


def batched(fn, x, run: Run | None = None, size: int = 1024) -> torch.Tensor:
    """fn over x in chunks, without gradients: bounded memory on large splits. With `run`, x is as
    stored and each chunk becomes model input on the model's device first."""
    with torch.no_grad():
        outs = []
        for start in range(0, len(x), size):
            chunk = x[start:start + size]
            outs.append(fn(run.datamodule.transform(chunk).to(run.model.device) if run else chunk).cpu())
        return torch.cat(outs)


def model_input(run: Run, x) -> torch.Tensor:
    """Stored examples as model input on the model's device (all at once: for the few a picture shows)."""
    return run.datamodule.transform(x[:]).to(run.model.device)


def inputs(cfg: DictConfig, run: Run) -> Inputs:
    """The user's data (`input=`: a folder of images, resized to the model's shape, in sorted file order;
    or a .npy/.npz/.pt array file) or else the chosen split of the run's data."""
    if not cfg.input:
        splits = run.datamodule.splits
        if cfg.split not in splits:
            raise UserError(f"split={cfg.split!r} is not one of {', '.join(splits)}")
        x, y = splits[cfg.split]
        return Inputs(x, y.cpu(), np.arange(len(x)), cfg.split)
    from autoenc.datasets import Arrays, read_images

    path = Path(str(cfg.input)).expanduser()
    if path.suffix in ARRAY_SUFFIXES:
        x, y = Arrays(path=str(path)).examples()
        y = y if y is not None else torch.full((len(x),), -1)
        if tuple(x.shape[1:]) != tuple(run.model.shape):
            raise UserError(f"{path} holds examples of shape {tuple(x.shape[1:])}; the model takes {tuple(run.model.shape)}")
        return Inputs(x, y, np.arange(len(x)), path.stem)
    if not run.images:
        raise UserError(f"input={path} must be a {'/'.join(ARRAY_SUFFIXES)} file: the model takes vectors")
    c, _, w = run.model.shape
    dm = run.datamodule  # decoded as the training data was (its crop), through the cache
    x, y, files = read_images(path, w, c, getattr(dm, "crop", None), getattr(dm, "cache_dir", None))
    return Inputs(x, y, np.array([str(f) for f in files]), path.name)


def out_path(cfg: DictConfig, run: Run, name: str) -> Path:
    """Where a command writes: `out=` if given, else `<run>/commands/<name>`, apart from training's files."""
    p = Path(cfg.out).expanduser() if cfg.out else run.dir / "commands" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def needs_images(run: Run, command: str) -> None:
    if not run.images:
        raise UserError(f"`{command}` draws pictures and this model takes vectors of shape {tuple(run.model.shape)}; "
                        "use encode, decode or score")


def chunked_rows(columns: list[torch.Tensor], labels: list[str], cols: int = 8) -> tuple[list, list]:
    """Rows of `cols` images: each chunk's first row is followed by its other versions, labelled."""
    cols = min(cols, len(columns[0]))
    n = len(columns[0]) - len(columns[0]) % cols
    rows = [c[i:i + cols] for i in range(0, n, cols) for c in columns]
    return rows, labels * (n // cols)


# ---- commands ---------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test figures of the family (Lightning's test loop) plus reconstruction vs PCA and linear probes,
    each fitted on the same kind of data it is scored on; seeded, so two runs write the same numbers."""
    import lightning.pytorch as pl

    run = load_run(cfg)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, enable_model_summary=False, inference_mode=False)
    trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    figures = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("test/") and v.numel() == 1}
    model, dm = run.model.to(device()), run.datamodule  # Lightning's teardown moved the model to the CPU
    x_tr, y_tr = dm.evaluation_split("train")
    x_te, y_te = dm.evaluation_split("test")
    x_te_in = batched(lambda b: b, x_te, run)
    x_hat = batched(model, x_te, run)
    # mse and psnr of clean test examples through the deterministic code: the figures PCA competes with
    figures |= {"mse": metrics.mse(x_hat, x_te_in)}
    if run.images and dm.standardize is False:
        figures["psnr"] = float(metrics.psnr(x_hat, x_te_in))
    keep = torch.as_tensor(np.sort(np.random.default_rng(cfg.seed).permutation(len(x_tr))[:cfg.eval.probe_examples]))
    x_tr_in, y_tr = batched(lambda b: b, subset(x_tr, keep), run), y_tr[keep]  # a seeded subset: seconds, not minutes
    components = model.bottleneck.active_size(model.latent_dim)
    print(f"fitting PCA ({components} components) and linear probes on {len(x_tr_in)} training examples…", flush=True)
    figures["pca_mse"], figures["pca_components"] = metrics.pca_mse(x_tr_in, x_te_in, components)
    if bool((y_te >= 0).all()):
        codes_tr = batched(lambda b: model.encode(b.to(model.device)).code, x_tr_in)
        codes_te = batched(lambda b: model.encode(b).code, x_te, run)
        figures["probe_accuracy"] = metrics.probe_accuracy(codes_tr, y_tr, codes_te, y_te)
        figures["probe_accuracy_pixels"] = metrics.probe_accuracy(x_tr_in, y_tr, x_te_in, y_te)
    width = max(map(len, figures))
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in sorted(figures.items())))
    path = Path(cfg.out).expanduser() if cfg.out else run.dir / "evaluation.json"
    write_json(path, figures)
    print(f"wrote {path}")
    return figures


def sample(cfg: DictConfig) -> Path:
    """A grid of n images decoded from prior samples z ~ p(z)."""
    run = load_run(cfg)
    needs_images(run, "sample")
    g = torch.Generator(device=run.model.device).manual_seed(cfg.seed)
    x = run.model.sample(cfg.n, generator=g)
    return save_png(picture(square(x)), out_path(cfg, run, f"sample_n{cfg.n}_seed{cfg.seed}.png"))


def reconstruct(cfg: DictConfig) -> Path:
    """Rows of input | reconstruction for n images of a split or of `input=`."""
    run = load_run(cfg)
    needs_images(run, "reconstruct")
    data = inputs(cfg, run)
    x = model_input(run, data.x[:cfg.n])
    with torch.no_grad():
        rows, labels = chunked_rows([x, run.model(x)], ["input", "reconstruction"])
    return save_png(picture(rows, labels), out_path(cfg, run, f"reconstruct_{data.source}.png"))


def denoise(cfg: DictConfig) -> Path:
    """Rows of clean | corrupted | denoised, with the model's own noise or the one chosen by `noise=`."""
    from hydra.utils import instantiate

    run = load_run(cfg)
    needs_images(run, "denoise")
    noise = instantiate(cfg.noise) if cfg.get("noise") else run.model.noise
    if noise is None:
        raise UserError("this model was trained without noise; choose one, e.g. noise=gaussian, "
                        "noise=masking noise.p=0.5 or noise=salt_pepper")
    data = inputs(cfg, run)
    x = model_input(run, data.x[:cfg.n])
    x_tilde = noise(x, torch.Generator(device=x.device).manual_seed(cfg.seed))
    with torch.no_grad():
        x_hat = run.model(x_tilde)
    before, after = float(metrics.psnr(x_tilde, x)), float(metrics.psnr(x_hat, x))
    print(f"PSNR {before:.2f} dB corrupted → {after:.2f} dB denoised")
    settings = "_".join(f"{k}{v}" for k, v in (cfg.noise or {}).items() if not k.startswith("_"))
    rows, labels = chunked_rows([x, x_tilde, x_hat], ["clean", "noisy", "denoised"])
    return save_png(picture(rows, labels), out_path(cfg, run, f"denoise_{data.source}{'_' + settings if settings else ''}.png"))


def encode(cfg: DictConfig) -> Path:
    """The deterministic codes (`code`) of a split or of `input=`, in order, with `label` and `path` (the
    files of input=) or `index` (the positions in the split), as .npz."""
    run = load_run(cfg)
    data = inputs(cfg, run)
    code = batched(lambda b: run.model.encode(b).code, data.x, run)
    path = out_path(cfg, run, f"encode_{data.source}.npz")
    name = "path" if cfg.input and not str(cfg.input).endswith(ARRAY_SUFFIXES) else "index"
    np.savez(path, code=code.numpy(), label=data.y.numpy(), **{name: data.names})
    print(f"wrote {path} (code: {len(code)}×{run.model.latent_dim}, label, {name}: {len(code)})")
    return path


def decode(cfg: DictConfig) -> Path:
    """Decodes the codes of an `encode` output (codes=FILE.npz, array `code`): the inverse of encode.
    Writes the decoded examples (`x_hat`, with the file's other arrays) as .npz, and a grid for images."""
    run = load_run(cfg)
    if not cfg.codes:
        raise UserError("name the codes to decode: codes=<file>.npz (as `autoenc encode` writes)")
    src = Path(str(cfg.codes)).expanduser()
    try:
        with np.load(src) as z:
            arrays = dict(z)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read codes={src}: {e}") from None
    code = arrays.get("code")
    if code is None or code.ndim != 2 or code.shape[1] != run.model.latent_dim:
        raise UserError(f"codes={src} needs an array `code` of shape (N, {run.model.latent_dim}); "
                        f"it has {'none' if code is None else tuple(code.shape)}")
    model = run.model
    x_hat = batched(lambda b: model.likelihood.mean(model.decode(b.to(model.device))), torch.as_tensor(code).float())
    path = out_path(cfg, run, f"decode_{src.stem}.npz")
    np.savez(path, x_hat=x_hat.numpy(), **{k: v for k, v in arrays.items() if k != "code"})
    print(f"wrote {path} (x_hat: {tuple(x_hat.shape)})")
    if run.images:
        save_png(picture(square(x_hat[:cfg.n])), path.with_suffix(".png"))
    return path


def interpolate(cfg: DictConfig) -> Path:
    """Straight latent paths between pairs of images; with a prior, also a traversal of each dimension."""
    run = load_run(cfg)
    needs_images(run, "interpolate")
    model, data = run.model, inputs(cfg, run)
    pairs = min(cfg.pairs, len(data.x) // 2)
    if pairs < 1:
        raise UserError("interpolate needs at least two images")
    x = model_input(run, data.x[:2 * pairs])
    with torch.no_grad():
        z = model.encode(x).code
        za, zb = z[:pairs], z[pairs:]
        t = torch.linspace(0, 1, cfg.steps, device=x.device).view(1, -1, 1)
        paths = decoded(model, (1 - t) * za[:, None] + t * zb[:, None])  # (pairs, steps, C, H, W), on the CPU
    a, b = x[:pairs].cpu(), x[pairs:].cpu()
    path = save_png(picture([torch.cat([a[i:i + 1], paths[i], b[i:i + 1]]) for i in range(pairs)]),
                    out_path(cfg, run, f"interpolate_{data.source}.png"))
    if model.bottleneck.stochastic:
        d = model.latent_dim
        z = za[0].expand(d, cfg.steps, d).clone()  # row i sweeps dimension i around the first image's code
        z[torch.arange(d), :, torch.arange(d)] = torch.linspace(-cfg.traversal, cfg.traversal, cfg.steps, device=x.device)
        with torch.no_grad():
            rows = list(decoded(model, z))
        save_png(picture(rows, [f"z{i + 1}" for i in range(d)]), path.with_name(f"{path.stem}_traversal{path.suffix}"))
    return path


def decoded(model, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] decoded from codes of shape (rows, cols, latent), as (rows, cols, C, H, W)."""
    x = batched(lambda b: model.likelihood.mean(model.decode(b)), z.flatten(0, 1))
    return x.view(*z.shape[:2], *x.shape[1:])


def score(cfg: DictConfig) -> Path:
    """A per-example anomaly score for a split or `input=`: the reconstruction's squared error, or for a
    stochastic bottleneck the IWAE estimate of −log p(x) (K = eval.iwae_samples); as CSV and NPZ with
    the examples' paths or indices, a histogram, and with `normal=[labels]` ROC-AUC and average precision
    of telling the other labels from those."""
    from tqdm import tqdm

    run = load_run(cfg)
    model, data = run.model, inputs(cfg, run)
    g = torch.Generator(device=model.device).manual_seed(cfg.seed)
    columns: dict[str, list] = {"mse": [], "recon_nll": []}
    if model.bottleneck.stochastic:
        columns["nll_iwae"] = []
    size = 256
    with torch.no_grad():
        for start in tqdm(range(0, len(data.x), size), desc="score", unit="batch", leave=False):
            x = model_input(run, data.x[start:start + size])
            logits = model.decode(model.encode(x).code)
            columns["mse"].append((model.likelihood.mean(logits) - x).pow(2).flatten(1).mean(1).cpu())
            columns["recon_nll"].append(model.likelihood.nll(logits, x).cpu())
            if model.bottleneck.stochastic:
                columns["nll_iwae"].append(-model.log_likelihood(x, cfg.eval.iwae_samples, g).cpu())
    table = {k: torch.cat(v).numpy() for k, v in columns.items()}
    kind = "nll_iwae" if model.bottleneck.stochastic else "mse"
    table["score"] = table[kind]
    name = "path" if cfg.input and not str(cfg.input).endswith(ARRAY_SUFFIXES) else "index"
    table = {name: data.names, "label": data.y.numpy(), **table}
    path = out_path(cfg, run, f"score_{data.source}.csv")
    write_table(path, table)
    np.savez(path.with_suffix(".npz"), **table)
    summary = {"score": kind, "examples": len(data.names), "mean": float(table["score"].mean())}
    if cfg.normal is not None:
        summary |= detection(table["score"], data.y.numpy(), list(cfg.normal))
    score_histogram(table["score"], data.y.numpy(), cfg.normal, kind, path.with_suffix(".png"))
    write_json(path.with_suffix(".json"), summary)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"wrote {path} (and .npz, .json, .png)")
    return path


def detection(scores: np.ndarray, labels: np.ndarray, normal: list) -> dict:
    """How well the scores tell anomalies (labels not in `normal`) from normal examples: ROC-AUC, AP."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    anomalous = ~np.isin(labels, normal)
    if anomalous.all() or not anomalous.any():
        raise UserError(f"normal={normal} must name some but not all of the labels here ({sorted(set(labels.tolist()))})")
    return {"roc_auc": float(roc_auc_score(anomalous, scores)), "average_precision": float(average_precision_score(anomalous, scores)),
            "normal": int((~anomalous).sum()), "anomalous": int(anomalous.sum())}


def score_histogram(scores, labels, normal, kind: str, path: Path) -> None:
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


def write_table(path: Path, table: dict) -> None:
    """Columns of equal length as CSV (one row per example)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table)
        writer.writerows(zip(*(np.asarray(v).tolist() for v in table.values())))
