"""autoenc: train, evaluate and use autoencoders from one config-driven command line or from Python.

    import autoenc
    model = autoenc.load("outputs/<run>")      # a run directory or a .ckpt file
    z = model.encode(images)                    # arrays, tensors, PIL images or image paths
"""

from __future__ import annotations

__version__ = "0.3.0"
__all__ = ["Autoencoder", "Model", "UserError", "load", "train"]

_HOMES = {"Autoencoder": "autoenc.model.core", "Model": "autoenc.app.api", "load": "autoenc.app.api", "train": "autoenc.app.api",
          "UserError": "autoenc.util.errors"}


def __getattr__(name: str):
    """The public names, imported on first use: `autoenc --help` does not wait for torch."""
    if name not in _HOMES:
        raise AttributeError(f"module 'autoenc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
