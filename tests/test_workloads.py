"""scripts/benchmark.py's workloads a GPU is for: the conv VAE on 64 × 64 × 3 and the top-k SAE 4,096 → 32,768."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402


def test_each_workload_composes_its_model_on_generated_data_of_its_shape(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    args = argparse.Namespace(data_root=str(tmp_path), batch_size=0, steps=1, warmup=2, precision="32-true",
                              device="cpu", compile=False, override=[])
    shapes = {}
    for name, (_, batch_size, (shape, dtype)) in benchmark.WORKLOADS.items():
        args.data, path = benchmark.workload_data(args, name, tmp_path)
        x = np.load(path, mmap_mode="r")
        assert args.data == "array" and x.shape == shape and x.dtype == dtype
        args.batch_size, args.override = batch_size, [f"data.path={path}"]
        shapes[name] = OmegaConf.to_container(benchmark.compose(args, name, str(tmp_path)), resolve=True)
    vae, sae = shapes["conv_vae_64"], shapes["topk_sae_4096"]
    assert vae["net"]["channels"] == [32, 64, 128, 256, 512] and vae["model"]["latent_dim"] == 128
    assert vae["data"]["batch_size"] == 128 and vae["bottleneck"]["_target_"].endswith("Gaussian")
    assert sae["model"]["latent_dim"] == 32768 and sae["bottleneck"]["k"] == 32 and sae["data"]["batch_size"] == 4096
    assert sae["net"]["_target_"] == "autoenc.model.backbones.sae" and sae["likelihood"]["_target_"].endswith("SquaredError")


def test_the_conv_workload_uses_celeba_where_the_data_root_has_it(tmp_path):
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("")
    args = argparse.Namespace(data_root=str(tmp_path))
    assert benchmark.workload_data(args, "conv_vae_64", tmp_path) == ("celeba", None)
