"""Commands that use a trained model: thin wrappers over the Python API (autoenc.app.api) and the
evaluation layer (autoenc.evaluation) that read the config's keys and inputs, write files and print."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from autoenc.model.bottlenecks import Stochastic
from autoenc.model.quantize import VQ
from autoenc.app.api import Model, load
from autoenc.evaluation import anomaly, arithmetic, inference
from autoenc.training.runs import write_json
from autoenc.util.errors import UserError, is_integer, require
from autoenc.util.pictures import picture, save_png, square

ARRAY_SUFFIXES = (".npy", ".npz", ".pt")


@dataclass
class Inputs:
    """What a command works on: examples as stored (tensor or Rows), labels (−1: none), and a name per
    example (file paths for input=, indices into the split otherwise), with a short name for outputs."""

    x: object
    y: torch.Tensor
    names: np.ndarray
    source: str


def load_model(cfg: DictConfig) -> Model:
    """The model of `ckpt=` (a checkpoint, or a run directory's best one)."""
    if not cfg.ckpt:
        raise UserError("name the checkpoint to use: ckpt=<run>/checkpoints/best.ckpt")
    n = cfg.get("n", 1)
    require(is_integer(n) and n >= 1, "n", n, "a positive integer")
    return load(cfg.ckpt, iwae_samples=cfg.eval.iwae_samples)


def inputs(cfg: DictConfig, model: Model) -> Inputs:
    """The user's data (`input=`: a folder of images, resized to the model's shape, in sorted file order;
    or a .npy/.npz/.pt array file) or else the chosen split of the run's data."""
    if not cfg.input:
        x, y = model.split(cfg.split)
        return Inputs(x, y, np.arange(len(x)), cfg.split)
    from autoenc.data.sources import Arrays, read_images

    path = Path(str(cfg.input)).expanduser()
    if not path.exists():
        raise UserError(f"input={path} does not exist; give a folder of images or a {'/'.join(ARRAY_SUFFIXES)} file")
    if path.suffix in ARRAY_SUFFIXES:
        x, y = Arrays(path=str(path)).examples()
        y = y if y is not None else torch.full((len(x),), -1)
        if tuple(x.shape[1:]) != tuple(model.shape):
            raise UserError(f"{path} holds examples of shape {tuple(x.shape[1:])}; the model takes {tuple(model.shape)}")
        return Inputs(x, y, np.arange(len(x)), path.stem)
    if len(model.shape) != 3:
        raise UserError(f"input={path} must be a {'/'.join(ARRAY_SUFFIXES)} file: the model takes vectors")
    c, _, w = model.shape
    dm = model.run.datamodule  # decoded as the training data was (its crop), through the cache
    x, y, files = read_images(path, w, c, getattr(dm, "crop", None), getattr(dm, "cache_dir", None))
    return Inputs(x, y, np.array([str(f) for f in files]), path.name)


def out_path(cfg: DictConfig, model: Model, name: str) -> Path:
    """Where a command writes: `out=` if given, else `<run>/commands/<name>`, apart from training's files."""
    p = Path(cfg.out).expanduser() if cfg.out else model.dir / "commands" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def needs_images(model: Model, command: str) -> None:
    if len(model.shape) != 3:
        raise UserError(f"`{command}` draws pictures and this model takes vectors of shape {tuple(model.shape)}; "
                        "use encode, decode or score")


def chunked_rows(columns: list[torch.Tensor], labels: list[str], cols: int = 8) -> tuple[list, list]:
    """Rows of `cols` images: each chunk's first row is followed by its other versions, labelled."""
    cols = min(cols, len(columns[0]))
    n = len(columns[0]) - len(columns[0]) % cols
    rows = [c[i:i + cols] for i in range(0, n, cols) for c in columns]
    return rows, labels * (n // cols)


def name_column(cfg: DictConfig) -> str:
    """`path` for the files of input=DIR, `index` for positions in a split or an array file."""
    return "path" if cfg.input and not str(cfg.input).endswith(ARRAY_SUFFIXES) else "index"


# ---- commands ---------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test figures vs the PCA baseline and linear probes, image figures (SSIM, MS-SSIM, per-image PSNR; FID,
    KID and rFID in the features of eval.features) (Model.evaluate) → evaluation.json."""
    model = load_model(cfg)
    figures = model.evaluate(cfg.eval.probe_examples, cfg.seed, features=cfg.eval.features, samples=cfg.eval.samples)
    width = max(map(len, figures))
    print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in sorted(figures.items())))
    path = Path(cfg.out).expanduser() if cfg.out else model.dir / "evaluation.json"
    write_json(path, figures)
    print(f"wrote {path}")
    return figures


def sample(cfg: DictConfig) -> Path:
    """A grid of n images decoded from prior samples z ~ p(z): of one label or with chosen attributes for a
    conditional model; with neither, a row per label (the same prior draws in each row)."""
    model = load_model(cfg)
    needs_images(model, "sample")
    label, attributes = cfg.get("label"), cfg.get("attributes")
    given = model.autoencoder.condition.rows()
    if label is None and attributes is None and given:
        per = max(1, cfg.n // len(given))
        rows = [model.sample(per, seed=cfg.seed, label=y.tolist() if y.dim() == 0 else None,
                             attributes=[name] if y.dim() else None) for name, y in given]
        return save_png(picture(rows, [name for name, _ in given]),
                        out_path(cfg, model, f"sample_n{per}_per_label_seed{cfg.seed}.png"))
    x = model.sample(cfg.n, seed=cfg.seed, label=label,
                     attributes=None if attributes is None else list(attributes))
    chosen = "" if label is None and attributes is None else (
        f"_label{label}" if label is not None else "_" + "+".join(map(str, attributes)))
    return save_png(picture(square(x)), out_path(cfg, model, f"sample_n{cfg.n}{chosen}_seed{cfg.seed}.png"))


def reconstruct(cfg: DictConfig) -> Path:
    """Rows of input | reconstruction for n images of a split or of `input=`."""
    model = load_model(cfg)
    needs_images(model, "reconstruct")
    data = inputs(cfg, model)
    x = model.input(data.x[:cfg.n]).cpu()
    rows, labels = chunked_rows([x, model.reconstruct(data.x[:cfg.n], labels=data.y[:cfg.n])], ["input", "reconstruction"])
    return save_png(picture(rows, labels), out_path(cfg, model, f"reconstruct_{data.source}.png"))


def denoise(cfg: DictConfig) -> Path:
    """Rows of clean | corrupted | denoised, with the model's own noise or the one chosen by `noise=`."""
    from hydra.utils import instantiate

    from autoenc.model import metrics

    model = load_model(cfg)
    needs_images(model, "denoise")
    data = inputs(cfg, model)
    x = model.input(data.x[:cfg.n]).cpu()
    x_tilde, x_hat = model.denoise(data.x[:cfg.n], instantiate(cfg.noise) if cfg.get("noise") else None, cfg.seed,
                                   labels=data.y[:cfg.n])
    print(f"PSNR {float(metrics.psnr(x_tilde, x)):.2f} dB corrupted → {float(metrics.psnr(x_hat, x)):.2f} dB denoised")
    settings = "_".join(f"{k}{v}" for k, v in (cfg.noise or {}).items() if not k.startswith("_"))
    rows, labels = chunked_rows([x, x_tilde, x_hat], ["clean", "noisy", "denoised"])
    return save_png(picture(rows, labels), out_path(cfg, model, f"denoise_{data.source}{'_' + settings if settings else ''}.png"))


def encode(cfg: DictConfig) -> Path:
    """The deterministic codes (`code`) of a split or of `input=`, in order, with `label` and `path` (the
    files of input=) or `index` (the positions in the split), as .npz."""
    model = load_model(cfg)
    data = inputs(cfg, model)
    quantized = isinstance(model.autoencoder.bottleneck, VQ)
    if quantized:  # the code is the indices' codebook vectors: one pass of the encoder gives both
        indices = model.indices(data.x, labels=data.y)
        code = inference.looked_up(model.run, indices, model.batch_size).flatten(1).numpy()
        extra = {"indices": indices.numpy()}
    else:
        code, extra = model.encode(data.x, numpy=True, labels=data.y), {}
    path = out_path(cfg, model, f"encode_{data.source}.npz")
    name = name_column(cfg)
    np.savez(path, code=code, label=data.y.numpy(), **{name: data.names}, **extra)
    grid = model.autoencoder.grid
    shape = f" (the {'×'.join(map(str, model.autoencoder.code_shape))} grid, flattened)" if grid else ""
    print(f"wrote {path} (code: {len(code)}×{code.shape[1]}{shape}, label, {name}: {len(code)}"
          + (f", indices: {'×'.join(map(str, extra['indices'].shape))} into {model.autoencoder.bottleneck.codes} codes"
             if quantized else "") + ")")
    return path


def decode(cfg: DictConfig) -> Path:
    """Decodes the codes of an `encode` output (codes=FILE.npz, array `code`): the inverse of encode.
    Writes the decoded examples (`x_hat`, with the file's other arrays) as .npz, and a grid for images."""
    model = load_model(cfg)
    if not cfg.codes:
        raise UserError("name the codes to decode: codes=<file>.npz (as `autoenc encode` writes)")
    src = Path(str(cfg.codes)).expanduser()
    try:
        loaded = np.load(src)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read codes={src}: {e}") from None
    if isinstance(loaded, np.ndarray):  # a .npy of codes alone
        arrays = {"code": loaded}
    else:
        with loaded:
            arrays = dict(loaded)
    code = arrays.get("code")
    if isinstance(model.autoencoder.bottleneck, VQ) and "indices" in arrays:
        x_hat = model.decode_indices(arrays["indices"], labels=arrays.get("label"))  # the indices are the code
    elif code is None or code.ndim != 2 or code.shape[1] != model.autoencoder.code_size:
        raise UserError(f"codes={src} needs an array `code` of shape (N, {model.autoencoder.code_size}); "
                        f"it has {'none' if code is None else tuple(code.shape)}")
    else:
        x_hat = model.decode(code, labels=arrays.get("label"))
    path = out_path(cfg, model, f"decode_{src.stem}.npz")
    np.savez(path, x_hat=x_hat.numpy(), **{k: v for k, v in arrays.items() if k not in ("code", "indices")})
    print(f"wrote {path} (x_hat: {tuple(x_hat.shape)})")
    if len(model.shape) == 3:
        save_png(picture(square(x_hat[:cfg.n])), path.with_suffix(".png"))
    return path


def interpolate(cfg: DictConfig) -> Path:
    """Straight latent paths between pairs of images; with a prior, also a traversal of each dimension."""
    require(is_integer(cfg.pairs) and cfg.pairs >= 1, "pairs", cfg.pairs, "a positive integer")
    model = load_model(cfg)
    needs_images(model, "interpolate")
    data = inputs(cfg, model)
    pairs = min(cfg.pairs, len(data.x) // 2)
    if pairs < 1:
        raise UserError("interpolate needs at least two images")
    if pairs < cfg.pairs:
        print(f"{data.source} has {len(data.x)} images: {pairs} pairs, not {cfg.pairs}")
    a, b = model.input(data.x[:pairs]).cpu(), model.input(data.x[pairs:2 * pairs]).cpu()
    paths = model.interpolate(data.x[:pairs], data.x[pairs:2 * pairs], cfg.steps, labels_a=data.y[:pairs],
                              labels_b=data.y[pairs:2 * pairs])
    path = save_png(picture([torch.cat([a[i:i + 1], paths[i], b[i:i + 1]]) for i in range(pairs)]),
                    out_path(cfg, model, f"interpolate_{data.source}_pairs{pairs}_steps{cfg.steps}.png"))
    if isinstance(model.autoencoder.bottleneck, Stochastic) and model.autoencoder.grid:
        print("no traversal: a grid's code has a value per position, too many to sweep one by one")
    elif isinstance(model.autoencoder.bottleneck, Stochastic):
        rows = list(arithmetic.traversal(model.run, model.stored(data.x[:1]), cfg.steps, cfg.traversal, model.batch_size,
                                         inference.labels(model.run, data.y[:1])))
        labels = [f"z{i + 1}" for i in range(len(rows))]
        save_png(picture(rows, labels), path.with_name(f"{path.stem}_traversal{path.suffix}"))
    return path


def score(cfg: DictConfig) -> Path:
    """A per-example anomaly score for a split or `input=` (Model.score) as CSV and NPZ with the examples'
    paths or indices, a histogram, and with `normal=[labels]` ROC-AUC and average precision of telling
    the other labels from those."""
    model = load_model(cfg)
    data = inputs(cfg, model)
    scores = model.score(data.x, k=cfg.eval.iwae_samples, seed=cfg.seed, numpy=True, labels=data.y)
    table = {name_column(cfg): data.names, "label": data.y.numpy(), **scores}
    path = out_path(cfg, model, f"score_{data.source}.csv")
    write_table(path, table)
    np.savez(path.with_suffix(".npz"), **table)
    summary = anomaly.summary(scores, data.y.numpy(), cfg.normal)
    anomaly.histogram(scores["score"], data.y.numpy(), cfg.normal, summary["score"], path.with_suffix(".png"))
    write_json(path.with_suffix(".json"), summary)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"wrote {path} (and .npz, .json, .png)")
    return path


def write_table(path: Path, table: dict) -> None:
    """Columns of equal length as CSV (one row per example)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table)
        writer.writerows(zip(*(np.asarray(v).tolist() for v in table.values())))


def attribute(cfg: DictConfig) -> Path:
    """Latent arithmetic: the attribute vector `from` → `to` (mean code of the training examples with `to`
    minus that of those with `from`) added at each strength to n test examples with `from`; a picture grid
    (rows: examples, columns: input then strengths) and a JSON of how many a pixel probe assigns to `to`."""
    if cfg.to is None:
        raise UserError("name what to move toward: to=<label or attribute> (and from=<label>, default: all the others)")
    model = load_model(cfg)
    needs_images(model, "attribute")
    strengths = [float(s) for s in cfg.strengths]
    found = model.attribute_transfer(cfg.to, cfg["from"], strengths, cfg.n, cfg.eval.probe_examples, cfg.seed)
    source = "rest" if cfg["from"] is None else cfg["from"]
    name = f"attribute_{source}_to_{cfg.to}"
    rows = [torch.cat([found["input"][i:i + 1], found["shifted"][i]]) for i in range(len(found["input"]))]
    shares = " ".join(f"{s:+g}: {p:.0%}" for s, p in zip(strengths, found["share_to"]))
    title = f"{source} -> {cfg.to}; columns: input, {', '.join(f'{s:+g}' for s in strengths)}; a probe says {cfg.to}: {shares}"
    path = save_png(picture(rows, [f"#{int(i)}" for i in found["examples"]], title=title),
                    out_path(cfg, model, f"{name}.png"))
    summary = {"from": cfg["from"], "to": cfg.to, "strengths": strengths, "share_to": found["share_to"],
               "examples": [int(i) for i in found["examples"]], "vector_norm": float(found["vector"].norm()),
               "probe": f"logistic regression on {cfg.eval.probe_examples} training inputs: {cfg.to} against the rest"}
    write_json(path.with_suffix(".json"), summary)
    print(f"share of shifted examples a probe assigns to {cfg.to}: {shares}")
    print(f"wrote {path.with_suffix('.json')}")
    return path


def export(cfg: DictConfig) -> Path:
    """The model as a self-describing folder (autoenc.app.share.export), and with `push=owner/name` on the Hub."""
    from autoenc.app import share

    if not cfg.out:
        raise UserError("name the folder to write: out=<folder> (a new or empty one)")
    require(cfg.private in (True, False), "private", cfg.private, "true or false")
    model = load_model(cfg)
    folder = share.export(model.run, Path(str(cfg.out)), str(cfg.license))
    print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if cfg.push:
        url = share.push(folder, str(cfg.push), private=cfg.private)
        print(f"uploaded to {url} ({'private' if cfg.private else 'public'}); load it with "
              f"autoenc.load(\"hf://{cfg.push}\") or ckpt=hf://{cfg.push}")
    return folder


def classifier(cfg: DictConfig) -> Path:
    """A small CNN (autoenc.evaluation.features.SmallCNN) trained on the chosen data's training split, saved
    as safetensors with a JSON of its shape beside it: evaluate's eval.features for FID, KID and rFID."""
    from hydra.utils import instantiate

    from autoenc.evaluation import features

    require(is_integer(cfg.epochs) and cfg.epochs >= 1, "epochs", cfg.epochs, "a positive integer")
    out = Path(str(cfg.out)).expanduser() if cfg.out else None
    if out is not None and out.suffix != ".safetensors":
        raise UserError(f"out={out} must end in .safetensors (the weights; the shape goes beside it as .json)")
    dm = instantiate(cfg.data)
    name = str(getattr(dm, "name", None) or type(dm).__name__).lower()
    if len(dm.shape) != 3 or dm.standardize:
        raise UserError(f"`autoenc classifier` needs images in [0, 1] and data={name} gives "
                        f"{'standardized values' if dm.standardize else f'vectors of shape {tuple(dm.shape)}'}")
    x_tr, y_tr = dm.evaluation_split("train")
    x_te, y_te = dm.evaluation_split("test")
    y_tr, y_te = torch.as_tensor(y_tr).cpu(), torch.as_tensor(y_te).cpu()
    if y_tr.dim() != 1 or bool((y_tr < 0).any()):
        raise UserError(f"`autoenc classifier` needs a class label for every training example and data={name} "
                        "has none (or attributes instead)")
    print(f"training a classifier of {name} ({len(y_tr)} images, {int(y_tr.max()) + 1} classes, "
          f"{cfg.epochs} epochs)…", flush=True)
    labelled = y_te.dim() == 1 and bool((y_te >= 0).all())
    net, figures = features.train_classifier(x_tr, y_tr, dm.transform, cfg.epochs, seed=cfg.seed,
                                             x_test=x_te if labelled else None, y_test=y_te if labelled else None)
    path = features.save_classifier(net, out or Path(f"classifier_{name}.safetensors"),
                                    {"data": name, "epochs": cfg.epochs, "seed": cfg.seed, **figures})
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    print(f"wrote {path} and {path.with_suffix('.json').name} (use: autoenc evaluate ckpt=RUN eval.features={path})")
    return path
