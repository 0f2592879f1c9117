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

RUN_MARKS = ("results.json", "checkpoints", "multirun.yaml")  # what makes a directory hold a run (or a sweep)


def run_dir_of(ckpt) -> Path | None:
    """The run directory a checkpoint belongs to: the nearest folder above it that holds a run's .hydra/."""
    path = Path(str(ckpt)).expanduser().absolute()
    return next((d for d in path.parents if (d / ".hydra").is_dir()), None)


def held(out: Path) -> list[str]:
    """What in `out` belongs to an earlier run: its results, checkpoints, or a sweep's multirun.yaml."""
    return [name for name, there in (("results.json", (out / "results.json").is_file()),
                                     ("checkpoints", any((out / "checkpoints").glob("*.ckpt"))),
                                     ("multirun.yaml", (out / "multirun.yaml").is_file())) if there]


class Taken(UserError):
    """The directory holds another run, or another live run is writing it."""


@dataclass
class Claim:
    """A run directory taken by this process: its lock, the folders the claim created (removed again if the
    run is refused before it starts), and whether the run replaces an earlier one (overwrite=true)."""

    dir: Path
    lock: Path
    created: list[Path]
    replaces: bool = False
    accepted: bool = False
    saved: dict | None = None  # files that may be rewritten before the run is accepted: their bytes (None: absent)

    def keep(self, *files: Path) -> None:
        """Remembers `files` as they are, to be put back if the run is refused before it starts."""
        self.saved = {f: f.read_bytes() if f.is_file() else None for f in files}

    def accept(self, spare: tuple = ()) -> None:
        """The run starts: an earlier run that overwrite=true replaces is removed (all but the lock and `spare`)."""
        self.accepted = True
        if self.replaces:
            self.replaces = False
            for entry in self.dir.iterdir():
                if entry != self.lock and entry not in spare:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def release(self) -> None:
        """Drops the lock; a run refused before it started leaves none of the folders it created."""
        self.lock.unlink(missing_ok=True)
        _CLAIMS.pop(self.dir, None)
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
    it, or `overwrite` replaces it; a `default` (not user-given) name that is taken moves on to <name>_2, _3…"""
    out = Path(out).expanduser().absolute()
    for n in range(1, 1000 if default else 2):
        candidate = out if n == 1 else out.with_name(f"{out.name}_{n}")
        try:
            return _take(candidate, command, ckpt_path, overwrite, resume, what)
        except Taken:
            if not default:
                raise
    raise UserError(f"{out}: a thousand runs of that name exist; choose another {what}=")


def _take(out: Path, command, ckpt_path, overwrite, resume, what) -> Claim:
    earlier = held(out)
    resuming = resume or bool(ckpt_path and run_dir_of(ckpt_path) == out)
    if earlier and not overwrite and not resuming:
        hint = (f"resume it with ckpt_path={out / 'checkpoints' / 'last.ckpt'}" if "multirun.yaml" not in earlier
                else "continue it with resume=true and the same overrides")
        raise Taken(f"{out} already holds a {'sweep' if 'multirun.yaml' in earlier else 'run'} "
                    f"({' and '.join(earlier)}); {hint}, choose another {what}=, or add overwrite=true to replace it")
    if earlier and overwrite and not resuming and not (out / ".hydra").is_dir() and "multirun.yaml" not in earlier:
        raise UserError(f"{out} holds {' and '.join(earlier)} but is not a run directory (no .hydra/): overwrite=true "
                        f"replaces only what autoenc wrote; choose another {what}=")
    created = [p for p in (out, *out.parents) if not p.exists()]
    lock = out / ".lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                with open(lock, "x") as f:  # exclusive: of two runs started together, one gets it
                    f.write(f"{os.getpid()}\n{command}\n")
                found = Claim(out, lock, created, replaces=bool(earlier) and overwrite and not resuming)
                _CLAIMS[out] = found
                return found
            except FileExistsError:
                pid, _, holder = lock.read_text().partition("\n")
                if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                    raise Taken(f"{out} is being written by another run (process {pid}: autoenc {holder.strip()}); "
                                f"wait for it, or choose another {what}=") from None
                lock.unlink(missing_ok=True)  # left by a run that was killed (or by this process)
    except OSError as e:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise UserError(f"cannot write the run directory {out} ({e.strerror}); choose another {what}=") from None
    raise UserError(f"cannot take the run directory {out}: its .lock keeps reappearing; choose another {what}=")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def further_rank() -> bool:
    """A further DDP rank, which Lightning starts with rank 0's run directory: rank 0 holds and writes it."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def release(out: Path) -> None:
    """Releases this process's claim of `out`, if it has one."""
    found = _CLAIMS.get(Path(out).expanduser().absolute())
    if found is not None:
        found.release()


def release_all() -> None:
    """Releases every claim of this process."""
    for found in list(_CLAIMS.values()):
        found.release()


def begin(out: Path, cfg) -> None:
    """The run is accepted and starts writing into `out`: an earlier run that overwrite=true replaces is removed
    first, then the config goes to .hydra/ (as Hydra writes it) and the held log lines to the log file."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(out).expanduser().absolute()
    if not further_rank():  # rank 0 writes
        if out in _CLAIMS:
            _CLAIMS[out].accept()
        sweep = _CLAIMS.get(out.parent)  # a sweep starts with its first job: a replaced sweep goes then
        if sweep is not None and not sweep.accepted:
            sweep.accept(spare=(out, out.parent / "multirun.yaml"))
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
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is None:
            super().emit(record)
        else:
            self.held.append(record)

    def accept(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)
