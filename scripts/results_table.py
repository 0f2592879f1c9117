"""Trains the five families on each data set with a fixed small budget, evaluates them, prints a markdown table.

    python scripts/results_table.py --data digits:60:32 fashion_mnist:2:128 mnist:2:128 --out outputs/results_table

Each `name:epochs:batch_size` trains `autoenc train model=<family> data=<name>` with that budget (the same
latent size for all, so test MSE compares with PCA at that size), then runs `autoenc evaluate` on the best
checkpoint.
A data set that cannot be loaded here (e.g. missing files) gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = ("ae", "sparse", "denoising", "contractive", "vae")
COLUMNS = ("data", "model", "epochs × batch", "test MSE", "PCA MSE", "probe acc. (code)", "probe acc. (pixels)", "VAE NLL")


def autoenc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoenc", *args], text=True, capture_output=True)


def data_problem(data: str) -> str | None:
    """Why a data config cannot be loaded here (e.g. missing files), or None when it can."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from autoenc.cli import CONFIGS
    from autoenc.errors import UserError

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}"])
    try:
        instantiate(cfg.data).shape  # loads the data set
    except UserError as e:
        return str(e)
    return None


def one_run(data: str, family: str, epochs: str, batch_size: str, args) -> list[str]:
    """Trains and evaluates one model; its table row (or the one-line reason it could not run)."""
    run = args.out / data / family
    proc = autoenc("train", f"model={family}", f"data={data}", f"model.latent_dim={args.latent_dim}",
                   f"trainer.max_epochs={epochs}", f"data.batch_size={batch_size}", "eval.iwae_samples=0",
                   f"hydra.run.dir={run}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                   *args.overrides)
    if proc.returncode == 0:
        proc = autoenc("evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}",
                       f"eval.iwae_samples={args.iwae_samples}", f"eval.probe_examples={args.probe_examples}")
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("autoenc: error: ")
        return [data, family, f"{epochs} × {batch_size}", f"failed: {reason}"] + [""] * 4
    e = json.loads((run / "evaluation.json").read_text())
    nll = f"{e['nll_iwae']:.2f} (K={args.iwae_samples})" if "nll_iwae" in e else "–"
    return [data, family, f"{epochs} × {batch_size}", f"{e['mse']:.4f}", f"{e['pca_mse']:.4f}",
            f"{e['probe_accuracy']:.3f}", f"{e['probe_accuracy_pixels']:.3f}", nll]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits:60:32", "fashion_mnist:2:128", "mnist:2:128"],
                        help="data config, epochs and batch size: name:epochs:batch_size")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--iwae-samples", type=int, default=100, help="K for the VAE's IWAE NLL")
    parser.add_argument("--probe-examples", type=int, default=5000, help="training examples for the probes")
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
            rows.append([data, "all", f"{epochs} × {batch_size}", f"not available on this machine: {problem}"]
                        + [""] * 4)
            continue
        for family in FAMILIES:
            rows.append(one_run(data, family, epochs, batch_size, args))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}")
    print("\n".join(f"| {' | '.join(r)} |" for r in rows))
    print(f"\nlatent size {args.latent_dim} for every model; PCA with as many components, fitted on the "
          f"training set; probes: logistic regression on ≤{args.probe_examples} training examples; "
          f"{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
