"""A run directory belongs to one run: taken with an exclusive lock, refused (or, for a default name,
skipped) when another run holds it, and left untouched until the run is accepted to start."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from autoenc.util.errors import UserError

# What autoenc writes into a run or sweep directory: all that overwrite=true removes (a user's own files stay).
WRITTEN = (".hydra", "checkpoints", "commands", "results.json", "evaluation.json", "hparams.yaml", "error.txt",
           "multirun.yaml", "optimization_results.yaml", "mlflow.db", "mlflow-artifacts", "wandb", "csv", ".submitit",
           "*.png", "*.log", "events.out.tfevents.*", "[0-9]*")


def where(path) -> Path:
    """An absolute path with `~` expanded and `..` collapsed, as Hydra names its output directory."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def run_dir_of(ckpt) -> Path | None:
    """The run directory a checkpoint belongs to: the nearest folder above it that holds a run's .hydra/."""
    return next((d for d in where(ckpt).parents if (d / ".hydra").is_dir()), None)


def earlier_run(out: Path) -> list[str]:
    """What in `out` belongs to an earlier run: its results, checkpoints, or a sweep's record."""
    return [name for name, there in (("results.json", (out / "results.json").is_file()),
                                     ("checkpoints", any((out / "checkpoints").glob("*.ckpt"))),
                                     ("multirun.yaml", (out / "multirun.yaml").is_file()),
                                     ("optimization_results.yaml", (out / "optimization_results.yaml").is_file()))
            if there]


class Taken(UserError):
    """The directory holds another run, or another live run is writing it."""


@dataclass
class Claim:
    """A run directory taken by this process: its lock (an flock held open, which the system drops when the
    process dies), the folders the claim created (removed again if the run is refused before it starts), and
    whether the run replaces an earlier one (overwrite=true)."""

    dir: Path
    lock: Path
    handle: object
    created: list[Path]
    replaces: bool = False
    accepted: bool = False
    saved: dict | None = None  # files that may be rewritten before the run is accepted: their bytes (None: absent)
    since: float = 0.0  # when the claim was taken

    def keep(self, *files: Path) -> None:
        """Remembers `files` as they are, to be put back if the run is refused before it starts."""
        self.saved = {f: f.read_bytes() if f.is_file() else None for f in files}

    def accept(self) -> None:
        """The run starts: what autoenc wrote there for an earlier run that overwrite=true replaces is removed,
        but for what this run (a sweep: its jobs) wrote since the claim."""
        self.accepted = True
        if self.replaces:
            self.replaces = False
            for entry in {e for pattern in WRITTEN for e in self.dir.glob(pattern)}:
                if entry != self.lock and entry.lstat().st_mtime < self.since:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def release(self) -> None:
        """Drops the lock (once); a run refused before it started leaves none of the folders it created."""
        if _CLAIMS.get(self.dir) is not self:
            return
        del _CLAIMS[self.dir]
        self.lock.unlink(missing_ok=True)  # while still holding it: nobody else can have taken it
        self.handle.close()
        if not self.accepted:
            for f, content in (self.saved or {}).items():
                f.unlink(missing_ok=True) if content is None else f.write_bytes(content)
            for d in self.created:  # deepest first; a folder something else wrote into stays
                try:
                    d.rmdir()
                except OSError:
                    break


_CLAIMS: dict[Path, Claim] = {}


def claim(out: Path, *, command: str, ckpt_path=None, overwrite: bool = False, resume: bool = False,
          default: bool = False, what: str = "hydra.run.dir") -> Claim:
    """Takes the run directory `out` for this process. One that another live run is writing (its .lock) or
    that holds an earlier run is refused in one line, unless `ckpt_path` resumes that run, `resume` continues
    it, or `overwrite` replaces it; a `default` (not user-given) name that is taken moves on to <name>_2, _3…
    (overwrite=true never replaces a run under a name the user did not give)."""
    out = where(out)
    for n in range(1, 1000 if default else 2):
        candidate = out if n == 1 else out.with_name(f"{out.name}_{n}")
        try:
            return _take(candidate, command, ckpt_path, overwrite and not default, resume, what)
        except Taken:
            if not default:
                raise
    raise UserError(f"{out}: a thousand runs of that name exist; choose another {what}=")


