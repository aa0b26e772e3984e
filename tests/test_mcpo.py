"""MC-PO through the real command line: the M = 1 identity with DPO, `prefrun generate` (pools, resume after
a kill), training on the pools it wrote, the sampler metrics, the bias warning, and a judged evaluation of a
user's model with a reward model (never the built-in task's score)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import TINY_JOB, run_cli
from .test_judges import char_tokenizer, save_classifier

pytestmark = pytest.mark.slow

TINY_MODEL = [a for a in TINY_JOB if a.startswith("model.")]
TINY_TRAIN = [a for a in TINY_JOB if not a.startswith("data.")]
POOL_METRICS = {"loss/optimised", "negatives/judge_score", "negatives/rank", "sampler/ess",
                "sampler/draws_chosen", "sequences/with_grad"}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_run(tmp_path: Path, name: str, args: list[str], env: dict | None = None) -> Path:
    run = tmp_path / name
    proc = run_cli(["train", f"hydra.run.dir={run}", *args], tmp_path, env_extra=env)
    return run if proc else run


def test_mcpo_with_one_negative_is_dpo_through_the_pool_machinery(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    common = ["model=hf", f"model.name_or_path={bpe_model_dir}", "data=jsonl", f"data.path={pairs_jsonl}", "~task",
              "trainer.batch_size=4", "trainer.max_steps=5", "trainer.log_every=1", "trainer.save_final=false",
              "loss.beta=0.3"]
    dpo = rows(train_run(tmp_path, "dpo", [*common, "loss=dpo"]))
    as_given = rows(train_run(tmp_path, "dataset", [*common, "loss=mcpo", "sampler=dataset"]))
    # pairs as pools of two, the pool scored with the policy each step, the negative drawn by the sampler
    drawn = rows(train_run(tmp_path, "reward", [*common, "loss=mcpo", "sampler=reward", "sampler.num_negatives=1"]))
    for a, b, c in zip(dpo, as_given, drawn, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) == pytest.approx(c["loss"], abs=1e-6)
        assert a["loss"] == pytest.approx(c["loss/optimised"], abs=1e-6)
        assert a["rewards/margin"] == pytest.approx(c["rewards/margin"], abs=2e-6)  # fp32 rounding of packed rows
    assert POOL_METRICS <= set(drawn[-1]) and drawn[-1]["negatives/judge_score"] == 0.0  # the rejected one, scored 0


def generate_args(out: Path, *extra: str) -> list[str]:
    return ["generate", *TINY_MODEL, "generator=hf", "generator.num_candidates=4", "generator.max_new_tokens=10",
            "num_prompts=48", "shard_size=6", f"output={out}", *extra]


def test_generate_writes_judged_pools_and_resumes_after_a_kill(tmp_path, cache_dir):
    whole = tmp_path / "whole" / "pools.jsonl"
    run_cli(generate_args(whole), tmp_path)
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(records) == 48 and all(len(r["candidates"]) == len(r["scores"]) == 4 for r in records)
    from prefrun.tasks import SortDigits

    task = SortDigits()
    assert all(s == task.score(r["prompt"], c) for r in records for c, s in zip(r["candidates"], r["scores"]))

    killed = tmp_path / "killed" / "pools.jsonl"
    shards = killed.with_name("pools.jsonl.shards")
    proc = subprocess.Popen([sys.executable, "-m", "prefrun", *generate_args(killed)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while not (shards / "shard-00001.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(shards.glob("shard-*.jsonl"))
    assert 2 <= len(done) < 8 and not killed.exists()  # killed in the middle
    resumed = run_cli(generate_args(killed), tmp_path)
    assert "already done" in resumed.stdout + resumed.stderr
    assert killed.read_text() == whole.read_text()

    # the pools train MC-PO as they are (data=pools), with every sampler metric logged
    run = train_run(tmp_path, "train", [*TINY_TRAIN, "data=pools", f"data.path={whole}", "loss=mcpo_cd", "sampler=cd",
                                        "trainer.max_steps=4", "trainer.log_every=2"])
    last = rows(run)[-1]
    assert POOL_METRICS <= set(last) and 1 <= last["sampler/ess"] <= 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_examples"] <= 48 and summary["eval_after"] == {}  # rule judge, the data is not the task's


def test_generate_does_not_take_the_shards_of_a_model_since_retrained_in_the_same_directory(tmp_path, bpe_model_dir):
    """The shards beside the output are reused by the same job only: the job named the model by its path, and after
    retraining into the same directory the same command wrote the old model's pools again, silently."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    policy = tmp_path / "policy"
    shutil.copytree(bpe_model_dir, policy)
    args = ["generate", "model=hf", f"model.name_or_path={policy}", "generator=hf", "generator.num_candidates=2",
            "generator.max_new_tokens=4", "num_prompts=4", f"output={tmp_path / 'pools.jsonl'}"]
    run_cli(args, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(policy)  # "retrained"
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 2 and "holds pools of another job" in proc.stdout + proc.stderr


def test_a_grid_of_generate_jobs_writes_each_jobs_pools_in_its_own_directory(tmp_path, bpe_model_dir):
    # the default output (pools.jsonl) is relative: every job of the grid wrote it in the working directory, and
    # the second refused the first one's shards
    grid = tmp_path / "grid"
    run_cli(["generate", "-m", "model=hf", f"model.name_or_path={bpe_model_dir}", "generator=hf",
             "generator.num_candidates=2", "generator.max_new_tokens=4", "num_prompts=4", "generator.seed=0,1",
             f"hydra.sweep.dir={grid}"], tmp_path)
    first, second = ([json.loads(line) for line in (grid / job / "pools.jsonl").read_text().splitlines()]
                     for job in ("0", "1"))
    assert len(first) == len(second) == 4 and first != second and not (tmp_path / "pools.jsonl").exists()


def test_biased_pairing_runs_with_one_warning(tmp_path, cache_dir):
    proc = run_cli(["train", *TINY_JOB, "experiment=mcpo_tiny", "sampler=hardest", "trainer.max_steps=2",
                    "eval.num_prompts=0", "trainer.save_final=false"], tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("does not keep the optimum π** as a fixed point") == 1 and "sampler=hardest" in log


def test_user_data_is_judged_by_a_reward_model_never_by_the_task(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    rm = save_classifier(tmp_path / "rm", char_tokenizer())
    common = ["model=hf", f"model.name_or_path={bpe_model_dir}", "data=jsonl", f"data.path={pairs_jsonl}",
              "data.eval_size=4", "trainer.batch_size=4", "trainer.max_steps=2", "eval.num_prompts=4",
              "trainer.save_final=false"]
    # the built-in task is still configured (no ~task): its score must not be reported for this data
    plain = json.loads((train_run(tmp_path, "rule", common) / "summary.json").read_text())
    assert plain["eval_before"] == {} and plain["eval_after"] == {}
    judged = json.loads((train_run(tmp_path, "rm", [*common, "judge=reward_model", f"judge.name_or_path={rm}"])
                         / "summary.json").read_text())
    after = judged["eval_after"]["sampled"]
    assert after["judge"].startswith("judge=reward_model") and after["num_prompts"] == 4
    assert 0 <= after["prompts_above_start"] <= 1 and judged["eval_before"]["sampled"]["mean"] != 0
    assert 0 <= after["vs_start"]["win_rate"] <= 1 and after["vs_start"]["judged_pairs"] > 0


def test_mcpo_on_the_embedded_task_improves_the_judged_score(tmp_path, cache_dir):
    """experiment=mcpo_tiny on a quarter of its prompts: pools of 8 from the reference, mcpo_cd + cd."""
    run = train_run(tmp_path, "mcpo", ["experiment=mcpo_tiny", "data.num_prompts=512", "eval.num_prompts=128",
                                       "trainer.save_final=false"])
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["eval_before"]["sampled"], summary["eval_after"]["sampled"]
    assert after["mean"] - before["mean"] > 3 * (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
    assert after["prompts_above_start"] > 0.5
    # Pairwise against the start (the rule's verdicts compared hard): a win rate above one half, its interval too.
    pairwise = after["vs_start"]
    assert pairwise["win_rate_interval"][0] > 0.5 and pairwise["num_pairs"] == 128 * 4
    assert pairwise["position_bias_rate"] == 0 and "completions" not in summary["eval_before"]["sampled"]
    last = rows(run)[-1]
    assert last["sequences/with_grad"] < 32 * 3  # y_w and the distinct draws only (M = 2), never the whole pool


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_generate_with_vllm_through_the_cli(tmp_path, cache_dir):
    """`prefrun generate generator=vllm`: the engine (one child process) loads the weights from their
    directory; the parent holds only the tokenizer. Pools as the HF backend's: judged, K per prompt."""
    out = tmp_path / "vllm" / "pools.parquet"
    proc = run_cli(["generate", *TINY_MODEL, "generator=vllm", "generator.num_candidates=3",
                    "generator.max_new_tokens=10", "num_prompts=12", f"output={out}"], tmp_path)
    from datasets import Dataset

    records = Dataset.from_parquet(str(out)).to_list()
    assert len(records) == 12 and all(len(r["candidates"]) == len(r["scores"]) == 3 for r in records)
    assert "generate (vllm)" in proc.stdout + proc.stderr and "policy:" not in proc.stdout + proc.stderr
