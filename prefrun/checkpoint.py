"""Resumable checkpoints: model, optimiser, scheduler, RNG (accelerate's save_state) plus the
loop's own position, written atomically, checked on resume, the last `keep` kept.

A checkpoint directory is written as `step-N.tmp`; once every process has written its part, a manifest of
every file's size and SHA-256 is written last, and the directory is renamed to `step-N`. Resume takes the
newest checkpoint whose files match their manifest; a damaged one (cut short, bit-flipped, a file missing) is
named in one line, set aside as `step-N.damaged`, and the one before it is used. The free space is checked
before each save (a checkpoint is about as big as the one before it), and a full disk mid-save removes the
partial directory and ends in one line; the previous checkpoint is untouched either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from prefrun import distributed, faults, storage
from prefrun.errors import InputError, PrefrunError

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

MANIFEST = "manifest.json"
TENSORS = "prefrun_tensors.pt"
_NAME = re.compile(r"step-(\d+)")


class Checkpoints:
    def __init__(self, root: Path, every: int | None, keep: int | None) -> None:
        self.root, self.every, self.keep = Path(root), every or 0, keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def latest(self) -> Path | None:
        """The newest checkpoint that passes its manifest, the same on every process (the main one lists them and
        sets a damaged one aside; the processes share the reading of the files, `_damage`)."""
        for path in reversed(distributed.from_main(self._done)):
            damage = _damage(path)
            if damage is None:
                return path
            if distributed.is_main():
                aside = path.with_name(f"{path.name}.damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the one before it", path, damage,
                            aside.name)
            distributed.barrier()
        return None

    def save(self, accelerator: Accelerator, state: dict, tensors: dict | None = None) -> None:
        """`state`: the loop's position (JSON, in the manifest); `tensors`: more of it, the same on every process
        (MC-PO's kept pool scores), written by the main process into the checkpoint as one file."""
        final = self.path(state["step"])
        tmp = final.with_name(final.name + ".tmp")
        needed = self._needed(accelerator)
        main = accelerator.is_main_process

        def clear() -> None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                storage.ensure_space(self.root, needed, f"checkpoint {final.name}")

        def write() -> None:
            try:
                with _quiet_accelerate():
                    accelerator.save_state(str(tmp))
                if tensors is not None and main:
                    torch.save(tensors, tmp / TENSORS)
                faults.inject("checkpoint", state["step"], path=tmp)
            except Exception as err:  # (torch.save and safetensors report a full disk without its errno)
                if storage.filled(err, tmp):
                    raise storage.disk_full(tmp, needed, err if isinstance(err, OSError) else None) from None
                raise

        def seal() -> None:  # once every process has written its part: the manifest, last, then the name
            files = _sealed(tmp)  # on the disk, and what the manifest says of them
            if not main:
                return
            storage.write_atomic(tmp / MANIFEST, json.dumps(
                {"state": {**state, "num_processes": accelerator.num_processes}, "files": files}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()

        try:
            for part in (clear, write, seal):
                distributed.together(part)
        except PrefrunError:  # a full disk (on several processes at once: `together` names one of them)
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, accelerator: Accelerator, path: Path) -> tuple[dict, dict | None]:
        """The loop's state and the tensors saved with it (None when there were none)."""
        state = json.loads((path / MANIFEST).read_text())["state"]
        _same_processes(path, state.pop("num_processes", accelerator.num_processes), accelerator.num_processes)
        with _quiet_accelerate():
            accelerator.load_state(str(path))
        tensors = torch.load(path / TENSORS, weights_only=True) if (path / TENSORS).exists() else None
        return state, tensors

    def check_processes(self, num_processes: int) -> None:
        """The refusal `load` makes, made before anything is loaded or generated: the newest checkpoint was written
        by another number of processes. (A damaged one is skipped here, as `latest` sets it aside.)"""
        for path in reversed(self._done()):
            try:
                state = json.loads((path / MANIFEST).read_text())["state"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            _same_processes(path, state.get("num_processes", num_processes), num_processes)
            return

    def _done(self) -> list[Path]:
        """Checkpoint directories by step, oldest first (not the .tmp being written, nor those set aside)."""
        found = [p for p in self.root.glob("step-*") if _NAME.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def _needed(self, accelerator: Accelerator) -> int:
        """What the next checkpoint will take: the last one's size, else the model and optimiser state (each
        process's share, times the processes when the weights are sharded; under DeepSpeed four fp32 copies of
        the weights) plus 5%."""
        done = self._done()
        if done:
            return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())
        if accelerator.distributed_type == "DEEPSPEED":  # its optimiser's state is its own; ZeRO-3 empties params
            weights = sum(getattr(p, "ds_numel", p.numel()) * 4 for model in accelerator._models
                          for p in model.parameters())
            return int(weights * 4 * 1.05)  # fp32 weights, AdamW's two moments, ZeRO's fp32 master copy
        tensors = [t for model in accelerator._models for t in model.state_dict().values()]
        for optimizer in accelerator._optimizers:
            tensors += [t for slot in optimizer.state_dict()["state"].values() for t in slot.values()
                        if hasattr(t, "nbytes")]
        total = sum(t.numel() * t.element_size() for t in tensors)
        if any(distributed.is_sharded(model) for model in accelerator._models):
            total *= accelerator.num_processes
        return int(total * 1.05)

    def _prune(self) -> None:
        if not self.keep:
            return
        for old in self._done()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _same_processes(path: Path, written_by: int, processes: int) -> None:
    if written_by != processes:
        raise InputError(f"{path} was written by {written_by} process(es), and this run has {processes}: resume it "
                         f"with {written_by} (accelerate launch --num_processes {written_by}); an online run changes "
                         "the number of processes only at a round boundary")


def _shared_out(sizes: dict[str, int]) -> list[str]:
    """The files in the order the processes share them (`distributed.map_shards` deals them out in turn): the
    largest first, so that each process reads about as many bytes (a checkpoint of 8 processes under FSDP: 8
    model and 8 optimiser shards, hashed 8 at a time instead of one after the other on the main process)."""
    return sorted(sizes, key=lambda name: (-sizes[name], name))


def _sealed(directory: Path) -> dict[str, dict]:
    """Every file under `directory` made durable (fsync) and described by its size and SHA-256, the files read by
    all the processes, each its share (every process calls this; the main process lists them)."""
    sizes = distributed.from_main(lambda: {str(f.relative_to(directory)): f.stat().st_size
                                           for f in Path(directory).rglob("*") if f.is_file()})
    names = _shared_out(sizes)
    digests = distributed.map_shards(len(names), lambda i: storage.file_digest(directory / names[i], sync=True))
    return {name: {"size": sizes[name], "sha256": digest} for name, digest in sorted(zip(names, digests))}


def _damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when every file matches its manifest (every
    process calls this: the files are read by all of them, each its share)."""
    def manifest() -> dict | str:
        try:
            return json.loads((path / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return f"no readable {MANIFEST}"

    files = distributed.from_main(manifest)
    if isinstance(files, str):
        return files
    names = _shared_out({name: expected["size"] for name, expected in files.items()})

    def check(i: int) -> str | None:
        name, expected = names[i], files[names[i]]
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes of {expected['size']}"
        if storage.file_digest(file) != expected["sha256"]:
            return f"{name} differs from what was written (SHA-256)"
        return None

    return next((found for found in distributed.map_shards(len(names), check) if found), None)
