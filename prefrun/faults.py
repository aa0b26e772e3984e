"""Fault injection for the tests and for anyone who wants to see a fault handled: `PREFRUN_FAULT=<phase>:<n>:<kind>`
(several, comma-separated; `...:<kind>@<rank>` on one process only).

Phases and what `n` is: `checkpoint` (the step being saved, after its files are written), `round` (an online round,
at its start), `extrapolate` (an online round, before APO's extrapolation); `train` (at an optimiser step's
boundary), `generate` / `judge` / `reference` / `evaluate` (shards; an online round's reference log-probs are one
call): the n-th of its kind this process does, counted
from its start over all rounds (6 steps a round: `train:10` is round 2's step 4; with 2 pool shards a round,
`generate:3` is round 2's first).
Kinds: `kill` (SIGKILL to this process: a crash or an OOM kill), `term` (SIGTERM to this process), `hang` (wait
until a signal arrives, 300 s at most: what a test needs to signal the launcher at a known point), `enospc` (the
disk is full: OSError ENOSPC), `engine` (SIGKILL to the vLLM engine's process group), `oom` (torch's
OutOfMemoryError, as a GPU out of memory raises it). Each planned fault happens once per run directory (noted in
<run dir>/.faults/), so the same command, environment and all, then continues as a user's retry would.
docs/reliability.md lists the faults tried and the tests that show them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("kill", "term", "hang", "enospc", "engine", "oom")
_engine_pids: list[int] = []
_counts: dict[str, int] = {}


def _planned() -> list[tuple[str, int, str, int | None]]:
    spec = os.environ.get("PREFRUN_FAULT", "")
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            phase, n, kind = entry.split(":")
            kind, _, rank = kind.partition("@")
            out.append((phase, int(n), kind, int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"PREFRUN_FAULT={spec!r}: write <phase>:<n>:<kind>[@rank], e.g. train:3:term") from None
        if kind not in KINDS:
            raise ValueError(f"PREFRUN_FAULT={spec!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return out


def inject(phase: str, n: int | None = None, path=None) -> None:
    """Do the fault planned for (phase, n) on this process, if any; `n=None` counts the calls for `phase`."""
    if n is None:
        n = _counts[phase] = _counts.get(phase, 0) + 1
    if "PREFRUN_FAULT" not in os.environ:
        return
    rank = int(os.environ.get("RANK", "0"))
    for planned_phase, planned_n, kind, only in _planned():
        if planned_phase != phase or planned_n != n or (only is not None and only != rank):
            continue
        marker = _marker(f"{phase}-{n}-{kind}-{rank}")
        if marker is not None:
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        log.warning("fault injected: %s %d: %s (PREFRUN_FAULT)", phase, n, kind)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif kind == "hang":
            from prefrun import preemption

            deadline = time.monotonic() + 300
            while preemption.caught() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        elif kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)
        elif kind == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                          "79.10 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this "
                                          "process has 78.03 GiB memory in use (PREFRUN_FAULT)")
        elif kind == "engine":
            for pid in _engine_pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _marker(name: str) -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir) / ".faults" / name
    except ValueError:  # not inside a Hydra job
        return None


def engine_started(pid: int) -> None:
    """The generator's engine process group, for the `engine` fault."""
    _engine_pids.append(pid)
