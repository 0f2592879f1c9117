"""The Python API: `load` a trained run and use its model on arrays, tensors, PIL images or image files;
`train` a run from Python. The commands of the CLI are thin wrappers over these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from autoenc.app.share import load_shared
from autoenc.model.conditions import Attributes, Label
from autoenc.model.quantize import VQ
from autoenc.data.cache import list_images
from autoenc.data.module import Rows
from autoenc.evaluation import anomaly, arithmetic, baselines, inference
from autoenc.training.runs import Run
from autoenc.util.errors import UserError, is_integer, require


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
        return inference.device(self.run)

    @property
    def results(self) -> dict:
        """The run's results.json (test figures of its best checkpoint), {} if it has none."""
        path = self.dir / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def to(self, device) -> Model:
        self.run.autoencoder.to(device)
        return self

    def split(self, name: str = "test") -> tuple[object, torch.Tensor]:
        """A split of the run's data as stored (examples, labels; −1 where there are none)."""
        return inference.split(self.run, name)

    # ---- inputs and outputs --------------------------------------------------------------
    def stored(self, x) -> torch.Tensor:
        """Examples as the run stores them (uint8 or float, shape (N, *shape)) from any accepted form."""
        if isinstance(x, (str, Path)):
            p = Path(x).expanduser()
            x = list_images(p) if p.is_dir() else [p]  # the order the commands read a folder in
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
        return cache.resize(torch.from_numpy(pixels).permute(2, 0, 1), (h, w), crop)

    def input(self, x) -> torch.Tensor:
        """Model input on the model's device: the run's own transform (uint8 to [0, 1], standardization)."""
        return inference.model_input(self.run, self.stored(x))

    # ---- the model -----------------------------------------------------------------------
    def encode(self, x, numpy: bool = False, labels=None):
        """The deterministic codes (the posterior mean for a gaussian bottleneck), (N, code_size): a grid's map
        flattened. `labels`, in this and the other methods: each example's class (or attribute columns), which
        only a conditional model (model.condition) needs."""
        return _out(inference.codes(self.run, self.stored(x), self.batch_size, y=labels), numpy)

    def decode(self, z, numpy: bool = False, labels=None):
        """Examples decoded from codes (N, code_size), or (N, *code_shape) for a grid: the likelihood's mean,
        in the model's input space."""
        z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).float()
        shape, size = self.autoencoder.code_shape, self.autoencoder.code_size
        z = z[None] if z.dim() in (1, len(shape)) and tuple(z.shape[-len(shape):]) in ((size,), shape) else z
        if tuple(z.shape[1:]) not in ((size,), shape):
            need = f"(N, {size})" + (f" or (N, {', '.join(map(str, shape))})" if len(shape) > 1 else "")
            raise UserError(f"codes of shape {tuple(z.shape)} do not fit this model: it needs {need}")
        return _out(inference.decoded(self.run, z, self.batch_size, labels), numpy)

    def indices(self, x, numpy: bool = False, labels=None):
        """A VQ model's code indices into its codebook, (N,) or (N, H, W) on a grid."""
        self._quantized("indices")
        return _out(inference.indices(self.run, self.stored(x), self.batch_size, labels), numpy)

    def decode_indices(self, indices, numpy: bool = False, labels=None):
        """Examples decoded from a VQ model's code indices (N,) or (N, H, W)."""
        self._quantized("decode_indices")
        i = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        codes = self.autoencoder.bottleneck.codes
        if i.is_floating_point() or tuple(i.shape[1:]) != self.autoencoder.grid or i.numel() and not 0 <= int(i.min()) <= int(i.max()) < codes:
            raise UserError(f"indices of shape {tuple(i.shape)} do not fit this model: it needs whole numbers in "
                            f"[0, {codes}) of shape (N{''.join(f', {s}' for s in self.autoencoder.grid)})")
        return self.decode(inference.looked_up(self.run, i, self.batch_size), numpy, labels)

    def _quantized(self, use: str) -> None:
        if not isinstance(self.autoencoder.bottleneck, VQ):
            raise UserError(f"{use} needs a quantized code (bottleneck=vq); this model has "
                            f"bottleneck={self.autoencoder.bottleneck.name}")

    def reconstruct(self, x, numpy: bool = False, labels=None):
        """x̂ from the deterministic code, in the model's input space."""
        return _out(inference.reconstructions(self.run, self.stored(x), self.batch_size, labels), numpy)

    def denoise(self, x, noise=None, seed: int = 0, numpy: bool = False, labels=None):
        """(corrupted, denoised): x through `noise` (a function of (batch, generator); default the model's own)
        with a seeded generator, then reconstructed."""
        noise = noise or self.autoencoder.noise
        if noise is None:
            raise UserError("this model was trained without noise; choose one, e.g. noise=gaussian, "
                            "noise=masking noise.p=0.5 or noise=salt_pepper")
        x = self.input(x)
        with torch.no_grad():
            x_tilde = noise(x, torch.Generator(device=x.device).manual_seed(seed))
            y = inference.labels(self.run, labels)
            out = x_tilde.cpu(), self.autoencoder.reconstruct(x_tilde, None if y is None else y.to(x.device)).cpu()
        return tuple(o.numpy() for o in out) if numpy else out

    def sample(self, n: int, seed: int = 0, numpy: bool = False, label=None, attributes=None):
        """n examples decoded from prior samples z ~ p(z) (a gaussian bottleneck); a conditional model's of
        one class (`label=7`) or with `attributes` (a list of names: those present, the others absent)."""
        require(is_integer(n) and n >= 1, "n", n, "a positive integer")
        condition = self.autoencoder.condition
        chosen = [c for c in (label, attributes) if c is not None]
        if len(chosen) > 1:
            raise UserError("give label= or attributes=, not both")
        if label is not None and isinstance(condition, Attributes):
            raise UserError("this model is conditioned on attributes (model.condition=attributes): choose them "
                            "with attributes=[…], not label=")
        if attributes is not None and isinstance(condition, Label):
            raise UserError("this model is conditioned on class labels (model.condition=label): choose one with "
                            "label=K, not attributes=")
        y = condition.of(chosen[0]).to(self.device) if chosen else None
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.autoencoder.sample(n, generator=g, y=y).cpu()
        return out.numpy() if numpy else out

    def log_likelihood(self, x, k: int = 100, seed: int = 0, numpy: bool = False, labels=None):
        """IWAE estimate of log p(x) per example with k importance samples (a gaussian bottleneck)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        iwae = (lambda b, yb=None: self.autoencoder.log_likelihood(b, k, g, self.run.iwae_chunk, yb))
        return _out(inference.apply(self.run, iwae, self.stored(x), self.batch_size, y=inference.labels(self.run, labels)), numpy)

    def score(self, x, k: int = 100, seed: int = 0, numpy: bool = False, labels=None) -> dict:
        """Per-example anomaly scores: `mse` (of the reconstruction), `recon_nll` (−log p(x|code)), and for a
        gaussian bottleneck `nll_iwae` (−log p(x), k importance samples); `score` is the last of these."""
        out = anomaly.scores(self.run, self.stored(x), k, seed, self.batch_size, labels)
        return {k_: v.numpy() for k_, v in out.items()} if numpy else out

    def interpolate(self, a, b, steps: int = 10, numpy: bool = False, labels_a=None, labels_b=None):
        """Decoded straight latent paths from each example of `a` to the one of `b`: (N, steps, *shape) (a
        conditional model decodes each path with the labels of its start)."""
        require(is_integer(steps) and steps >= 2, "steps", steps, "an integer ≥ 2")
        return _out(arithmetic.interpolation(self.run, self.stored(a), self.stored(b), steps, self.batch_size,
                                             labels_a, labels_b), numpy)

    def evaluate(self, probe_examples: int = 10_000, seed: int = 0, progress: bool = True, features=None,
                 samples: int = 1000) -> dict[str, float]:
        """The test split's figures (Lightning's test loop), the reconstruction against PCA with as many
        components as the code can have non-zero values, and linear probes on the codes and on the input,
        all fitted on a seeded subset of the training split of the same kind of data they are scored on.
        Images in [0, 1] add SSIM, MS-SSIM and per-image PSNR; with a feature network (`features`: a
        classifier's .safetensors from `autoenc classifier`, "inception", or a {_target_: …} node), rFID,
        and for a model with a prior FID and KID of `samples` seeded prior samples against the test split."""
        require(is_integer(probe_examples) and probe_examples >= 1, "eval.probe_examples", probe_examples,
                "a positive integer")
        require(is_integer(samples) and samples >= 2, "eval.samples", samples, "an integer ≥ 2")
        return baselines.evaluate(self.run, probe_examples, seed, progress, self.batch_size, features, samples)

    # ---- latent arithmetic ----------------------------------------------------------------
    def members(self, name, split: str = "train") -> torch.Tensor:
        """Which examples of a split carry `name`: a class label (y == name), or an attribute of the data
        (e.g. CelebA's Smiling) where the data module names them."""
        return arithmetic.members(self.run, name, split)

    def attribute(self, to, from_=None, split: str = "train") -> torch.Tensor:
        """The attribute vector: the mean code of the examples with `to` minus the mean code of those with
        `from_` (default: all the others), over a split ("smiling face − neutral face = smile vector")."""
        return arithmetic.attribute_vector(self.run, to, from_, split, self.batch_size)

    def shift(self, x, vector, strengths=(-2, -1, 0, 1, 2), numpy: bool = False, labels=None):
        """x's codes moved along `vector` by each strength, decoded: (N, len(strengths), *shape)."""
        return _out(arithmetic.shift(self.run, self.stored(x), vector, strengths, self.batch_size, labels), numpy)

    def attribute_transfer(self, to, from_=None, strengths=(-2, -1, 0, 1, 2), n: int = 8,
                           probe_examples: int = 10_000, seed: int = 0) -> dict:
        """Adds the `from_` → `to` attribute vector (fitted on the training split) to n test examples that
        have `from_` (default: lack `to`) at each strength, and measures how far they moved: the share of the
        shifted, decoded examples that a linear probe fitted on real training examples (input space, `to`
        against the rest) assigns to `to`. Returns the vector, the examples, the shifted decodings, shares."""
        return arithmetic.attribute_transfer(self.run, to, from_, strengths, n, probe_examples, seed, self.batch_size)


def _out(t: torch.Tensor, numpy: bool) -> torch.Tensor | np.ndarray:
    return t.numpy() if numpy else t


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.")


def load(path, device: str | None = None, iwae_samples: int | None = None) -> Model:
    """The trained model of a run directory (its best checkpoint) or of a checkpoint file, rebuilt from the
    run's saved config with the weights loaded safely (weights_only); `iwae_samples`: K of evaluate's
    importance-weighted NLL (default: the run's). Also a folder that `autoenc export` wrote, or a Hugging Face
    Hub model `hf://owner/name[@revision]`."""
    return Model(load_shared(path, iwae_samples=iwae_samples, on=device))


@dataclass
class TrainedRun:
    """What `train` returns: the run directory, its results (results.json) and its model, loaded on demand."""

    dir: Path
    results: dict

    @cached_property
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
