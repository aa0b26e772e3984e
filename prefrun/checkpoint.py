"""Resumable checkpoints: model, optimiser, scheduler, RNG (accelerate's save_state) plus the
loop's own position, written atomically, the last `keep` kept.

A checkpoint directory is written as `step-N.tmp` and renamed to `step-N` only when complete, so
a kill or a full disk mid-save never damages the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from prefrun import faults
from prefrun.errors import InputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_accelerate():
    """save_state/load_state log a line per file and warn about tied embeddings at every save."""
    loggers = [logging.getLogger(n) for n in ("accelerate.checkpointing", "accelerate.accelerator",
                                              "accelerate.utils.other")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

STATE_FILE = "prefrun_state.json"


class Checkpoints:
    def __init__(self, root: Path, every: int | None, keep: int | None) -> None:
        self.root, self.every, self.keep = Path(root), every or 0, keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def latest(self) -> Path | None:
        done = [p for p in self.root.glob("step-*") if p.suffix != ".tmp" and (p / STATE_FILE).exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save(self, accelerator: Accelerator, state: dict) -> None:
        final = self.path(state["step"])
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with _quiet_accelerate():
            accelerator.save_state(str(tmp))
        faults.inject("checkpoint", state["step"], path=tmp)
        # The state file marks the checkpoint complete: only once every process has written its part.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "num_processes": accelerator.num_processes}))
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()

    def load(self, accelerator: Accelerator, path: Path) -> dict:
        state = json.loads((path / STATE_FILE).read_text())
        written_by = state.pop("num_processes", accelerator.num_processes)
        if written_by != accelerator.num_processes:
            raise InputError(f"{path} was written by {written_by} process(es), and this run has "
                             f"{accelerator.num_processes}: resume it with {written_by} (accelerate launch "
                             f"--num_processes {written_by}); an online run changes the number of processes only at "
                             "a round boundary")
        with _quiet_accelerate():
            accelerator.load_state(str(path))
        return state

    def _prune(self) -> None:
        if not self.keep:
            return
        done = sorted((p for p in self.root.glob("step-*") if p.suffix != ".tmp"), key=lambda p: int(p.name[5:]))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
