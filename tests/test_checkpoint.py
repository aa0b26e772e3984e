"""Checkpoints on disk: which one resume takes (never a half-written `.tmp`, one without its manifest, or one whose
files do not match it: cut short, bit-flipped, missing), how many are kept, a checkpoint of another number of
processes refused in one line, and a full disk (a real small tmpfs where the tests may mount one, else the fault
switch) stopping a save in one line with nothing partial left and the previous checkpoint intact."""

import json
import os
import subprocess

import pytest
import torch
from accelerate import Accelerator

from prefrun.checkpoint import MANIFEST, Checkpoints
from prefrun.errors import InputError
from prefrun.storage import DiskFull, read_checked, write_atomic


def _saved(root, steps, keep=None, size=2):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(size, size))
    checkpoints = Checkpoints(root, every=1, keep=keep)
    for step in steps:
        checkpoints.save(accelerator, {"step": step, "micro_batches": step, "window": {}})
    return checkpoints, accelerator, model


def test_latest_skips_partial_and_unsealed_directories_and_keep_last_is_exact(tmp_path):
    checkpoints, _, _ = _saved(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4", "step-5"]
    (tmp_path / "step-9.tmp").mkdir()  # a save that was killed before its rename
    (tmp_path / "step-7").mkdir()  # a directory without its manifest
    (tmp_path / "step-7" / "model.safetensors").write_bytes(b"partial")
    assert checkpoints.latest() == tmp_path / "step-5"
    assert (tmp_path / "step-7.damaged").is_dir()  # set aside, kept for a look, never tried again


@pytest.mark.parametrize("damage", ["cut in half", "one bit flipped", "a file missing"])
def test_a_damaged_checkpoint_is_named_set_aside_and_the_one_before_is_used(tmp_path, caplog, damage):
    checkpoints, accelerator, model = _saved(tmp_path, [1, 2])
    weights = tmp_path / "step-2" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "cut in half":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "one bit flipped":
        weights.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    else:
        weights.unlink()
    assert checkpoints.latest() == tmp_path / "step-1"
    said = caplog.text
    assert f"checkpoint {tmp_path / 'step-2'} is damaged (model.safetensors" in said and "step-2.damaged" in said
    assert checkpoints.load(accelerator, tmp_path / "step-1")[0]["step"] == 1


def test_a_checkpoint_of_another_number_of_processes_is_refused_in_one_line(tmp_path):
    checkpoints, accelerator, _ = _saved(tmp_path, [1])
    manifest = json.loads((tmp_path / "step-1" / MANIFEST).read_text())
    assert manifest["state"]["num_processes"] == 1
    manifest["state"]["num_processes"] = 2
    (tmp_path / "step-1" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"written by 2 process\(es\).*--num_processes 2"):
        checkpoints.load(accelerator, tmp_path / "step-1")
    with pytest.raises(InputError, match=r"step-1 was written by 2 process\(es\), and this run has 1"):
        checkpoints.check_processes(1)  # the same refusal at the run's start, before anything loads
    checkpoints.check_processes(2)


def test_a_full_disk_mid_save_is_one_line_and_leaves_nothing_partial(tmp_path, monkeypatch):
    checkpoints, accelerator, _ = _saved(tmp_path, [1])
    monkeypatch.setenv("PREFRUN_FAULT", "checkpoint:2:enospc")
    with pytest.raises(DiskFull, match=r"step-2.tmp: no space left on the device .* needed.*run the same command"):
        checkpoints.save(accelerator, {"step": 2, "micro_batches": 2, "window": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    assert checkpoints.latest() == tmp_path / "step-1"


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs; the tests need root and may skip without it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the fault switch covers the full disk instead)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_on_a_small_real_disk_the_space_is_checked_before_the_save_and_nothing_is_written(small_disk):
    # 600 x 600 fp32 weights: 1.4 MiB, more than the disk holds.
    checkpoints, accelerator, _ = _saved(small_disk, [], size=600)
    with pytest.raises(DiskFull, match=r"checkpoint step-1 needs .* MiB and the disk has .* free.*nothing was written"):
        checkpoints.save(accelerator, {"step": 1, "micro_batches": 1, "window": {}})
    assert list(small_disk.iterdir()) == []


def test_on_a_small_real_disk_a_checkpoint_that_fills_it_mid_save_is_one_line_and_nothing_partial_stays(
        small_disk, monkeypatch):
    """The disk fills while accelerate writes (another writer took the space the check saw): safetensors and
    torch.save say so in errors of their own, without ENOSPC's errno. Still the full disk's line, and no .tmp."""
    checkpoints, accelerator, _ = _saved(small_disk, [], size=600)
    monkeypatch.setattr(Checkpoints, "_needed", lambda self, accelerator: 0)  # the check before the save passes
    with pytest.raises(DiskFull, match=r"step-1.tmp: no space left on the device .*run the same command again"):
        checkpoints.save(accelerator, {"step": 1, "micro_batches": 1, "window": {}})
    assert list(small_disk.iterdir()) == []


def test_on_a_small_real_disk_a_write_that_does_not_fit_is_one_line_and_no_temporary_file_stays(small_disk):
    with pytest.raises(DiskFull, match=r"big.bin: no space left on the device \(2.0 MiB needed"):
        write_atomic(small_disk / "big.bin", b"x" * (2 << 20), checked=True)
    assert list(small_disk.iterdir()) == []


def test_on_a_small_real_disk_a_weight_push_that_does_not_fit_is_one_line_and_no_bucket_stays(small_disk):
    """The engine push writes its buckets to /dev/shm (the node's memory) or the temporary directory: full, that
    was safetensors' own error and a traceback."""
    from prefrun.generate.weights import _write_bucket

    with pytest.raises(DiskFull, match=r"small/prefrun-vllm-push-\w+: no space left on the device \(2.0 MiB needed, .* free\)"):
        _write_bucket({"w": torch.zeros(512, 1024)}, str(small_disk))
    assert list(small_disk.iterdir()) == []


def test_a_checked_file_that_was_damaged_reads_as_missing(tmp_path, caplog):
    path = tmp_path / "entry.pt"
    write_atomic(path, b"0123456789", checked=True)
    assert read_checked(path) == b"0123456789"
    path.write_bytes(b"01234")
    assert read_checked(path) is None and "entry.pt is damaged (5 bytes, 10 written" in caplog.text
