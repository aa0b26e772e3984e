"""Data: every format and source `data=hf` reads, token ids equal to TRL's, held-out splits, the
tokenized cache, skip-and-count, one clear line for each broken input, and the task pairs."""

import json
import logging
import random
from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.data import (
    Example,
    GeneratedPreferences,
    HFPreferenceData,
    PreferenceData,
    attach_reference_logps,
    tokenize_record,
)
from prefrun.errors import InputError
from prefrun.tasks import SortDigits

from .conftest import build_bpe_model, run_cli

# A small chat template in the usual shape: BOS, then each turn as <|role|>content</s>.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def question(i):
    return f"Question {i}: what is {i} plus {2 * i}?"


# The same six preferences in each of TRL's preference formats.
FORMATS = {
    "standard": [{"prompt": question(i), "chosen": f" Answer: {3 * i}.", "rejected": f" Answer: {3 * i + 1}, the fox."}
                 for i in range(6)],
    "implicit_prompt": [{"chosen": f"{question(i)} Answer: {3 * i}.", "rejected": f"{question(i)} The quick fox {i}."}
                        for i in range(6)],
    "conversational": [{"prompt": user(question(i)), "chosen": assistant(f"Answer: {3 * i}."),
                        "rejected": assistant(f"The quick fox {i}.")} for i in range(6)],
    "conversational_implicit_prompt": [
        {"chosen": [{"role": "system", "content": "Be brief."}, *user(question(i)), *assistant(f"Answer: {3 * i}.")],
         "rejected": [{"role": "system", "content": "Be brief."}, *user(question(i)), *assistant(f"fox {i}")]}
        for i in range(6)],
    # UltraFeedback style: a string prompt next to full conversations (TRL: maybe_extract_prompt).
    "string_prompt_full_conversations": [
        {"prompt": question(i), "chosen": user(question(i)) + assistant(f"Answer: {3 * i}."),
         "rejected": user(question(i)) + assistant(f"fox {i}")} for i in range(6)],
}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' arrow cache of the test files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """The tiny BPE Llama of conftest with a chat template saved in its tokenizer config."""
    path = build_bpe_model(tmp_path_factory.mktemp("chat_llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tokenizer, tmp_path, part="train", **keys):
    data = HFPreferenceData(**keys)
    data.check()
    loader = data.load if part == "train" else data.load_eval
    return loader(policy=None, tokenizer=tokenizer, task=None, cache_dir=tmp_path / "cache")


def ids(examples):
    return [(ex.prompt_ids, ex.completion_ids) for ex in examples]


# -- tokenisation ----------------------------------------------------------------------------------


def test_completion_gets_eos_and_prompt_keeps_bos(bpe_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    ex = tokenize_record({"prompt": "Question 1:", "chosen": " Answer: 3.", "rejected": " no"}, tokenizer)
    assert ex.prompt_ids[0] == tokenizer.bos_token_id
    assert all(ids[-1] == tokenizer.eos_token_id for ids in ex.completion_ids)
    assert tokenizer.decode(ex.completion_ids[0], skip_special_tokens=True) == " Answer: 3."


@pytest.mark.parametrize("name", FORMATS)
def test_token_ids_equal_trl_for_each_format(name, tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.data_utils import maybe_extract_prompt

    records = FORMATS[name]
    ours = load(tokenizer, tmp_path, path=str(write_jsonl(tmp_path / f"{name}.jsonl", records)))
    dataset = Dataset.from_list(records)
    if name == "string_prompt_full_conversations":
        dataset = dataset.map(maybe_extract_prompt)  # what TRL's docs prescribe for this shape
    # DPOTrainer's own preprocessing, without building a trainer around it.
    theirs = trl.DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer,
        SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start"), "train")
    assert ids(ours) == [(row["prompt_ids"], [row["chosen_ids"], row["rejected_ids"]]) for row in theirs]
    assert all(ex.prompt_ids[0] == tokenizer.bos_token_id for ex in ours)
    if "conversational" in name or "conversations" in name:
        assert tokenizer.decode(ours[1].prompt_ids).endswith("<|assistant|>")
        assert tokenizer.decode(ours[1].completion_ids[0]) == "Answer: 3.</s>"  # the template's turn end, once


def test_truncation_cuts_prompt_from_the_left_then_completions_from_the_right():
    data = PreferenceData(max_length=10, max_prompt_length=4)
    out = data.truncate(Example(list(range(8)), [list(range(100, 108)), [200, 201]]))
    assert out.prompt_ids == [4, 5, 6, 7]
    assert out.completion_ids == [[100, 101, 102, 103, 104, 105], [200, 201]]
    assert PreferenceData(max_length=8).truncate(Example(list(range(8)), [[1], [2]])) is None  # prompt fills it
    fits = Example([1, 2], [[3], [4]])
    assert PreferenceData(max_length=8, max_prompt_length=1).truncate(fits).prompt_ids == [1, 2]  # untouched
    # A model whose context is shorter than max_length (GPT-2's learned positions: an index error in torch, as
    # a user's 256-position model with the default 512 showed): cut at the context, the prompt still leaving a token
    short = PreferenceData(max_length=512, max_prompt_length=600)
    short.fit_to(SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(
        max_position_embeddings=6))))
    out = short.truncate(Example(list(range(8)), [[100, 101], [200]]))
    assert (out.prompt_ids, out.completion_ids) == ([3, 4, 5, 6, 7], [[100], [200]])


# -- sources and formats -----------------------------------------------------------------------------


def test_every_file_kind_gives_the_same_examples(tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict

    strings, conversations = FORMATS["standard"], FORMATS["conversational"]
    expected = ids(load(tokenizer, tmp_path, path=str(write_jsonl(tmp_path / "s.jsonl", strings))))
    expected_chat = ids(load(tokenizer, tmp_path, path=str(write_jsonl(tmp_path / "c.jsonl", conversations))))
    (tmp_path / "s.json").write_text(json.dumps(strings))
    Dataset.from_list(strings).to_parquet(tmp_path / "s.parquet")
    Dataset.from_list(strings).to_csv(tmp_path / "s.csv", index=False)
    Dataset.from_list(conversations).to_parquet(tmp_path / "c.parquet")
    Dataset.from_list(conversations).save_to_disk(tmp_path / "c_disk")
    DatasetDict(train=Dataset.from_list(strings), test=Dataset.from_list(strings[:2])).save_to_disk(tmp_path / "dd")
    (tmp_path / "split_dir").mkdir()
    write_jsonl(tmp_path / "split_dir" / "train.jsonl", strings)
    write_jsonl(tmp_path / "split_dir" / "test.jsonl", strings[:2])
    for name in ("s.json", "s.parquet", "s.csv", "dd", "split_dir"):
        assert ids(load(tokenizer, tmp_path, path=str(tmp_path / name))) == expected, name
    for name in ("c.parquet", "c_disk"):
        assert ids(load(tokenizer, tmp_path, path=str(tmp_path / name))) == expected_chat, name
    for name in ("dd", "split_dir"):  # named splits
        assert ids(load(tokenizer, tmp_path, path=str(tmp_path / name), split="test")) == expected[:2], name


def test_renamed_columns_and_max_samples(tokenizer, tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "prompt": "ignored"}
            for r in FORMATS["standard"]]
    path = str(write_jsonl(tmp_path / "renamed.jsonl", rows))
    expected = ids(load(tokenizer, tmp_path, path=str(write_jsonl(tmp_path / "s.jsonl", FORMATS["standard"]))))
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert ids(load(tokenizer, tmp_path, path=path, columns=columns)) == expected
    assert ids(load(tokenizer, tmp_path, path=path, columns=columns, max_samples=4)) == expected[:4]
    # prompt: null -> the implicit prompt, even when a prompt column exists.
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"prompt": "x", **r} for r in FORMATS["implicit_prompt"]])
    plain = write_jsonl(tmp_path / "plain.jsonl", FORMATS["implicit_prompt"])
    assert (ids(load(tokenizer, tmp_path, path=str(implicit), columns={"prompt": None}))
            == ids(load(tokenizer, tmp_path, path=str(plain))))


