"""How long the commands that use a trained model take, each timed as a whole process (start to exit).

    python scripts/command_times.py --run outputs/2026-12-07/10-00-00 --repeats 5
    python scripts/command_times.py --data-root ../shared/data     # trains a one-epoch VAE on MNIST first

Each command runs `--repeats` times in turn (the disk cache warm after a first untimed round); printed per
command: the median, the lowest and the highest wall time, beside `python -c "import torch"`, the floor
every command that touches a model stands on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    """name: the command line, for a trained run `run`, writing into `out`."""
    python = sys.executable
    return {
        'python -c "import torch"': [python, "-c", "import torch"],
        'python -c "import autoenc"': [python, "-c", "import autoenc"],
        "autoenc.load(RUN)": [python, "-c", f"import autoenc; autoenc.load({str(run)!r})"],
        "autoenc sample ckpt=RUN n=16": [python, "-m", "autoenc", "sample", f"ckpt={run}", "n=16", f"out={out / 's.png'}"],
        "autoenc reconstruct ckpt=RUN": [python, "-m", "autoenc", "reconstruct", f"ckpt={run}", f"out={out / 'r.png'}"],
        "autoenc encode ckpt=RUN": [python, "-m", "autoenc", "encode", f"ckpt={run}", f"out={out / 'codes.npz'}"],
        "autoenc --help": [python, "-m", "autoenc", "--help"],
    }


def wall(cmd: list[str], env: dict) -> float:
    """Seconds from the process's start to its exit; a failing command stops the script with its output."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    spent = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return spent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a trained run's directory (default: train a one-epoch VAE on MNIST)")
    p.add_argument("--data-root", default=os.environ.get("AUTOENC_DATA_DIR"), help="where MNIST is, to train one")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"AUTOENC_DATA_DIR": args.data_root} if args.data_root else {})}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run = args.run
        if run is None:
            run = scratch / "vae"
            print(f"training a one-epoch VAE on MNIST into {run} …", flush=True)
            wall([sys.executable, "-m", "autoenc", "train", "model=vae", "data=mnist", "trainer.max_epochs=1",
                  f"hydra.run.dir={run}"], env)
        lines = commands(run.resolve(), scratch)
        for cmd in lines.values():  # one untimed round: the files in the page cache
            wall(cmd, env)
        times: dict[str, list[float]] = {name: [] for name in lines}
        for _ in range(args.repeats):  # in turn, so that each command sees whatever else the machine does
            for name, cmd in lines.items():
                times[name].append(wall(cmd, env))
    width = max(map(len, times))
    print(f"{'command':<{width}}  median   lowest  highest   ({args.repeats} runs each, one torch thread)")
    for name, t in times.items():
        print(f"{name:<{width}}  {statistics.median(t):5.2f} s  {min(t):5.2f} s  {max(t):5.2f} s")


if __name__ == "__main__":
    main()
