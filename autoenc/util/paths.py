"""Where the Hydra config tree is: the package's own, then the directory AUTOENC_CONFIG_DIR names."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]  # the autoenc package
# Installed wheel: autoenc/configs; checkout (editable install): ../configs.
CONFIGS = next(p for p in (_PKG / "configs", _PKG.parent / "configs") if p.is_dir())


# The config groups, named once: the pipeline's four seams, and the groups that tell one model from another.
SEAMS = ("noise", "bottleneck", "penalty", "likelihood")
PIPELINE = ("model", "net", "data", *SEAMS)


def config_dirs() -> list[Path]:
    """CONFIGS, then AUTOENC_CONFIG_DIR if it is set: where a config is looked for, in that order."""
    extra = os.environ.get("AUTOENC_CONFIG_DIR")
    return [CONFIGS, *([Path(extra).expanduser().resolve()] if extra else [])]
