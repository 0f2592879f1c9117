"""One way in, for the command line, the Python API and the tests: a command's config composed, then (after
`schema.validate`) run by the function its `run: module:function` names."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, open_dict

from autoenc.app.schema import composition_error
from autoenc.util.errors import UserError
from autoenc.util.paths import CONFIGS
from autoenc.util.threads import set_threads


def compose(command: str, overrides=(), hydra: bool = False) -> DictConfig:
    """The config `autoenc <command> OVERRIDES` composes; with `hydra`, Hydra's own node is set as a run has it
    (${hydra:…}, the run directory's name) and left out of the config. A mistake Hydra finds raises UserError
    with the one line the CLI prints."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [str(o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = hydra_compose(f"command/{command}", overrides=overrides, return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(composition_error(e, command, overrides)) from None
    if hydra:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
    return cfg


def run(cfg: DictConfig):
    """Runs a checked config: the function its `run` names, with the command's threads."""
    set_threads(cfg.get("threads"))
    return function(cfg.run)(cfg)


def function(path: str):
    """The function a command's `run: module:function` names, or a UserError saying it is not one."""
    module, _, name = str(path).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as e:
        if module != e.name and not module.startswith(f"{e.name}."):
            raise  # the module exists; something it imports is missing
        fn = None
    if not callable(fn):
        raise UserError(f"run={path} is not a function: name one as module:function")
    return fn
