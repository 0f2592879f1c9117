"""`autoenc <command> [hydra overrides]`: one Hydra app per command, heavy imports deferred."""

from __future__ import annotations

import atexit
import errno
import importlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from hydra.experimental.callback import Callback

from autoenc.errors import Interrupt
from autoenc.paths import CONFIGS, config_dirs

_ARGV0 = sys.argv[0]  # the program as started (the `autoenc` script or autoenc/__main__.py)


def commands() -> dict[str, Path]:
    """Each command's YAML, <configs>/command/<command>.yaml, from CONFIGS (which wins a clash), then
    AUTOENC_CONFIG_DIR: `train` first, then by name."""
    found: dict[str, Path] = {}
    for root in config_dirs():
        if not root.is_dir():
            _fail(f"AUTOENC_CONFIG_DIR={root} is not a directory; point it at a folder of configs (with command/)")
        for f in sorted((root / "command").glob("*.yaml")):
            found.setdefault(f.stem, f)
    return dict(sorted(found.items(), key=lambda item: (item[0] != "train", item[0])))


def function(path: str):
    """The function a command's `run: module:function` names, or a UserError saying it is not one."""
    from autoenc.errors import UserError

    module, _, name = str(path).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as e:
        if module != e.name and not module.startswith(f"{e.name}."):
            raise  # the module exists; something it imports is missing
        fn = None
    if not callable(fn):
        raise UserError(f"run={path} is not a function: name one as module:function")
    return fn


USAGE = """usage: autoenc <command> [key=value ...] [--help] [-m]

commands:
{commands}

Each command is a Hydra app: `autoenc <command> --help` lists its config groups and options,
`--cfg job` prints the composed config, and `-m` sweeps over comma-separated values:

  autoenc train model=vae data=fashion_mnist trainer.max_epochs=20
  autoenc train -m model=ae,sparse,vae model.latent_dim=2,8,32
  tensorboard --logdir outputs
"""


def _quiet_full_disk(args) -> None:
    """A full disk in a writer thread (TensorBoard's) is said once, by the main thread's write: no traceback."""
    if not (issubclass(args.exc_type, OSError) and getattr(args.exc_value, "errno", None) == errno.ENOSPC):
        threading.__excepthook__(args)


