"""The fault drill (docs/reliability.md): a stop signal, a full disk, a damaged checkpoint, two runs in one
directory. Each ends in one line or recovers, and the same command then ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import TINY_JOB, run_cli

OFFLINE = [*TINY_JOB, "eval.num_prompts=16", "trainer.max_steps=8", "trainer.log_every=1", "trainer.save_every=100",
           "trainer.save_final=false"]
ENV = {"OMP_NUM_THREADS": "1"}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def signal_at_fault(command: list[str], env: dict, cwd, signum=signal.SIGTERM) -> tuple[int, str]:
    """Run `command` in its own process group, and when a process reports the fault planned by PREFRUN_FAULT
    (a `hang`), send `signum` to the whole group, as SLURM signals every process of a job step."""
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "fault injected" in line:
            os.killpg(proc.pid, signum)
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), "".join(lines)


def test_a_signal_outside_training_stops_at_once_with_status_75(tmp_path):
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache"), "PREFRUN_FAULT": "evaluate:1:term"}
    proc = run_cli(["train", *OFFLINE, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env, check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 75, said[-3000:]
    assert "stopped by SIGTERM outside training" in said and "Traceback" not in said


def test_stop_signals_are_checked(tmp_path):
    proc = run_cli(["train", *OFFLINE, "stop_signals=[TERM,KILL]"], tmp_path,
                   {"PREFRUN_CACHE": str(tmp_path / "cache")}, check=False)
    assert proc.returncode == 2 and "stop_signals: 'KILL' is not a signal prefrun can catch" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_second_run_into_a_live_run_directory_refuses_and_takes_over_once_the_first_is_killed(tmp_path):
    env = {**os.environ, **ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    job = [sys.executable, "-m", "prefrun", "train", *OFFLINE, "trainer.save_every=2", f"hydra.run.dir={run}"]
    first = subprocess.Popen(job, cwd=tmp_path, env={**env, "PREFRUN_FAULT": "train:2:hang"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:  # the first run waits at step 2, its checkpoint saved, its lock held
        if "fault injected" in line:
            break
    second = subprocess.run([*job, "seed=5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = second.stdout + second.stderr
    assert second.returncode == 2 and f"pid {first.pid}" in said and "is in use by a live run" in said, said[-3000:]
    assert "Traceback" not in said
    # Hydra wrote the refused command's overrides into the live run's .hydra/ (what `prefrun report` reads): put back
    assert "seed=5" not in (run / ".hydra" / "overrides.yaml").read_text()
    first.kill()
    first.wait()
    third = subprocess.run(job, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = third.stdout + third.stderr
    assert third.returncode == 0, said[-3000:]
    assert "taking over the lock of a run that is gone" in said and "resuming from" in said
    assert [r["step"] for r in _rows(run)] == list(range(1, 9))
    assert not (run / ".lock").exists()  # released at the end


def test_the_lock_is_shared_by_one_job_and_a_stale_one_from_another_host_is_taken_over(tmp_path, caplog):
    from prefrun.storage import RunLock

    held = [RunLock(tmp_path, "slurm-7"), RunLock(tmp_path, "slurm-7")]  # a job's attempts (or its processes)
    for lock in held:
        lock.acquire()
    lock = json.loads((tmp_path / ".lock").read_text())
    with pytest.raises(Exception, match=r"in use by a live run \(host .*, job slurm-7"):
        RunLock(tmp_path, "slurm-8").acquire()
    (tmp_path / ".lock").write_text(json.dumps({**lock, "host": "node-elsewhere", "heartbeat": time.time() - 600}))
    held.append(RunLock(tmp_path, "slurm-8"))
    held[-1].acquire()
    assert "taking over the lock of a run that is gone (host node-elsewhere" in caplog.text
    for lock in held:
        lock.release()


@pytest.mark.slow
def test_a_run_directory_on_a_disk_that_fills_stops_before_the_checkpoint_and_continues_once_there_is_space(tmp_path):
    """The run directory on a real small filesystem (tmpfs) with room for one checkpoint: the second save is
    refused before it writes anything, in one line; with space again the same command ends where an
    uninterrupted run ends."""
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    job = ["train", *OFFLINE, "trainer.save_every=2", "trainer.keep_last=1"]
    whole = tmp_path / "whole"
    run_cli([*job, f"hydra.run.dir={whole}"], tmp_path, env)
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (tests/test_checkpoint.py covers a full disk with the fault switch)")
    try:
        checkpoint = sum(f.stat().st_size for f in (whole / "checkpoints").rglob("*") if f.is_file())
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - int(1.5 * checkpoint)))
        run = disk / "run"
        full = run_cli([*job, f"hydra.run.dir={run}"], tmp_path, env, check=False)
        said = full.stdout + full.stderr
        assert full.returncode == 2 and "Traceback" not in said, said[-3000:]
        assert "checkpoint step-4 needs" in said and "nothing was written" in said, said[-3000:]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
        ballast.unlink()
        run_cli([*job, f"hydra.run.dir={run}"], tmp_path, env)
        assert "resuming from" in (run / "train.log").read_text()
        for a, b in zip(_rows(run), _rows(whole), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# One fault in every phase of an APO run (an optimiser step, a checkpoint's write, each round's start, pool
# generation and judging, the reference log-probs, the extrapolation, the judged evaluation), the kinds in turn:
# each attempt stops at the next one, and the same command, environment and all, goes on.
MATRIX = ("generate:2:kill,judge:2:enospc,reference:1:term,train:3:kill,checkpoint:4:enospc,extrapolate:1:term,"
          "evaluate:2:kill,round:2:term")
EXITS = {"kill": -signal.SIGKILL, "term": 75, "enospc": 2}


@pytest.mark.slow
def test_a_fault_in_every_phase_then_the_same_command_ends_where_an_uninterrupted_run_ends(tmp_path, cache_dir):
    job = ["train", *TINY_JOB, "online=apo", "online.alpha=0.3", "online.rounds=2", "trainer.max_steps=6",
           "trainer.save_every=2", "generator=hf", "generator.shard_size=16", "eval.num_prompts=16"]
    whole, drilled = tmp_path / "whole", tmp_path / "drilled"
    run_cli([*job, f"hydra.run.dir={whole}"], tmp_path, ENV)
    planned = MATRIX.split(",")
    exits = []
    for _ in range(len(planned) + 1):
        proc = run_cli([*job, f"hydra.run.dir={drilled}"], tmp_path, {**ENV, "PREFRUN_FAULT": MATRIX}, check=False)
        said = proc.stdout + proc.stderr
        exits.append(proc.returncode)
        if proc.returncode == 0:
            break
        assert "Traceback" not in said, said[-3000:]
        if proc.returncode == 2:  # a full disk: one line naming the path
            assert "no space left on the device" in said, said[-3000:]
    fired = sorted(p.name.rsplit("-", 1)[0] for p in (drilled / ".faults").iterdir())
    assert fired == sorted(f.replace(":", "-") for f in planned), fired  # every fault happened, once
    assert sorted(exits[:-1]) == sorted(EXITS[f.rsplit(":", 1)[1]] for f in planned) and exits[-1] == 0, exits
    assert [(r["round"], r["step"]) for r in _rows(drilled)] == [(r["round"], r["step"]) for r in _rows(whole)]
    for a, b in zip(_rows(drilled), _rows(whole)):
        for key in ("loss", "rewards/margin", "round/judge_score", "round/kl_to_initial",
                    "round/eval/policy/sampled/mean", "round/eval/policy_hat/greedy/mean"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (drilled, whole)]
    for decoding, result in summaries[1]["eval_after"].items():
        assert summaries[0]["eval_after"][decoding]["per_prompt"] == pytest.approx(result["per_prompt"], abs=1e-6)