def test_held_out_split_or_share(tokenizer, tmp_path):
    rows = [{"prompt": question(i), "chosen": f" {3 * i}.", "rejected": f" {i}{i}!"} for i in range(20)]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    every = ids(load(tokenizer, tmp_path, path=path))
    train = ids(load(tokenizer, tmp_path, path=path, eval_size=0.25, seed=1))
    held = ids(load(tokenizer, tmp_path, "eval", path=path, eval_size=0.25, seed=1))
    assert len(held) == 5 and len(train) == 15 and sorted(train + held) == sorted(every)
    assert held == ids(load(tokenizer, tmp_path, "eval", path=path, eval_size=5, seed=1, max_samples=3))  # fixed
    assert held != ids(load(tokenizer, tmp_path, "eval", path=path, eval_size=5, seed=2))
    assert ids(load(tokenizer, tmp_path, path=path, eval_size=0.25, seed=1, max_samples=3)) == train[:3]
    assert load(tokenizer, tmp_path, "eval", path=path) == []  # none asked for

    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "train.jsonl", rows[:15])
    write_jsonl(tmp_path / "dir" / "test.jsonl", rows[15:])
    assert ids(load(tokenizer, tmp_path, "eval", path=str(tmp_path / "dir"), eval_split="test")) == every[15:]
    assert GeneratedPreferences().load_eval(policy=None, tokenizer=tokenizer, task=SortDigits(), cache_dir=tmp_path) == []


