"""sync(): the generator brought to the trainer's weights every round, and verified, against real vLLM engines.

One persistent engine runs the main scenario (sync, generate, train, sync, broken syncs, the engine killed and
restarted by the watchdog, then a hung one); two fresh children check fresh mode's probe. A tiny random Llama (head_dim 64) is built here."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from prefrun.errors import PrefrunError
from prefrun.evaluate import judged_scores
from prefrun.generate import HFGenerator, VLLMGenerator, prompt_ids
from prefrun.judges import RuleJudge
from prefrun.tasks import SortDigits

from .conftest import char_llama, teacher_forced

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

K, MAX_NEW = 2, 8
PROMPTS = ["sort 3 1 4 1 5:", "sort 9 2 6:", "sort 5 3 5 8 9 7:", "sort 2 7 1 8 2 8:", "sort 1 2:"]
EVAL = OmegaConf.create({"batch_size": 3, "max_new_tokens": MAX_NEW, "num_examples": 2, "decodings": {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "num_samples": 1},
    "sampled": {"temperature": 1.0, "top_p": 1.0, "num_samples": 3}}})


def live_processes_of_group(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in "ZX":
            alive.append(int(entry))
    return alive


@pytest.fixture(scope="module")
def base():
    """A random 2-layer Llama over the character tokenizer, initialised wide enough to have opinions."""
    return char_llama(hidden=128, heads=2, seed=0, tie_word_embeddings=True, initializer_range=0.1)


def trained(model, tokenizer) -> None:
    """One optimiser step on the probe prompts: the kind of change a training round makes."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[0])])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.zero_grad()


