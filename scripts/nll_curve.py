"""Test NLL (IWAE) of a VAE run's saved epochs, as a table and a picture with the published value as a line.

    python scripts/nll_curve.py RUN --epochs 100 300 1000 3280 --k 1000 --published 86.76 --out nll.png

RUN is a run of `autoenc train experiment=vae_mnist_iwae` that also saved weights every few epochs
(e.g. `+callbacks.every10._target_=lightning.pytorch.callbacks.ModelCheckpoint ...every_n_epochs=10
...save_top_k=-1 ...save_weights_only=true ...dirpath=RUN/checkpoints/epochs`, files `epoch=E.ckpt`, E
counted from 0). For each asked epoch the weights after that many passes are rebuilt from the run's own
config and scored on its test set with `autoenc.app.commands` (weights_only loading, K importance samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def test_nll(run: Path, ckpt: Path, k: int, seed: int = 0) -> float:
    """The IWAE estimate of the test set's −log p(x) in nats, for one checkpoint of the run."""
    import torch
    from tqdm import tqdm

    import autoenc

    model = autoenc.load(ckpt)  # the same rebuild as the commands that use a model
    x, _ = model.split("test")
    g = torch.Generator(device=model.device).manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in tqdm(range(0, len(x), 100), desc=ckpt.name, leave=False):
            b = model.input(x[start:start + 100])
            total += float(-model.autoencoder.log_likelihood(b, k, g).sum())
    return total / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--epochs", type=int, nargs="+", required=True, help="passes done (E+1 for epoch=E.ckpt)")
    p.add_argument("--k", type=int, default=1000, help="importance samples")
    p.add_argument("--published", type=float, default=86.76, help="the published NLL, drawn as a line")
    p.add_argument("--out", type=Path, default=None, help="PNG (and .json beside it); default RUN/nll_curve.png")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or args.run / "nll_curve.png"
    # Figures already in the JSON (same epochs and K) are kept: an interrupted or extended curve goes on.
    done = {(r["epochs"], r["k"]): r for r in json.loads(out.with_suffix(".json").read_text())} \
        if out.with_suffix(".json").is_file() else {}
    rows = []
    for epochs in sorted(args.epochs):
        # A resumed run that saves an epoch again writes epoch=E-v1.ckpt: the newest file is the trajectory's.
        found = sorted((args.run / "checkpoints" / "epochs").glob(f"epoch={epochs - 1}*.ckpt"), key=lambda f: f.stat().st_mtime)
        found = [f for f in found if f.stem.split("-v")[0] == f"epoch={epochs - 1}"]
        if not found:
            sys.exit(f"nll_curve: no checkpoint epoch={epochs - 1}.ckpt in {args.run / 'checkpoints' / 'epochs'}")
        if (epochs, args.k) not in done:
            start = time.time()
            done[epochs, args.k] = {"epochs": epochs, "nll": test_nll(args.run, found[-1], args.k), "k": args.k,
                                    "checkpoint": found[-1].name, "seconds": time.time() - start}
        rows.append(done[epochs, args.k])
        print(f"{epochs:>5} passes: test NLL {rows[-1]['nll']:.2f} nats (K={args.k}, {rows[-1]['seconds']:.0f} s)", flush=True)
        out.with_suffix(".json").write_text(json.dumps(sorted(done.values(), key=lambda r: (r["k"], r["epochs"])), indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["epochs"] for r in rows], [r["nll"] for r in rows], "o-", label=f"autoenc, IWAE K={args.k}")
    ax.axhline(args.published, color="grey", ls="--", label=f"published: {args.published} (Burda et al. 2015, K=5000)")
    ax.set(xscale="log", xlabel="passes over the training set", ylabel="test −log p(x) (nats)")
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
