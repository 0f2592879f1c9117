"""`autoenc <command> [hydra overrides]`: one Hydra app per command, heavy imports deferred."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent
# Installed wheel: autoenc/configs; checkout (editable install): ../configs.
CONFIGS = next(p for p in (_PKG / "configs", _PKG.parent / "configs") if p.is_dir())

# command: (config name, "module:function" run with the composed config, one-line description)
COMMANDS = {
    "train": ("train", "autoenc.train:train", "train a model (default: undercomplete AE on the embedded 8×8 digits)"),
}

USAGE = """usage: autoenc <command> [key=value ...] [--help] [-m]

commands:
{commands}

Each command is a Hydra app: `autoenc <command> --help` lists its config groups and options,
`--cfg job` prints the composed config, and `-m` sweeps over comma-separated values:

  autoenc train model=vae data=fashion_mnist trainer.max_epochs=20
  autoenc train -m model=ae,sparse,vae model.latent_dim=2,8,32
  tensorboard --logdir outputs
"""


def _fail(message: str) -> None:
    print(f"autoenc: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _full_error() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 set before autoenc started)."""
    return os.environ.get("AUTOENC_USER_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def _task(command: str):
    """The function Hydra runs for `command`: user mistakes become one line and exit code 2."""

    def task(cfg):
        from hydra.errors import InstantiationException
        from omegaconf.errors import OmegaConfBaseException

        from autoenc.errors import UserError
        from autoenc.schema import validate

        module, function = COMMANDS[command][1].split(":")
        try:
            validate(cfg)
            return _objective(cfg, getattr(importlib.import_module(module), function)(cfg))
        except (UserError, InstantiationException, OmegaConfBaseException) as e:
            if _full_error():
                raise
            _fail(str(e))

    return task


def _objective(cfg, results):
    """What a Hydra sweeper optimizes: the metric the config names, if any."""
    name = cfg.get("optimized_metric")
    return results.get(name) if name and isinstance(results, dict) else None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {k:<{width}}  {d}" for k, (*_, d) in COMMANDS.items())))
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    import hydra

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_name = COMMANDS[command][0]
    sys.argv = [f"autoenc {command}", *rest]
    # Hydra then raises composition errors (unknown option or key, bad override) to us, and we
    # print them as one line; the user's own HYDRA_FULL_ERROR=1 still gets the traceback.
    os.environ.setdefault("AUTOENC_USER_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=config_name)(_task(command))()
    except (HydraException, OmegaConfBaseException) as e:
        if _full_error():
            raise
        _fail(f"{str(e).split('Config search path')[0]} (see `autoenc {command} --help`)")


if __name__ == "__main__":
    main()