def _fail(message: str) -> None:
    print(f"autoenc: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _full_error() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 set before autoenc started)."""
    return os.environ.get("AUTOENC_USER_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def _task(command: str):
    """What Hydra runs for `command`: the function its config's `run` names; user mistakes become one line
    and exit code 2."""

    def task(cfg):
        from hydra.errors import InstantiationException
        from omegaconf.errors import OmegaConfBaseException

        from autoenc.errors import UserError
        from autoenc.schema import validate

        env = dict(os.environ)
        _relaunchable(command)
        Interrupt.signal, Interrupt.reported = None, False
        handlers = _catch_stop_signals()
        try:
            if "run" not in cfg:
                raise UserError(f"command/{command}.yaml names no function; add `run: module:function` to it")
            _refuse_added_keys(cfg, command)
            validate(cfg)
            if _in_sweep():
                _claim_job(cfg, command)
            set_threads(cfg.get("threads"))
            return _objective(cfg, function(cfg.run)(cfg))
        except (UserError, InstantiationException, OmegaConfBaseException) as e:
            if _full_error():
                raise
            if _in_sweep():
                return _job_failed(e)
            _release()
            _fail(str(e))
        except OSError as e:
            if e.errno != errno.ENOSPC or _full_error():
                raise
            _release()
            _fail(f"no space left on device writing {e.filename or 'the run directory'}; free some space or "
                  "point hydra.run.dir= at another disk")
        except KeyboardInterrupt:
            _interrupted(command)
        except SystemExit as e:  # Lightning ends a fit or test that a signal stopped with exit code 1
            if e.code == 1 and Interrupt.signal:
                _interrupted(command)
            raise
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            _release()
            _end_distributed(env)

    return task


def _catch_stop_signals() -> dict:
    """Ctrl-C and SIGTERM outside training (SafetyNet has its own handlers while a model trains) stop the
    command with one line and exit code 128 + the signal's number; returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _stopped) for s in (signal.SIGINT, signal.SIGTERM)}


def _stopped(signum, frame) -> None:
    Interrupt.signal = signum
    raise KeyboardInterrupt


def _interrupted(command: str) -> None:
    """A stop signal: one line saying what was saved (training's SafetyNet has said it already), exit code
    128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), so that a scheduler sees an interrupted job."""
    signum = Interrupt.signal or signal.SIGINT
    if not Interrupt.reported:
        _release()
        print(f"autoenc: interrupted: `autoenc {command}` stopped by {signal.Signals(signum).name} before it "
              "finished and wrote nothing more", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def _refuse_added_keys(cfg, command: str) -> None:
    """`+key=value` adds a top-level key the command's config lacks, so nothing would read it: refused.
    (`++key=value`, Hydra's force-add, is left alone; keys below the top are schema.validate's.)"""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.errors import UserError

    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    for override in HydraConfig.get().overrides.task:
        key = override[1:].split("=")[0]
        added = override.startswith("+") and not override.startswith("++")
        if added and "." not in key and "/" not in key and key not in choices:
            keys = ", ".join(k for k in cfg if k not in ("run", "about", key))
            raise UserError(f"{override}: `autoenc {command}` has no key {key}; its keys are: {keys}")


def set_threads(threads) -> None:
    """torch's intra-op threads for this command (`threads=`): a number; `auto`, OMP_NUM_THREADS if set,
    else half the cores this process may use, so that other load on the machine cannot stall threads
    that wait on each other (on 2 cores, 2 threads took 2× as long as 1 beside one busy core, and no
    less alone); null keeps torch's default of one per core."""
    from autoenc.errors import is_integer, require

    require(threads in (None, "auto") or (is_integer(threads) and threads >= 1), "threads", threads,
            "auto, null (torch's default) or a positive integer")
    if threads == "auto":
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2))
    if threads:
        import torch

        torch.set_num_threads(threads)


def _release() -> None:
    """Releases this job's run directory; one that a refused run created is removed with its empty parents."""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.rundir import release

    from omegaconf import OmegaConf

    out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None) if HydraConfig.initialized() else None
    if out:
        release(Path(out))


def _claim_job(cfg, command: str) -> None:
    """A sweep's job takes its own directory as a single run does (its lock and its checks)."""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.rundir import claim

    claim(Path(HydraConfig.get().runtime.output_dir), command=_command_line(command), ckpt_path=cfg.get("ckpt_path"),
          overwrite=bool(cfg.get("overwrite")), resume=bool(cfg.get("resume")), what="hydra.sweep.dir")


