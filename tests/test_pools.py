"""Pools as training data: our format and the public shapes (SimPO-style flat lists, UltraFeedback-style
nested lists) through `data.columns.*`, the best candidate first, bad pools skipped and counted or stopped
with one line, the MC-PO losses by hand, and batches that compute a candidate drawn twice once."""

import json
import logging
import math

import pytest
import torch
from transformers import AutoTokenizer

from prefrun.data import Example, HFPreferenceData, collate, token_ids
from prefrun.errors import InputError
from prefrun.losses import mcpo_cd_loss, mcpo_loss, pool_log_softmax_loss
from prefrun.pools import field, read_pool

from .conftest import build_bpe_model

OURS = {"prompt": "prompt", "candidates": "candidates", "scores": "scores"}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_bpe_model(tmp_path_factory.mktemp("pool_llama")))


def question(i):
    return f"Question {i}: what is {i} plus {2 * i}?"


def pools(n=6):
    return [{"prompt": question(i), "candidates": [f" Answer: {3 * i + d}." for d in (2, 0, 1, 5)],
             "scores": [0.2, 1.0, 0.5, -1.0]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tokenizer, tmp_path, pools=True, **keys):
    data = HFPreferenceData(**keys)
    data.check()
    return data.load(policy=None, tokenizer=tokenizer, task=None, cache_dir=tmp_path / "cache", pools=pools), data


def test_read_pool_puts_the_best_first_and_keeps_the_rest_in_order():
    prompt, candidates, scores = read_pool({"prompt": "p", "candidates": ["a", "b", "c", "d"],
                                            "scores": [0.2, 1.0, 0.5, 1.0]}, OURS, lambda: "r")
    assert candidates == ["b", "a", "c", "d"] and scores == [1.0, 0.2, 0.5, 1.0]  # first of equal best
    # a conversational prompt: string candidates become one assistant message
    prompt, candidates, _ = read_pool({"prompt": [{"role": "user", "content": "p"}], "candidates": ["a", "b"],
                                       "scores": [0, 1]}, OURS, lambda: "r")
    assert candidates[0] == [{"role": "assistant", "content": "b"}]


def test_field_paths_read_into_lists_of_objects():
    record = {"completions": [{"response": "x", "annotations": {"help": {"Rating": 4}}}, {"response": "y",
                                                                                         "annotations": {"help": {"Rating": 2}}}]}
    assert field(record, "completions.response") == ["x", "y"]
    assert field(record, "completions.annotations.help.Rating") == [4, 2]
    with pytest.raises(KeyError, match="no 'score'"):
        field(record, "completions.score")


def test_our_format_and_public_shapes_give_the_same_examples(tokenizer, tmp_path):
    rows = pools()
    ours, _ = load(tokenizer, tmp_path, path=write_jsonl(tmp_path / "ours.jsonl", rows), columns=OURS)
    simpo = [{"prompt": r["prompt"], "all_generated_responses": r["candidates"], "all_rm_scores": r["scores"]}
             for r in rows]
    flat, _ = load(tokenizer, tmp_path, path=write_jsonl(tmp_path / "simpo.jsonl", simpo),
                   columns={"candidates": "all_generated_responses", "scores": "all_rm_scores"})
    ultra = [{"instruction": r["prompt"], "completions": [{"response": c, "overall_score": s}
                                                          for c, s in zip(r["candidates"], r["scores"])]} for r in rows]
    nested, _ = load(tokenizer, tmp_path, path=write_jsonl(tmp_path / "uf.jsonl", ultra),
                     columns={"prompt": "instruction", "candidates": "completions.response",
                              "scores": "completions.overall_score"})
    assert len(ours) == 6
    for a, b, c in zip(ours, flat, nested):
        assert (a.prompt_ids, a.completion_ids, a.scores) == (b.prompt_ids, b.completion_ids, b.scores) \
            == (c.prompt_ids, c.completion_ids, c.scores)
    # best first, token ids exactly as a pair record of the same texts would get them
    first = rows[0]
    _, expected, _ = token_ids(tokenizer, first["prompt"], [first["candidates"][i] for i in (1, 0, 2, 3)])
    assert ours[0].completion_ids == expected and ours[0].scores == [1.0, 0.2, 0.5, -1.0]


def test_a_pair_loss_on_a_pool_file_trains_on_each_pools_best_vs_worst(tokenizer, tmp_path):
    # loss=dpo's sampler does not draw from pools: before, pools of 4 reached the loss and stopped the run there
    rows = pools(3)
    rows[1]["scores"] = [0.2, 1.0, -1.0, -1.0]  # the first of equal worst
    path = write_jsonl(tmp_path / "ours.jsonl", rows)
    assert [len(e.completion_ids) for e in load(tokenizer, tmp_path, path=path, columns=OURS)[0]] == [4, 4, 4]
    pairs, _ = load(tokenizer, tmp_path, pools=False, path=path, columns=OURS)
    for record, pair in zip(rows, pairs, strict=True):
        best, worst = (record["candidates"][record["scores"].index(f(record["scores"]))] for f in (max, min))
        assert pair.completion_ids == token_ids(tokenizer, record["prompt"], [best, worst])[1] and pair.scores is None
    _, data = load(tokenizer, tmp_path, pools=False, path=path, columns=OURS, eval_size=1)
    held_out = data.load_eval(policy=None, tokenizer=tokenizer, task=None, cache_dir=tmp_path / "cache")
    assert [len(e.completion_ids) for e in held_out] == [2]  # the held-out share too: the loss scores it


def test_bad_pools_are_skipped_and_counted(tokenizer, tmp_path, caplog):
    good = pools(2)
    bad = [
        {"prompt": "p", "candidates": ["only one"], "scores": [1.0]},
        {"prompt": "p", "candidates": ["a", "b", "c"], "scores": [1.0, 0.0]},
        {"prompt": "p", "candidates": ["a", "b"], "scores": [1.0, float("nan")]},
        {"prompt": "p", "candidates": ["a", "b"], "scores": [1.0, None]},
        {"prompt": "p", "candidates": ["a", "b"], "scores": [0.5, 0.5]},
        {"prompt": "p", "candidates": ["a", " "], "scores": [0.5, 0.1]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r).replace("NaN", "NaN") + "\n" for r in good + bad))
    with caplog.at_level(logging.WARNING):
        examples, data = load(tokenizer, tmp_path, path=str(path), columns=OURS)
    assert len(examples) == 2
    assert data.skipped["train"] == {"fewer than 2 candidates": 1, "candidates and scores of different lengths": 1,
                                     "a null, NaN or infinite score": 2, "all scores equal": 1, "an empty candidate": 1}
    assert "skipped 6 of 8 train records" in caplog.text


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "candidates": ["a", "b"], "scores": ["good", "bad"]}, "is not a number"),
    ({"prompt": "p", "candidates": "a b", "scores": [1, 0]}, "expected a list"),
    ({"prompt": "p", "candidates": [1, 2], "scores": [1, 0]}, "expected a string or a list of"),
])
def test_broken_pools_are_one_line_naming_the_record(record, message, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", pools(2) + [record])
    with pytest.raises(InputError, match=message) as err:
        load(tokenizer, tmp_path, path=path, columns=OURS)
    assert "broken.jsonl:3" in str(err.value) and "\n" not in str(err.value)


def test_a_wrong_column_mapping_is_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "ours.jsonl", pools(2))
    with pytest.raises(InputError, match="no candidates column 'responses'"):
        load(tokenizer, tmp_path, path=path, columns={"candidates": "responses", "scores": "scores"})
    with pytest.raises(InputError, match="cannot read scores from data.columns.scores='scores.value'"):
        load(tokenizer, tmp_path, path=path, columns={"candidates": "candidates", "scores": "scores.value"})


