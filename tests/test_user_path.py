"""The path users take: `autoenc` run from a working directory with the defaults (no hydra.run.dir=): two runs at
once, refused commands pointed at a run, sweeps into a used directory, SIGTERM, SLURM's requeue, a kill during a
checkpoint write with $TMPDIR on another filesystem, a full disk. Each interrupted run resumes to the end of the
run never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, autoenc, one_line_error

# A VAE with masking noise: every source of randomness; 41 steps an epoch on the embedded digits. A step
# checkpoint every 10 steps tells the tests where the run is; Delay makes it slow enough to stop midway.
RUN = ["model=vae", "noise=masking", "trainer.max_epochs=2", "eval.iwae_samples=4", "trainer.enable_model_summary=false",
       "callbacks.step_checkpoint.every_n_train_steps=10"]
SLOW = ["+callbacks.delay._target_=helpers.Delay", "+callbacks.delay.seconds=0.03"]
HELPERS = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


def digest(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included) by its SHA-256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def weights(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    for name in ("last.ckpt", "best.ckpt"):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def start(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoenc", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **HELPERS, **(env or {})})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start_ = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start_ < timeout
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: RUN trained once, uninterrupted, from a working directory with the defaults."""
    cwd = tmp_path_factory.mktemp("reference")
    autoenc("train", *RUN, cwd=cwd)
    (run,) = run_dirs(cwd)
    return run


