"""Stopping on a signal without losing work: SIGTERM (what SLURM and Kubernetes send before they preempt or
kill), SIGINT (Ctrl-C) and any configured signal (`stop_signals`, e.g. SLURM's `--signal=USR1@90`).

While the training loop runs, a signal only raises a flag: the loop looks at it at every optimiser step (one
value reduced over the processes, so that all of them stop at the same step), saves a checkpoint and raises
`Preempted`. Anywhere else (generation, judging, scoring, evaluation) `Preempted` is raised at once: what was
finished is on disk already (pool shards, finished rounds, the last checkpoint). `prefrun` then exits with
status 75 (EX_TEMPFAIL, "try again") and says how to continue; under submitit it hands over to submitit's own
handler, which requeues the job (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import torch

from prefrun.errors import InputError, PrefrunError

log = logging.getLogger(__name__)

EXIT_CODE = 75
# The same signal again within this many seconds is the same request: SLURM signals every process of a step and
# torchrun forwards what it gets to its workers, so a worker sees each signal twice.
REPEAT_WINDOW_S = 5.0


class Preempted(PrefrunError):
    """A stop signal ended the run where it can continue from."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


class _Listener:
    def __init__(self) -> None:
        self.caught: int | None = None
        self.caught_at = 0.0
        self.deferring = 0
        self.stops_at = "the next step boundary with a checkpoint"
        self.previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        first = self.caught is None
        if not first and now - self.caught_at < REPEAT_WINDOW_S:
            return
        self.caught, self.caught_at = signum, now
        if self.deferring and first:
            log.warning("%s: stopping at %s (send it again to stop at once)", signal.Signals(signum).name,
                        self.stops_at)
            return
        raise Preempted(signum, "at once (a repeated signal)" if self.deferring else
                        "outside training (finished shards, rounds and checkpoints are on disk)")


_listener = _Listener()


def parse(names) -> list[signal.Signals]:
    out = []
    for name in names or ():
        key = str(name).upper()
        key = key if key.startswith("SIG") else f"SIG{key}"
        if not hasattr(signal, key) or key in ("SIGKILL", "SIGSTOP"):
            raise InputError(f"stop_signals: {name!r} is not a signal prefrun can catch: use names such as TERM, INT, "
                             "USR1, USR2")
        out.append(signal.Signals[key])
    return out


def listen(names) -> None:
    """Catch `names` (and submitit's preemption signal inside a submitit job) from now on; the handlers found
    are kept, to be handed the signal once the work is saved (`hand_over`)."""
    wanted = parse(names)
    submitit = _submitit_signal()
    if submitit is not None and submitit not in wanted:
        wanted.append(submitit)
    _listener.caught = None
    for signum in wanted:
        previous = signal.signal(signum, _listener.handle)
        if previous is not _listener.handle:
            _listener.previous[signum] = previous


def caught() -> int | None:
    return _listener.caught


@contextlib.contextmanager
def at_step_boundaries(stops_at: str = "the next step boundary with a checkpoint"):
    """Inside: a signal waits for `requested()` (or another agreed point, which `stops_at` names in the log). A
    signal caught inside and not acted on is raised on leaving."""
    _listener.deferring += 1
    before, _listener.stops_at = _listener.stops_at, stops_at
    try:
        yield
    finally:
        _listener.deferring -= 1
        _listener.stops_at = before
    if _listener.caught is not None and not _listener.deferring:
        raise Preempted(_listener.caught, "after the last step")


def shared(signum: int) -> Preempted | None:
    """`signum`, the signal some process caught (0: none) as all of them agreed on it: this process stops with it
    too (the error to raise, outside training), or None."""
    if not _adopt(signum):
        return None
    return Preempted(signum, "outside training (finished shards, rounds and checkpoints are on disk)")


def _adopt(signum: int) -> int:
    """`signum` (0: none), agreed on by the processes: one caught by another process is this one's too."""
    if signum and _listener.caught is None:  # another process was signalled: this one stops with it
        _listener.caught, _listener.caught_at = signum, time.monotonic()
    return signum


def requested(accelerator) -> int:
    """The signal any process has caught (0: none), the same on every process: the loop's question at each step."""
    signum = _listener.caught or 0
    if accelerator.num_processes > 1:
        flag = torch.tensor([signum], device=accelerator.device)
        signum = int(accelerator.reduce(flag, "max").item())
    return _adopt(signum)


def hand_over(err: Preempted) -> None:
    """Give the signal to the handler that was there before prefrun's (submitit's requeue), once prefrun has
    saved what it had. Default and ignore dispositions are left alone: prefrun exits with EXIT_CODE instead."""
    previous = _listener.previous.get(err.signum)
    if callable(previous) and previous is not signal.default_int_handler:
        previous(err.signum, None)


def ignore() -> None:
    """Stop signals are ignored from now on: the process is on its way out and says why in its own line (a
    launcher signals the survivors of a process that died while they print theirs)."""
    for signum in _listener.previous:
        signal.signal(signum, signal.SIG_IGN)


def _submitit_signal() -> signal.Signals | None:
    """The signal a submitit job is preempted or timed out with (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    try:
        from submitit import JobEnvironment

        environment = JobEnvironment()
        return environment._usr_sig()  # submitit's own reading of SUBMITIT_PREEMPT_SIGNAL
    except Exception:  # not inside a submitit job (or submitit absent)
        return None
