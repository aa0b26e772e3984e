"""scripts/gpu_check.py cannot rot before a GPU is at hand: its smoke mode runs the online, DPO and FSDP checks
(fsdp_online on one process) on the CPU, and says why the ZeRO-3 checks are skipped there (the generate check is
scripts/bench_generate.py, which starts a vLLM engine: left to the GPU run)."""

import importlib.util
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n")
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--only", "online,dpo,fsdp,zero3,fsdp_online,zero3_online",
               "--out", str(out), "--work", str(tmp_path / "work")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and text.count("<!-- gpu_check: begin -->") == 1
    assert "| dpo | step-1 loss 0.693147" in text and "| fsdp | step-1 loss 0.693147" in text
    assert "| online | push + probe s" in text and "| fsdp_online | first losses 0.6931 0.6931" in text
    assert "FAILED" not in text
    # accelerate runs a DeepSpeed config on GPUs only (trainer.cpu_deepspeed is tested by tests/test_distributed.py)
    assert "| zero3 | skipped (no GPU" in text and "| zero3_online | skipped (no GPU" in text
    # A rerun replaces its table (and only it).
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    block = text[text.index(gpu_check.MARKERS[0]) : text.index(gpu_check.MARKERS[1]) + len(gpu_check.MARKERS[1])]
    gpu_check.write_table(block.replace("| dpo |", "| dpo again |"), out)
    again = out.read_text()
    assert again.count(gpu_check.MARKERS[0]) == 1 and "| dpo again |" in again and again.startswith("# Benchmarks")