def test_tokenized_records_are_cached(tokenizer, tmp_path, caplog):
    path = str(write_jsonl(tmp_path / "pairs.jsonl", FORMATS["conversational"]))
    caplog.set_level(logging.INFO, logger="prefrun")
    first = load(tokenizer, tmp_path, path=path)
    assert "tokenized in" in caplog.text and list((tmp_path / "cache" / "tokenized").glob("*.arrow"))
    caplog.clear()
    assert ids(load(tokenizer, tmp_path, path=path)) == ids(first)
    assert "tokenized (cached)" in caplog.text
    caplog.clear()
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = TEMPLATE.replace("<|", "[")  # a different template is a different cache entry
    load(other, tmp_path, path=path)
    assert "tokenized in" in caplog.text


def test_parallel_tokenisation_equals_serial(tokenizer, tmp_path):
    rows = [{"prompt": question(i), "chosen": f" {3 * i}.", "rejected": f" {i}!"} for i in range(1000)]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    serial = ids(load(tokenizer, tmp_path / "a", path=path))
    assert ids(load(tokenizer, tmp_path / "b", path=path, num_proc=2)) == serial


def test_skipped_records_are_counted(tokenizer, tmp_path, caplog):
    rows = [dict(r) for r in FORMATS["standard"]]
    rows[0]["chosen"] = "   "
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["rejected"] = None
    rows[3]["prompt"] = "long " * 600
    data = HFPreferenceData(path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), max_length=64)
    with caplog.at_level(logging.WARNING, logger="prefrun"):
        examples = data.load(policy=None, tokenizer=tokenizer, task=None, cache_dir=tmp_path)
    assert len(examples) == 2
    assert data.skipped["train"] == {"empty completion": 1, "chosen identical to rejected": 1,
                                     "missing rejected (null)": 1,
                                     "prompt alone fills data.max_length=64 (raise it or set data.max_prompt_length)": 1}
    assert "skipped 4 of 6 train records: " in caplog.text and "1 chosen identical to rejected" in caplog.text


