"""Commands that use a trained model (evaluate, sample, reconstruct, denoise, encode, interpolate) and compare runs."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from autoenc import metrics
from autoenc.errors import UserError
from autoenc.train import build, load_checkpoint, quiet_lightning, restore, write_json
from autoenc.viz import grid_of_rows, make_grid, save_image


@dataclass
class Run:
    """A trained model rebuilt from its run: directory, config, data module and model (eval mode)."""

    dir: Path
    cfg: DictConfig
    datamodule: object
    model: torch.nn.Module


def load_run(cfg: DictConfig) -> Run:
    """Rebuilds the model of `cfg.ckpt` from its run's config and loads the weights (weights_only)."""
    if not cfg.ckpt:
        raise UserError("name the checkpoint to use: ckpt=<run>/checkpoints/best.ckpt")
    path = Path(str(cfg.ckpt)).expanduser()
    ckpt = load_checkpoint(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        run_cfg = OmegaConf.load(saved)
    elif "autoenc_config" in ckpt:
        run_cfg = OmegaConf.create(ckpt["autoenc_config"])
    else:
        raise UserError(f"{path} stores no config and {saved} is missing; evaluate a checkpoint inside "
                        "the run directory that `autoenc train` wrote")
    run_cfg.paths.output_dir = str(run_dir)
    run_cfg.model.iwae_samples = cfg.eval.iwae_samples
    quiet_lightning()
    datamodule, model = build(run_cfg)
    restore(model, ckpt, path)  # the checkpoint already read above, not read again
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Run(run_dir, run_cfg, datamodule, model.eval().to(device))


def batched(fn, x: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """fn applied to x in chunks (bounded memory on large splits), without gradients."""
    with torch.no_grad():
        return torch.cat([fn(b) for b in x.split(size)])


def codes(model, x: torch.Tensor) -> torch.Tensor:
    """Deterministic latent codes (the posterior mean for a VAE)."""
    return batched(lambda b: model.encode(b).code, x)


def split_images(run: Run, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images as [0, 1] floats on the model's device, and its labels."""
    from autoenc.data import to_unit

    splits = run.datamodule.splits
    if split not in splits:
        raise UserError(f"split={split!r} is not one of {', '.join(splits)}")
    x, y = splits[split]
    return to_unit(x).to(run.model.device), y.cpu()


def images(cfg: DictConfig, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's image folder (`input=`, resized to the model's shape) or else the chosen split."""
    if not cfg.input:
        return split_images(run, cfg.split)
    from autoenc.data import ImageFolder, to_unit

    c, _, w = run.model.shape
    *_, x, y = ImageFolder(path=cfg.input, size=w, channels=c, test_fraction=1.0).load()
    return to_unit(x).to(run.model.device), y


def out_path(cfg: DictConfig, run: Run, default: str) -> Path:
    """Where a command writes: `out=` if given, else `default` in the run directory."""
    p = Path(cfg.out).expanduser() if cfg.out else run.dir / default
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def save_png(grid: torch.Tensor, path: Path) -> Path:
    """Writes a grid as PNG and says so (with its size in pixels)."""
    save_image(grid, path)
    print(f"wrote {path} ({grid.shape[2]}×{grid.shape[1]} px)")
    return path


def paired_rows(columns: list[torch.Tensor], cols: int = 8) -> torch.Tensor:
    """A grid of rows of `cols` images: each chunk's input row is followed by its other versions."""
    cols = min(cols, len(columns[0]))
    n = len(columns[0]) - len(columns[0]) % cols
    return grid_of_rows([c[i:i + cols] for i in range(0, n, cols) for c in columns])


# ---- commands ---------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test figures of the family (Lightning's test loop) plus reconstruction vs PCA and linear probes."""
    import lightning.pytorch as pl

    run = load_run(cfg)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    figures = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("test/") and v.numel() == 1}
    model = run.model.eval()
    (x_tr, y_tr), (x_te, y_te) = split_images(run, "train"), split_images(run, "test")
    x_hat = batched(model, x_te)
    # mse and psnr of clean test images through the deterministic code: the figures PCA competes with.
    figures |= {"mse": metrics.mse(x_hat, x_te), "psnr": float(metrics.psnr(x_hat, x_te))}
    figures["pca_mse"], figures["pca_components"] = metrics.pca_mse(x_tr, x_te, model.latent_dim)
    probe = dict(max_train=cfg.eval.probe_examples, seed=cfg.seed)
    figures["probe_accuracy"] = metrics.probe_accuracy(codes(model, x_tr), y_tr, codes(model, x_te), y_te, **probe)
    figures["probe_accuracy_pixels"] = metrics.probe_accuracy(x_tr, y_tr, x_te, y_te, **probe)
    width = max(map(len, figures))
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in sorted(figures.items())))
    path = out_path(cfg, run, "evaluation.json")
    write_json(path, figures)
    print(f"wrote {path}")
    return figures


