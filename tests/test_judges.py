"""Judges: the rule equals the task's score; reward-model and pairwise scores equal single-example
forwards of the texts they render, whatever the batch; models trained here to prefer correct sorts
rank them first; every bad path, model or score stops with one line."""

import json
import math
import random
import weakref

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from prefrun.errors import InputError
from prefrun.judges import JudgeError, LLMJudge, PairwiseJudge, RewardModelJudge, RuleJudge, check_scores
from prefrun.tasks import SortDigits

from .conftest import REPO

# A small chat template in the usual shape: BOS, then each turn as <|role|>content</s>.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PAIR = "{prompt}\n<A>{a}\n<B>{b}"
TASK = SortDigits()
ERRORS = ("echo", "descending", "swap", "drop")


def char_tokenizer(*, padding_side: str = "right", chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level with no merges (one token per byte) and a BOS: digit patterns stay easy to learn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        padding_side=padding_side)
    tokenizer.chat_template = chat_template
    return tokenizer


def llama_config(tokenizer, **overrides) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                          "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          "num_labels": 1, **overrides})


def save_classifier(path, tokenizer, *, seed: int = 0, model=None, **config):
    torch.manual_seed(seed)
    model = model if model is not None else LlamaForSequenceClassification(llama_config(tokenizer, **config))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wrong_answers(prompt: str) -> list[str]:
    """The teacher's four kinds of error, those that differ from the answer."""
    rng = random.Random(prompt)
    out = {SortDigits(teacher_error_rate=1.0, teacher_errors=(e,)).teacher(prompt, rng) for e in ERRORS}
    return sorted(out - {TASK.answer(prompt)})


def train(model, tokenizer, make_batch, loss_fn, steps: int):
    """A few hundred AdamW steps on the CPU (seconds): texts -> one logit each -> loss."""
    rng = random.Random(0)
    prompts = TASK.prompts("train", 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and a busy machine makes them spin
    try:
        for _ in range(steps):
            texts, targets = make_batch(rng.sample(prompts, 16), rng)
            logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
            loss = loss_fn(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def random_rm(tmp_path_factory):
    """Untrained, its tokenizer left-padding (the judge pads itself, on the right)."""
    return save_classifier(tmp_path_factory.mktemp("random_rm"), char_tokenizer(padding_side="left"))


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory):
    """Bidirectional, absolute positions, read at the first token: padding that is not masked, or on
    the left, changes its scores."""
    tokenizer = char_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, num_labels=1,
                        initializer_range=0.5)  # large weights: texts score visibly apart
    return save_classifier(tmp_path_factory.mktemp("bert_rm"), tokenizer, model=BertForSequenceClassification(config))


@pytest.fixture(scope="module")
def chat_rm(tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("chat_rm"), char_tokenizer(chat_template=TEMPLATE), seed=1)


@pytest.fixture(scope="module")
def sort_rm(tmp_path_factory):
    """Trained (Bradley-Terry) to score `prompt + right answer` above `prompt + the teacher's error`."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(tokenizer))

    def batch(prompts, rng):
        wrong = [SortDigits(teacher_error_rate=1.0).teacher(p, rng) for p in prompts]
        return [p + TASK.answer(p) for p in prompts] + [p + w for p, w in zip(prompts, wrong)], None

    def bradley_terry(logits, _):
        chosen, rejected = logits.chunk(2)
        return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

    train(model, tokenizer, batch, bradley_terry, steps=250)
    return save_classifier(tmp_path_factory.mktemp("sort_rm"), tokenizer, model=model)


@pytest.fixture(scope="module")
def sort_pairwise(tmp_path_factory):
    """Trained to give l(a, b) > 0 when a is the right answer and b an error, < 0 the other way."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(tokenizer))

    def batch(prompts, rng):
        texts = []
        for p in prompts:
            right, wrong = TASK.answer(p), SortDigits(teacher_error_rate=1.0).teacher(p, rng)
            texts += [PAIR.format(prompt=p, a=right, b=wrong), PAIR.format(prompt=p, a=wrong, b=right)]
        return texts, torch.tensor([1.0, 0.0] * len(prompts))

    train(model, tokenizer, batch, torch.nn.functional.binary_cross_entropy_with_logits, steps=250)
    return save_classifier(tmp_path_factory.mktemp("sort_pairwise"), tokenizer, model=model)


