"""Several processes through `accelerate launch` (gloo on the CPU): the repository's FSDP config with an empty
cache, and online rounds, each equal to one process at the same global batch, with the work split (each
shard made once) and one writer per file; a 2-process online run stopped by SIGTERM in round 2 resumes, a run
changes its number of processes at a round boundary, and a preempted submitit job requeues itself."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from prefrun.online import load_weights

from .conftest import REPO, TINY_JOB, accelerate_launch, fsdp_on_cpu, run_cli, sharded_checkpoint
from .test_faults import signal_at_fault

pytestmark = pytest.mark.slow

JOB = [*TINY_JOB, "eval.num_prompts=16", "trainer.max_steps=6", "trainer.log_every=1", "trainer.save_final=false",
       "trainer.save_every=3"]
# APO, 3 rounds of 200 prompts: 4 shards of 64 per round (128 + 72 prompts on two processes); the third round
# reads the momentum θ̂_{t-1} that the second carried over.
ONLINE = [*TINY_JOB, "experiment=apo_tiny", "generator=hf", "generator.shard_size=64", "data.num_prompts=600",
          "online.rounds=3",
          "trainer.max_steps=6", "trainer.log_every=1", "eval.num_prompts=16"]
ENV = {"OMP_NUM_THREADS": "1"}  # both sides the same threads: sampling then sees the very same probabilities


def launch(args: list[str], cwd, env: dict, *, config: str | None = None, processes: int = 2,
           check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch [--config_file F] --num_processes N -m prefrun <args>`, as a user types it. On a machine
    without GPUs `--multi_gpu` is accelerate's multi-process launcher (torchrun); the processes then train on the
    CPU with gloo, and an FSDP config becomes multi-process DDP (accelerate wraps with FSDP on GPUs only)."""
    how = ["--config_file", config] if config else ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = accelerate_launch(*how, "--num_processes", str(processes), "--num_machines", "1", "-m", "prefrun", *args)
    proc = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def beside(args: list[str], cwd, env: dict) -> subprocess.Popen:
    """`prefrun <args>` on one process, started in the background: a one-process run that a test compares with a
    multi-process one runs while the other starts (each process is one thread, ENV: on two cores the pair took
    19 s instead of 29 s one after the other). Give each its own cache: two jobs never build an entry at once."""
    return subprocess.Popen([sys.executable, "-m", "prefrun", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen) -> None:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed ({proc.returncode}):\n{out[-6000:]}"


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_rows(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [(r.get("round"), r["step"]) for r in a] == [(r.get("round"), r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=1e-5, rel=1e-5), (x["step"], key)


TRAIN_KEYS = ("loss", "rewards/margin", "logps/chosen", "logps/rejected", "grad_norm")
ROUND_KEYS = (*TRAIN_KEYS, "round/judge_score", "round/kl_to_initial", "round/eval/policy_hat/sampled/mean",
              "round/eval/policy/sampled/mean", "round/num_examples")


def test_the_shipped_fsdp_config_on_two_processes_with_an_empty_cache_equals_one_process(tmp_path):
    """transformers zeroes the weights of local ranks other than 0 under this config (RAM-efficient loading); the
    processes must still generate, judge and score with the real weights, and build the cache once."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = beside(["train", *JOB, "trainer.batch_size=8", f"hydra.run.dir={one}"], tmp_path,
                    {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache-one")})
    config = tmp_path / "fsdp.yaml"
    shutil.copy(REPO / "docs" / "accelerate" / "fsdp.yaml", config)
    out = launch(["train", *JOB, "trainer.batch_size=4", f"hydra.run.dir={two}"], tmp_path,
                 {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache-two")}, config=str(config))
    finished(single)
    log = (two / "train.log").read_text()
    assert log.count("accelerate: 2 process(es)") == 1, "one writer for train.log"
    assert (out.stdout + out.stderr).count("judged score [sampled") == 1, "the console prints once"
    assert sorted(p.name for p in (two / "checkpoints" / "step-3").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    single, double = _rows(one), _rows(two)
    assert double[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # ln 2: policy = reference on every process
    assert [r["step"] for r in double] == list(range(1, 7))
    # Accuracy is left out: at step 1 policy = reference, rewards are ±1e-7 noise.
    _same_rows(single, double, TRAIN_KEYS)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert a["num_examples"] == b["num_examples"]
    for decoding in ("sampled", "greedy"):
        assert a["eval_after"][decoding]["per_prompt"] == b["eval_after"][decoding]["per_prompt"]
    assert a["held_out_after"] == b["held_out_after"] or not a["held_out_after"]


@pytest.fixture(scope="module")
def online_runs(tmp_path_factory):
    """The same APO job, uninterrupted, on one process (batch 8) and on two (batch 4 each)."""
    root = tmp_path_factory.mktemp("online")
    env = {**ENV, "PREFRUN_CACHE": str(root / "cache")}
    single = beside(["train", *ONLINE, "trainer.batch_size=8", f"hydra.run.dir={root / 'one'}"], root,
                    {**env, "PREFRUN_CACHE": str(root / "cache-one")})
    out = launch(["train", *ONLINE, "trainer.batch_size=4", f"hydra.run.dir={root / 'two'}"], root, env)
    finished(single)
    return root, env, out


def test_online_rounds_on_two_processes_split_the_work_and_equal_one_process(online_runs):
    root, _, out = online_runs
    one, two = root / "one", root / "two"
    for t in (1, 2, 3):
        # The pools (prompts, candidates, scores) do not depend on the number of processes.
        assert (one / "rounds" / str(t) / "pools.jsonl").read_text() == (two / "rounds" / str(t) / "pools.jsonl").read_text()
        single, double = (json.loads((d / "rounds" / str(t) / "round.json").read_text()) for d in (one, two))
        assert single["generate/prompts_per_process"] == [200]
        assert double["generate/prompts_per_process"] == [128, 72]  # shards 0, 2 and 1, 3 of 64 prompts
        assert single["train/global_batch"] == double["train/global_batch"] == 8
        for which in ("policy_hat", "policy"):
            for decoding, result in single["eval"].get(which, {}).items():
                assert double["eval"][which][decoding]["per_prompt"] == result["per_prompt"], (t, which, decoding)
    _same_rows(_rows(one), _rows(two), ROUND_KEYS)
    # Each round starts from the weights the last one left (θ_t, extrapolated) and uses them as its reference
    # (ref=previous): its first step's rewards are 0; round 1 starts at the initial policy (KL 0).
    for t in (1, 2, 3):
        first = next(r for r in _rows(two) if r.get("round") == t and r.get("round_step") == 1)
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
        assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    kl = [json.loads((two / "rounds" / str(t) / "round.json").read_text())["round/kl_to_initial"] for t in (1, 2, 3)]
    assert abs(kl[0]) < 1e-5 and kl[1] > 1e-4 and kl[2] > 1e-4, kl
    for t in (1, 2, 3):
        assert (out.stdout + out.stderr).count(f"round {t}/3:") == 1, "each round printed once"
    assert (two / "train.log").read_text().count("round 2/3:") == 1
    final_one, final_two = (load_file(d / "checkpoint-final" / "model.safetensors") for d in (one, two))
    for name in final_one:  # 18 steps and two extrapolations apart by the order of DDP's gradient sums
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-4, rtol=1e-3)


def test_a_two_process_run_stopped_by_sigterm_in_round_2_resumes_and_changes_processes_only_at_a_round_boundary(online_runs):
    """Under real FSDP2 (the shipped config, trainer.cpu_fsdp): APO's extrapolation and the round-start reference
    write into sharded weights, the mid-round checkpoint is sharded, and the resumed run equals one process."""
    root, env, _ = online_runs
    broken = root / "broken"
    config, sharded = fsdp_on_cpu(root)
    job = [*ONLINE, "trainer.save_every=2", f"hydra.run.dir={broken}"]
    command = accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1", "-m", "prefrun",
                                "train", *job, "trainer.batch_size=4", sharded)
    # SIGTERM to the whole job (as SLURM preempts; the launcher forwards it too: twice is once) while process 0
    # waits at round 2's step 3 (its 9th step): both stop at that step boundary and save there, off the
    # save_every=2 grid (test_faults.py has the rest of the stop signal's drill).
    code, said = signal_at_fault(command, {**env, "PREFRUN_FAULT": "train:9:hang@0"}, root)
    assert code != 0 and "stopped by SIGTERM at step 3 of 6" in said and "the same command continues" in said, \
        said[-3000:]
    assert sorted(p.name for p in (broken / "rounds" / "2" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    sharded_checkpoint(broken / "rounds" / "2" / "checkpoints" / "step-3")
    assert not (broken / "rounds" / "2" / "round.json").exists()

    # Mid-round, the checkpoint holds two processes' state: one process (same global batch) is refused in one line.
    # (The global batch too, when it changed: the number of processes is named first, the one thing to change.)
    for batch in (8, 4):
        refused = run_cli(["train", *job, f"trainer.batch_size={batch}"], root, env, check=False)
        said = refused.stdout + refused.stderr
        assert refused.returncode == 2 and "written by 2 process(es)" in said, said[-3000:]
        assert "are done" not in said  # refused before the policy loads and the finished rounds are read back
        # and the run's record stays the command's that ran (it said batch_size 8 after the refusal)
        assert yaml.safe_load((broken / "config.yaml").read_text())["trainer"]["batch_size"] == 4
        assert "trainer.batch_size=4" in (broken / ".hydra" / "overrides.yaml").read_text()
    launch(["train", *job, "trainer.batch_size=4", sharded], root, env, config=config)  # the same command again
    log = (broken / "train.log").read_text()
    assert "round 1 of 3 is done" in log and "resuming from" in log
    # (the two refused commands said what they changed; the same command again had nothing to say)
    assert log.count("was started with other values") == 2, log
    _same_rows(_rows(broken), _rows(root / "one"), ROUND_KEYS)
    for t in (1, 2, 3):  # each round starts from θ_{t-1} (extrapolated into the shards) as its reference
        first = next(r for r in _rows(broken) if r.get("round") == t and r.get("round_step") == 1)
        assert first["loss"] == pytest.approx(0.693147, abs=1e-4), first
    final_one, final_broken = (load_file(d / "checkpoint-final" / "model.safetensors") for d in (root / "one", broken))
    for name in final_one:  # gathered from the shards; apart by the order of the gradient sums
        torch.testing.assert_close(final_broken[name], final_one[name], atol=1e-4, rtol=1e-3)

    # At a round boundary (rounds 1-2 done) one process continues at the same global batch, and only at it.
    boundary = root / "boundary"
    shutil.copytree(root / "two", boundary, symlinks=True)
    shutil.rmtree(boundary / "rounds" / "3")
    other_batch = run_cli(["train", *ONLINE, "trainer.batch_size=4", f"hydra.run.dir={boundary}"], root, env,
                          check=False)
    said = other_batch.stdout + other_batch.stderr
    assert other_batch.returncode == 2 and "global batch of 8" in said and "are done" not in said, said[-3000:]
    run_cli(["train", *ONLINE, "trainer.batch_size=8", f"hydra.run.dir={boundary}"], root, env)
    assert "rounds 1-2 of 3 are done" in (boundary / "train.log").read_text()
    _same_rows(_rows(boundary), _rows(root / "one"), ROUND_KEYS)
    assert (boundary / "rounds" / "3" / "pools.jsonl").read_text() == (root / "one" / "rounds" / "3" / "pools.jsonl").read_text()


def test_mcpo_under_real_fsdp2_killed_and_resumed_from_sharded_checkpoints_equals_one_process(tmp_path):
    """Offline MC-PO on generated pools (CD negatives drawn under the sharded policy) through accelerate's FSDP2
    path on two CPU processes: the run is SIGKILLed after its sharded step-3 checkpoint, the same command resumes,
    and losses, negatives, evaluation and the gathered checkpoint-final equal one process at the same global batch."""
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    job = [*(a for a in JOB if a != "trainer.save_final=false"), "experiment=mcpo_tiny"]
    single = beside(["train", *job, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
                    {**env, "PREFRUN_CACHE": str(tmp_path / "cache-one")})
    config, sharded = fsdp_on_cpu(tmp_path)
    two = ["train", *job, "trainer.batch_size=4", sharded, f"hydra.run.dir={tmp_path / 'two'}"]
    killed = launch(two, tmp_path, {**env, "PREFRUN_FAULT": "train:5:kill"}, config=str(config), check=False)
    assert killed.returncode != 0
    finished(single)
    sharded_checkpoint(tmp_path / "two" / "checkpoints" / "step-3")
    launch(two, tmp_path, env, config=str(config))
    log = (tmp_path / "two" / "train.log").read_text()
    assert "accelerate: 2 process(es), FSDP" in log and "resuming from" in log
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    _same_rows(one, two, ("loss", "rewards/margin", "logps/chosen", "negatives/rank", "sampler/ess"))
    # The gradient norm of sharded gradients is summed in another order (1e-5 relative here).
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert a["eval_after"]["sampled"]["per_prompt"] == b["eval_after"]["sampled"]["per_prompt"]
    final_one, final_two = (load_file(tmp_path / d / "checkpoint-final" / "model.safetensors") for d in ("one", "two"))
    assert final_two.keys() == final_one.keys()  # the gathered weights without a copy of the tied lm_head.weight
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-4, rtol=1e-3)


def test_in_bf16_under_fsdp2_and_zero3_the_reference_is_scored_as_training_computes_and_the_first_step_is_ln_2(
        tmp_path):
    """FSDP2's mixed precision casts every parameter to bf16 (embeddings and norms too), and so does DeepSpeed's
    engine; autocast over whole fp32 weights casts only the matmuls' inputs. A reference scored before sharding
    started the log-ratio off 0 (step-1 loss 0.69361 under FSDP2, 0.69523 under ZeRO-3). The FSDP policy is
    sharded as it is loaded, the DeepSpeed one cast to bf16, so the pools, the reference and training compute
    alike. The cache keeps the three apart: a bf16 run of one process (autocast) samples and scores the same
    weights first, into the same cache, and each sharded run makes its own pools and reference."""
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    bf16 = [*JOB, "trainer.mixed_precision=bf16", "trainer.max_steps=1", "trainer.save_every=0", "eval.num_prompts=0"]
    run_cli(["train", *bf16, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'autocast'}"], tmp_path, env)
    assert _rows(tmp_path / "autocast")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    fsdp, sharded = fsdp_on_cpu(tmp_path)
    zero3 = str(REPO / "docs" / "accelerate" / "deepspeed_zero3.yaml")
    for name, config, key, kind in (("fsdp", fsdp, sharded, "FSDP"),
                                    ("zero3", zero3, "trainer.cpu_deepspeed=true", "DEEPSPEED ZeRO-3")):
        launch(["train", *bf16, key, f"hydra.run.dir={tmp_path / name}"], tmp_path, env, config=config)
        log = (tmp_path / name / "train.log").read_text()
        assert f"accelerate: 2 process(es), {kind}, cpu:0, mixed precision bf16" in log
        assert "cache hit" not in log and "cached pools" not in log, log  # sampled and scored as it trains
        first = _rows(tmp_path / name)[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margin"] == 0.0, first


def test_lora_apo_rounds_under_real_zero3_killed_and_resumed_equal_one_process(tmp_path):
    """The shipped DeepSpeed ZeRO-3 config on two CPU processes, run by DeepSpeed for real (trainer.cpu_deepspeed:
    its CPU accelerator over gloo; accelerate alone would train it as DDP): APO with LoRA, 2 rounds. Round 1's
    pools are generated before prepare() by a policy loaded whole (under a ZeRO-3 config transformers partitions
    what it loads: empty weights); round 2 samples its pools and evaluation from the partitioned policy, split
    over the processes (synced generate() calls); round 1's adapters are merged and extrapolated into this
    process's partition of each base weight, fresh adapters cut to their partitions, the round's weights
    gathered partition by partition for the writer; the KL estimate swaps the initial weights into the
    partitions and back. The run is SIGKILLed in round 1 after its ZeRO-3 checkpoint at step 2 and the same
    command resumes; checkpoint-final merges the gathered base weights and adapter factors. Pools, round
    weights, losses, evaluation and the merged weights equal one process at the same global batch. (Each of
    these met a defect, the shipped config's on GPUs too: its "auto" values stopped Accelerator() at start-up,
    prepare() had no micro-batch size, the checkpoint's space estimate read a ZeRO optimiser as a torch one,
    checkpoint-final was asked of the module, not the engine; a partition written while DeepSpeed held the
    parameter gathered went unused.)"""
    pytest.importorskip("deepspeed")
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    job = [*(a for a in ONLINE if a not in ("online.rounds=3", "data.num_prompts=600", "generator.shard_size=64")),
           "online.rounds=2", "data.num_prompts=128", "generator.shard_size=32", "+model/lora=default",
           "model.lora.merge=true", "trainer.max_steps=4", "trainer.save_every=2"]  # 64 prompts a round, 2 shards
    single = beside(["train", *job, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
                    {**env, "PREFRUN_CACHE": str(tmp_path / "cache-one")})
    config = str(REPO / "docs" / "accelerate" / "deepspeed_zero3.yaml")
    two = ["train", *job, "trainer.batch_size=4", "trainer.cpu_deepspeed=true", f"hydra.run.dir={tmp_path / 'two'}"]
    killed = launch(two, tmp_path, {**env, "PREFRUN_FAULT": "train:3:kill"}, config=config, check=False)
    assert killed.returncode != 0
    finished(single)
    assert (tmp_path / "two" / "rounds" / "1" / "checkpoints" / "step-2" / "pytorch_model").is_dir()  # DeepSpeed's
    launch(two, tmp_path, env, config=config)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "accelerate: 2 process(es), DEEPSPEED" in log and "resuming from" in log
    for t in (1, 2):
        assert (tmp_path / "two" / "rounds" / str(t) / "pools.jsonl").read_text() == \
            (tmp_path / "one" / "rounds" / str(t) / "pools.jsonl").read_text()
    # Round 2 (the partitioned policy) split its pools; round 1's were made before the kill.
    assert json.loads((tmp_path / "two" / "rounds" / "2" / "round.json").read_text())[
        "generate/prompts_per_process"] == [32, 32]
    for weights in ("policy_hat", "policy"):  # round 1's θ̂ and its extrapolation θ (one file / gathered in files)
        kept = [load_weights(tmp_path / d / "rounds" / "1" / weights) for d in ("one", "two")]
        assert sorted(kept[0]) == sorted(kept[1])
        for name in kept[0]:
            torch.testing.assert_close(kept[1][name], kept[0][name], atol=1e-5, rtol=1e-4)
    one, two_rows = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    _same_rows(one, two_rows, tuple(k for k in ROUND_KEYS if k != "grad_norm"))
    assert [r["loss"] for r in two_rows if r.get("round_step") == 1] == pytest.approx([0.6931472] * 2, abs=1e-5)
    merged = [load_file(tmp_path / d / "checkpoint-final" / "model.safetensors") for d in ("one", "two")]
    assert sorted(merged[0]) == sorted(merged[1]) and not any("lora_" in name for name in merged[0])
    for name in merged[0]:
        torch.testing.assert_close(merged[1][name], merged[0][name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("stage, experiment", [(3, "apo_tiny"), (2, "iterdpo_tiny")])
def test_deepspeed_in_bf16_carries_its_fp32_master_weights_from_round_to_round_and_through_a_resume(
        tmp_path, stage, experiment):
    """DeepSpeed builds each round's optimiser from the bf16 module: its fp32 masters lasted one round, and every
    round boundary rounded the weights to bf16 (at lr 1e-6 round 2's update was lost in 98% of the weights). Now
    each process's part of the fp32 masters (a ZeRO-3 partition; under ZeRO-2 its fragment of the optimiser's flat
    buffer) is kept past the round (θ̂_t and APO's extrapolation θ_t in fp32, on disk too) and the next optimiser
    starts from it, also after a resume at a round boundary (read back from disk). ZeRO-3 runs APO (round 2 starts
    from the extrapolation written into the partitions), ZeRO-2 iterative rounds (round 2 starts from the kept
    fragments themselves). AdamW's first step moves every weight by lr exactly (sign of its gradient): with one
    step a round, each round's θ̂_t is its start ± lr, to fp32's rounding; checkpoint-final holds θ̂_3 in fp32."""
    pytest.importorskip("deepspeed")
    lr = 1e-6
    job = [*(a for a in ONLINE if a not in ("online.rounds=3", "data.num_prompts=600", "trainer.max_steps=6",
                                            "experiment=apo_tiny")),
           f"experiment={experiment}", "online.rounds=3", "data.num_prompts=192", "generator.shard_size=32",
           "trainer.max_steps=1", "trainer.batch_size=4", "eval.num_prompts=0", f"optim.lr={lr}",
           "trainer.mixed_precision=bf16", "trainer.cpu_deepspeed=true", f"hydra.run.dir={tmp_path / 'run'}"]
    config = tmp_path / "zero.yaml"
    config.write_text((REPO / "docs" / "accelerate" / "deepspeed_zero3.yaml").read_text()
                      .replace("zero_stage: 3", f"zero_stage: {stage}"))
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    killed = launch(["train", *job], tmp_path, {**env, "PREFRUN_FAULT": "round:3:kill"}, config=str(config),
                    check=False)
    assert killed.returncode != 0 and (tmp_path / "run" / "rounds" / "2" / "round.json").exists()
    launch(["train", *job], tmp_path, env, config=str(config))  # round 3 starts from θ_2 read back from disk
    log = (tmp_path / "run" / "train.log").read_text()
    assert "rounds 1-2 of 3 are done" in log and f"DEEPSPEED ZeRO-{stage}, cpu" in log
    rounds = tmp_path / "run" / "rounds"
    for t in (2, 3):
        start, hat = load_weights(rounds / str(t - 1) / "policy"), load_weights(rounds / str(t) / "policy_hat")
        assert {w.dtype for w in (*start.values(), *hat.values())} == {torch.float32}
        if t == 2:  # θ_1 (θ̂_2 = θ_0 ± lr ∓ lr of iterative rounds is back on bf16's grid in about half)
            exact = sum(int((w == w.bfloat16().float()).sum()) for w in start.values())
            assert exact < 0.1 * sum(w.numel() for w in start.values()), "θ_1 kept in bf16"
        step = torch.cat([(hat[name].double() - start[name].double()).abs().flatten() for name in start])
        moved = step[step > lr / 100]
        assert moved.numel() > 0.9 * step.numel() and float(step.max()) < 1.05 * lr, (t, float(step.max()) / lr)
        assert float(moved.median()) == pytest.approx(lr, rel=1e-2)
    # checkpoint-final is θ̂_3 in fp32 too (it was DeepSpeed's 16-bit gather)
    final = load_weights(tmp_path / "run" / "checkpoint-final")
    assert final.keys() == hat.keys() and all(torch.equal(final[n], hat[n]) for n in hat)


def test_lora_apo_rounds_under_real_fsdp2_equal_one_process(tmp_path):
    """APO with LoRA, 2 rounds, through FSDP2 on two CPU processes: pools and evaluation sample through PEFT's
    `generate`, which skips the root module's forward (the root's parameters are gathered around it); round 1's
    adapters are merged and extrapolated into the sharded base and fresh adapters drawn as one process draws them
    (on the shards they came out other, and round 2 diverged); checkpoint-final holds the merged model gathered
    from the shards. Pools, losses, evaluation and the merged final model equal one process at the same global batch."""
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    job = [*(a for a in ONLINE if a not in ("online.rounds=3", "data.num_prompts=600", "generator.shard_size=64")),
           "online.rounds=2", "data.num_prompts=128", "generator.shard_size=32", "+model/lora=default",
           "trainer.save_every=3"]  # 64 prompts a round, 2 shards
    single = beside(["train", *job, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
                    {**env, "PREFRUN_CACHE": str(tmp_path / "cache-one")})
    config, sharded = fsdp_on_cpu(tmp_path)
    launch(["train", *job, "trainer.batch_size=4", sharded, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, env,
           config=config)
    finished(single)
    assert "accelerate: 2 process(es), FSDP" in (tmp_path / "two" / "train.log").read_text()
    for t in (1, 2):
        assert (tmp_path / "two" / "rounds" / str(t) / "pools.jsonl").read_text() == \
            (tmp_path / "one" / "rounds" / str(t) / "pools.jsonl").read_text()
        # Split in both rounds, also in round 2, where the policy is sharded (synced generate() calls).
        done = json.loads((tmp_path / "two" / "rounds" / str(t) / "round.json").read_text())
        assert done["generate/prompts_per_process"] == [32, 32], (t, done["generate/prompts_per_process"])
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    _same_rows(one, two, tuple(k for k in ROUND_KEYS if k != "grad_norm"))  # (sharded: summed in another order)
    assert [r["loss"] for r in two if r.get("round_step") == 1] == pytest.approx([0.6931472] * 2, abs=1e-5)
    # The last round's adapters were merged too: checkpoint-final is the merged model gathered from the shards, θ̂_2.
    final = [load_file(tmp_path / d / "checkpoint-final" / "model.safetensors") for d in ("one", "two")]
    hat = load_weights(tmp_path / "two" / "rounds" / "2" / "policy_hat")
    assert sorted(final[0]) == sorted(final[1]) == sorted(hat) and not any("lora_" in name for name in hat)
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(final[1][name], hat[name], atol=0, rtol=0)


def test_a_bad_record_or_override_stops_two_processes_with_one_line_printed_once(tmp_path):
    """Every process reads the data and stops on the same record: the line was printed once per process. The
    main process prints it; the others stay quiet when it says the same (and speak when it does not). The same
    for a bad override, which Hydra reports before prefrun runs, and for what Hydra prints instead of running."""
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "sort 3 1:", "chosen": "13", "rejected": "31"}
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [good, {**good, "chosen": ["x"]}, good]))
    out = launch(["train", *(a for a in TINY_JOB if not a.startswith("data.")), "data=jsonl", f"data.path={pairs}", f"hydra.run.dir={tmp_path / 'run'}"],
                 tmp_path, {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}, check=False)
    said = out.stdout + out.stderr
    assert out.returncode != 0 and said.count("pairs.jsonl:2: 'chosen' is list ['x']") == 1, said[-3000:]
    # Hydra's own errors, before any process group: every process makes the same one, the main process prints it.
    out = launch(["train", "trainer.batchsize=4"], tmp_path, ENV, check=False)
    said = out.stdout + out.stderr
    assert out.returncode != 0 and said.count("Could not override 'trainer.batchsize'") == 1, said[-3000:]
    out = launch(["train", "--cfg", "job"], tmp_path, ENV)  # what Hydra prints instead of running: once too
    assert out.stdout.count("\nseed: ") + out.stdout.startswith("seed: ") == 1, out.stdout[-3000:]


@pytest.mark.parametrize("fault, line", [
    ("kill", "process 0 of 2: another process of this job is gone ("),
    ("hang", "process 0 of 2: another process of this job did not answer in time (Timed out waiting 8000ms"),
    ("enospc", ": no space left on the device")], ids=["kill", "hang", "enospc"])
def test_a_process_killed_hung_or_failing_alone_in_training_stops_the_job_in_one_line(tmp_path, cache_dir, fault,
                                                                                       line):
    """Process 1 is killed (SIGKILL: a crash, an OOM kill, its node gone), hangs, or stops alone with its own line
    (a full disk) at step 4: process 0 learns it in its next collective, at once or after the process group's
    timeout. It printed gloo's traceback ("Connection reset by peer", "Timed out waiting"); now the job says one
    line: the survivor's (exit 1), or the failing process's own, which the survivor only writes into train.log
    (it said "another process is gone" after it, and a hung process said so of the healthy one). The same command
    continues from the last checkpoint to the end (checked once, after the kill)."""
    env = {**ENV, "PREFRUN_FAULT": f"train:4:{fault}@1"}
    args = ["train", *JOB, "trainer.dist_timeout_s=8", f"hydra.run.dir={tmp_path / 'run'}"]
    out = launch(args, tmp_path, env, check=False)
    said = out.stdout + out.stderr
    errors = [row for row in said.splitlines() if "[ERROR]" in row]
    assert out.returncode != 0 and len(errors) == 1 and line in errors[0], said[-3000:]
    assert "Error executing job" not in said, said[-3000:]
    if fault == "enospc":  # said by process 1, which writes no log: process 0 puts it there
        assert f"process 1 of 2 stopped: {errors[0].split('] - ', 1)[1]}" in (tmp_path / "run" / "train.log").read_text()
    else:
        assert "the same command continues" in errors[0]
    if fault == "kill":
        again = launch(args, tmp_path, env)  # each planned fault happens once per run directory
        assert "resuming from" in again.stdout + again.stderr
        assert _rows(tmp_path / "run")[-1]["step"] == 6


def test_prefrun_generate_on_two_processes_writes_what_one_process_writes(tmp_path):
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    args = ["generate", *[a for a in TINY_JOB if a.startswith("model.")], "generator=hf", "generator.num_candidates=4",
            "generator.max_new_tokens=10", "num_prompts=48", "shard_size=6"]
    one, two = tmp_path / "one" / "pools.jsonl", tmp_path / "two" / "pools.jsonl"
    single = beside([*args, f"output={one}"], tmp_path, {**env, "PREFRUN_CACHE": str(tmp_path / "cache-one")})
    out = launch([*args, f"output={two}"], tmp_path, env)
    finished(single)
    assert two.read_text() == one.read_text()
    assert len(list(two.with_name("pools.jsonl.shards").glob("shard-*.jsonl"))) == 8
    assert (out.stdout + out.stderr).count("pools: 48 prompts x 4 candidates") == 1  # printed once


def test_two_simulated_nodes_with_their_own_tmpdir_and_cache_equal_one_process(online_runs):
    """Two machines of one process each (`--num_machines 2`, rendezvous on 127.0.0.1), one shared run directory
    but each node its own TMPDIR and cache, as real nodes have: the same rounds as one process."""
    root, _, _ = online_runs
    nodes = root / "nodes"
    port = str(29_000 + os.getpid() % 1_000)
    procs = []
    for rank in (0, 1):
        node = root / f"node{rank}"
        (node / "tmp").mkdir(parents=True)
        env = {**os.environ, **ENV, "TMPDIR": str(node / "tmp"), "PREFRUN_CACHE": str(node / "cache")}
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "prefrun", "train", *ONLINE,
                   "trainer.batch_size=4", f"hydra.run.dir={nodes}"]
        procs.append(subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _same_rows(_rows(nodes), _rows(root / "one"), ROUND_KEYS)
    for t in (1, 2, 3):
        assert (nodes / "rounds" / str(t) / "pools.jsonl").read_text() == (
            root / "one" / "rounds" / str(t) / "pools.jsonl").read_text()
    # Each node built the embedded model into its own cache, once.
    assert all(len(list((root / f"node{r}" / "cache" / "models").glob("tiny-llama-*"))) == 1 for r in (0, 1))


def test_two_nodes_whose_run_directories_differ_are_refused_in_one_line(tmp_path):
    """`hydra.run.dir=run`, relative: each node's own directory (as a node-local disk is). Checkpoints and rounds
    written by one process and read by all would be missing on the other node: refused before anything loads."""
    port = str(30_000 + os.getpid() % 1_000)
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "prefrun", "train", *JOB,
                   "hydra.run.dir=run"]
        procs.append(subprocess.Popen(command, cwd=node, env={**os.environ, **ENV, "PREFRUN_CACHE": str(node / "cache")},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    errors = [line for out in outputs for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and f"the run directory {tmp_path / 'node0' / 'run'} is not the directory the main " \
        "process writes in, for process(es) 1 (on " in errors[0], outputs
    assert not (tmp_path / "node0" / "cache").exists()  # refused before the embedded model was built


def test_a_multirun_grid_of_two_process_jobs_writes_one_directory_per_job(tmp_path):
    """`accelerate launch ... -m prefrun train -m seed=0,1`: both processes run the grid, job by job, into the
    same sweep directory (rank 0 picks it), so each job's checkpoints hold both processes' state."""
    env = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache")}
    launch(["train", "-m", "seed=0,1", *JOB, "trainer.batch_size=4", "eval.num_prompts=0"], tmp_path, env)
    [sweep] = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    for job in ("0", "1"):
        assert [r["step"] for r in _rows(sweep / job)] == list(range(1, 7))
        assert sorted(p.name for p in (sweep / job / "checkpoints" / "step-3").glob("random_states_*")) == [
            "random_states_0.pkl", "random_states_1.pkl"]
    assert _rows(sweep / "0")[-1]["loss"] != _rows(sweep / "1")[-1]["loss"]  # two seeds, two runs
    # Its report under the same launcher: written by the main process alone (the other took Hydra's arguments
    # for its own and stopped the job with a usage error)
    out = launch(["report", str(sweep)], tmp_path, env)
    assert (sweep / "report.md").exists() and "error" not in out.stdout + out.stderr


def test_srun_tasks_become_ranks_without_torchrun(tmp_path):
    """`srun --ntasks-per-node=2 python -m prefrun train ...`: two tasks of one SLURM step (SLURM's variables,
    faked here on one machine) train as 2 processes, with no torchrun or accelerate launch in between."""
    run = tmp_path / "run"
    common = {**ENV, "PREFRUN_CACHE": str(tmp_path / "cache"), "SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "prefrun", "train", *JOB, "trainer.batch_size=4",
                               f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, **common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "accelerate: 2 process(es)" in (run / "train.log").read_text()
    assert _rows(run)[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert sorted(p.name for p in (run / "checkpoints" / "step-3").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_the_submitit_launcher_runs_each_job_as_two_processes_and_a_preempted_job_requeues_itself(tmp_path):
    """A grid of two jobs of 2 tasks each; both are preempted at step 4 (submitit's signal, SIGUSR2, to every
    task, as SLURM sends it), save there, requeue through submitit's checkpoint protocol and finish."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, **ENV, "PREFRUN_CACHE": str(tmp_path / "cache"), "PREFRUN_FAULT": "train:4:hang@0"}
    command = [sys.executable, "-m", "prefrun", "train", "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", *JOB, "trainer.batch_size=4",
               "eval.num_prompts=0", "seed=0,1"]
    sweep_root = tmp_path / "outputs" / "multirun"
    grid = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and grid.poll() is None:
        logs = list(sweep_root.glob("*/*/*/train.log"))
        if len(logs) == 2 and all("fault injected" in log.read_text() for log in logs):
            break
        time.sleep(0.2)
    tasks = [p for p in psutil.Process(grid.pid).children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())]
    assert len(tasks) == 4, [p.cmdline() for p in tasks]
    for task in tasks:
        task.send_signal(signal.SIGUSR2)
    out = grid.communicate(timeout=600)[0]
    assert grid.returncode == 0, out[-3000:]
    [sweep] = list(sweep_root.glob("*/*"))
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        assert "accelerate: 2 process(es)" in log
        assert "stopped by SIGUSR2 at step 4 of 6" in log and "resuming from" in log, log[-3000:]
        assert [r["step"] for r in _rows(sweep / job)] == list(range(1, 7))
        assert (sweep / job / "summary.json").exists()
    assert list(sweep.glob(".submitit/*/*_log.out"))  # the jobs really went through submitit