def test_mcpo_cd_by_hand_and_the_pool_loss():
    # rewards β·(policy − reference) with β = 0.5: [1.0, −0.5, 0.25]
    policy, reference = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[-1.0, 0.0, 0.0]])
    losses, rewards = mcpo_cd_loss(policy, reference, torch.ones(1, 3), beta=0.5)
    assert rewards[0].tolist() == pytest.approx([1.0, -0.5, 0.25])
    assert losses.item() == pytest.approx(-1.0 + (-0.5 + 0.25) / 2)
    pool = torch.tensor([[1.0, -0.5, 0.25, float("-inf")]])  # the last candidate is padding
    expected = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-0.5) + math.exp(0.25)))
    assert pool_log_softmax_loss(pool).item() == pytest.approx(expected)
    # the whole-pool log-softmax is mcpo_loss over every candidate
    assert mcpo_loss(policy, reference, torch.ones(1, 3), beta=0.5)[0].item() == pytest.approx(
        pool_log_softmax_loss(rewards).item())


def test_mcpo_cd_gradient_is_the_pool_log_softmax_gradient_in_expectation():
    """E over draws ∝ softmax(r) of ∇[−r_w + mean_j r_j] = ∇[−log softmax(r)[w]] (exact enumeration, M = 1)."""
    rewards = torch.tensor([0.3, -0.2, 1.1, 0.0], requires_grad=True)
    pool_log_softmax_loss(rewards[None]).sum().backward()
    target = rewards.grad.clone()
    probs = torch.softmax(rewards.detach(), 0)
    expected = torch.zeros(4)
    for j in range(4):
        r = rewards.detach().clone().requires_grad_(True)
        losses, _ = mcpo_cd_loss(r[[0, j]][None], torch.zeros(1, 2), torch.ones(1, 2), beta=1.0)
        losses.sum().backward()
        expected += probs[j] * r.grad
    torch.testing.assert_close(expected, target)


