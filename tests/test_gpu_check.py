"""scripts/gpu_check.py cannot rot before a GPU is at hand: its smoke mode runs the online, DPO and FSDP checks
(fsdp_online on one process) on the CPU, and says why the ZeRO-3 checks are skipped there (the generate check is
scripts/bench_generate.py, which starts a vLLM engine: left to the GPU run)."""

import argparse
import importlib.util
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, run_cli


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


@pytest.mark.parametrize("vllm", [True, False], ids=["with-vllm", "without-vllm"])
def test_the_gpu_sizes_compose_into_the_jobs_the_gpu_runs(tmp_path, vllm):
    """The GPU sizes are never run here: composed (Hydra, --cfg job) they must be the jobs meant, the embedded
    recipe scaled to 113M with its full warm-up (which runs on the GPU), vLLM where it is installed, else HF."""
    gpu_check = _script()
    ctx = argparse.Namespace(smoke=False, vllm=vllm, work=tmp_path)
    for build in (gpu_check.online_job, gpu_check.sharded_online_job):
        job = build(ctx, tmp_path / "run")
        cfg = yaml.safe_load(run_cli([*job, "--cfg", "job"], tmp_path).stdout)
        recipe = cfg["model"]["build"]
        assert (recipe["hidden_size"], recipe["num_layers"], recipe["sft_steps"]) == (768, 12, gpu_check.GPU_SFT_STEPS)
        assert cfg["generator"]["_target_"].endswith("VLLMGenerator" if vllm else "HFGenerator"), cfg["generator"]
        assert cfg["online"]["rounds"] == 2 and cfg["trainer"]["max_steps"] == 20


@pytest.mark.slow
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
    gpu_check = _script()
    block = text[text.index(gpu_check.MARKERS[0]) : text.index(gpu_check.MARKERS[1]) + len(gpu_check.MARKERS[1])]
    gpu_check.write_table(block.replace("| dpo |", "| dpo again |"), out)
    again = out.read_text()
    assert again.count(gpu_check.MARKERS[0]) == 1 and "| dpo again |" in again and again.startswith("# Benchmarks")
    # Every check that ran left its whole output in one log; a table made elsewhere merges into the docs.
    assert (tmp_path / "work" / "checks.log").read_text().count("\n===== ") == 4
    docs = tmp_path / "docs.md"
    docs.write_text("# Benchmarks\n")
    merged = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--merge", str(out), "--out",
                             str(docs)], capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0 and "| dpo again |" in docs.read_text(), merged.stderr[-2000:]