def _command_line(command: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    return " ".join([command, *HydraConfig.get().overrides.task]) if HydraConfig.initialized() else command


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(error: Exception) -> float:
    """A sweep's failed job: its error goes to the log and <job dir>/error.txt; the sweep goes on."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    from omegaconf import OmegaConf

    out = Path(HydraConfig.get().runtime.output_dir)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(HydraConfig.get().overrides.task, out / ".hydra" / "overrides.yaml")  # for the summary
    message = " ".join(str(error).split())
    (out / "error.txt").write_text(message + "\n")
    logging.getLogger("autoenc").error(f"job {HydraConfig.get().job.num} failed: {message} ({out / 'error.txt'})")
    return float("nan")  # what an Optuna search records as a failed trial


def _relaunchable(command: str) -> None:
    """Lets Lightning's DDP launcher, which re-runs `sys.argv` with `hydra.run.dir=<hydra.run.dir>`
    for each further rank, start this same job: `autoenc <command> <its overrides>` in its directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get()
    sys.argv = [_ARGV0, command, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def _end_distributed(env: dict[str, str]) -> None:
    """Closes this job's DDP process group and restores the environment Lightning's launcher
    changed (LOCAL_RANK, MASTER_PORT…), so that the next job of a sweep starts its own ranks."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


class RunDirectory(Callback):
    """A run (or sweep) directory belongs to one run (sweep), before Hydra writes into it: the default name
    (no hydra.run.dir=) is resolved once and, if another run holds it, becomes <name>_2, _3…; a resume
    (`ckpt_path=` a checkpoint of a run, no hydra.run.dir given) goes back into that run's directory; in a
    SLURM job the default is outputs/slurm/<job>_<model>_<data>, which a requeued job continues; a
    directory given by hand that another live run holds (its `.lock`) or that holds an earlier run is
    refused in one line, unless this resumes it or says `overwrite=true`. The lock is held until the end."""

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import read_write

        from autoenc.rundir import further_rank, run_dir_of
        from autoenc.slurm import restarted, slurm_job

        if further_rank():
            return
        HydraConfig.instance().set_config(config)  # the default name reads ${hydra:runtime.choices…}
        given = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        ckpt, resume = config.get("ckpt_path"), bool(config.get("resume"))
        out, default = Path(str(config.hydra.run.dir)), not given
        if ckpt and not given and run_dir_of(ckpt) is not None:
            out, default = run_dir_of(ckpt), False
        elif not given and slurm_job():
            choices = config.hydra.runtime.choices
            out = Path("outputs") / "slurm" / f"{slurm_job()}_{choices.model}_{choices.data}"
            if restarted():  # a requeued job: continue the run its first start began
                resume, default, config.resume = True, False, True
        elif resume and not given:
            _fail("resume=true continues the run in hydra.run.dir=: name that directory (or resume a checkpoint "
                  "with ckpt_path=…)")
        found = _claim(out, config, resume=resume, default=default, what="hydra.run.dir")
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(found.dir)

    def on_run_end(self, config, **kwargs) -> None:
        from autoenc.rundir import release_all

        release_all()

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, read_write

        HydraConfig.instance().set_config(config)
        given = any(o.startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        resume = bool(config.get("resume"))
        if resume and not given:
            _fail("resume=true continues the sweep in hydra.sweep.dir=: name that directory")
        out = Path(str(config.hydra.sweep.dir))
        if resume and (out / "multirun.yaml").is_file():
            ours = [o for o in config.hydra.overrides.task if not o.startswith(("resume=", "overwrite="))]
            before = [o for o in OmegaConf.load(out / "multirun.yaml").hydra.overrides.task
                      if not o.startswith(("resume=", "overwrite="))]
            if sorted(ours) != sorted(before):
                _fail(f"{out.absolute()} holds the sweep `{' '.join(before)}`; resume=true continues it only with the "
                      f"same overrides (these are `{' '.join(ours)}`); choose another hydra.sweep.dir= for a new sweep")
        found = _claim(out, config, resume=resume, default=not given, what="hydra.sweep.dir")
        found.accept()  # a replaced sweep goes now: its jobs are the new sweep's to write
        with read_write(config.hydra.sweep):
            config.hydra.sweep.dir = str(found.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        from autoenc.rundir import release_all

        release_all()


def _claim(out: Path, config, **how):
    """rundir.claim for a Hydra callback: a refusal is one line and exit code 2 (Hydra would turn a callback's
    exception into a warning and go on); the lock goes when the process ends, however it ends."""
    from autoenc.errors import UserError
    from autoenc.rundir import claim

    try:
        found = claim(out, command=" ".join(sys.argv[1:]), ckpt_path=config.get("ckpt_path"),
                      overwrite=bool(config.get("overwrite")), **how)
    except UserError as e:
        if _full_error():
            raise SystemExit(f"autoenc: error: {e}") from e
        _fail(str(e))
    atexit.register(found.release)
    return found


class SweepSummary(Callback):
    """After `-m`: one line per job (its optimized metric, or its error) and the search's best trial."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        root, name = Path(config.hydra.sweep.dir), config.get("optimized_metric")
        jobs = sorted((p for p in root.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
        saved = [job / ".hydra" / "overrides.yaml" for job in jobs]
        overrides = [list(OmegaConf.load(f)) if f.is_file() else [] for f in saved]
        common = set.intersection(*map(set, overrides)) if overrides else set()  # not repeated per job
        lines = [f"sweep summary ({root}):"]
        for job, own in zip(jobs, overrides):
            if (job / "error.txt").is_file():
                outcome = "FAILED: " + (job / "error.txt").read_text().strip()
            elif (job / "results.json").is_file():
                outcome = f"{name}={json.loads((job / 'results.json').read_text()).get(name)}"
            else:
                outcome = "no results.json"
            lines.append(f"  #{job.name} {' '.join(o for o in own if o not in common)}: {outcome}")
        best = root / "optimization_results.yaml"
        if best.is_file():
            found = OmegaConf.load(best)
            lines.append(f"best trial ({best}): {name}={found.get('best_value')} with "
                         + " ".join(f"{k}={v}" for k, v in found.get("best_params", {}).items()))
        print("\n".join(lines), flush=True)
        failed = [job.name for job in jobs if (job / "error.txt").is_file()]
        if failed:  # after every job has run: the sweep as a whole did not succeed
            print(f"autoenc: error: {len(failed)} of {len(jobs)} jobs failed (#{', #'.join(failed)}); "
                  f"see error.txt in each", file=sys.stderr, flush=True)
            sys.exit(1)


def _objective(cfg, results):
    """What a Hydra sweeper optimizes: the metric `optimized_metric` names (NaN if the run has none)."""
    name = cfg.get("optimized_metric")
    if not name or not isinstance(results, dict):
        return None
    if name not in results and _in_sweep():
        import logging

        logging.getLogger("autoenc").warning(f"optimized_metric={name} is not among this run's metrics: "
                                             f"{', '.join(sorted(results))}")
    return results.get(name, float("nan"))


def composition_error(error: Exception, command: str, overrides: list[str]) -> str:
    """The one line for a config that Hydra could not compose (an unknown option or key, a value it cannot
    parse), as the CLI prints it and the Python API raises it."""
    from hydra.errors import OverrideParseException

    if isinstance(error, OverrideParseException):
        bad = next((a for a in overrides if a in str(error)), str(error).splitlines()[0])
        key, _, value = bad.partition("=")
        return (f"cannot parse {bad!r}: a value with spaces or other special characters must be quoted for Hydra, "
                f"inside the shell's quotes: '{key}=\"{value}\"'")
    from autoenc.schema import misspelt

    message = str(error).split("Config search path")[0]
    key = re.match(r"Could not override '([\w.]+)'\.", message)  # Hydra's hint, to add it with `+`, would not help
    if key and "." not in key[1]:
        message = f"Could not override '{key[1]}': `autoenc {command}` has no key {key[1]}"
    elif key and (nearest := misspelt(f"command/{command}", overrides, key[1])):
        return nearest
    return " ".join(f"{message} (see `autoenc {command} --help`)".split())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from omegaconf import OmegaConf

    found = commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, found))
        about = {k: OmegaConf.load(f).get("about", "") for k, f in found.items()}
        print(USAGE.format(commands="\n".join(f"  {k:<{width}}  {d}" for k, d in about.items())))
        return
    command, rest = argv[0], argv[1:]
    if command not in found:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(found)}")
    if not found[command].read_text().startswith("# @package _global_"):
        _fail(f"{found[command]} must start with the line `# @package _global_`: it is the command's root config")
    import hydra

    from hydra.errors import HydraException

    threading.excepthook = _quiet_full_disk
    from omegaconf.errors import OmegaConfBaseException

    extra = [a for d in config_dirs()[1:] for a in ("--config-dir", str(d))]  # searched after CONFIGS
    sys.argv = [f"autoenc {command}", *extra, *rest]
    os.environ["AUTOENC_COMMAND"] = command  # the name tool.yaml's help shows
    # Hydra then raises composition errors (unknown option or key, bad override) to us, and we
    # print them as one line; the user's own HYDRA_FULL_ERROR=1 still gets the traceback.
    os.environ.setdefault("AUTOENC_USER_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from autoenc.errors import UserError

    try:
        hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=f"command/{command}")(_task(command))()
    except UserError as e:  # raised before the job started (the run directory's checks)
        if _full_error():
            raise
        _fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        if _full_error():
            raise
        _fail(composition_error(e, command, rest))


if __name__ == "__main__":
    main()