def test_two_runs_started_together_get_two_directories_and_no_warning(tmp_path):
    procs = [start(tmp_path, "train", f"seed={seed}", "trainer.max_epochs=1") for seed in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2  # started in the same second: <name> and <name>_2 (test_reliability.py checks the rule)
    said = {out.split("run directory: ")[1].split()[0] for out in outs}
    assert said == {str(d) for d in dirs}
    for d in dirs:
        assert list(OmegaConf.load(d / ".hydra" / "overrides.yaml")) in (["seed=1", "trainer.max_epochs=1"],
                                                                          ["seed=2", "trainer.max_epochs=1"])
        assert len(list(d.glob("events.out.tfevents.*"))) == 3  # one run's files
        assert not (d / ".lock").exists()
    assert all("Warning" not in out and "HydraConfig was not set" not in out for out in outs)


def test_a_refused_command_changes_nothing_and_leaves_no_directory(tmp_path, uninterrupted):
    """Refused resumes and commands leave the run byte-identical (commands trust the checkpoint's config); a
    refused fresh run leaves no outputs/ at all."""
    proc = autoenc("train", "data.batch_size=0", cwd=tmp_path, check=False)
    assert "data.batch_size=0 is invalid" in one_line_error(proc) and not (tmp_path / "outputs").exists()
    run = tmp_path / "run"
    os.system(f"cp -a {uninterrupted} {run}")
    before = digest(run)
    autoenc("evaluate", f"ckpt={run}", "eval.probe_examples=200", cwd=tmp_path)
    evaluated = json.loads((run / "evaluation.json").read_text())
    before = digest(run)  # evaluate writes its own evaluation.json, once
    last = run / "checkpoints" / "last.ckpt"
    for refused, says in ((["model=ae"], "is from a different model"), (["data.batch_size=0"], "data.batch_size=0"),
                          (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
                          (["data.binarize=dynamic", "trainer.max_epochs=0"], "trainer.max_epochs=0")):
        proc = autoenc("train", f"ckpt_path={last}", *refused, cwd=tmp_path, check=False)
        assert says in one_line_error(proc)
        assert digest(run) == before, refused
    for command in (["sample", "n=0"], ["attribute", "from=1", "to=1"]):
        one_line_error(autoenc(*command, f"ckpt={run}", cwd=tmp_path, check=False))
        assert digest(run) == before, command
    autoenc("evaluate", f"ckpt={run}", "eval.probe_examples=200", cwd=tmp_path)
    assert json.loads((run / "evaluation.json").read_text()) == evaluated and not (tmp_path / "outputs").exists()


def test_a_second_sweep_into_a_used_sweep_directory_is_refused_resumed_or_replaced(tmp_path):
    sweep, fast = tmp_path / "D", ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_test_batches=1"]
    autoenc("train", "-m", "model.latent_dim=2,3,4", f"hydra.sweep.dir={sweep}", *fast, cwd=tmp_path)
    before = digest(sweep)
    line = one_line_error(autoenc("train", "-m", "model.latent_dim=8,16", f"hydra.sweep.dir={sweep}", *fast,
                                  cwd=tmp_path, check=False))
    assert line == (f"autoenc: error: {sweep} already holds a sweep (multirun.yaml); continue it with resume=true and "
                    "the same overrides, choose another hydra.sweep.dir=, or add overwrite=true to replace it")
    assert digest(sweep) == before
    line = one_line_error(autoenc("train", "-m", "model.latnt_dim=8,16", f"hydra.sweep.dir={sweep}", "overwrite=true",
                                  *fast, cwd=tmp_path, check=False))  # refused before its first job: nothing replaced
    assert line.endswith("did you mean model.latent_dim?") and digest(sweep) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    line = one_line_error(autoenc("train", "-m", "model.latnt_dim=8,16", cwd=fresh, check=False))
    assert line.endswith("did you mean model.latent_dim?") and not list(fresh.iterdir())  # no outputs/multirun stub
    assert "resume=true continues it only with the same overrides" in one_line_error(autoenc(
        "train", "-m", "model.latent_dim=8,16", f"hydra.sweep.dir={sweep}", "resume=true", *fast, cwd=tmp_path, check=False))
    (sweep / "1" / "results.json").unlink()  # job 1 was stopped before its end: resume=true finishes it alone
    kept = {k: v for k, v in digest(sweep).items() if not k.startswith("1/")}
    proc = autoenc("train", "-m", "model.latent_dim=2,3,4", f"hydra.sweep.dir={sweep}", "resume=true", *fast, cwd=tmp_path)
    assert proc.stdout.count("has finished already") == 2 and (sweep / "1" / "results.json").is_file()
    assert {k: v for k, v in digest(sweep).items() if k in kept and not k.endswith(("multirun.yaml", ".log"))} == \
        {k: v for k, v in kept.items() if not k.endswith(("multirun.yaml", ".log"))}
    autoenc("train", "-m", "model.latent_dim=8,16", f"hydra.sweep.dir={sweep}", "overwrite=true", *fast, cwd=tmp_path)
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]  # no job 2 of the earlier sweep
    for job, dim in (("0", 8), ("1", 16)):
        assert len(list((sweep / job).glob("events.out.tfevents.*"))) == 3  # one run's event files, not two
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["autoenc_config"]["model"][
            "latent_dim"] == dim


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_at_the_step_and_the_resume_ends_as_the_uninterrupted_run(tmp_path, uninterrupted, sig, code):
    proc = start(tmp_path, "train", *RUN, *SLOW)
    wait_for(tmp_path / "outputs", proc)
    time.sleep(0.1)
    (run,) = run_dirs(tmp_path)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    name = signal.Signals(sig).name
    step = int(out.split(f"interrupted by {name} at step ")[1].split(";")[0])
    last = run / "checkpoints" / "last.ckpt"
    said = f"saved {last}; resume with: {shlex.join(['autoenc', 'train', *RUN, *SLOW, f'ckpt_path={last}'])}"
    assert said in out and "Traceback" not in out  # the run's own overrides: the resume is the same run
    assert torch.load(last, weights_only=True)["global_step"] == step and 0 < step < 82
    autoenc("train", *RUN, f"ckpt_path={last}", cwd=tmp_path)
    assert_same_run(run, uninterrupted)


def test_a_slurm_job_stopped_by_its_signal_requeues_itself_and_resumes_where_it_stopped(tmp_path, uninterrupted):
    """Under Lightning's SLURM environment, SIGUSR1 (`#SBATCH --signal=USR1@…`) saves, runs `scontrol requeue`,
    and the job restarted with the same id continues its own run directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NODELIST": "localhost",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = start(tmp_path, "train", *RUN, *SLOW, env=slurm)
    run = tmp_path / "outputs" / "slurm" / "4242_vae_digits"
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out
    assert "requeued SLURM job 4242" in out and (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    restarted = start(tmp_path, "train", *RUN, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    out, _ = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, out
    assert f"run directory: {run}" in out and run_dirs(tmp_path) == [run]
    assert 0 < step < 82
    assert_same_run(run, uninterrupted)


@pytest.fixture
def other_filesystem(tmp_path):
    """A folder on another filesystem than $TMPDIR: a small tmpfs mounted for the test (root), else /dev/shm."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True).returncode:
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == Path(os.environ.get("TMPDIR", "/tmp")).stat().st_dev:
            pytest.skip("no second filesystem: mounting a tmpfs needs root, and /dev/shm is not one")
        import tempfile

        yield Path(tempfile.mkdtemp(dir=shm)), False
        return
    yield mount, True
    subprocess.run(["umount", "-l", str(mount)])


def test_a_kill_during_a_checkpoint_write_across_filesystems_keeps_the_last_good_one(tmp_path, other_filesystem,
                                                                                    uninterrupted):
    """The run directory on one filesystem, $TMPDIR on another (the usual cluster layout); the process is
    SIGKILLed halfway through writing a step checkpoint: the previous last.ckpt loads, and the resume ends as
    the run never killed, leaving no temporary file."""
    where, _ = other_filesystem
    run, tmp = where / "run", tmp_path / "tmpdir"
    tmp.mkdir()
    assert where.stat().st_dev != tmp.stat().st_dev
    proc = start(tmp_path, "train", *RUN, f"hydra.run.dir={run}", "+callbacks.kill._target_=helpers.KillMidWrite",
                 "+callbacks.kill.step=25", env={"TMPDIR": str(tmp)})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    last = run / "checkpoints" / "last.ckpt"
    assert (run / "checkpoints" / ".last.ckpt.tmp").stat().st_size > 0  # the write it stopped in
    assert torch.load(last, weights_only=True)["global_step"] == 20  # the step checkpoint before it, whole
    autoenc("train", *RUN, f"ckpt_path={last}", env={"TMPDIR": str(tmp)}, cwd=tmp_path)
    assert_same_run(run, uninterrupted)
    assert not list(run.rglob("*.tmp")) and not list(tmp.glob("tmp*"))  # nor a temporary file in $TMPDIR


def test_a_full_disk_is_one_line_keeps_the_checkpoints_and_the_run_resumes(tmp_path, other_filesystem, uninterrupted):
    where, mounted = other_filesystem
    if not mounted:
        pytest.skip("a full disk needs a small tmpfs, which needs root to mount")
    run = where / "run"
    proc = start(tmp_path, "train", *RUN, *SLOW, f"hydra.run.dir={run}")
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    filler = where / "filler"
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 256 * 1024))  # room for logs, not for a checkpoint
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in out, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("autoenc: error: no space left on device for ") and f"in {run / 'checkpoints'}: it needs " in line
    assert line.endswith("free some space and resume, or point hydra.run.dir= at another disk")
    for name in ("last.ckpt", "best.ckpt"):
        if (run / "checkpoints" / name).exists():
            torch.load(run / "checkpoints" / name, weights_only=True)  # whole
    assert not list(run.rglob("*.tmp"))
    filler.unlink()
    autoenc("train", *RUN, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert_same_run(run, uninterrupted)


def test_last_ckpt_is_the_last_state_however_the_run_ends(tmp_path):
    """Written whatever validation did (a rate too small to improve it) and at a max_steps inside an epoch; a resume
    from it continues where the run stopped and ends as the run never stopped."""
    autoenc("train", "trainer.max_epochs=3", "model.optimizer.lr=1e-30", "hydra.run.dir=flat", cwd=tmp_path)
    steps = {n: torch.load(tmp_path / "flat" / "checkpoints" / n, weights_only=True)["global_step"]
             for n in ("best.ckpt", "last.ckpt")}
    assert steps == {"best.ckpt": 41, "last.ckpt": 123}
    constant = ["model.scheduler=null", "noise=masking", "model=vae"]
    autoenc("train", "trainer.max_steps=100", *constant, "hydra.run.dir=stopped", cwd=tmp_path)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 100
    autoenc("train", "trainer.max_steps=150", *constant, f"ckpt_path={last}", cwd=tmp_path)
    autoenc("train", "trainer.max_steps=150", *constant, "hydra.run.dir=whole", cwd=tmp_path)
    assert torch.load(last, weights_only=True)["global_step"] == 150
    assert_same_run(tmp_path / "stopped", tmp_path / "whole")