@torch.no_grad()
def direct_logits(path, texts: list[str], *, add_special_tokens: bool = True) -> list[float]:
    """The reference: each text alone (no padding) through the saved model."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return [model(torch.tensor([tokenizer(t, add_special_tokens=add_special_tokens).input_ids])).logits[0, 0].item()
            for t in texts]


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- rule -----------------------------------------------------------------------------------------


def test_rule_judge_is_the_task_score():
    prompts = TASK.prompts("eval", 6)
    candidates = [[TASK.answer(p), *wrong_answers(p), "", "12"] for p in prompts]
    scores = RuleJudge(TASK).score(prompts, candidates)
    assert scores == [[TASK.score(p, c) for c in group] for p, group in zip(prompts, candidates)]
    assert all(row[0] == 1.0 and max(row[1:]) < 1.0 for row in scores)


def test_rule_judge_needs_a_task_and_string_prompts():
    judge = RuleJudge(task=None)  # built all the same: judge=rule is the default, and a run may never judge
    with pytest.raises(InputError) as err:
        judge.score(["sort 21:"], [["12"]])
    assert "judge=rule needs a built-in task" in one_line(err) and "judge=reward_model judge.name_or_path=" in str(
        err.value)
    with pytest.raises(InputError) as err:
        RuleJudge(TASK).score([[{"role": "user", "content": "sort 321:"}]], [["123"]])
    assert "judge=rule (task sort)" in one_line(err) and "conversation" in str(err.value)


def test_configs_instantiate_without_loading_a_model():
    """Every key of conf/judge/*.yaml is a constructor argument; a bad path only fails at score()."""
    judges = {}
    for name in ("rule", "reward_model", "pairwise", "llm"):
        cfg = OmegaConf.load(REPO / "conf" / "judge" / f"{name}.yaml")
        if name != "rule":
            assert OmegaConf.is_missing(cfg, "name_or_path")
            cfg.name_or_path = "/no/such/model"
        judges[name] = instantiate(cfg, task=TASK)
    assert [type(j) for j in judges.values()] == [RuleJudge, RewardModelJudge, PairwiseJudge, LLMJudge]
    assert judges["pairwise"].template == PAIR
    assert repr(judges["pairwise"]) == ("PairwiseJudge(name_or_path='/no/such/model', max_length=1024, dtype='auto', "
                                        "chat_template='none', template='{prompt}\\n<A>{a}\\n<B>{b}')")
    assert isinstance(judges["rule"].task, SortDigits)  # Hydra hands the task over as a config: made whole again
    prompts = TASK.prompts("eval", 3)
    assert judges["rule"].score(prompts, [["123", TASK.answer(p)] for p in prompts]) == [
        [TASK.score(p, "123"), 1.0] for p in prompts]
    with pytest.raises(InputError) as err:
        judges["reward_model"].score(["sort 21:"], [["12"]])
    assert "judge.name_or_path='/no/such/model'" in one_line(err)


# -- reward model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_reward_model_scores_equal_single_forwards_whatever_the_batch(architecture, request):
    path = request.getfixturevalue({"llama": "random_rm", "bert": "bert_rm"}[architecture])
    prompts = ["sort 4813:", "sort 99:", "sort 1234567:"]
    candidates = [["1348", "8431", "13"], ["99"], ["1234567", "7654321 and then some more text", "", "2"]]
    expected = direct_logits(path, [p + c for p, group in zip(prompts, candidates) for c in group])
    for batch_size in (1, 3, 16):
        scores = RewardModelJudge(str(path), batch_size=batch_size, device="cpu").score(prompts, candidates)
        assert [len(row) for row in scores] == [3, 1, 4]
        assert np.allclose(sum(scores, []), expected, atol=1e-5), batch_size
    assert len(set(np.round(expected, 4))) == len(expected)  # the texts do score differently


def test_a_text_beyond_the_judge_models_context_is_cut_to_it_not_an_index_error(bert_rm, caplog):
    """BERT's positions are learned (128 here): judge.max_length=1024, the default, let a long text reach them."""
    long = "sort 1:" + "9" * 300
    with caplog.at_level("WARNING"):
        [[score]] = RewardModelJudge(str(bert_rm), device="cpu").score([long], ["1"])
    assert math.isfinite(score) and "longer than 128 tokens, the judge model's context" in caplog.text


def test_a_reward_model_retrained_into_its_directory_is_another_judge_for_the_pools_it_scores(tmp_path):
    """Judged pools (the cached ones of an offline job, a round's shards, prefrun generate's) are keyed by the judge's
    identity: its settings and, without loading it, its weight files' bytes, not only their path."""
    path = save_classifier(tmp_path / "rm", char_tokenizer())
    before = RewardModelJudge(str(path)).identity()
    assert before.startswith("RewardModelJudge(name_or_path=") and " weights=files:" in before
    assert RewardModelJudge(str(path)).identity() == before
    save_classifier(path, char_tokenizer(), seed=1)  # retrained, same directory
    assert RewardModelJudge(str(path)).identity() != before
    assert RewardModelJudge("org/hub-model").identity() == repr(RewardModelJudge("org/hub-model"))


def test_reward_model_renders_the_chat_template(chat_rm, random_rm):
    tokenizer = AutoTokenizer.from_pretrained(chat_rm)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort 321:"}]
    prompts, candidates = ["sort 4813:", conversation], [["1348", "8431"], ["123"]]
    rendered = [f"<s><|user|>sort 4813:</s><|assistant|>{c}</s>" for c in candidates[0]]
    rendered.append("<s><|system|>Be brief.</s><|user|>sort 321:</s><|assistant|>123</s>")
    assert rendered[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort 4813:"}, {"role": "assistant", "content": "1348"}], tokenize=False)
    assert tokenizer(rendered[0], add_special_tokens=False).input_ids.count(tokenizer.bos_token_id) == 1
    expected = direct_logits(chat_rm, rendered, add_special_tokens=False)
    scores = RewardModelJudge(str(chat_rm), batch_size=2).score(prompts, candidates)
    assert np.allclose(sum(scores, []), expected, atol=1e-5)
    # Neither a doubled BOS nor the plain text is what the model read.
    doubled = direct_logits(chat_rm, rendered)
    plain = direct_logits(chat_rm, ["sort 4813:1348", "sort 4813:8431"])
    assert min(abs(a - b) for a, b in zip(expected, doubled)) > 1e-4
    assert min(abs(a - b) for a, b in zip(expected[:2], plain)) > 1e-4
    # chat_template=none: plain text; a conversation then has nothing to render it.
    assert np.allclose(RewardModelJudge(str(chat_rm), chat_template="none").score(prompts[:1], candidates[:1])[0],
                       plain, atol=1e-5)
    # ... a single user turn (a string prompt that a chat policy saw in chat form) reads as that string
    assert np.allclose(RewardModelJudge(str(chat_rm), chat_template="none").score(
        [[{"role": "user", "content": "sort 4813:"}]], candidates[:1])[0], plain, atol=1e-5)
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(chat_rm), chat_template=None).score([conversation], [["123"]])
    assert "no chat template" in one_line(err) and "judge.chat_template" in str(err.value)
    # judge.chat_template gives a tokenizer without one a template.
    own = RewardModelJudge(str(random_rm), chat_template=TEMPLATE).score(prompts, candidates)
    assert np.allclose(sum(own, []), direct_logits(random_rm, rendered, add_special_tokens=False), atol=1e-5)


def test_trained_reward_model_ranks_right_answers_first(sort_rm):
    prompts = TASK.prompts("eval", 60)
    candidates = [[TASK.answer(p), *wrong_answers(p)] for p in prompts]
    judge = RewardModelJudge(str(sort_rm), batch_size=32)
    scores = judge.score(prompts, candidates)
    right_first = np.mean([row[0] > max(row[1:]) for row in scores])
    beats = np.mean([row[0] > wrong for row in scores for wrong in row[1:]])
    assert right_first >= 0.75 and beats >= 0.9, (right_first, beats)
    # The judge's pick is as good as the rule says: far above a random candidate's score.
    picked = np.mean([TASK.score(p, group[int(np.argmax(row))]) for p, group, row in zip(prompts, candidates, scores)])
    assert picked > np.mean([TASK.score(p, c) for p, group in zip(prompts, candidates) for c in group]) + 0.15


def test_close_frees_the_model_and_a_later_score_reloads_it(random_rm):
    judge = RewardModelJudge(str(random_rm))
    first = judge.score(["sort 21:"], [["12", "21"]])
    model = weakref.ref(judge._model)
    judge.close()
    assert model() is None
    assert judge.score(["sort 21:"], [["12", "21"]]) == first


def test_bad_reward_models_stop_with_one_line(tmp_path, random_rm):
    tokenizer = char_tokenizer()
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(tmp_path / "missing")).score(["sort 21:"], [["12"]])
    assert one_line(err) == f"judge.name_or_path='{tmp_path / 'missing'}': no such directory; give the model's " \
        "directory or a hub id"  # (not the hub's "Repo id must be in the form ...")

    causal = tmp_path / "causal"
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(causal)
    tokenizer.save_pretrained(causal)
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(causal)).score(["sort 21:"], [["12"]])
    assert "LlamaForCausalLM checkpoint, not a sequence classifier" in one_line(err) and str(causal) in str(err.value)

    two = save_classifier(tmp_path / "two_labels", tokenizer, num_labels=2)
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(two)).score(["sort 21:"], [["12"]])
    assert "num_labels=2" in one_line(err) and str(two) in str(err.value)

    no_tokenizer = tmp_path / "no_tokenizer"
    AutoModelForSequenceClassification.from_pretrained(random_rm).save_pretrained(no_tokenizer)
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(no_tokenizer)).score(["sort 21:"], [["12"]])
    assert "cannot load its tokenizer" in one_line(err) and str(no_tokenizer) in str(err.value)

    for bad, key in (({"dtype": "fp8"}, "judge.dtype"), ({"device": "gpu0"}, "judge.device"),
                     ({"batch_size": 0}, "judge.batch_size"), ({"chat_template": "no_such_file.jinja"},
                                                                "judge.chat_template")):
        with pytest.raises(InputError) as err:
            RewardModelJudge(str(random_rm), **bad)
        assert key in one_line(err)


SCORED_CODE = """
from dataclasses import dataclass

import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput


@dataclass
class ScoredOutput(ModelOutput):
    logits: torch.FloatTensor = None
    score: torch.FloatTensor = None


class ScoredLlama(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        rewards = super().forward(input_ids=input_ids, attention_mask=attention_mask).logits
        return ScoredOutput(logits=rewards, score=rewards.sum(-1, keepdim=True))
"""


def test_reward_model_with_its_own_code_and_a_score_output(tmp_path):
    """ArmoRM-style: several objectives in `logits`, the preference in `score`, code in the checkpoint."""
    path = save_classifier(tmp_path / "scored", char_tokenizer(), num_labels=3)
    (path / "modeling_scored.py").write_text(SCORED_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["ScoredLlama"],
                  auto_map={"AutoModelForSequenceClassification": "modeling_scored.ScoredLlama"})
    (path / "config.json").write_text(json.dumps(config))
    prompts, candidates = ["sort 4813:", "sort 99:"], [["1348", "8431"], ["99"]]
    scores = RewardModelJudge(str(path), batch_size=2, trust_remote_code=True).score(prompts, candidates)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        expected = [model(torch.tensor([tokenizer(t).input_ids])).logits.sum().item()
                    for t in ("sort 4813:1348", "sort 4813:8431", "sort 99:99")]
    assert np.allclose(sum(scores, []), expected, atol=1e-5)
    with pytest.raises(InputError) as err:
        RewardModelJudge(str(path)).score(prompts, candidates)
    assert "ScoredLlama checkpoint" in one_line(err) and "judge.trust_remote_code=true" in str(err.value)


# -- pairwise -------------------------------------------------------------------------------------


def test_pairwise_symmetrises_the_two_orders(random_rm):
    conversation = [{"role": "user", "content": "sort 312:"}]
    prompts, candidates = ["sort 4813:", conversation], [["1348", "8431"], ["123", "321"]]
    judge = PairwiseJudge(str(random_rm), template=PAIR)
    scores = judge.score(prompts, candidates)
    texts = ["sort 4813:\n<A>1348\n<B>8431", "sort 4813:\n<A>8431\n<B>1348",
             "user: sort 312:\n<A>123\n<B>321", "user: sort 312:\n<A>321\n<B>123"]
    l_ab, l_ba, m_ab, m_ba = direct_logits(random_rm, texts)
    first = (sigmoid(l_ab) + 1 - sigmoid(l_ba)) / 2
    second = (sigmoid(m_ab) + 1 - sigmoid(m_ba)) / 2
    assert np.allclose(scores, [[first, 1 - first], [second, 1 - second]], atol=1e-5)
    assert abs(first - sigmoid(l_ab)) > 1e-4  # the second order counts: not just σ(l(a, b))


def test_pairwise_with_a_chat_template_reads_one_user_turn(chat_rm):
    scores = PairwiseJudge(str(chat_rm), chat_template="auto").score(["sort 21:"], [["12", "21"]])
    texts = [f"<s><|user|>sort 21:\n<A>{a}\n<B>{b}</s><|assistant|>" for a, b in (("12", "21"), ("21", "12"))]
    l_ab, l_ba = direct_logits(chat_rm, texts, add_special_tokens=False)
    first = (sigmoid(l_ab) + 1 - sigmoid(l_ba)) / 2
    assert np.allclose(scores, [[first, 1 - first]], atol=1e-5)


def test_pairwise_scores_k_candidates_whatever_the_batch(random_rm):
    prompts = ["sort 4813:", "sort 99:", "sort 52:"]
    candidates = [["1348", "8431", "13", "a much longer candidate"], ["99"], ["25", "52", ""]]
    scores = PairwiseJudge(str(random_rm), batch_size=1).score(prompts, candidates)
    assert [len(row) for row in scores] == [4, 1, 3] and scores[1] == [0.5]
    assert all(0 <= s <= 1 for row in scores for s in row)
    assert np.isclose(np.mean(scores[0]), 0.5) and np.isclose(np.mean(scores[2]), 0.5)  # p(i>j) + p(j>i) = 1
    assert np.allclose(sum(PairwiseJudge(str(random_rm), batch_size=7).score(prompts, candidates), []),
                       sum(scores, []), atol=1e-6)


def test_trained_pairwise_ranks_right_answers_first(sort_pairwise):
    prompts = TASK.prompts("eval", 40)
    candidates = [[*wrong_answers(p), TASK.answer(p)] for p in prompts]  # the right one last
    scores = PairwiseJudge(str(sort_pairwise), batch_size=64, template=PAIR).score(prompts, candidates)
    right_first = np.mean([row[-1] > max(row[:-1]) for row in scores])
    assert right_first >= 0.75, right_first
    assert np.mean([row[-1] for row in scores]) > 0.75


def test_pairwise_template_needs_prompt_and_both_candidates(random_rm):
    for template, problem in (("{prompt} {a}", "lacks {b}"), ("{prompt} {a} {b} {c}", "KeyError"),
                              ("{prompt} {a} {b} {", "ValueError")):
        with pytest.raises(InputError) as err:
            PairwiseJudge(str(random_rm), template=template)
        assert "judge.template=" in one_line(err) and problem in str(err.value)


# -- check_scores ---------------------------------------------------------------------------------


class NanTask:
    name = "nan"

    def score(self, prompt: str, completion: str) -> float:
        return float("nan")


def test_check_scores_stops_bad_scores_with_one_line():
    long_prompt = "sort " + "7" * 200 + ":"
    prompts, candidates = ["sort 21:", long_prompt], [["12"], ["1", "2"]]
    assert check_scores("judge=x", prompts, candidates, [[1], [np.float32(0.5), -2.0]]) == [[1.0], [0.5, -2.0]]
    for scores, problem in (([[0.1], [float("nan"), 0.2]], "a score of nan"),
                            ([[0.1], [0.3, float("inf")]], "a score of inf"),
                            ([[0.1], [0.3]], "1 scores for 2 candidates"),
                            ([[0.1], ["0.5", 0.2]], "'0.5' is not a number"),
                            ([[0.1], [None, 0.2]], "None is not a number"),
                            ([[0.1], [True, 0.2]], "True is not a number"),
                            ([[0.1], 0.2], "not a list of scores")):
        with pytest.raises(JudgeError) as err:
            check_scores("judge=x (model)", prompts, candidates, scores)
        message = one_line(err)
        assert message.startswith("judge=x (model) returned") and problem in message, message
        assert "'sort 7777" in message and long_prompt not in message  # the prompt, shortened
    with pytest.raises(JudgeError) as err:
        check_scores("judge=x", prompts, candidates, [[0.1]])
    assert "1 score lists for 2 prompts" in one_line(err)
    with pytest.raises(JudgeError) as err:  # every judge's score() goes through the check
        RuleJudge(NanTask()).score(["sort 21:"], [["12"]])
    assert "judge=rule (task nan) returned [nan] for prompt 'sort 21:'" in one_line(err)


def test_a_users_judge_has_a_repr_that_is_the_same_in_every_run():
    """It keys the pool shards a resumed round reuses: an object's address in it would refuse every resume."""
    from prefrun.judges import Judge

    class Mine(Judge):
        def __init__(self, task=None, threshold=0.5):
            self.threshold, self.model = threshold, object()

    assert repr(Mine()) == repr(Mine()) != repr(Mine(threshold=0.7))
    assert repr(Mine()).startswith("tests.test_judges.") and repr(Mine()).endswith(".Mine(threshold=0.5)")
