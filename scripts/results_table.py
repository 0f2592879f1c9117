"""Trains the five families on each data set with a fixed budget, evaluates them, prints a markdown table.

    python scripts/results_table.py --data mnist:20:128 fashion_mnist:20:128 --out outputs/results_table

Each `name:epochs:batch_size` trains `autoenc train model=<family> data=<name>` for each family as its
preset is (or with one `--latent-dim` for all, and a family's own overrides after a colon:
`contractive:model.latent_dim=256`), then runs `autoenc evaluate` on the best
checkpoint. Each row says how long training and evaluation took on this machine. A data set that cannot
be loaded here (e.g. missing files) gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = ("ae", "sparse", "denoising", "contractive", "vae")
COLUMNS = ("data", "model", "code", "epochs × batch", "wall time", "test MSE", "PCA MSE (components)",
           "probe acc. (code)", "probe acc. (pixels)", "NLL (IWAE) / active units")


def autoenc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoenc", *args], text=True, capture_output=True)


def data_problem(data: str) -> str | None:
    """Why a data config cannot be loaded here (e.g. missing files), or None when it can."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from autoenc.util.paths import CONFIGS
    from autoenc.util.errors import UserError

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}"])
    try:
        instantiate(cfg.data).shape  # loads the data set
    except UserError as e:
        return str(e)
    return None


def one_run(data: str, spec: str, epochs: str, batch_size: str, args) -> list[str]:
    """Trains and evaluates one model; its table row (or the one-line reason it could not run)."""
    family, _, extra = spec.partition(":")
    overrides = [o for o in extra.split(",") if o]
    latent = [] if args.latent_dim is None or any(o.startswith("model.latent_dim") for o in overrides) \
        else [f"model.latent_dim={args.latent_dim}"]
    run = args.out / data / spec.replace(":", "_").replace(",", "_").replace("=", "")
    start = time.time()
    proc = autoenc("train", f"model={family}", f"data={data}", *latent, f"trainer.max_epochs={epochs}",
                   f"data.batch_size={batch_size}", "eval.iwae_samples=0", f"hydra.run.dir={run}",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides, *args.overrides)
    if proc.returncode == 0:
        proc = autoenc("evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}",
                       f"eval.iwae_samples={args.iwae_samples}", f"eval.probe_examples={args.probe_examples}")
    wall = f"{time.time() - start:.0f} s"
    name = " ".join([family, *overrides])
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("autoenc: error: ")
        return [data, name, "", f"{epochs} × {batch_size}", wall, f"failed: {reason}"] + [""] * 4
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    e = json.loads((run / "evaluation.json").read_text())
    code = f"{cfg.model.latent_dim} {cfg.bottleneck._target_.rsplit('.', 1)[-1].lower()}"
    vae = f"{e['nll_iwae']:.2f} (K={args.iwae_samples}) / {e['active_units']:.0f}" if "nll_iwae" in e else "–"
    return [data, name, code, f"{epochs} × {batch_size}", wall, f"{e['mse']:.4f}",
            f"{e['pca_mse']:.4f} ({e['pca_components']:.0f})" + (
                f"; {e['pca_mse_active_units']:.4f} ({e['active_units']:.0f})" if "pca_mse_active_units" in e else ""),
            f"{e['probe_accuracy']:.3f}",
            f"{e['probe_accuracy_pixels']:.3f}", vae]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["mnist:20:128", "fashion_mnist:20:128"],
                        help="data config, epochs and batch size: name:epochs:batch_size")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES),
                        help="model presets, each optionally with overrides: contractive:model.latent_dim=256")
    parser.add_argument("--latent-dim", type=int, default=None, help="one code size for every family (default: each preset's own)")
    parser.add_argument("--iwae-samples", type=int, default=1000, help="K for the VAE's IWAE NLL")
    parser.add_argument("--probe-examples", type=int, default=60000, help="training examples for PCA and the probes (at most the training split)")
    parser.add_argument("--out", type=Path, default=Path(time.strftime("outputs/results_table/%Y-%m-%d_%H-%M-%S")),
                        help="a new directory for the runs (an existing one would mix old checkpoints in)")
    parser.add_argument("overrides", nargs="*", help="extra `autoenc train` overrides for every run")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new --out directory")
    rows, start = [], time.time()
    for spec in args.data:
        data, epochs, batch_size = spec.split(":")
        problem = data_problem(data)
        if problem:
            rows.append([data, "all", "", f"{epochs} × {batch_size}", "", f"not available here: {problem}"] + [""] * 4)
            continue
        for family in args.families:
            rows.append(one_run(data, family, epochs, batch_size, args))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}")
    print("\n".join(f"| {' | '.join(r)} |" for r in rows))
    print(f"\nPCA with as many components as the code can have non-zero values, fitted on ≤{args.probe_examples} "
          f"training examples; probes: logistic regression on the same examples; {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