def test_tokenizer_without_pad_token_works(bpe_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    examples = load(tokenizer, tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", FORMATS["standard"])))
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    attach_reference_logps(examples, model, tokenizer, cache_dir=tmp_path, batch_size=4, weights_key="w")
    assert all(len(ex.reference_logps) == 2 for ex in examples)


# -- broken inputs: one line naming the file, record or key --------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def jsonl_with(tmp_path, line, good=GOOD):
    """pairs.jsonl whose line 2 is `line` (bytes or a record), between good records."""
    body = line if isinstance(line, bytes) else json.dumps(line).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + body + b"\n" + json.dumps(good).encode() + b"\n")
    return str(path)


BROKEN = {
    "invalid JSON": (b"{not json", {}, r"pairs.jsonl:2: not valid JSON"),
    "unterminated string": (b'{"prompt": "p", "chosen": "c, "rejected": "r"}', {},
                            r"pairs.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 32\)"),
    "non-UTF-8 bytes": (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', {},
                        r"pairs.jsonl:2: not valid UTF-8 \(byte 0xe9\)"),
    "not an object": (b"[1, 2]", {}, r"pairs.jsonl:2: list \[1, 2\] is not a JSON object"),
    "number for a string": ({**GOOD, "chosen": 3}, {}, r"pairs.jsonl:2: 'chosen' is int 3; expected a string"),
    "object for a string": ({**GOOD, "prompt": {"text": "p"}}, {}, r"pairs.jsonl:2: 'prompt' is dict"),
    "renamed column, wrong type": ({"q": "p", "good": ["x"], "bad": "r"},
                                   {"columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
                                   r"pairs.jsonl:2: 'chosen' \(column 'good'\) is list \['x'\]"),
    "message without content": ({"prompt": user("p"), "chosen": [{"role": "assistant"}], "rejected": assistant("r")},
                                {}, r"pairs.jsonl:2: 'chosen' message 0 has no 'content'"),
    "message without role": ({"prompt": [{"content": "p"}], "chosen": assistant("c"), "rejected": assistant("r")},
                             {}, r"pairs.jsonl:2: 'prompt' message 0 has no 'role'"),
    "string vs messages": ({"prompt": "p", "chosen": "c", "rejected": assistant("r")}, {},
                           r"pairs.jsonl:2: chosen is a string but rejected is a list of messages"),
    "messages prompt, string completions": ({"prompt": user("p"), "chosen": "c", "rejected": "r"}, {},
                                            r"pairs.jsonl:2: prompt is a list of messages but chosen and rejected"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_record_is_one_line_naming_file_and_line(case, tokenizer, tmp_path, caplog):
    line, keys, message = BROKEN[case]
    good = {"q": "p", "good": "c", "bad": "r"} if "columns" in keys else GOOD
    path = jsonl_with(tmp_path, line, good)
    with pytest.raises(InputError, match=message) as err:
        load(tokenizer, tmp_path, path=path, **keys)
    assert "\n" not in str(err.value)
    # `datasets`' own error log named another row ("Failed to load JSON ... in row 1") before this line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("datasets")]


def test_a_number_among_digit_strings_names_its_own_line(tokenizer, tmp_path):
    """A column of strings and one number: `datasets` reads it as JSON values and decodes every string, "04668" as
    4668, so the first record looked wrong ("pairs.jsonl:1: 'chosen' is int 4668", a value the file does not
    hold). The file itself names the line."""
    digits = {"prompt": "sort 4 6 0 8 6:", "chosen": "04668", "rejected": "04686"}
    path = jsonl_with(tmp_path, {**digits, "chosen": 12345}, digits)
    with pytest.raises(InputError, match=r"pairs.jsonl:2: 'chosen' is int 12345; expected a string"):
        load(tokenizer, tmp_path, path=path)


def test_missing_file_and_unknown_hub_id(tmp_path, monkeypatch, tokenizer):
    import datasets
    import huggingface_hub

    with pytest.raises(InputError, match=r"data.path='/no/such.jsonl': no such file"):
        HFPreferenceData(path="/no/such.jsonl").check()
    with pytest.raises(InputError, match=r"data.path='pairs.jsonl': no such file"):
        HFPreferenceData(path="pairs.jsonl").check()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"data.path='no-org/no-such-set': not a local file or directory, and no "
                                         r"data set by that id could be loaded from the Hugging Face hub .*check "
                                         r"data.path"):
        HFPreferenceData(path="no-org/no-such-set").check()


def test_bad_data_sets_and_settings_are_one_line(tokenizer, tmp_path):
    from datasets import Dataset

    pairs = write_jsonl(tmp_path / "pairs.jsonl", FORMATS["standard"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "pairs.txt").write_text("x")
    Dataset.from_dict({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}).filter(lambda _: False).to_parquet(
        tmp_path / "empty.parquet")
    Dataset.from_dict({"prompt": ["p"], "chosen": [1], "rejected": [2]}).to_parquet(tmp_path / "ints.parquet")
    write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "p", "chosen": "c", "answer": "r"}])
    write_jsonl(tmp_path / "useless.jsonl", [{**GOOD, "chosen": ""}, {**GOOD, "chosen": "r"}])
    (tmp_path / "latin1.csv").write_bytes("prompt,chosen,rejected\np,c,r\ncaf\u00e9,c,r\n".encode("latin-1"))
    (tmp_path / "broken.json").write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": }\n]')
    cases = [
        ({"path": str(tmp_path / "empty.jsonl")}, r"empty.jsonl': the file is empty \(0 records\)"),
        ({"path": str(tmp_path / "empty.parquet")}, r"empty.parquet': split 'train' has no records"),
        ({"path": str(tmp_path / "pairs.txt")}, r"pairs.txt': unknown file type '.txt'"),
        ({"path": str(tmp_path / "answers.jsonl")},
         r"answers.jsonl' \(split 'train'\): no rejected column 'rejected' \(its columns: \['prompt', 'chosen', "
         r"'answer'\]\); name yours with data.columns.rejected=<column>"),
        ({"path": str(tmp_path / "ints.parquet")}, r"ints.parquet \(split 'train', row 0\): 'chosen' is int 1"),
        ({"path": str(tmp_path / "useless.jsonl")},
         r"useless.jsonl': no usable train records \(2 read: 1 empty completion, 1 chosen identical to rejected\)"),
        ({"path": str(tmp_path / "latin1.csv")}, r"latin1.csv:3: not valid UTF-8 \(byte 0xe9\)"),
        ({"path": str(tmp_path / "broken.json")}, r"broken.json:3: not valid JSON"),
        ({"path": str(pairs), "split": "validation"},
         r"data.split='validation': data.path='.*pairs.jsonl' has no such split \(its splits: \['train'\]\)"),
        ({"path": str(pairs), "eval_split": "test"}, r"data.eval_split='test': .*hold out part of the train split "
                                                     r"with data.eval_size"),
        ({"path": str(pairs), "eval_size": 6}, r"data.eval_size=6 holds out 6 of the 6 records"),
        ({"path": str(pairs), "eval_size": 0.1, "eval_split": "test"}, r"are both set"),
        ({"path": str(pairs), "eval_split": "train"}, r"data.eval_split='train' is also data.split"),
        ({"path": str(pairs), "columns": {"answer": "x"}}, r"data.columns.answer: unknown key"),
        ({"path": str(pairs), "chat_template": "no_such.jinja"}, r"data.chat_template='no_such.jinja': no such file"),
        ({"path": None}, r"data.path is not set"),
    ]
    for keys, message in cases:
        with pytest.raises(InputError, match=message) as err:
            load(tokenizer, tmp_path, **keys)
        assert "\n" not in str(err.value)


def test_conversations_need_a_chat_template(bpe_model_dir, tmp_path):
    plain = AutoTokenizer.from_pretrained(bpe_model_dir)
    assert plain.chat_template is None
    path = str(write_jsonl(tmp_path / "chat.jsonl", FORMATS["conversational"]))
    with pytest.raises(InputError, match=r"chat.jsonl' holds conversations .* but the tokenizer has no chat "
                                         r"template: use a chat/instruct model, set model.chat_template"):
        load(plain, tmp_path, path=path)
    (tmp_path / "template.jinja").write_text(TEMPLATE)  # ... which then works
    assert len(load(plain, tmp_path, path=path, chat_template=str(tmp_path / "template.jinja"))) == 6


# -- the built-in task --------------------------------------------------------------------------------


def test_sort_task_judge_splits_and_teacher():
    task = SortDigits()
    assert task.score("sort 4813:", "1348") == 1.0
    assert task.score("sort 4813:", "1384") == 0.5
    assert task.score("sort 4813:", "134") == 0.75  # a dropped digit
    assert task.score("sort 4813:", "") == 0.0
    train, held_out = task.prompts("train", 500), task.prompts("eval", 200)
    assert not set(train) & set(held_out)
    assert task.prompts("eval", 200) == held_out  # reproducible

    rng = random.Random(0)
    demos = [task.score(p, task.teacher(p, rng)) for p in train]
    right = sum(s == 1.0 for s in demos) / len(demos)
    assert 0.15 < right < 0.45  # the teacher is right about 1 - 0.75 of the time (+ lucky errors)


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_on_conversational_parquet(tmp_path, cache_dir, chat_model_dir):
    from datasets import Dataset

    rows = [{"prompt": user(question(i)), "chosen": assistant(f"Answer: {3 * i}."),
             "rejected": assistant(f"The quick brown fox {i}.")} for i in range(24)]
    Dataset.from_list(rows).to_parquet(tmp_path / "chat.parquet")
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "HF_HUB_OFFLINE": "1"}
    common = ["train", "model=hf", f"model.name_or_path={chat_model_dir}", "data=hf", "~task",
              "trainer.batch_size=4", "trainer.max_steps=2", "trainer.log_every=1"]
    run_cli([*common, f"data.path={tmp_path / 'chat.parquet'}", "data.eval_size=4"], tmp_path, env)
    [summary] = list(tmp_path.glob("outputs/**/summary.json"))
    result = json.loads(summary.read_text())
    assert result["num_examples"] == 20 and result["final"]["step"] == 2
    assert "tokenized in" in (summary.parent / "train.log").read_text()
    again = run_cli([*common, f"data.path={tmp_path / 'chat.parquet'}", "data.eval_size=4"], tmp_path, env)
    assert "tokenized (cached)" in again.stdout + again.stderr  # the cache key is stable across processes

    proc = run_cli([*common, f"data.path={tmp_path / 'chat.parquet'}", "data.columns.chosen=answer"], tmp_path, env,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no chosen column 'answer'" in proc.stdout + proc.stderr
