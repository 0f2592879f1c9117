"""The decoded-image cache and the streamed path, measured on generated JPEGs against plain baselines in one run.

    python scripts/benchmark_data.py decode --images 4000              # workers 0/1/2 vs one process; PIL vs torchvision
    python scripts/benchmark_data.py startup --images 200000           # the 2nd `autoenc train` on a folder vs the digits
    python scripts/benchmark_data.py memory --images 200000 --size 128 # anonymous memory training on a > 9 GB cache
    python scripts/benchmark_data.py stream --images 200000            # streamed batches/s vs the conv model's steps/s

Every folder, cache and run goes under --work (default: a temporary directory, removed at the end unless
--keep). Each part prints its figures and ratios; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(folder: Path, n: int, size=(178, 218), distinct: int = 256) -> Path:
    """n JPEGs of CelebA's size (smooth gradients with noise, `distinct` different ones, written cyclically)
    in sub-folders of 10,000; made once per folder."""
    import numpy as np
    from PIL import Image

    if (folder / ".done").is_file() and len(list(folder.glob("*/*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    blobs = []
    for _ in range(min(distinct, n)):
        base = (np.sin(xx / rng.uniform(5, 40)) + np.cos(yy / rng.uniform(5, 40)))[..., None] * rng.uniform(40, 90, 3)
        img = np.clip(base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        sub = folder / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    (folder / ".done").write_text("")
    return folder


def decode(args) -> dict:
    """Decoding into the cache with 0 (in this process), 1 and 2 workers; one process of PIL for comparison."""
    import numpy as np
    import torch

    from autoenc.data import cache

    torch.set_num_threads(1)
    folder = make_jpegs(args.work / f"jpegs{args.images}", args.images)
    files = cache.list_images(folder)
    settings = {"size": [64, 64], "channels": 3, "crop": [148, 148]}
    out = {"images": len(files)}
    t = time.perf_counter()
    from PIL import Image

    for f in files[:min(len(files), 2000)]:
        with Image.open(f) as im:
            w, h = im.size
            l, u = (w - 148) // 2, (h - 148) // 2
            np.asarray(im.convert("RGB").crop((l, u, l + 148, u + 148)).resize((64, 64), Image.BILINEAR))
    out["pil_one_process_per_s"] = min(len(files), 2000) / (time.perf_counter() - t)
    for workers in (0, 1, 2):
        shutil.rmtree(args.work / "cache-decode", ignore_errors=True)
        t = time.perf_counter()
        cache.open_cache(files, settings, folder, args.work / "cache-decode", workers)
        out[f"workers{workers}_per_s"] = len(files) / (time.perf_counter() - t)
    out["ratio_2_workers_vs_one_process"] = out["workers2_per_s"] / out["workers0_per_s"]
    out["ratio_torchvision_vs_pil"] = out["workers0_per_s"] / out["pil_one_process_per_s"]
    return out


def autoenc_train(*overrides: str) -> tuple[float, str, dict]:
    """Runs `autoenc train`; returns the seconds from its start to the end of its first step, its output, the probe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "autoenc", "train", "threads=1", "trainer.enable_progress_bar=false",
                           "+callbacks.probe._target_=benchmark_data.Probe", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("probe "))
    probe = json.loads(line[len("probe "):])
    return probe["first_step_s"], proc.stdout, probe


def _probe_class():
    """A Lightning callback that prints, as JSON, when the first training step ended (seconds since the
    process started), the peak anonymous memory while training, and the steps per second after the first."""
    from lightning.pytorch.callbacks import Callback

    def process_age() -> float:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")

    def anon_bytes() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))

    class _Probe(Callback):
        def __init__(self):
            self.first = self.t0 = None
            self.peak, self.steps, self._stop = 0, 0, threading.Event()

        def on_train_start(self, trainer, pl_module):
            threading.Thread(target=self._sample, daemon=True).start()

        def _sample(self):
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, anon_bytes())

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.steps += 1
            if self.first is None:
                self.first, self.t0 = process_age(), time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self._stop.set()
            rate = (self.steps - 1) / (time.perf_counter() - self.t0) if self.steps > 1 else None
            print("probe " + json.dumps({"first_step_s": self.first, "process_s": process_age(),
                                          "peak_anon_gb": max(self.peak, anon_bytes()) / 1e9, "steps_per_s": rate}),
                  flush=True)

    return _Probe


