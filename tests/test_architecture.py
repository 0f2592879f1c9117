"""The package's layers (docs/architecture.md): a module imports only from its own layer or those below it,
and the model knows nothing of Lightning, Hydra or files; a 0.2 checkpoint, whose config names the flat
modules of then, still loads."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from conftest import ROOT

LAYERS = ["util", "model", "data", "training", "evaluation", "app"]  # bottom to top


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "autoenc" and parts[1] in LAYERS else None


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted((ROOT / "autoenc").rglob("*.py")):
        own = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if own is None:
            continue
        upward += [f"{path.relative_to(ROOT)} imports {m}" for m in imports(path) if (layer(m) or 0) > own]
    assert not upward
    assert sorted(p.name for p in (ROOT / "autoenc").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_the_model_layer_is_plain_pytorch():
    heavy = [f"{p.name}: {m}" for p in (ROOT / "autoenc" / "model").glob("*.py") for m in imports(p)
             if m.split(".")[0] in ("lightning", "hydra", "omegaconf", "PIL", "torchvision")]
    assert not heavy


def test_no_config_names_the_command_line_module():
    named = [str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if "autoenc.app.cli" in p.read_text()]
    assert not named


def test_a_checkpoint_of_0_2_loads_with_the_module_names_of_then(tmp_path):
    from autoenc import load
    from conftest import train_here

    run = tmp_path / "run"
    train_here(run, "model=vae")
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    then = {"autoenc.training.module.": "autoenc.module.", "autoenc.model.bottlenecks.": "autoenc.bottlenecks.",
            "autoenc.model.likelihoods.": "autoenc.likelihoods.", "autoenc.model.backbones.": "autoenc.nets.",
            "autoenc.data.sources.": "autoenc.datasets."}

    def old(node):
        if isinstance(node, dict):
            return {k: old(v) for k, v in node.items()}
        if isinstance(node, str):
            for new, was in then.items():
                node = node.replace(new, was)
        return node

    stored = old(ckpt["autoenc_config"])
    assert stored["model"]["_target_"] == "autoenc.module.AutoencoderModule"
    assert stored["net"]["_target_"].startswith("autoenc.nets.") and stored["data"]["_target_"].startswith("autoenc.datasets.")
    old_run = tmp_path / "old"
    (old_run / "checkpoints").mkdir(parents=True)
    torch.save({**ckpt, "autoenc_config": stored}, old_run / "checkpoints" / "best.ckpt")
    x = load(run, device="cpu").split("test")[0][:8]
    assert torch.equal(load(old_run, device="cpu").reconstruct(x), load(run, device="cpu").reconstruct(x))
