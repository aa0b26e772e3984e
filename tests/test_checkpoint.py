"""Checkpoints on disk: which one resume takes (never a half-written `.tmp` or one without its state file),
how many are kept, and a checkpoint of another number of processes refused in one line."""

import json

import pytest
import torch
from accelerate import Accelerator

from prefrun.checkpoint import STATE_FILE, Checkpoints
from prefrun.errors import InputError


def _saved(root, steps, keep=None):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    checkpoints = Checkpoints(root, every=1, keep=keep)
    for step in steps:
        checkpoints.save(accelerator, {"step": step, "micro_batches": step, "window": {}})
    return checkpoints, accelerator, model


def test_latest_skips_partial_and_stateless_directories_and_keep_last_is_exact(tmp_path):
    checkpoints, _, _ = _saved(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4", "step-5"]
    (tmp_path / "step-9.tmp").mkdir()  # a save that was killed before its rename
    (tmp_path / "step-7").mkdir()  # a directory without its state file
    (tmp_path / "step-7" / "model.safetensors").write_bytes(b"partial")
    assert checkpoints.latest() == tmp_path / "step-5"


def test_a_checkpoint_of_another_number_of_processes_is_refused_in_one_line(tmp_path):
    checkpoints, accelerator, _ = _saved(tmp_path, [1])
    state = json.loads((tmp_path / "step-1" / STATE_FILE).read_text())
    assert state["num_processes"] == 1
    state["num_processes"] = 2
    (tmp_path / "step-1" / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(InputError, match=r"written by 2 process\(es\).*--num_processes 2"):
        checkpoints.load(accelerator, tmp_path / "step-1")