def noised(model, seed: int, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


def error_of(call) -> str:
    start = time.perf_counter()
    with pytest.raises(PrefrunError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.startswith("generator=vllm: "), message
    return message + f" [{time.perf_counter() - start:.1f} s]"


@pytest.fixture(scope="module")
def persistent(base):
    """The main scenario on one persistent engine; every step's outcome is recorded for the tests below."""
    model, tokenizer = copy.deepcopy(base[0]), base[1]
    generator = VLLMGenerator(num_candidates=K, max_new_tokens=MAX_NEW, seed=3, probe_size=4, probe_tokens=8)
    rec = {"repr": repr(generator)}
    try:
        generator.sync(model, tokenizer, probe_prompts=PROMPTS, version=0)
        rec["v0"], rec["pid"] = dict(generator.sync_stats), generator.worker_pid
        rec["group_v0"] = live_processes_of_group(rec["pid"])  # single_process (auto, CPU): the worker alone
        rec["out_v0"] = generator.generate(PROMPTS, model=model, tokenizer=tokenizer)
        shard = dataclasses.replace(generator, seed=generator.seed + 7919)  # what pools.make_pools does
        rec["shard_out"], rec["shard_pid"] = shard.generate(PROMPTS, model=model, tokenizer=tokenizer), shard.worker_pid
        rec["shard_repr"] = repr(shard)

        trained(model, tokenizer)
        generator.sync(model, tokenizer, probe_prompts=PROMPTS, version=1)
        rec["v1"] = dict(generator.sync_stats)
        rec["out_v1"] = generator.generate(PROMPTS, model=model, tokenizer=tokenizer)
        rec["model_v1"] = copy.deepcopy(model)
        # The held-out evaluation through the synced engine (what online rounds do with eval.generator=same),
        # against HF generate in this process on the same weights; shards of 3 prompts, each its own seed.
        judge = RuleJudge(task=SortDigits())
        rec["eval_engine"] = judged_scores(model, tokenizer, PROMPTS, judge, EVAL, seed=5, engine=generator)
        rec["eval_engine_again"] = judged_scores(model, tokenizer, PROMPTS, judge, EVAL, seed=5, engine=generator)
        rec["eval_hf"] = judged_scores(model, tokenizer, PROMPTS, judge, EVAL, seed=5)

        # The probe's block-filling prompts were cached by sync v1; without a reset they are served from there.
        noised(model, seed=1)
        skip_reset = dataclasses.replace(generator, debug_break_sync="skip_prefix_reset")
        rec["skip_reset"] = error_of(lambda: skip_reset.sync(model, tokenizer, probe_prompts=PROMPTS, version=2))
        generator.sync(model, tokenizer, probe_prompts=PROMPTS, version=2)  # the same push, done right
        noised(model, seed=2)
        skip_push = dataclasses.replace(generator, debug_break_sync="skip_push")
        rec["skip_push"] = error_of(lambda: skip_push.sync(model, tokenizer, probe_prompts=PROMPTS, version=3))
        # Done right, in files of 50 KiB, each reloaded alone by the engine (the skipped push sent nothing): the
        # embeddings, each decoder layer (never split: vLLM fuses q/k/v and gate/up), the norm with the tied head.
        dataclasses.replace(generator, push_bucket_mb=0.05).sync(model, tokenizer, probe_prompts=PROMPTS, version=3)
        rec["v3"], rec["pid_v3"] = dict(generator.sync_stats), generator.worker_pid
        rec["repr_v3"] = repr(generator)

        # The watchdog: the engine killed before a generation is restarted with v3's weights, probed, and gives
        # what the lost engine gave; a second loss in the round (a hang, below) is then one line.
        rec["out_v3"] = generator.generate(PROMPTS, model=model, tokenizer=tokenizer)
        os.kill(rec["pid"], signal.SIGKILL)
        rec["out_restarted"], rec["pid_restarted"] = generator.generate(PROMPTS, model=model, tokenizer=tokenizer), \
            generator.worker_pid
        rec["killed_group"] = live_processes_of_group(rec["pid"])
        rec["restart_stats"] = dict(generator.sync_stats)

        os.kill(rec["pid_restarted"], signal.SIGSTOP)  # a hung engine: alive, never answering
        hurried = dataclasses.replace(generator, call_timeout_s=2)
        rec["hung"] = error_of(lambda: hurried.generate(PROMPTS, model=model, tokenizer=tokenizer))
        rec["after_hung"] = error_of(lambda: generator.generate(PROMPTS, model=model, tokenizer=tokenizer))
    finally:
        generator.close()
        generator.close()  # idempotent
    rec["alive_after_close"] = live_processes_of_group(rec["pid_restarted"])
    return rec


@needs_vllm
@pytest.mark.slow
def test_sync_v0_starts_the_engine_and_verifies_it(persistent):
    v0 = persistent["v0"]
    assert set(v0) == {"sync/max_abs_logp_diff", "sync/probe_change", "sync/weight_version", "sync/time_s",
                       "sync/engine_restarts", "sync/push_buckets", "sync/push_bytes"}
    assert v0["sync/push_buckets"] == v0["sync/push_bytes"] == 0  # started from these weights: nothing to push
    assert v0["sync/engine_restarts"] == 0
    assert persistent["group_v0"] == [persistent["pid"]]  # engine core and model in the worker: one process
    assert v0["sync/weight_version"] == 0 and v0["sync/max_abs_logp_diff"] <= 1e-3
    assert math.isnan(v0["sync/probe_change"])  # nothing to compare with yet
    assert len(persistent["out_v0"]) == len(PROMPTS) and all(len(c.texts) == K for c in persistent["out_v0"])


@needs_vllm
@pytest.mark.slow
def test_copies_share_the_engine_and_the_repr_stays(persistent):
    assert persistent["shard_pid"] == persistent["pid"] == persistent["pid_v3"]
    assert persistent["shard_repr"] != persistent["repr"]  # another seed
    assert persistent["repr_v3"] == persistent["repr"]  # sessions and versions stay out of the repr
    assert [c.token_ids for c in persistent["shard_out"]] != [c.token_ids for c in persistent["out_v0"]]


@needs_vllm
@pytest.mark.slow
def test_a_pushed_version_is_served_and_verified(persistent, base):
    v1 = persistent["v1"]
    print(f"\nsync v1: diff {v1['sync/max_abs_logp_diff']:.2e}, change {v1['sync/probe_change']:.3f}, "
          f"{v1['sync/time_s']:.3f} s; v3: {persistent['v3']}")
    assert v1["sync/weight_version"] == 1 and v1["sync/max_abs_logp_diff"] <= 1e-3
    assert v1["sync/probe_change"] > 1e-2  # the step moved the engine's log-probs
    model, tokenizer = persistent["model_v1"], base[1]
    worst = max((torch.tensor(lps) - teacher_forced(model, tokenizer, p, ids)).abs().max().item()
                for p, c in zip(PROMPTS, persistent["out_v1"]) for ids, lps in zip(c.token_ids, c.logprobs) if ids)
    assert worst < 1e-4  # what generate() samples after the push comes from the pushed weights
    assert persistent["v3"]["sync/max_abs_logp_diff"] <= 1e-3 and persistent["v3"]["sync/weight_version"] == 3
    assert v1["sync/push_buckets"] == 1  # the whole model in one file (generator.push_bucket_mb=1024)
    # in fp32, as served, tied weights under each name (as the state dict has them)
    assert v1["sync/push_bytes"] == 4 * sum(t.numel() for t in model.state_dict().values())
    # v3 went in 50 KiB files, each reloaded alone: the probe, on weights that all moved (noise on every
    # parameter), agrees only if every part arrived.
    v3 = persistent["v3"]
    assert v3["sync/push_buckets"] == 4 and v3["sync/probe_change"] > 1e-2


@needs_vllm
@pytest.mark.slow
def test_the_held_out_evaluation_through_the_engine_samples_the_synced_weights(persistent):
    """Greedy, the engine's answers are HF's on the same weights; sampled, each shard's seed gives the same samples
    again; the results name the backend."""
    engine, again, hf = persistent["eval_engine"], persistent["eval_engine_again"], persistent["eval_hf"]
    assert engine["greedy"]["completions"] == hf["greedy"]["completions"]
    assert engine["greedy"]["per_prompt"] == hf["greedy"]["per_prompt"]
    assert engine["sampled"]["completions"] == again["sampled"]["completions"]
    assert [len(c) for c in engine["sampled"]["completions"]] == [3] * len(PROMPTS)
    # shard 0 and shard 1 are sampled with seeds of their own, not one stream cut in two
    assert engine["sampled"]["completions"][0] != engine["sampled"]["completions"][3]
    assert (engine["sampled"]["generator"], hf["sampled"]["generator"]) == ("vllm", "hf")


@needs_vllm
@pytest.mark.slow
def test_a_skipped_push_is_caught(persistent):
    message = persistent["skip_push"]
    print(f"\n{message}")
    assert "(version 3)" in message and "did not take the new weights" in message
    assert "debug_break_sync=skip_push" in message


@needs_vllm
@pytest.mark.slow
def test_a_stale_prefix_cache_is_caught(persistent):
    message = persistent["skip_reset"]
    print(f"\n{message}")
    assert "(version 2)" in message and "prefix cache" in message and "skip_prefix_reset" in message


@needs_vllm
@pytest.mark.slow
def test_a_hung_engine_is_one_line_and_stopped(persistent):
    print(f"\n{persistent['hung']}")
    assert "call_timeout_s=2" in persistent["hung"] and f"pid {persistent['pid_restarted']}" in persistent["hung"]
    assert float(persistent["hung"].rsplit("[", 1)[1].split()[0]) < 10
    # The round's one restart was spent on the killed engine: this second loss is the run's one line.
    assert "(after 1 restart(s) this round, generator.max_restarts=1); the run is resumable" in persistent["hung"]
    assert persistent["hung"].startswith(persistent["after_hung"].split(" [")[0])  # repeated, not hanging
    assert persistent["alive_after_close"] == []


@needs_vllm
@pytest.mark.slow
def test_a_killed_engine_is_restarted_with_the_same_weights_and_gives_the_same_candidates(persistent):
    assert persistent["pid_restarted"] != persistent["pid"] and persistent["killed_group"] == []
    assert [c.token_ids for c in persistent["out_restarted"]] == [c.token_ids for c in persistent["out_v3"]]
    stats = persistent["restart_stats"]
    assert stats["sync/engine_restarts"] == 1 and stats["sync/weight_version"] == 3
    assert stats["sync/max_abs_logp_diff"] < 1e-3  # the new engine passed the probe on v3's weights


@pytest.fixture(scope="module")
def fresh(base, persistent):
    """Fresh mode: a sync, then a child that probes before it generates, in vLLM's own process layout (engine core
    and model worker in processes of their own, the default on GPUs); then a skipped push (one process)."""
    model, tokenizer = copy.deepcopy(base[0]), base[1]
    generator = VLLMGenerator(num_candidates=K, max_new_tokens=MAX_NEW, seed=3, mode="fresh", single_process=False)
    rec = {"starts_engine": generator.starts_engine}
    try:
        generator.sync(model, tokenizer, probe_prompts=PROMPTS, version=0)
        rec["stats_before"] = dict(generator.sync_stats)
        rec["out"] = generator.generate(PROMPTS, model=model, tokenizer=tokenizer)
        rec["v0"] = dict(generator.sync_stats)
        trained(model, tokenizer)
        broken = dataclasses.replace(generator, debug_break_sync="skip_push", single_process=True)
        broken.sync(model, tokenizer, probe_prompts=PROMPTS, version=1)
        rec["skip_push"] = error_of(lambda: broken.generate(PROMPTS, model=model, tokenizer=tokenizer))
    finally:
        generator.close()
    return rec


@needs_vllm
@pytest.mark.slow
def test_fresh_mode_probes_in_the_child_and_equals_persistent(fresh, persistent):
    assert fresh["starts_engine"] and not VLLMGenerator().starts_engine
    assert fresh["stats_before"] == {}  # fresh: filled by the generate() whose child ran the probe
    assert fresh["v0"]["sync/weight_version"] == 0 and fresh["v0"]["sync/max_abs_logp_diff"] <= 1e-3
    # Same weights, same seed: the persistent engine (one process) sampled the same candidates as vLLM's layout.
    assert [c.token_ids for c in fresh["out"]] == [c.token_ids for c in persistent["out_v0"]]
    for a, b in zip(fresh["out"], persistent["out_v0"]):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x == pytest.approx(y, abs=1e-4)


@needs_vllm
@pytest.mark.slow
def test_fresh_mode_skipped_push_is_refused(fresh):
    print(f"\n{fresh['skip_push']}")
    assert "(version 1)" in fresh["skip_push"] and "skip_push" in fresh["skip_push"]


def test_hf_sync_has_nothing_to_push():
    generator = HFGenerator()
    generator.sync(None, None, probe_prompts=PROMPTS, version=4)
    assert generator.sync_stats == {"sync/max_abs_logp_diff": 0.0, "sync/probe_change": 0.0,
                                    "sync/weight_version": 4, "sync/time_s": 0.0}
    generator.sleep()
    generator.close()
    assert "sync_stats" not in repr(generator)


def test_vllm_sync_settings_are_checked():
    for bad in ({"mode": "warm"}, {"debug_break_sync": "skip_all"}, {"sleep_mode": "yes"}, {"probe_size": 0},
                {"call_timeout_s": 0}, {"data_parallel_size": 0}):
        with pytest.raises(PrefrunError, match=f"generator.{next(iter(bad))}="):
            VLLMGenerator(**bad)
    generator = VLLMGenerator()
    assert not generator.starts_engine and generator.worker_pid is None
    generator.sleep()  # no engine: nothing to do
    generator.close()
    copied = copy.deepcopy(generator)
    assert copied._session is generator._session and copied == generator and repr(copied) == repr(generator)
