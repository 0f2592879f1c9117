"""Extending without touching the package: a new bottleneck is one class and one YAML found through Hydra's
search path, and it composes with the rest (the README's "Extending" example, run as written)."""

from __future__ import annotations

import json
import os

import torch

from conftest import FAST, autoenc

BOTTLENECK = '''
import math

import torch

from autoenc.model.bottlenecks import Bottleneck


class Tanh(Bottleneck):
    """z = tanh(h): codes in (-1, 1)."""

    bounds = (-1.0, 1.0)

    def activation(self, h):
        return torch.tanh(h)

    def slope(self, code):
        return 1 - code ** 2
'''

CONFIG = """# z = tanh(h): codes in (-1, 1).
_target_: my_bottlenecks.Tanh
threshold: null
"""


def test_a_bottleneck_added_from_outside_the_package_trains_and_composes(tmp_path):
    (tmp_path / "my_bottlenecks.py").write_text(BOTTLENECK)
    (tmp_path / "configs" / "bottleneck").mkdir(parents=True)
    (tmp_path / "configs" / "bottleneck" / "tanh.yaml").write_text(CONFIG)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = tmp_path / "run"
    autoenc("train", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "bottleneck=tanh", "penalty=contractive",
            "net=mlp_shallow", f"hydra.run.dir={run}", *FAST, "trainer.limit_test_batches=1.0", env=env)
    results = json.loads((run / "results.json").read_text())
    assert results["test/jacobian_fro"] > 0  # the closed-form contractive penalty used the new slope
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert state["autoenc_config"]["bottleneck"]["_target_"] == "my_bottlenecks.Tanh"
