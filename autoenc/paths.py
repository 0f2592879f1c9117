"""Where the Hydra config tree is: in an installed wheel (autoenc/configs) or a checkout (../configs)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
# Installed wheel: autoenc/configs; checkout (editable install): ../configs.
CONFIGS = next(p for p in (_PKG / "configs", _PKG.parent / "configs") if p.is_dir())
