"""`autoenc <command> [hydra overrides]`: one Hydra app per command, heavy imports deferred."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path

from autoenc.app.compose import run
from autoenc.app.schema import composition_error
from autoenc.util.errors import Interrupt, fail, full_error
from autoenc.util.paths import CONFIGS, config_dirs

_ARGV0 = sys.argv[0]  # the program as started (the `autoenc` script or autoenc/__main__.py)


def commands() -> dict[str, Path]:
    """Each command's YAML, <configs>/command/<command>.yaml, from CONFIGS (which wins a clash), then
    AUTOENC_CONFIG_DIR: `train` first, then by name."""
    found: dict[str, Path] = {}
    for root in config_dirs():
        if not root.is_dir():
            fail(f"AUTOENC_CONFIG_DIR={root} is not a directory; point it at a folder of configs (with command/)")
        for f in sorted((root / "command").glob("*.yaml")):
            found.setdefault(f.stem, f)
    return dict(sorted(found.items(), key=lambda item: (item[0] != "train", item[0])))


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


def _task(command: str):
    """What Hydra runs for `command`: the function its config's `run` names; user mistakes become one line
    and exit code 2."""

    def task(cfg):
        from hydra.errors import InstantiationException
        from omegaconf.errors import OmegaConfBaseException

        from autoenc.util.errors import UserError
        from autoenc.app.schema import validate

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
            return _objective(cfg, run(cfg))
        except (UserError, InstantiationException, OmegaConfBaseException) as e:
            if full_error():
                raise
            if _in_sweep():
                return _job_failed(e)
            fail(str(e))  # the run directory is released below: one that a refused run made goes
        except OSError as e:
            if e.errno != errno.ENOSPC or full_error():
                raise
            fail(f"no space left on device writing {e.filename or 'the run directory'}; free some space or "
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
    from autoenc.util.slurm import slurm_job

    if threading.current_thread() is not threading.main_thread():
        return {}
    stops = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if slurm_job() else ())
    return {s: signal.signal(s, _stopped) for s in stops}


def _stopped(signum, frame) -> None:
    Interrupt.signal = signum
    raise KeyboardInterrupt


def _interrupted(command: str) -> None:
    """A stop signal: one line saying what was saved (training's SafetyNet has said it already), exit code
    128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), so that a scheduler sees an interrupted job."""
    signum = Interrupt.signal or signal.SIGINT
    if not Interrupt.reported:
        print(f"autoenc: interrupted: `autoenc {command}` stopped by {signal.Signals(signum).name} before it "
              "finished and wrote nothing more", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def _refuse_added_keys(cfg, command: str) -> None:
    """`+key=value` adds a top-level key the command's config lacks, so nothing would read it: refused.
    (`++key=value`, Hydra's force-add, is left alone; keys below the top are schema.validate's.)"""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.util.errors import UserError

    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    for override in HydraConfig.get().overrides.task:
        key = override[1:].split("=")[0]
        added = override.startswith("+") and not override.startswith("++")
        if added and "." not in key and "/" not in key and key not in choices:
            keys = ", ".join(k for k in cfg if k not in ("run", "about", key))
            raise UserError(f"{override}: `autoenc {command}` has no key {key}; its keys are: {keys}")


def _release() -> None:
    """Releases this job's run directory; one that a refused run created is removed with its empty parents."""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.training.rundir import release

    from omegaconf import OmegaConf

    out = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None) if HydraConfig.initialized() else None
    if out:
        release(Path(out))


def _claim_job(cfg, command: str) -> None:
    """A sweep's job takes its own directory as a single run does (its lock and its checks); its further
    distributed ranks write into rank 0's."""
    from hydra.core.hydra_config import HydraConfig

    from autoenc.training.rundir import claim, further_rank

    if further_rank():
        return
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

    from autoenc.training.rundir import Taken

    out = Path(HydraConfig.get().runtime.output_dir)
    if isinstance(error, Taken):  # another run's directory: nothing is written into it
        logging.getLogger("autoenc").error(f"job {HydraConfig.get().job.num} failed: {' '.join(str(error).split())}")
        return float("nan")
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
        fail(f"unknown command {command!r}; choose one of: {', '.join(found)}")
    if not found[command].read_text().startswith("# @package _global_"):
        fail(f"{found[command]} must start with the line `# @package _global_`: it is the command's root config")
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
    from autoenc.training.rundir import release_all
    from autoenc.util.errors import UserError

    try:
        hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=f"command/{command}")(_task(command))()
    except UserError as e:  # raised before the job started (the run directory's checks)
        if full_error():
            raise
        release_all()
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        if full_error():
            raise
        release_all()  # a sweep refused before its first job leaves nothing (its multirun.yaml put back)
        fail(composition_error(e, command, rest))


if __name__ == "__main__":
    main()