def test_a_candidate_drawn_twice_is_one_row():
    example = Example([1, 5], [[7, 2], [8, 8, 2], [9, 2]], reference_logps=[-1.0, -2.0, -3.0])
    batch = collate([example, example], 0, [[0, 2, 2], [0, 0, 1]])
    assert batch["input_ids"].shape[0] == 4  # (0, 2) and (0, 1): two distinct rows each
    assert batch["row_index"].tolist() == [[0, 1, 1], [2, 2, 3]]
    assert batch["reference_logps"].tolist() == [[-1.0, -3.0, -3.0], [-1.0, -1.0, -2.0]]
    assert batch["completion_lengths"].tolist() == [[2, 2, 2], [2, 2, 3]]


def test_a_judge_that_answers_nan_stops_pools_in_one_line_naming_the_shard_and_keeps_the_finished_ones(tmp_path):
    from prefrun.generate import HFGenerator
    from prefrun.judges import Judge, JudgeError
    from prefrun.pools import make_pools

    from .conftest import char_llama

    class NaNOnSecondShard(Judge):
        name = "nan-judge"
        calls = 0

        def _score(self, prompts, candidates):
            self.calls += 1
            return [[math.nan if self.calls == 2 else 0.0] * len(group) for group in candidates]

    model, tokenizer = char_llama(hidden=64, heads=1, seed=0)
    generator = HFGenerator(num_candidates=2, max_new_tokens=4, batch_size=2)
    with pytest.raises(JudgeError) as caught:
        make_pools(["sort 12:", "sort 31:", "sort 7:", "sort 98:"], generator=generator, judge=NaNOnSecondShard(),
                   model=model, tokenizer=tokenizer, out_dir=tmp_path / "shards", shard_size=2)
    message = str(caught.value)
    assert message.startswith("nan-judge returned [nan, nan] for prompt 'sort 7:': a score of nan")
    # A stop signal caught while judging (a judge checks between its batches) stops as a stop: it was a TypeError.
    import signal

    from prefrun.preemption import Preempted

    class Stopped(Judge):
        name = "stopped-judge"

        def _score(self, prompts, candidates):
            raise Preempted(signal.SIGTERM, "outside training")

    with pytest.raises(Preempted, match="stopped by SIGTERM outside training"):
        make_pools(["sort 12:"], generator=generator, judge=Stopped(), model=model, tokenizer=tokenizer,
                   out_dir=tmp_path / "stopped", shard_size=2)
    assert f"(judging shard 2 of 2, prompts 3-4, for {tmp_path / 'shards'}; the finished shards are kept)" in message
    assert (tmp_path / "shards" / "shard-00000.jsonl").exists() and not (tmp_path / "shards" / "shard-00001.jsonl").exists()
    # The finished shard is reused only by pools cut the same way: other shards are another job's, one line.
    with pytest.raises(InputError, match=r"holds pools of another job \(changed: shard_size: 2 -> 3\)"):
        make_pools(["sort 12:", "sort 31:", "sort 7:", "sort 98:"], generator=generator, judge=NaNOnSecondShard(),
                   model=model, tokenizer=tokenizer, out_dir=tmp_path / "shards", shard_size=3)
