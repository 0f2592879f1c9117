"""The value rules of a composed config, checked once before anything is built."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from autoenc.errors import UserError


def _int(lo: int, hi_key: str | None = None):
    return lambda v, cfg: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (
        hi_key is None or v <= OmegaConf.select(cfg, hi_key))


def _num(lo: float = float("-inf"), hi: float = float("inf"), open_lo: bool = False):
    return lambda v, cfg: isinstance(v, (int, float)) and not isinstance(v, bool) and (
        v > lo if open_lo else v >= lo) and v <= hi


def _one_of(*choices):
    return lambda v, cfg: v in choices


_ABSENT = object()

# key: (rule, what a valid value is). Keys absent from a config (e.g. noise.p without noise) are skipped.
RULES = {
    "model.latent_dim": (_int(1), "a positive integer"),
    "model.beta": (_num(0), "a number ≥ 0"),
    "model.warmup_epochs": (_num(0), "a number ≥ 0"),
    "model.likelihood": (_one_of("bernoulli", "gaussian"), "bernoulli or gaussian"),
    "model.sigma": (lambda v, cfg: v is None or _num(0, open_lo=True)(v, cfg), "null (learned) or a number > 0"),
    "model.iwae_samples": (_int(0), "an integer ≥ 0"),
    "model.iwae_chunk": (_int(1), "a positive integer"),
    "model.optimizer.lr": (_num(0, open_lo=True), "a number > 0"),
    "model.grad_clip": (lambda v, cfg: v is None or _num(0, open_lo=True)(v, cfg), "null or a number > 0"),
    "data.batch_size": (_int(1), "a positive integer"),
    "data.steps_per_call": (_int(1), "a positive integer"),
    "data.val_fraction": (_num(0, 1), "a fraction in [0, 1)"),
    "data.test_fraction": (_num(0, 1, open_lo=True), "a fraction in (0, 1)"),
    "data.binarize": (_one_of(None, "static", "dynamic"), "null, static or dynamic"),
    "data.size": (_int(1), "a positive integer"),
    "data.channels": (_one_of(1, 3), "1 or 3"),
    "noise.p": (_num(0, 1), "a fraction in [0, 1]"),
    "noise.std": (_num(0), "a number ≥ 0"),
    "penalty.weight": (_num(0), "a number ≥ 0"),
    "penalty.rho": (_num(0, 1, open_lo=True), "a rate in (0, 1)"),
    "penalty.k": (_int(1, "model.latent_dim"), "an integer from 1 to model.latent_dim"),
    "penalty.method": (_one_of("auto", "analytic", "exact", "estimate"), "auto, analytic, exact or estimate"),
    "penalty.projections": (_int(1), "a positive integer"),
    # autoenc's training_step runs the optimizer itself (data.steps_per_call), so Lightning's own
    # clipping and accumulation do not apply
    "trainer.gradient_clip_val": (lambda v, cfg: v is None, "unset: clip with model.grad_clip"),
    "trainer.accumulate_grad_batches": (lambda v, cfg: v == 1, "1: use a larger data.batch_size instead"),
    "trainer.max_epochs": (lambda v, cfg: v is None or v == -1 or _int(1)(v, cfg), "a positive integer (or -1)"),
    "eval.iwae_samples": (_int(0), "an integer ≥ 0"),
    "eval.probe_examples": (_int(1), "a positive integer"),
    "n": (_int(1), "a positive integer"),
    "pairs": (_int(1), "a positive integer"),
    "steps": (_int(2), "an integer ≥ 2"),
}


def validate(cfg: DictConfig) -> None:
    """Raises UserError naming the first key whose value breaks its rule, and what it must be."""
    for key, (ok, what) in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value, cfg):
            raise UserError(f"{key}={value!r} is invalid: it must be {what}; fix it on the command line")
