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
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1", "-m", "prefrun"]


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


@pytest.mark.slow
def test_sigterm_to_a_two_process_launcher_saves_at_the_step_boundary_and_the_same_command_continues(tmp_path):
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    job = ["train", *OFFLINE, "trainer.batch_size=4", f"hydra.run.dir={run}"]
    # Process 0 waits at step 3's boundary until the signal comes; the launcher forwards it too (twice is once).
    code, said = signal_at_fault([*LAUNCH, *job], {**env, "PREFRUN_FAULT": "train:3:hang@0"}, tmp_path)
    assert code != 0, said[-3000:]
    assert "stopped by SIGTERM at step 3 of 8" in said and "the same command continues" in said, said[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]  # save_every=100: the stop saved it
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]

    subprocess.run([*LAUNCH, *job], cwd=tmp_path, env={**os.environ, **env}, check=True, capture_output=True)
    assert "resuming from" in (run / "train.log").read_text()
    whole = tmp_path / "whole"  # one process at the same global batch, never stopped
    run_cli(["train", *OFFLINE, "trainer.batch_size=8", f"hydra.run.dir={whole}"], tmp_path, env)
    resumed, uninterrupted = _rows(run), _rows(whole)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    after = [json.loads((d / "summary.json").read_text())["eval_after"]["sampled"]["mean"] for d in (run, whole)]
    assert after[0] == pytest.approx(after[1], abs=1e-6)


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