def _take(out: Path, command, ckpt_path, overwrite, resume, what) -> Claim:
    import fcntl
    import time

    earlier = earlier_run(out)
    sweep = "multirun.yaml" in earlier or "optimization_results.yaml" in earlier
    resuming = resume or bool(ckpt_path and run_dir_of(ckpt_path) == out)
    if earlier and not overwrite and not resuming:
        hint = (f"resume it with ckpt_path={out / 'checkpoints' / 'last.ckpt'}" if not sweep
                else "continue it with resume=true and the same overrides")
        raise Taken(f"{out} already holds a {'sweep' if sweep else 'run'} ({' and '.join(earlier)}); {hint}, choose "
                    f"another {what}=, or add overwrite=true to replace it")
    if earlier and overwrite and not resuming and where(Path.cwd()).is_relative_to(out):
        raise UserError(f"overwrite=true would clear {out}, which holds the current directory; choose another {what}=")
    created = [p for p in (out, *out.parents) if not p.exists()]
    lock = out / ".lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            handle = open(lock, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                pid, _, holder = handle.read().partition("\n")
                handle.close()
                raise Taken(f"{out} is being written by another run (process {pid or '?'}: autoenc {holder.strip()}); "
                            f"wait for it, or choose another {what}=") from None
            if not lock.exists() or os.stat(lock).st_ino != os.fstat(handle.fileno()).st_ino:
                handle.close()  # its holder removed it as we opened it: take the new one
                continue
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n{command}\n")
            handle.flush()
            found = Claim(out, lock, handle, created, replaces=bool(earlier) and overwrite and not resuming,
                          since=time.time())
            _CLAIMS[out] = found
            return found
    except OSError as e:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise UserError(f"cannot write the run directory {out} ({e.strerror}); choose another {what}=") from None
    raise UserError(f"cannot take the run directory {out}: its .lock keeps changing; choose another {what}=")


def further_rank() -> bool:
    """A further process of a distributed run (Lightning's, torchrun's or srun's ranks): rank 0 holds and
    writes the run directory."""
    return any(os.environ.get(k, "0") != "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def claimed(out: Path) -> Claim | None:
    """This process's claim of `out`, if it has one."""
    return _CLAIMS.get(where(out))


def release(out: Path) -> None:
    """Releases this process's claim of `out`, if it has one."""
    found = claimed(out)
    if found is not None:
        found.release()


def release_all() -> None:
    """Releases every claim of this process."""
    for found in list(_CLAIMS.values()):
        found.release()


def begin(out: Path, cfg) -> None:
    """The run is accepted and starts writing into `out`: an earlier run that overwrite=true replaces is removed
    first, then the config goes to .hydra/ (as Hydra writes it) and the log lines held until then to the log file."""
    from hydra.core.hydra_config import HydraConfig

    out = where(out)
    if not further_rank():  # rank 0 writes
        if out in _CLAIMS:
            _CLAIMS[out].accept()
        sweep = _CLAIMS.get(out.parent)  # a sweep starts with its first job: a replaced sweep goes then
        if sweep is not None and not sweep.accepted:
            sweep.accept()
        (out / "error.txt").unlink(missing_ok=True)  # a job that failed before and now runs
        saved = out / ".hydra"
        saved.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, saved / "config.yaml")
        if HydraConfig.initialized():
            OmegaConf.save(HydraConfig.instance().cfg, saved / "hydra.yaml")
            OmegaConf.save(HydraConfig.get().overrides.task, saved / "overrides.yaml")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLog) and Path(handler.baseFilename).parent == out:
            handler.accept()


class RunLog(logging.FileHandler):
    """The run directory's log file (Hydra's job log), written from the moment the run is accepted: lines
    logged before are held, so a refused command adds nothing to the run it was pointed at."""

    def __init__(self, filename, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode, encoding, delay=True)
        self.pending: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.pending is None:
            super().emit(record)
        else:
            self.pending.append(record)

    def accept(self) -> None:
        pending, self.pending = self.pending or [], None
        for record in pending:
            super().emit(record)
