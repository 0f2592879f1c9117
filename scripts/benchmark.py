"""Training throughput of autoenc against a hand-written PyTorch loop and Lightning's own floor, per family.

    python scripts/benchmark.py --data-root ../shared/data --out bench.json
    python scripts/benchmark.py --device cuda --precision bf16-mixed --compile loss
    python scripts/benchmark.py --families --workloads conv_vae_64 topk_sae_4096 --steps 6 --warmup 2 --block 3

Each family is trained in this process three ways over the same network, optimizer, batch size and
device-resident data: as `autoenc train` builds it (the Trainer from autoenc.training.runs.make_trainer with
its logger, progress bar, checkpointing and callbacks, at default settings); as Lightning's floor (a
minimal LightningModule whose training_step is the plain loop's loss, automatic optimization, no
logger, bar or checkpoint); and as a plain loop (forward, loss, backward, step). Each Lightning path
alternates with the plain loop in blocks of `--block` steps, so that both see whatever else the machine
is doing. Per path: samples/s, the ratio to the plain loop, and the per-step overhead
(1/path − 1/plain) · batch in µs, over all blocks and as the median over blocks (which a preemption
landing in one block does not move).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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
# name: (`autoenc train` overrides, batch size, the generated data: shape and dtype) of the workloads a GPU is for
WORKLOADS = {
    # PyTorch-VAE's VanillaVAE shape on CelebA's 64 × 64 × 3 (data=celeba when it is under the data root)
    "conv_vae_64": (["model=vae", "net=conv", "net.channels=[32,64,128,256,512]", "net.norm=BatchNorm2d",
                     "net.activation=LeakyReLU", "model.latent_dim=128"], 128, ((128 * 40, 3, 64, 64), "uint8")),
    # Gao et al.'s top-k sparse autoencoder: 4,096-d activations, 32,768 units, k = 32
    "topk_sae_4096": (["net=sae", "bottleneck=topk", "bottleneck.k=32", "penalty=none", "likelihood=mse",
                       "model.latent_dim=32768"], 4096, ((4096 * 4, 4096), "float32")),
}
RUNS = {**FAMILIES, **{name: w[0] for name, w in WORKLOADS.items()}}
PATHS = ("autoenc", "floor", "tuned")


def paths(args) -> tuple[str, ...]:
    """The paths timed beside the user's plain loop: autoenc, Lightning's floor and (unless --no-tuned) the
    hand-tuned loop."""
    return PATHS[:2] if args.no_tuned else PATHS
# --ablation: what each part of autoenc's default path costs per step (each variant turns one part off)
CHECKPOINTS_OFF = ["callbacks.checkpoint=null", "callbacks.step_checkpoint=null",
                   "+trainer.enable_checkpointing=false"]
VARIANTS = {
    "default": [],
    "no progress bar": ["trainer.enable_progress_bar=false"],
    "no TensorBoard logger": ["logger=none"],
    "no checkpoints": CHECKPOINTS_OFF,
    "no pictures callback": ["callbacks.pictures=null"],
    "no non-finite/Ctrl-C callback": ["callbacks.safety=null"],
    "constant learning rate": ["model.scheduler=null"],
    "no model summary callback": ["trainer.enable_model_summary=false"],
    # what two defaults buy, set back to their former values
    "step scalars every 10 steps (was)": ["trainer.log_every_n_steps=10"],
    "bar redrawn every 10 steps (was)": ["callbacks.progress._target_=lightning.pytorch.callbacks.TQDMProgressBar",
                                         "~callbacks.progress.refresh_interval", "+callbacks.progress.refresh_rate=10"],
    "all of these off": ["trainer.enable_progress_bar=false", "logger=none", *CHECKPOINTS_OFF, "callbacks.pictures=null",
                         "callbacks.safety=null", "model.scheduler=null", "trainer.enable_model_summary=false"],
}


COUNTED = 5  # steps after the timed ones whose Python calls are counted


ORIGINS = ("lightning", "autoenc", "torch", "other", "C")  # the package of a counted call's code


class CallCounter:
    """Python and C function calls made between start() and stop() (sys.setprofile), in all and by the package
    of the called code (ORIGINS; lightning_utilities counts as Lightning): a per-step cost that timing noise
    cannot blur."""

    def start(self) -> None:
        self.n, self.by_origin = 0, dict.fromkeys(ORIGINS, 0)
        sys.setprofile(self._count)

    def _count(self, frame, event, arg) -> None:
        if event == "c_call":
            self.n += 1
            self.by_origin["C"] += 1
        elif event == "call":
            self.n += 1
            package = frame.f_globals.get("__name__", "").split(".")[0].replace("lightning_utilities", "lightning")
            self.by_origin[package if package in ORIGINS[:3] else "other"] += 1

    def stop(self) -> int:
        sys.setprofile(None)
        return self.n


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

    from autoenc.util.paths import CONFIGS

    overrides = [f"data={args.data}", f"data.batch_size={args.batch_size}", *RUNS[family],
                 f"trainer.max_steps={args.warmup + args.steps + COUNTED}", f"trainer.precision={args.precision}",
                 f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"model.compile={args.compile or 'null'}", f"paths.output_dir={out_dir}", "eval.iwae_samples=0",
                 *([f"data.root={args.data_root}"] if args.data_root and args.data not in ("digits", "array") else []),
                 *args.override]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_loss(model, x, g):
    """The training loss of the plain nn.Module (autoenc.model.core.Autoencoder), as a hand-written loop uses it."""
    x = x if x.is_floating_point() else x.float().div_(255)
    return model.autoencoder(x, model.autoencoder.corrupt(x, g)).loss


class PlainLoop:
    """A hand-written loop over the same network, optimizer, batch size and device-resident data: as a user
    writes it (the optimizer's defaults, eager), or `tuned` (the fused optimizer, the whole step compiled)."""

    def __init__(self, args, cfg, tuned: bool = False):
        import torch

        from omegaconf import open_dict

        from autoenc.training.runs import build

        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.model.compile = None  # a user's loop is eager; the tuned one compiles its whole step itself
        torch.manual_seed(cfg.seed)
        datamodule, model, _ = build(cfg)
        self.args, self.model = args, model.to(args.device)
        self.opt = model.optimizer_factory(model.parameters(), **({"fused": True} if tuned else {}))
        self.step = torch.compile(self.one_step) if tuned else self.one_step
        x = datamodule.splits["train"][0]  # stored as uint8 or float, like autoenc; Rows read whole
        self.x_all = (x if isinstance(x, torch.Tensor) else x[torch.arange(len(x))]).to(args.device)
        self.order = torch.randperm(len(self.x_all), device=args.device)
        self.g = torch.Generator(device=args.device).manual_seed(0)
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
        self.done = 0

    def run(self, steps: int) -> tuple[float, float]:
        """Trains `steps` steps; returns their wall and process CPU seconds."""
        b = self.args.batch_size
        sync(self.args.device)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            start = self.done * b % (len(self.x_all) - b + 1)
            self.done += 1
            self.step(self.x_all[self.order[start:start + b]])
        sync(self.args.device)
        return time.perf_counter() - w0, time.process_time() - c0

    def one_step(self, x) -> None:
        with self.autocast:
            loss = plain_loss(self.model, x, self.g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def floor_module(model, g):
    """Lightning's floor: a LightningModule that only computes the plain loop's loss (automatic optimization)."""
    import lightning.pytorch as pl

    class Floor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return plain_loss(self.net, batch[0], g)

        def configure_optimizers(self):
            return self.net.optimizer_factory(self.net.parameters())

    return Floor()


def alternate(args, plain, totals: dict, path: str):
    """A callback that times the Trainer's steps in blocks and runs as many plain-loop steps after each.
    Validation and what follows it (checkpoint, pictures) until the next step are left out of the
    blocks and timed apart, as `epoch_end_s`: the steps of both paths are what is compared. After the
    timed steps, the Python calls of each of COUNTED whole steps are counted (steps with a validation
    left out)."""
    import lightning.pytorch as pl

    counter = CallCounter()

    class Alternate(pl.Callback):
        clock = paused = None
        validated = False

        def on_validation_start(self, trainer, pl_module):
            self.validated = True
            if self.clock is not None and not trainer.sanity_checking:
                self.paused = time.perf_counter(), time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.paused is not None:  # shift the block's start past the validation
                wall, cpu = time.perf_counter() - self.paused[0], time.process_time() - self.paused[1]
                self.clock = self.clock[0], self.clock[1] + wall, self.clock[2] + cpu
                totals[f"epoch_end_{path}"] = totals.get(f"epoch_end_{path}", []) + [wall]
                self.paused = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step  # optimizer steps done so far
            timed = args.warmup + args.steps
            if step > timed:
                calls = counter.stop()
                if not self.validated:
                    totals.setdefault(f"calls_{path}", []).append(calls)
                    totals.setdefault(f"origins_{path}", []).append(counter.by_origin)
                self.validated = False
                if step < timed + COUNTED:
                    counter.start()
                return
            if self.clock is None:
                totals.setdefault("first_step", (time.perf_counter(), process_age()))
                if step < args.warmup:
                    return
                plain.run(args.warmup)
            else:
                sync(args.device)
                n = step - self.clock[0]
                if n < args.block and step < args.warmup + args.steps:
                    return
                spent = time.perf_counter() - self.clock[1], time.process_time() - self.clock[2]
                record_block(totals, path, n, spent, plain.run(n))
            sync(args.device)
            self.clock = step, time.perf_counter(), time.process_time()
            if step == timed:
                self.validated = False
                counter.start()

    return Alternate()


def record_block(totals: dict, path: str, n: int, timed: tuple[float, float], plain: tuple[float, float]) -> None:
    """Adds a block of n steps of `path` and the user's loop beside it (wall and CPU seconds of each)."""
    for key, value in ((path, timed), (f"plain_{path}", plain)):
        totals[key] = [a + b for a, b in zip(totals.get(key, (0.0, 0.0)), value)]
    totals[f"steps_{path}"] = totals.get(f"steps_{path}", 0) + n
    totals.setdefault(f"blocks_{path}", []).append((timed[0], plain[0], n))


def run_path(args, family: str, path: str) -> dict:
    """One path of a family (`autoenc`, Lightning's `floor` or the `tuned` loop), alternating with the user's plain
    loop, in this process."""
    import lightning.pytorch as pl
    import torch

    from autoenc.training.runs import build, configure_lightning, make_trainer, skip_failing_gpu_probe

    torch.set_num_threads(args.threads)
    skip_failing_gpu_probe()
    totals: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, PeakRSS() as mem:
        cfg = compose(args, family, out)
        plain_t0 = time.perf_counter()
        plain = PlainLoop(args, cfg)
        totals["plain_startup"] = time.perf_counter() - plain_t0 + plain.run(1)[0]
        counter = CallCounter()
        counter.start()
        plain.run(COUNTED)
        totals["plain_calls"] = counter.stop() / COUNTED
        t1 = time.perf_counter()
        configure_lightning()
        pl.seed_everything(cfg.seed, verbose=False)
        if path == "tuned":  # the hand-tuned loop, in blocks alternating with the user's loop
            tuned = PlainLoop(args, cfg, tuned=True)
            t2 = time.perf_counter()
            tuned.run(args.warmup)  # (includes the compilation)
            plain.run(args.warmup)
            totals["first_step"] = (time.perf_counter(), process_age())
            totals["tuned_compile_s"] = time.perf_counter() - t2
            for done in range(0, args.steps, args.block):
                n = min(args.block, args.steps - done)
                record_block(totals, path, n, tuned.run(n), plain.run(n))
        elif path == "autoenc":
            datamodule, model, _ = build(cfg)
            make_trainer(cfg, alternate(args, plain, totals, path)).fit(model, datamodule=datamodule)
            totals["startup"] = (plain_t0 - t0) + totals["first_step"][0] - t1
        else:
            datamodule, model, _ = build(cfg)
            g = torch.Generator(device=args.device).manual_seed(1)
            floor = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                               precision=args.precision, max_steps=args.warmup + args.steps + COUNTED, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                               num_sanity_val_steps=0, limit_val_batches=0, callbacks=[alternate(args, plain, totals, path)])
            floor.fit(floor_module(model, g), train_dataloaders=datamodule.train_dataloader())
    totals["peak_rss"] = mem.peak
    return totals


def run_family(args, family: str) -> dict:
    """Fits the autoenc path and the floor path, each in a fresh process of its own alternating with its own
    plain loop, so that neither path's plain loop runs in a process the other path has already used (run
    one after the other in one process, the second one's plain loop ran slower: see the README)."""
    import multiprocessing

    totals: dict = {}
    for path in paths(args):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            part = pool.apply(run_path, (args, family, path))
        for key in ("plain_startup", "plain_calls", "peak_rss", "first_step"):
            part[f"{key}_{path}"] = part.pop(key)
        totals |= part
    mem_peak = max(totals[f"peak_rss_{path}"] for path in paths(args))
    row = {"steps": totals["steps_autoenc"], "peak_rss_mb": mem_peak / 2**20}
    for path in paths(args):
        n = totals[f"steps_{path}"] * args.batch_size
        (wall, cpu), (pwall, pcpu) = totals[path], totals[f"plain_{path}"]
        row[path] = {"samples_per_s": n / wall, "cpu_samples_per_s": n / cpu, "plain_samples_per_s": n / pwall,
                     "ratio": pwall / wall, "ratio_cpu": pcpu / cpu,
                     "overhead_us": 1e6 * (wall - pwall) / totals[f"steps_{path}"]}
        # the median over blocks: a preemption that lands in one block moves the mean, not the median
        blocks = totals[f"blocks_{path}"]
        row[path]["ratio_median"] = statistics.median(pw / w for w, pw, _ in blocks)
        row[path]["overhead_us_median"] = statistics.median(1e6 * (w - pw) / k for w, pw, k in blocks)
        row[path]["blocks"] = len(blocks)
        calls = totals.get(f"calls_{path}")  # absent if every counted step held a validation
        # the median step (the lower one of an even count), and how its calls split by package
        middle = sorted(range(len(calls)), key=calls.__getitem__)[(len(calls) - 1) // 2] if calls else None
        row[path]["calls_per_step"] = None if middle is None else calls[middle]
        row[path]["calls_by_origin"] = None if middle is None else totals[f"origins_{path}"][middle]
    row["plain"] = {"samples_per_s": row["autoenc"]["plain_samples_per_s"],
                    "samples_per_s_floor_phase": row["floor"]["plain_samples_per_s"],
                    "startup_s": totals["plain_startup_autoenc"], "calls_per_step": totals["plain_calls_autoenc"]}
    row["autoenc"]["startup_s"] = totals["startup"]  # compose, build and fit up to the end of the first step
    if totals.get("epoch_end_autoenc"):  # validation, checkpoint and pictures: once an epoch, not per step
        row["autoenc"]["epoch_end_s"] = sum(totals["epoch_end_autoenc"]) / len(totals["epoch_end_autoenc"])
    row["since_process_start"] = totals["first_step_autoenc"][1]
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--workloads", nargs="*", default=[], choices=list(WORKLOADS),
                   help="models a GPU is for, each at its own batch size on generated data (conv_vae_64: CelebA if present)")
    p.add_argument("--data", default="fashion_mnist", help="data config (digits: embedded, offline)")
    p.add_argument("--data-root", default=os.environ.get("AUTOENC_DATA_DIR"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps before timing")
    p.add_argument("--block", type=int, default=50, help="steps of each path between switches")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, same in every path")
    p.add_argument("--compile", choices=["nets", "loss"], default=None,
                   help="model.compile= for autoenc's path and Lightning's floor (the user's loop stays eager)")
    p.add_argument("--precision", default="32-true", help="trainer.precision, e.g. bf16-mixed")
    p.add_argument("--override", nargs="*", default=[], help="extra `autoenc train` overrides")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-tuned", action="store_true",
                   help="leave out the hand-tuned loop (fused optimizer, compiled step) and its compilation")
    p.add_argument("--ablation", action="store_true",
                   help="for each family, also each variant with one part of the default path off")
    args = p.parse_args(argv)
    if args.warmup < 2:
        p.error("--warmup must be at least 2 (the clock starts at the end of a warm-up step)")

    import torch

    torch.set_num_threads(args.threads)
    env = {"device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
           "warmup": args.warmup, "block": args.block, "compile": args.compile,
           "precision": args.precision, "data": args.data, "override": args.override}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    rows, first_step, base = {}, None, list(args.override)
    runs = [(f, v) for f in args.families for v in (VARIANTS if args.ablation else ["default"])]
    runs += [(w, "default") for w in args.workloads]
    data, batch_size = args.data, args.batch_size
    with tempfile.TemporaryDirectory() as generated:
        for family, variant in runs:
            args.override = [*base, *VARIANTS[variant]]
            if family in WORKLOADS:
                args.batch_size, args.data, path = WORKLOADS[family][1], *workload_data(args, family, Path(generated))
                args.override += [f"data.path={path}"] if path else []
            name = family if variant == "default" else f"{family}, {variant}"
            row = rows[name] = {"batch_size": args.batch_size, "data": args.data, **run_family(args, family)}
            args.data, args.batch_size = data, batch_size
            since_process_start = row.pop("since_process_start")
            first_step = first_step or since_process_start
            print(format_row(name, row), flush=True)
    # again as one block: the progress bars of the autoenc runs interleave with the lines above
    print("\n".join(format_row(f, r) for f, r in rows.items()))
    result = {"env": env, "families": rows, "process_to_first_step_s": first_step}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def workload_data(args, name: str, folder: Path) -> tuple[str, Path | None]:
    """The data config of a workload: celeba where the data root has it (conv_vae_64), else a generated
    .npy of the workload's shape (uint8 pixels uniform in [0, 255], or standard normal floats)."""
    import numpy as np

    if name == "conv_vae_64" and args.data_root and (Path(args.data_root) / "celeba" / "list_attr_celeba.txt").is_file():
        return "celeba", None
    shape, dtype = WORKLOADS[name][2]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8) if dtype == "uint8" else rng.standard_normal(shape, dtype=np.float32)
    np.save(folder / f"{name}.npy", x)
    return "array", folder / f"{name}.npy"


def format_row(family: str, row: dict) -> str:
    a, f, tuned = row["autoenc"], row["floor"], row.get("tuned")
    versus = "" if tuned is None else (
        f"  |  tuned loop (fused, compiled) ratio {tuned['ratio']:.3f} (median {tuned['ratio_median']:.3f}); "
        f"autoenc / tuned {a['ratio'] / tuned['ratio']:.3f}")
    return (f"{family:<40} plain {row['plain']['samples_per_s']:8.0f}/s  autoenc {a['samples_per_s']:8.0f}/s "
            f"ratio {a['ratio']:.3f} (median of blocks {a['ratio_median']:.3f}), to its first step {a['startup_s']:.1f} s{versus}  |  autoenc overhead {a['overhead_us']:6.0f} µs (median of blocks {a['overhead_us_median']:5.0f})  "
            f"|  Lightning floor ratio {f['ratio']:.3f} (plain beside it {row['plain']['samples_per_s_floor_phase']:.0f}/s) "
            f"overhead {f['overhead_us']:6.0f} µs (median "
            f"{f['overhead_us_median']:5.0f})  |  Python calls per step: plain {row['plain']['calls_per_step']:.0f}, "
            f"floor {f['calls_per_step'] or 0:.0f}, autoenc {a['calls_per_step'] or 0:.0f}{origins(f, a)}  |  "
            f"peak_rss_mb {row['peak_rss_mb']:5.0f}")


def origins(floor: dict, autoenc: dict) -> str:
    """The counted calls of a step by where their code lives, floor → autoenc."""
    if not floor.get("calls_by_origin") or not autoenc.get("calls_by_origin"):
        return ""
    return " (" + ", ".join(f"{o} {floor['calls_by_origin'][o]:.0f} → {autoenc['calls_by_origin'][o]:.0f}"
                            for o in ORIGINS) + ")"


if __name__ == "__main__":
    sys.exit(main() and 0)
