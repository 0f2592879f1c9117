"""Training throughput of autoenc's real path against a hand-written PyTorch loop, per family.

    python scripts/benchmark.py --data-root ../shared/data --out bench.json
    python scripts/benchmark.py --device cuda --precision bf16-mixed --compile

Each family is trained in this process two ways, in alternating blocks of `--block` steps: as
`autoenc train` builds it (Hydra compose over the project's configs → autoenc.train.build →
Lightning Trainer, with its logger, progress bar and callbacks), and as a plain loop (forward,
loss, backward, step) over the same network, batch size, optimizer and device-resident data.
Alternating makes both paths share whatever else the machine is doing. Samples/s are timed over
`--steps` steps of each after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# name: overrides of `autoenc train` that select the family
FAMILIES = {
    "ae": ["model=ae"],
    "sparse": ["model=sparse"],
    "denoising": ["model=denoising"],
    "contractive_analytic": ["model=contractive", "penalty.method=analytic"],
    "contractive_exact": ["model=contractive", "penalty.method=exact"],
    "contractive_estimate": ["model=contractive", "penalty.method=estimate"],
    "vae": ["model=vae"],
}


class PeakRSS:
    """Peak resident set size (bytes) while a block runs, sampled from /proc every 10 ms."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_age() -> float:
    """Seconds since this process started (from /proc, 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def compose(args, family: str, out_dir: str):
    """The config `autoenc train <overrides>` would run, from the project's own config tree."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from autoenc.cli import CONFIGS

    overrides = [f"data={args.data}", f"data.batch_size={args.batch_size}", *FAMILIES[family],
                 f"++trainer.max_steps={args.warmup + args.steps}", f"trainer.precision={args.precision}",
                 f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"model.compile={args.compile}", f"paths.output_dir={out_dir}", "eval.iwae_samples=0",
                 *([f"data.root={args.data_root}"] if args.data_root and args.data != "digits" else []),
                 *args.override]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class PlainLoop:
    """A hand-written loop over the same network, optimizer, batch size and device-resident data."""

    def __init__(self, args, cfg):
        import torch

        from autoenc.train import build

        torch.manual_seed(cfg.seed)
        datamodule, model = build(cfg)
        self.args, self.model = args, model.to(args.device)
        self.opt = model.optimizer_factory(model.parameters())
        self.x_all = datamodule.splits["train"][0].to(args.device)  # stored as uint8 or float, like autoenc
        self.order = torch.randperm(len(self.x_all), device=args.device)
        self.g = torch.Generator(device=args.device).manual_seed(0)
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
        self.done = 0

    def run(self, steps: int) -> tuple[float, float]:
        """Trains `steps` steps; returns their wall and process CPU seconds."""
        import torch

        m, b = self.model, self.args.batch_size
        enc, dec, bottleneck, penalty, nll, noise = m.encoder, m.decoder, m.bottleneck, m.penalty, m.likelihood.nll, m.noise
        sync(self.args.device)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            start = self.done * b % (len(self.x_all) - b + 1)
            self.done += 1
            x = self.x_all[self.order[start:start + b]]
            x = x.float().div_(255) if x.dtype == torch.uint8 else x
            x_tilde = noise(x, self.g) if noise is not None else x
            with self.autocast:
                latent = bottleneck(enc(x_tilde))
                recon = nll(dec(latent.z).float(), x).mean()
                loss = (recon + bottleneck.terms(latent, recon, None)[0]
                        + penalty(latent.code, x_tilde, enc, bottleneck)[0])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        sync(self.args.device)
        return time.perf_counter() - w0, time.process_time() - c0


