"""Training throughput of autoenc's real path against a hand-written PyTorch loop, per family.

    python scripts/benchmark.py --data-root ../shared/data --out bench.json
    python scripts/benchmark.py --device cuda --precision bf16-mixed --compile

Each family is trained twice per repeat in this process, interleaved: once as `autoenc train`
builds it (Hydra compose over the project's configs → autoenc.train.build → Lightning Trainer,
with its logger, progress bar and callbacks), once as a plain loop (forward, loss, backward,
step) over the same network, batch size, optimizer and device-resident data. Samples/s are
timed over `--steps` steps after `--warmup` steps; the best repeat of each path is reported.
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


def elapsed(times: dict, args) -> dict:
    """Wall and process CPU seconds of the timed steps (CPU time is less sensitive to other load)."""
    (w0, c0), (w1, c1) = times[args.warmup], times[args.warmup + args.steps]
    return {"seconds": w1 - w0, "cpu_seconds": c1 - c0}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_autoenc(args, family: str) -> dict:
    """Fits through Lightning as `autoenc train` does; times steps [warmup, warmup+steps)."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from autoenc.train import build, quiet_lightning

    times = {}

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step  # optimizer steps done so far
            if step in (1, args.warmup, args.warmup + args.steps):
                sync(args.device)
                times[step] = time.perf_counter(), time.process_time()
                times.setdefault("since_process_start", process_age())

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, PeakRSS() as mem:
        cfg = compose(args, family, out)
        quiet_lightning()
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule, model = build(cfg)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + [Clock()]
        loggers = [instantiate(c) for c in cfg.logger.values() if c] if cfg.logger else False
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
        trainer.fit(model, datamodule=datamodule)
    return {**elapsed(times, args), "peak_rss": mem.peak, "startup_s": times[1][0] - t0, "since_process_start": times["since_process_start"], "cfg": cfg}


def run_plain(args, cfg) -> dict:
    """A hand-written loop over the same network, optimizer, batch size and device-resident data."""
    import torch

    from autoenc.train import build

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        torch.manual_seed(cfg.seed)
        datamodule, model = build(cfg)
        model.to(args.device)
        enc, dec, penalty, nll, noise = model.encoder, model.decoder, model.penalty, model.likelihood.nll, model.noise
        vae = model.head_mult == 2
        opt = model.optimizer_factory(model.parameters())
        x_all = datamodule.splits["train"][0].to(args.device)  # stored as uint8 or float, like autoenc
        order = torch.randperm(len(x_all), device=args.device)
        g = torch.Generator(device=args.device).manual_seed(0)
        autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
        times = {}
        for step in range(1, args.warmup + args.steps + 1):
            start = (step - 1) * args.batch_size % (len(x_all) - args.batch_size + 1)
            x = x_all[order[start:start + args.batch_size]]
            x = x.float().div_(255) if x.dtype == torch.uint8 else x
            x_tilde = noise(x, g) if noise is not None else x
            with autocast:
                h = enc(x_tilde)
                if vae:
                    mean, logvar = h.chunk(2, dim=1)
                    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
                    extra = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).sum(1).mean()
                else:
                    z, extra = penalty.code(h), 0.0
                loss = nll(dec(z).float(), x).mean() + penalty(z, x_tilde, enc)[0] + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in (1, args.warmup, args.warmup + args.steps):
                sync(args.device)
                times[step] = time.perf_counter(), time.process_time()
    return {**elapsed(times, args), "peak_rss": mem.peak, "startup_s": times[1][0] - t0}


def peak_cuda(fn, *a) -> dict:
    """Runs fn and replaces its peak memory by torch.cuda.max_memory_allocated on a GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = fn(*a)
    if torch.cuda.is_available():
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--data", default="fashion_mnist", help="data config (digits: embedded, offline)")
    p.add_argument("--data-root", default=os.environ.get("AUTOENC_DATA_DIR"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each path; best kept")
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
           "warmup": args.warmup, "repeats": args.repeats, "compile": args.compile,
           "precision": args.precision, "data": args.data}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    rows, first_step = {}, None
    for family in args.families:
        runs = {"autoenc": [], "plain": []}
        for _ in range(args.repeats):
            a = peak_cuda(run_autoenc, args, family)
            first_step = first_step or a.pop("since_process_start")
            runs["autoenc"].append(a)
            runs["plain"].append(peak_cuda(run_plain, args, a.pop("cfg")))
        row = {}
        for path, rs in runs.items():
            best = min(rs, key=lambda r: r["seconds"])
            row[path] = {"samples_per_s": args.batch_size * args.steps / best["seconds"],
                         "all_samples_per_s": [args.batch_size * args.steps / r["seconds"] for r in rs],
                         "cpu_samples_per_s": args.batch_size * args.steps / min(r["cpu_seconds"] for r in rs),
                         "peak_rss_mb": max(r["peak_rss"] for r in rs) / 2**20,
                         "startup_s": min(r["startup_s"] for r in rs)}
            if "peak_cuda" in best:
                row[path]["peak_cuda_mb"] = max(r["peak_cuda"] for r in rs) / 2**20
        row["ratio"] = row["autoenc"]["samples_per_s"] / row["plain"]["samples_per_s"]
        row["ratio_cpu"] = row["autoenc"]["cpu_samples_per_s"] / row["plain"]["cpu_samples_per_s"]
        rows[family] = row
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
    mem = "peak_cuda_mb" if "peak_cuda_mb" in row["autoenc"] else "peak_rss_mb"
    return (f"{family:<21} autoenc {row['autoenc']['samples_per_s']:9.0f}/s  plain {row['plain']['samples_per_s']:9.0f}/s"
            f"  ratio {row['ratio']:.3f} (cpu {row['ratio_cpu']:.3f})  {mem} {row['autoenc'][mem]:7.0f} / {row['plain'][mem]:7.0f}"
            f"  startup {row['autoenc']['startup_s']:.2f}s / {row['plain']['startup_s']:.2f}s")


if __name__ == "__main__":
    sys.exit(main() and 0)