def sample(cfg: DictConfig) -> Path:
    """A grid of n images decoded from prior samples z ~ p(z)."""
    run = load_run(cfg)
    g = torch.Generator(device=run.model.device).manual_seed(cfg.seed)
    x = run.model.sample(cfg.n, generator=g)
    nrow = max(1, round(cfg.n ** 0.5))
    return save_png(make_grid(x.cpu(), nrow=nrow, pad_value=1.0), out_path(cfg, run, "sample.png"))


def reconstruct(cfg: DictConfig) -> Path:
    """Rows of input | reconstruction for n images of a split or of `input=` folder."""
    run = load_run(cfg)
    x = images(cfg, run)[0][:cfg.n]
    return save_png(paired_rows([x, batched(run.model, x)]), out_path(cfg, run, "reconstruct.png"))


def denoise(cfg: DictConfig) -> Path:
    """Rows of clean | corrupted | denoised, with the model's own noise or the one chosen by `noise=`."""
    from hydra.utils import instantiate

    run = load_run(cfg)
    noise = instantiate(cfg.noise) if cfg.get("noise") else run.model.noise
    if noise is None:
        raise UserError("this model was trained without noise; choose one, e.g. noise=gaussian, "
                        "noise=masking noise.p=0.5 or noise=salt_pepper")
    x = images(cfg, run)[0][:cfg.n]
    x_tilde = noise(x, torch.Generator(device=x.device).manual_seed(cfg.seed))
    x_hat = batched(run.model, x_tilde)
    before, after = float(metrics.psnr(x_tilde, x)), float(metrics.psnr(x_hat, x))
    print(f"PSNR {before:.2f} dB corrupted → {after:.2f} dB denoised")
    return save_png(paired_rows([x, x_tilde, x_hat]), out_path(cfg, run, "denoise.png"))


def encode(cfg: DictConfig) -> Path:
    """Writes the deterministic latent codes (`code`) and labels (`label`) of a split as .npz."""
    import numpy as np

    run = load_run(cfg)
    x, y = images(cfg, run)
    path = out_path(cfg, run, "latents.npz")
    np.savez(path, code=codes(run.model, x).cpu().numpy(), label=y.numpy())
    print(f"wrote {path} (code: {len(x)}×{run.model.latent_dim}, label: {len(x)})")
    return path


