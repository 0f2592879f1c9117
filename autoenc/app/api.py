"""The Python API: `load` a trained run and use its model on arrays, tensors, PIL images or image files;
`train` a run from Python. The commands of the CLI are thin wrappers over these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoenc.data.cache import IMAGE_SUFFIXES
from autoenc.util.errors import UserError, is_integer, require
from autoenc.data.module import Rows
from autoenc.training.runs import Run, load_run



class Model:
    """A trained autoencoder with its run's input transform: every method takes examples as a tensor or numpy
    array (uint8 or float, one example or a batch), PIL images, or image paths, and returns a tensor (or a
    numpy array with `numpy=True`). `autoencoder` is the plain nn.Module (autoenc.model.core.Autoencoder)."""

    def __init__(self, run: Run, batch_size: int = 1024):
        self.run, self.batch_size = run, batch_size
        self.autoencoder = run.autoencoder.eval()

    def __repr__(self) -> str:
        ae = self.autoencoder
        return (f"autoenc.Model({self.dir}: bottleneck={ae.bottleneck.name}, latent_dim={ae.latent_dim}, "
                f"shape={self.shape}, device={self.device})")

    @property
    def dir(self) -> Path:
        return self.run.dir

    @property
    def config(self):
        return self.run.cfg

    @property
    def shape(self) -> tuple[int, ...]:
        return self.autoencoder.shape

    @property
    def latent_dim(self) -> int:
        return self.autoencoder.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def results(self) -> dict:
        """The run's results.json (test figures of its best checkpoint), {} if it has none."""
        path = self.dir / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def to(self, device) -> Model:
        self.run.module.to(device)
        return self

    def split(self, name: str = "test") -> tuple[object, torch.Tensor]:
        """A split of the run's data as stored (examples, labels; −1 where there are none)."""
        splits = self.run.datamodule.splits
        if name not in splits:
            raise UserError(f"split={name!r} is not one of {', '.join(splits)}")
        x, y = splits[name]
        return x, y.cpu()

    # ---- inputs and outputs --------------------------------------------------------------
    def stored(self, x) -> torch.Tensor:
        """Examples as the run stores them (uint8 or float, shape (N, *shape)) from any accepted form."""
        if isinstance(x, (str, Path)):
            p = Path(x).expanduser()
            x = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
            if not x:
                raise UserError(f"no images found in {p}")
        if isinstance(x, (list, tuple)) and x and not isinstance(x[0], (int, float)):
            return torch.stack([self._image(item) for item in x])
        if _is_pil(x):
            return self._image(x)[None]
        if isinstance(x, Rows):  # a memory-mapped split: read batch by batch
            return x
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        grey = len(self.shape) == 3 and self.shape[0] == 1 and t.dim() in (2, 3) and tuple(t.shape[-2:]) == self.shape[1:]
        if grey or tuple(t.shape) == self.shape:  # grey images (H, W) or (N, H, W), or one example
            t = t.reshape(-1, *self.shape)
        if tuple(t.shape[1:]) != self.shape:
            raise UserError(f"examples of shape {tuple(t.shape[1:])} do not fit this model, which takes {self.shape}")
        return t

    def _image(self, item) -> torch.Tensor:
        """One PIL image or image file as uint8 (C, H, W) at the model's size and channels, decoded as the
        run's training images were (its centre crop, antialiased resize: autoenc.data.cache)."""
        from autoenc.data import cache

        if len(self.shape) != 3:
            raise UserError(f"this model takes vectors of shape {self.shape}, not images")
        c, h, w = self.shape
        crop = getattr(self.run.datamodule, "crop", None)
        crop = (crop, crop) if crop else None
        if not _is_pil(item):
            try:
                return cache.decode(str(Path(item).expanduser()), (h, w), c, crop)
            except (OSError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot read image {item}: {cache.reason(e)}; give the path of a readable image") from None
        pixels = np.array(item.convert("L" if c == 1 else "RGB"), dtype=np.uint8).reshape(item.height, item.width, -1)
        return cache.fit(torch.from_numpy(pixels).permute(2, 0, 1), (h, w), crop)

    def input(self, x) -> torch.Tensor:
        """Model input on the model's device: the run's own transform (uint8 to [0, 1], standardization)."""
        return self.run.datamodule.transform(self.stored(x)).to(self.device)

    def _map(self, fn, x, numpy: bool, prepared: bool = False) -> torch.Tensor | np.ndarray:
        """fn over batches of x (model input unless `prepared`), without gradients, gathered on the CPU."""
        with torch.no_grad():
            data = x if prepared else self.stored(x)
            outs = []
            for start in range(0, len(data), self.batch_size):
                chunk = data[start:start + self.batch_size]
                chunk = chunk.to(self.device) if prepared else self.run.datamodule.transform(chunk).to(self.device)
                outs.append(fn(chunk).cpu())
            out = torch.cat(outs) if outs else torch.empty(0)
        return out.numpy() if numpy else out

    # ---- the model -----------------------------------------------------------------------
    def encode(self, x, numpy: bool = False):
        """The deterministic codes (the posterior mean for a gaussian bottleneck), (N, latent_dim)."""
        return self._map(lambda b: self.autoencoder.encode(b).code, x, numpy)

    def decode(self, z, numpy: bool = False):
        """Examples decoded from codes (N, latent_dim): the likelihood's mean, in the model's input space."""
        z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).float()
        z = z[None] if z.dim() == 1 else z
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise UserError(f"codes of shape {tuple(z.shape)} do not fit this model: it needs (N, {self.latent_dim})")
        ae = self.autoencoder
        return self._map(lambda b: ae.likelihood.mean(ae.decode(b)), z, numpy, prepared=True)

    def reconstruct(self, x, numpy: bool = False):
        """x̂ from the deterministic code, in the model's input space."""
        return self._map(self.autoencoder.reconstruct, x, numpy)

    def denoise(self, x, noise=None, seed: int = 0, numpy: bool = False):
        """(corrupted, denoised): x through `noise` (a function of (batch, generator); default the model's own)
        with a seeded generator, then reconstructed."""
        noise = noise or self.autoencoder.noise
        if noise is None:
            raise UserError("this model was trained without noise; choose one, e.g. noise=gaussian, "
                            "noise=masking noise.p=0.5 or noise=salt_pepper")
        x = self.input(x)
        with torch.no_grad():
            x_tilde = noise(x, torch.Generator(device=x.device).manual_seed(seed))
            out = x_tilde.cpu(), self.autoencoder.reconstruct(x_tilde).cpu()
        return tuple(o.numpy() for o in out) if numpy else out

    def sample(self, n: int, seed: int = 0, numpy: bool = False):
        """n examples decoded from prior samples z ~ p(z) (a gaussian bottleneck)."""
        require(is_integer(n) and n >= 1, "n", n, "a positive integer")
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.autoencoder.sample(n, generator=g).cpu()
        return out.numpy() if numpy else out

    def log_likelihood(self, x, k: int = 100, seed: int = 0, numpy: bool = False):
        """IWAE estimate of log p(x) per example with k importance samples (a gaussian bottleneck)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self._map(lambda b: self.autoencoder.log_likelihood(b, k, g, self.run.module.iwae_chunk), x, numpy)

    def score(self, x, k: int = 100, seed: int = 0, numpy: bool = False) -> dict:
        """Per-example anomaly scores: `mse` (of the reconstruction), `recon_nll` (−log p(x|code)), and for a
        gaussian bottleneck `nll_iwae` (−log p(x), k importance samples); `score` is the last of these."""
        ae, g = self.autoencoder, torch.Generator(device=self.device).manual_seed(seed)

        def columns(b):
            logits = ae.decode(ae.encode(b).code)
            cols = {"mse": (ae.likelihood.mean(logits) - b).pow(2).flatten(1).mean(1),
                    "recon_nll": ae.likelihood.nll(logits, b),
                    **ae.bottleneck.scores(ae, b, k, g, self.run.module.iwae_chunk)}
            return torch.stack([cols[name] for name in names], 1)

        extra = ae.bottleneck.score_names
        names = ["mse", "recon_nll", *extra]
        table = self._map(columns, x, False)
        out = {name: table[:, i] for i, name in enumerate(names)}
        out["score"] = out[extra[-1] if extra else "mse"]
        return {k_: v.numpy() for k_, v in out.items()} if numpy else out

    def interpolate(self, a, b, steps: int = 10, numpy: bool = False):
        """Decoded straight latent paths from each example of `a` to the one of `b`: (N, steps, *shape)."""
        require(is_integer(steps) and steps >= 2, "steps", steps, "an integer ≥ 2")
        za, zb = torch.as_tensor(self.encode(a)), torch.as_tensor(self.encode(b))
        if len(za) != len(zb):
            raise UserError(f"interpolate needs as many examples in a as in b ({len(za)} vs {len(zb)})")
        t = torch.linspace(0, 1, steps).view(1, -1, 1)
        z = (1 - t) * za[:, None] + t * zb[:, None]
        x = torch.as_tensor(self.decode(z.flatten(0, 1)))
        x = x.view(len(za), steps, *x.shape[1:])
        return x.numpy() if numpy else x


    def evaluate(self, probe_examples: int = 10_000, seed: int = 0, progress: bool = True) -> dict[str, float]:
        """The test split's figures (Lightning's test loop), the reconstruction against PCA with as many
        components as the code can have non-zero values, and linear probes on the codes and on the input,
        all fitted on a seeded subset of the training split of the same kind of data they are scored on."""
        import lightning.pytorch as pl

        from autoenc.model import metrics

        require(is_integer(probe_examples) and probe_examples >= 1, "eval.probe_examples", probe_examples,
                "a positive integer")
        module, dm = self.run.module, self.run.datamodule
        on = self.device
        trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=progress, enable_model_summary=False, inference_mode=False)
        trainer.test(module, datamodule=dm, verbose=False)
        figures = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("test/") and v.numel() == 1}
        self.to(on)  # Lightning's teardown moved the model to the CPU
        x_tr, y_tr = dm.evaluation_split("train")
        x_te, y_te = dm.evaluation_split("test")
        identity = (lambda b: b)
        x_te_in = self._map(identity, x_te, False)
        # mse and psnr of clean test examples through the deterministic code: the figures PCA competes with
        x_hat = self.reconstruct(x_te)
        figures["mse"] = metrics.mse(x_hat, x_te_in)
        if len(self.shape) == 3 and dm.standardize is False:
            figures["psnr"] = float(metrics.psnr(x_hat, x_te_in))
        keep, x_tr_in = self._training_sample(x_tr, probe_examples, seed)
        y_tr = y_tr.cpu()[keep]
        components = self.autoencoder.bottleneck.active_size(self.latent_dim)
        print(f"fitting PCA ({components} components) and linear probes on {len(x_tr_in)} training examples…", flush=True)
        figures["pca_mse"], figures["pca_components"] = metrics.pca_mse(x_tr_in, x_te_in, components)
        active = int(figures.get("active_units", components))  # a VAE's units that carry information
        if 0 < active < components:
            figures["pca_mse_active_units"], _ = metrics.pca_mse(x_tr_in, x_te_in, active)
        y_te = y_te.cpu()
        if bool((y_te >= 0).all()):
            encode = (lambda b: self.autoencoder.encode(b).code)
            codes_tr = self._map(encode, x_tr_in, False, prepared=True)
            codes_te = self._map(encode, x_te_in, False, prepared=True)
            figures["probe_accuracy"] = metrics.probe_accuracy(codes_tr, y_tr, codes_te, y_te)
            figures["probe_accuracy_pixels"] = metrics.probe_accuracy(x_tr_in, y_tr, x_te_in, y_te)
        return figures


    # ---- latent arithmetic ----------------------------------------------------------------
    def members(self, name, split: str = "train") -> torch.Tensor:
        """Which examples of a split carry `name`: a class label (y == name), or an attribute of the data
        (e.g. CelebA's Smiling) where the data module names them."""
        x, y = self.split(split)
        names = list(getattr(self.run.datamodule, "attribute_names", []) or []) if y.dim() == 2 else []
        if names:  # attributes as label columns (CelebA with data.target=all)
            if str(name) not in names:
                raise UserError(f"{name!r} is not an attribute of this data; use one of: {', '.join(names)}")
            return y[:, names.index(str(name))] > 0
        labels = sorted(set(y.flatten().tolist()))
        try:
            label = int(name)
        except (TypeError, ValueError):
            raise UserError(f"{name!r} is neither a label nor an attribute of this data; its labels are "
                            f"{', '.join(map(str, labels))} (CelebA's attributes by name need data.target=all)") from None
        found = y == label
        if not found.any():
            raise UserError(f"no {split} example has label {label}; the labels are {', '.join(map(str, labels))}")
        return found

    def attribute(self, to, from_=None, split: str = "train") -> torch.Tensor:
        """The attribute vector: the mean code of the examples with `to` minus the mean code of those with
        `from_` (default: all the others), over a split ("smiling face − neutral face = smile vector")."""
        with_to = self.members(to, split)
        with_from = ~with_to if from_ is None else self.members(from_, split)
        if torch.equal(with_from, with_to):
            raise UserError(f"from={from_} and to={to} name the same group, whose attribute vector is zero; choose "
                            "two different labels or attributes, or leave from= out (all the others)")
        codes = torch.as_tensor(self.encode(self.split(split)[0]))
        return codes[with_to].mean(0) - codes[with_from].mean(0)

    def shift(self, x, vector, strengths=(-2, -1, 0, 1, 2), numpy: bool = False):
        """x's codes moved along `vector` by each strength, decoded: (N, len(strengths), *shape)."""
        z = torch.as_tensor(self.encode(x))
        s = torch.as_tensor(list(strengths), dtype=z.dtype).view(1, -1, 1)
        moved = torch.as_tensor(self.decode((z[:, None] + s * torch.as_tensor(vector)[None, None]).flatten(0, 1)))
        moved = moved.view(len(z), len(strengths), *moved.shape[1:])
        return moved.numpy() if numpy else moved

    def _training_sample(self, x, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of at most n training examples (positions in order) and their model inputs: what
        PCA and the linear probes are fitted on."""
        from autoenc.data.module import subset

        keep = torch.as_tensor(np.sort(np.random.default_rng(seed).permutation(len(x))[:n]))
        return keep, self._map(lambda b: b, subset(x, keep), False)

    def attribute_transfer(self, to, from_=None, strengths=(-2, -1, 0, 1, 2), n: int = 8,
                           probe_examples: int = 10_000, seed: int = 0) -> dict:
        """Adds the `from_` → `to` attribute vector (fitted on the training split) to n test examples that
        have `from_` (default: lack `to`) at each strength, and measures how far they moved: the share of the
        shifted, decoded examples that a linear probe fitted on real training examples (input space, `to`
        against the rest) assigns to `to`. Returns the vector, the examples, the shifted decodings, shares."""
        from autoenc.model import metrics

        vector = self.attribute(to, from_, "train")
        x_te, _ = self.split("test")
        chosen = (~self.members(to, "test") if from_ is None else self.members(from_, "test")).nonzero().flatten()
        if not len(chosen):
            raise UserError(f"no test example has {from_!r} to move toward {to!r}")
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
        x = self.input(x_te[chosen.numpy()] if isinstance(x_te, Rows) else x_te[chosen]).cpu()
        moved = self.shift(x, vector, strengths)
        x_tr, _ = self.split("train")
        keep, x_tr_in = self._training_sample(x_tr, probe_examples, seed)
        target = self.members(to, "train")[keep]
        probe = metrics.fit_probe(x_tr_in, target.long())
        shares = [float(probe.predict(metrics.flat(moved[:, i])).mean()) for i in range(len(strengths))]
        return {"vector": vector, "examples": chosen, "input": x, "shifted": moved, "share_to": shares,
                "strengths": list(strengths)}


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.")


def load(path, device: str | None = None, iwae_samples: int | None = None) -> Model:
    """The trained model of a run directory (its best checkpoint) or of a checkpoint file, rebuilt from the
    run's saved config with the weights loaded safely (weights_only); `iwae_samples`: K of evaluate's
    importance-weighted NLL (default: the run's)."""
    return Model(load_run(path, iwae_samples=iwae_samples, on=device))


@dataclass
class TrainedRun:
    """What `train` returns: the run directory, its results (results.json) and its model, loaded on demand."""

    dir: Path
    results: dict

    @property
    def model(self) -> Model:
        return load(self.dir)


def train(overrides: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None) -> TrainedRun:
    """Trains as `autoenc train OVERRIDES` does, from Python (the run directory: `run_dir`, else
    outputs/<date>/<time>_<model>_<data>); returns the run. Mistakes raise autoenc.UserError."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    from autoenc.app.compose import compose, run
    from autoenc.app.schema import validate
    from autoenc.training.rundir import claim

    cfg = compose("train", overrides, hydra=True)
    validate(cfg)
    # the same run directory rules as `autoenc train`; written only once the run starts (training.train)
    out = Path(run_dir) if run_dir is not None else Path(HydraConfig.get().run.dir)
    taken = claim(out, command=" ".join(["train", *map(str, overrides)]), ckpt_path=cfg.get("ckpt_path"),
                  overwrite=bool(cfg.get("overwrite")), resume=bool(cfg.get("resume")), default=run_dir is None,
                  what="run_dir" if run_dir is not None else "hydra.run.dir")
    with read_write(HydraConfig.get().runtime):
        HydraConfig.get().runtime.output_dir = str(taken.dir)  # what ${paths.output_dir} reads, as in a CLI run
    try:
        return TrainedRun(taken.dir, run(cfg))
    finally:
        taken.release()
