"""Tokenisation, truncation, data errors, and the task pairs sampled from the embedded model."""

import json

import pytest
from transformers import AutoTokenizer

from prefrun.data import Example, JsonlPairs, PreferenceData, tokenize_record
from prefrun.tasks import SortDigits


def test_completion_gets_eos_and_prompt_keeps_bos(bpe_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    ex = tokenize_record({"prompt": "Question 1:", "chosen": " Answer: 3.", "rejected": " no"}, tokenizer)
    assert ex.prompt_ids[0] == tokenizer.bos_token_id
    assert all(ids[-1] == tokenizer.eos_token_id for ids in ex.completion_ids)
    assert tokenizer.decode(ex.completion_ids[0], skip_special_tokens=True) == " Answer: 3."


def test_truncation_cuts_prompt_from_the_left_then_completions_from_the_right():
    data = PreferenceData(max_length=10, max_prompt_length=4)
    out = data.truncate(Example(list(range(8)), [list(range(100, 108)), [200, 201]]))
    assert out.prompt_ids == [4, 5, 6, 7]
    assert out.completion_ids == [[100, 101, 102, 103, 104, 105], [200, 201]]
    assert PreferenceData(max_length=8).truncate(Example(list(range(8)), [[1], [2]])) is None  # prompt fills it
    fits = Example([1, 2], [[3], [4]])
    assert PreferenceData(max_length=8, max_prompt_length=1).truncate(fits).prompt_ids == [1, 2]  # untouched


@pytest.mark.parametrize("line, message", [
    ("{not json", r"pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "p", "chosen": "c"}', r"pairs.jsonl:2: needs string field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', r"pairs.jsonl:2: needs string field 'chosen'"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        JsonlPairs(path=str(path)).records()


def test_missing_jsonl_file_says_which():
    with pytest.raises(ValueError, match="data.path='/no/such.jsonl'"):
        JsonlPairs(path="/no/such.jsonl").records()


def test_sort_task_judge_splits_and_teacher():
    task = SortDigits()
    assert task.score("sort 4813:", "1348") == 1.0
    assert task.score("sort 4813:", "1384") == 0.5
    assert task.score("sort 4813:", "134") == 0.75  # a dropped digit
    assert task.score("sort 4813:", "") == 0.0
    train, held_out = task.prompts("train", 500), task.prompts("eval", 200)
    assert not set(train) & set(held_out)
    assert task.prompts("eval", 200) == held_out  # reproducible
    import random

    rng = random.Random(0)
    demos = [task.score(p, task.teacher(p, rng)) for p in train]
    right = sum(s == 1.0 for s in demos) / len(demos)
    assert 0.15 < right < 0.45  # the teacher is right about 1 - 0.75 of the time (+ lucky errors)
