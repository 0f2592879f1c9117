"""Hydra callbacks of `autoenc train`: a run (or sweep) directory belongs to one run, and a sweep ends with a
summary of its jobs."""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from autoenc.util.errors import fail, full_error


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

        from autoenc.training.rundir import further_rank, run_dir_of
        from autoenc.util.slurm import restarted, slurm_job

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
            fail("resume=true continues the run in hydra.run.dir=: name that directory (or resume a checkpoint "
                  "with ckpt_path=…)")
        found = _claim(out, config, resume=resume, default=default, what="hydra.run.dir")
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(found.dir)

    def on_run_end(self, config, **kwargs) -> None:
        from autoenc.training.rundir import release_all

        release_all()

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, read_write

        HydraConfig.instance().set_config(config)
        given = any(o.startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        resume = bool(config.get("resume"))
        if resume and not given:
            fail("resume=true continues the sweep in hydra.sweep.dir=: name that directory")
        out = Path(str(config.hydra.sweep.dir))
        if resume and (out / "multirun.yaml").is_file():
            ours = [o for o in config.hydra.overrides.task if not o.startswith(("resume=", "overwrite="))]
            before = [o for o in OmegaConf.load(out / "multirun.yaml").hydra.overrides.task
                      if not o.startswith(("resume=", "overwrite="))]
            if sorted(ours) != sorted(before):
                fail(f"{out.absolute()} holds the sweep `{' '.join(before)}`; resume=true continues it only with the "
                      f"same overrides (these are `{' '.join(ours)}`); choose another hydra.sweep.dir= for a new sweep")
        found = _claim(out, config, resume=resume, default=not given, what="hydra.sweep.dir")
        found.keep(found.dir / "multirun.yaml")  # Hydra writes it before any job is checked
        with read_write(config.hydra):
            config.hydra.sweep.dir = str(found.dir)
            # each job's config is composed anew from these overrides: it must name the directory taken here
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{found.dir}'")

    def on_multirun_end(self, config, **kwargs) -> None:
        from autoenc.training.rundir import claimed, release_all

        sweep = claimed(config.hydra.sweep.dir)
        if sweep is not None and not sweep.accepted:  # jobs run by another process (a SLURM launcher) began
            begun = [d for d in sweep.dir.glob("[0-9]*") if (d / ".hydra" / "config.yaml").is_file()
                     and (d / ".hydra" / "config.yaml").stat().st_mtime >= sweep.since]
            if begun:
                sweep.accept()
        release_all()


def _claim(out: Path, config, **how):
    """rundir.claim for a Hydra callback: a refusal is one line and exit code 2 (Hydra would turn a callback's
    exception into a warning and go on); the lock goes when the process ends, however it ends."""
    from autoenc.util.errors import UserError
    from autoenc.training.rundir import claim

    try:
        found = claim(out, command=" ".join(sys.argv[1:]), ckpt_path=config.get("ckpt_path"),
                      overwrite=bool(config.get("overwrite")), **how)
    except UserError as e:
        if full_error():
            raise SystemExit(f"autoenc: error: {e}") from e
        fail(str(e))
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