def interpolate(cfg: DictConfig) -> Path:
    """Straight latent paths between pairs of images; with a prior (VAE) also a traversal per dimension."""
    run = load_run(cfg)
    model, (x, _) = run.model, images(cfg, run)
    pairs = min(cfg.pairs, len(x) // 2)
    if pairs < 1:
        raise UserError("interpolate needs at least two images")
    a, b = x[:pairs], x[pairs:2 * pairs]
    za, zb = codes(model, a), codes(model, b)
    t = torch.linspace(0, 1, cfg.steps, device=x.device).view(1, -1, 1)
    z = (1 - t) * za[:, None] + t * zb[:, None]  # (pairs, steps, latent)
    paths = decoded(model, z)
    path = save_png(grid_of_rows([torch.cat([a[i:i + 1], paths[i], b[i:i + 1]]) for i in range(pairs)]),
                    out_path(cfg, run, "interpolate.png"))
    if model.bottleneck.stochastic:
        d = model.latent_dim
        z = za[0].expand(d, cfg.steps, d).clone()  # row i sweeps dimension i around the first image's code
        z[torch.arange(d), :, torch.arange(d)] = torch.linspace(-cfg.traversal, cfg.traversal, cfg.steps,
                                                               device=x.device)
        save_png(grid_of_rows(list(decoded(model, z))), path.with_name(f"{path.stem}_traversal{path.suffix}"))
    return path


def decoded(model, z: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] decoded from codes of shape (rows, cols, latent), as (rows, cols, C, H, W)."""
    x = batched(lambda b: model.likelihood.mean(model.decode(b)), z.flatten(0, 1))
    return x.view(*z.shape[:2], *x.shape[1:])


# ---- compare ----------------------------------------------------------------------------------
def run_record(run_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """A run's command-line overrides and its figures (results.json, then evaluation.json on top)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
    figures = {k.removeprefix("test/"): v for k, v in json.loads((run_dir / "results.json").read_text()).items()}
    if (run_dir / "evaluation.json").is_file():
        figures |= json.loads((run_dir / "evaluation.json").read_text())
    return dict(o.split("=", 1) for o in overrides if "=" in o), figures


def compare(cfg: DictConfig) -> list[dict]:
    """One table of runs (their differing overrides and figures) sorted by a metric; CSV and bar chart."""
    if not cfg.runs:
        raise UserError("name the runs to compare: runs=[RUN_DIR,...] (a multirun directory counts for all its runs)")
    dirs = [Path(str(d)).expanduser() for d in ([cfg.runs] if isinstance(cfg.runs, str) else cfg.runs)]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give run or multirun directories: runs=[DIR,...]")
    run_dirs = sorted({p.parent for d in dirs for p in d.rglob("results.json")})
    if not run_dirs:
        raise UserError(f"no results.json under {', '.join(map(str, dirs))}; "
                        "give directories written by `autoenc train`")
    records = [run_record(r) for r in run_dirs]
    names = sorted({m for _, f in records for m in f})
    shown = list(dict.fromkeys([cfg.sort, *(cfg.metrics or names)]))  # the sort metric first
    unknown = [m for m in shown if m not in names]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a figure of these runs (sort=, metrics=); "
                        f"choose from: {', '.join(names)}")
    keys = sorted({k for o, _ in records for k in o})
    varying = [k for k in keys if len({o.get(k) for o, _ in records}) > 1]
    root = Path(os.path.commonpath([str(r) for r in run_dirs]))
    rows = [{"run": str(r.relative_to(root)), **{k: o.get(k, "") for k in varying},
             **{m: f.get(m, "") for m in shown}} for r, (o, f) in zip(run_dirs, records)]
    rank = (sorted((r for r in rows if r[cfg.sort] != ""), key=lambda r: r[cfg.sort], reverse=cfg.descending)
            + [r for r in rows if r[cfg.sort] == ""])
    columns = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("\n".join("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rank))
    prefix = Path(cfg.out).expanduser() if cfg.out else root / "comparison"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rank)
    bar_chart(rank, varying, cfg.sort, prefix.with_suffix(".png"))
    print(f"wrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.png')}")
    return rank


def bar_chart(rows: list[dict], label_keys: list[str], metric: str, path: Path) -> None:
    """Horizontal bars of one metric per run, labelled by the run's differing overrides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r[metric] != ""]
    labels = [" ".join(f"{k}={r[k]}" for k in label_keys) or r["run"] for r in shown]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(shown) + 1.2))
    ax.barh(range(len(shown)), [r[metric] for r in shown])
    ax.set(yticks=range(len(shown)), yticklabels=labels, xlabel=metric)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