def run_family(args, family: str) -> dict:
    """Fits through Lightning as `autoenc train` does, and runs the plain loop in alternating blocks.

    After warm-up, every `--block` optimizer steps of the Trainer are followed by as many plain-loop
    steps, so that both paths see the same machine (other load, clock speed) over the run.
    """
    import lightning.pytorch as pl
    import torch

    from autoenc.train import build, make_trainer, quiet_lightning

    totals = {"autoenc": [0.0, 0.0], "plain": [0.0, 0.0], "steps": 0}
    cuda_peak = {"autoenc": 0, "plain": 0}

    def peak(path):
        if args.device == "cuda":
            cuda_peak[path] = max(cuda_peak[path], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    class Alternate(pl.Callback):
        """Times the Trainer's steps in blocks and runs the plain loop for as many steps after each."""

        clock = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step  # optimizer steps done so far
            if self.clock is None:
                if "first_step" not in totals:  # the end of the first training_step call
                    totals["first_step"] = time.perf_counter(), process_age()
                if step < args.warmup:
                    return
                plain.run(args.warmup)
                peak("plain")
            else:
                sync(args.device)
                n = step - self.clock[0]
                if n < args.block and step < args.warmup + args.steps:
                    return
                w, c = time.perf_counter() - self.clock[1], time.process_time() - self.clock[2]
                peak("autoenc")
                totals["autoenc"][0] += w
                totals["autoenc"][1] += c
                totals["steps"] += n
                for i, v in enumerate(plain.run(n)):
                    totals["plain"][i] += v
                peak("plain")
            sync(args.device)
            self.clock = step, time.perf_counter(), time.process_time()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, PeakRSS() as mem:
        cfg = compose(args, family, out)
        plain_t0 = time.perf_counter()
        plain = PlainLoop(args, cfg)
        plain_startup = time.perf_counter() - plain_t0 + plain.run(1)[0]
        t1 = time.perf_counter()
        quiet_lightning()
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule, model = build(cfg)
        trainer = make_trainer(cfg, Alternate())
        trainer.fit(model, datamodule=datamodule)
    row, n = {"steps": totals["steps"]}, totals["steps"] * args.batch_size
    for path in ("autoenc", "plain"):
        wall, cpu = totals[path]
        row[path] = {"samples_per_s": n / wall, "cpu_samples_per_s": n / cpu}
        if args.device == "cuda":
            row[path]["peak_cuda_mb"] = cuda_peak[path] / 2**20
    row["peak_rss_mb"] = mem.peak / 2**20
    # compose, then build and fit up to the end of the first step (the plain loop's build left out)
    row["autoenc"]["startup_s"] = (plain_t0 - t0) + totals["first_step"][0] - t1
    row["plain"]["startup_s"] = plain_startup
    row["since_process_start"] = totals["first_step"][1]
    row["ratio"] = row["autoenc"]["samples_per_s"] / row["plain"]["samples_per_s"]
    row["ratio_cpu"] = row["autoenc"]["cpu_samples_per_s"] / row["plain"]["cpu_samples_per_s"]
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--data", default="fashion_mnist", help="data config (digits: embedded, offline)")
    p.add_argument("--data-root", default=os.environ.get("AUTOENC_DATA_DIR"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps before timing")
    p.add_argument("--block", type=int, default=50, help="steps of each path between switches")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # 1 by default: on a small shared CPU, OpenMP threads that wait on each other under other load
    # slowed a plain step ~45× (2 threads vs 1 on the 2-core machine of the README's table).
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, same in both paths")
    p.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile) in both paths")
    p.add_argument("--precision", default="32-true", help="trainer.precision, e.g. bf16-mixed")
    p.add_argument("--override", nargs="*", default=[], help="extra `autoenc train` overrides")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.warmup < 2:
        p.error("--warmup must be at least 2 (the clock starts at the end of a warm-up step)")

    import torch

    torch.set_num_threads(args.threads)
    env = {"device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
           "warmup": args.warmup, "block": args.block, "compile": args.compile,
           "precision": args.precision, "data": args.data}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    rows, first_step = {}, None
    for family in args.families:
        row = rows[family] = run_family(args, family)
        since_process_start = row.pop("since_process_start")
        first_step = first_step or since_process_start
        print(format_row(family, row), flush=True)
    # again as one block: the progress bars of the autoenc runs interleave with the lines above
    print("\n".join(format_row(f, r) for f, r in rows.items()))
    result = {"env": env, "families": rows}
    if first_step is not None:
        # command start to the first family's first training step (imports, compose, data, sanity check)
        result["process_to_first_step_s"] = first_step
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_row(family: str, row: dict) -> str:
    a, p = row["autoenc"], row["plain"]
    mem = (f"peak_cuda_mb {a['peak_cuda_mb']:6.0f} / {p['peak_cuda_mb']:6.0f}" if "peak_cuda_mb" in a
           else f"peak_rss_mb {row['peak_rss_mb']:6.0f} (both)")
    return (f"{family:<21} autoenc {a['samples_per_s']:9.0f}/s  plain {p['samples_per_s']:9.0f}/s"
            f"  ratio {row['ratio']:.3f} (cpu {row['ratio_cpu']:.3f})  {mem}"
            f"  startup {a['startup_s']:.2f}s / {p['startup_s']:.2f}s")


if __name__ == "__main__":
    sys.exit(main() and 0)