def __getattr__(name):
    if name == "Probe":  # built on first use, so that `--help` does not import Lightning
        return _probe_class()
    raise AttributeError(name)


def folder_run(args, size: int, *overrides: str):
    folder = make_jpegs(args.work / f"jpegs{args.images}", args.images)
    return autoenc_train("data=folder", f"data.path={folder}", f"data.size={size}", "data.channels=3", "data.crop=148",
                         f"data.cache_dir={args.work / 'cache'}", f"hydra.run.dir={args.work / 'run'}", "overwrite=true", *overrides)


def startup(args) -> dict:
    """The first training step of `autoenc train` on the folder, the first time (decoding) and the second (the
    cache opened), against the same command on the embedded digits."""
    one = ["trainer.max_steps=1", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1", "net=conv"]
    first = folder_run(args, args.size, *one)
    second = folder_run(args, args.size, *one)
    digits = autoenc_train(f"hydra.run.dir={args.work / 'digits'}", "overwrite=true", *one)
    return {"images": args.images, "size": args.size, "first_run_first_step_s": first[0],
            "second_run_first_step_s": second[0], "digits_first_step_s": digits[0],
            "second_minus_digits_s": second[0] - digits[0]}


def memory(args) -> dict:
    """Peak anonymous memory of the training process streaming from the cache (data.stream=auto)."""
    seconds, out, probe = folder_run(args, args.size, f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=2",
                                     "trainer.limit_test_batches=2", "net=conv")
    big = max((p for p in (args.work / "cache").glob("*-*") if p.is_dir()), key=lambda p: (p / "images.npy").stat().st_size)
    return {"cache_gb": (big / "images.npy").stat().st_size / 1e9, "peak_anon_gb": probe["peak_anon_gb"],
            "steps": args.steps, "steps_per_s": probe["steps_per_s"]}


def stream(args) -> dict:
    """Batches per second the streamed path delivers (0, 1, 2 workers) over the cache, against the steps per
    second a plain PyTorch loop of the default conv model (Adam, Bernoulli loss) trains at that shape."""
    import numpy as np
    import torch

    from autoenc.data import cache as cache_module
    from autoenc.data.module import Rows, StreamedBatches, TensorBatches
    from autoenc.model.backbones import conv

    torch.set_num_threads(1)
    folder = make_jpegs(args.work / f"jpegs{args.images}", args.images)
    files = cache_module.list_images(folder)
    c = cache_module.open_cache(files, {"size": [args.size] * 2, "channels": 3, "crop": [148, 148]}, folder,
                                args.work / "cache", None)
    rows, y = Rows(c.images, c.valid), torch.zeros(len(c.valid), dtype=torch.long)
    out = {"cache_gb": c.images.nbytes / 1e9, "batch_size": args.batch_size, "size": args.size}
    for workers in (0, 1, 2):
        kind = TensorBatches if workers == 0 else StreamedBatches
        extra = {} if workers == 0 else {"workers": workers}
        batches = kind(rows, y, args.batch_size, True, workers, lambda: 0, **extra)
        t, n = time.perf_counter(), 0
        for x, _ in batches:
            n += 1
            if n == args.steps:
                break
        out[f"streamed_batches_per_s_workers{workers}"] = n / (time.perf_counter() - t)
    enc, dec = conv((3, args.size, args.size), 16)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()])
    x = torch.from_numpy(np.asarray(c.images[:args.batch_size])).float() / 255
    for i in range(13):
        if i == 3:
            t = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dec(enc(x)), x, reduction="sum") / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["conv_model_steps_per_s"] = 10 / (time.perf_counter() - t)
    out["ratio_streamed_vs_model"] = out["streamed_batches_per_s_workers0"] / out["conv_model_steps_per_s"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["decode", "startup", "memory", "stream"])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=64, help="data.size of the cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--work", type=Path, default=None, help="where the JPEGs, caches and runs go (kept)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    keep = args.work is not None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="autoenc-bench-"))
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        result = {"part": args.part, "cpus": len(os.sched_getaffinity(0)), **globals()[args.part](args)}
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
