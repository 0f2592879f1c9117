"""What a composed config must satisfy before anything is built: known keys and a penalty that suits the
bottleneck (each object checks its own values when it is built)."""

from __future__ import annotations

import re

import difflib
import inspect

from omegaconf import DictConfig, OmegaConf

from autoenc.util.errors import UserError, is_integer, require
from autoenc.util.paths import PIPELINE, config_dirs


# The groups whose nodes are checked for unknown keys (loggers and callbacks pass extra keys on).
GROUPS = (*PIPELINE, "trainer")


def validate(cfg: DictConfig) -> None:
    """Raises UserError for the first unknown key, missing value or unsuitable penalty."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    for group in GROUPS:
        check_keys(tree.get(group), group)
    require(is_integer(cfg.get("seed", 0)) and cfg.get("seed", 0) >= 0, "seed", cfg.get("seed"), "an integer ≥ 0")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]} is required; set it on the command line ({missing[0]}=…)")
    if cfg.get("bottleneck") and cfg.get("penalty"):
        check_pair(cfg.bottleneck, cfg.penalty)
    check_accelerator(OmegaConf.select(cfg, "trainer.accelerator"), OmegaConf.select(cfg, "trainer.precision"))


def check_accelerator(accelerator, precision=None) -> None:
    """A GPU asked for where none is visible, or float16 autocast on the CPU (where Lightning trains in bf16
    instead while the saved config says 16): one line, instead of Lightning's exception or switch."""
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} needs a CUDA GPU and none is visible here; "
                        "use trainer=cpu (or trainer.accelerator=auto)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if str(precision) in ("16", "16-mixed") and on_cpu:
        raise UserError(f"trainer.precision={precision} (float16 autocast) needs a CUDA GPU and this run trains on "
                        "the CPU, where Lightning would switch to bf16-mixed; use trainer.precision=bf16-mixed")


def settings(target: str) -> set[str] | None:
    """The keyword arguments `target` (a class or function path) accepts; None if it takes any."""
    from hydra.utils import get_object

    obj = get_object(target)
    names: set[str] = set()
    for fn in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def check_keys(node, path: str = "") -> None:
    """Every key of every instantiated node (one with `_target_`) must be a setting of its target."""
    if isinstance(node, list):
        for i, v in enumerate(node):
            check_keys(v, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if path in GROUPS and node and target is None:
        raise UserError(f"{path}.{next(iter(node))} is not a setting: this {path} choice has none")
    valid = settings(target) if isinstance(target, str) and not target.startswith("${") else None
    for key, value in node.items():
        name = f"{path}.{key}" if path else str(key)
        if valid is not None and not str(key).startswith("_") and key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f"did you mean {path}.{close[0]}?" if close else f"its settings are: {', '.join(sorted(valid))}"
            raise UserError(f"{name} is not a setting of {path} ({target}); {hint}")
        check_keys(value, name)


def misspelt(config_name: str, overrides: list[str], key: str) -> str | None:
    """For `KEY=…` that Hydra cannot override (the config has no KEY): the refusal that `+KEY=…` gets, which
    names the nearest setting (Hydra's own hint, to add KEY with `+`, adds a setting nothing reads); None
    where no group's keys are checked."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    group = key.split(".")[0]
    if group not in GROUPS:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    added = [f"+{o}" if o.split("=")[0] == key else o for o in overrides if "=" in o and not o.startswith("-")]
    try:  # a sweep (-m k=a,b) is checked with each swept key's first value
        added = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
                 for o in OverridesParser.create().parse_overrides(added)]
        with initialize_config_dir(config_dir=str(config_dirs()[0]), version_base="1.3"):
            cfg = compose(config_name, overrides=added)
        check_keys(OmegaConf.to_container(cfg[group], resolve=False), group)
    except UserError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException):  # composes only as a sweep, or from another config directory
        pass
    return None


def check_pair(bottleneck_cfg, penalty_cfg) -> None:
    """Refuses a penalty that needs what the bottleneck's codes are not, naming the bottlenecks that fit."""
    from autoenc.training.runs import instantiate  # a mistake in either is reported as itself

    bottleneck, penalty = instantiate(bottleneck_cfg), instantiate(penalty_cfg)
    if penalty.accepts(bottleneck):
        return
    options = {f.stem: f for d in reversed(config_dirs()) for f in (d / "bottleneck").glob("*.yaml")}
    fits = [name for name, f in sorted(options.items()) if penalty.accepts(instantiate(OmegaConf.load(f)))]
    name = type(bottleneck).__name__.lower()
    raise UserError(f"penalty={type(penalty).__name__.lower()} needs {penalty.needs}, which bottleneck={name} "
                    f"does not give; choose bottleneck={'|'.join(fits)}, or another penalty")


def composition_error(error: Exception, command: str, overrides: list[str]) -> str:
    """The one line for a config that Hydra could not compose (an unknown option or key, a value it cannot
    parse), as the CLI prints it and the Python API raises it."""
    from hydra.errors import OverrideParseException

    if isinstance(error, OverrideParseException):
        bad = next((a for a in overrides if a in str(error)), str(error).splitlines()[0])
        key, _, value = bad.partition("=")
        return (f"cannot parse {bad!r}: a value with spaces or other special characters must be quoted for Hydra, "
                f"inside the shell's quotes: '{key}=\"{value}\"'")
    message = str(error).split("Config search path")[0]
    key = re.match(r"Could not override '([\w.]+)'\.", message)  # Hydra's hint, to add it with `+`, would not help
    if key and "." not in key[1]:
        message = f"Could not override '{key[1]}': `autoenc {command}` has no key {key[1]}"
    elif key and (nearest := misspelt(f"command/{command}", overrides, key[1])):
        return nearest
    return " ".join(f"{message} (see `autoenc {command} --help`)".split())
