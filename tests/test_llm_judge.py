"""Pairwise verdicts for every judge, and the generative judge (judge=llm): verdicts equal single unpadded
forwards whatever the batch; swapping the pair swaps the verdicts; a judge that always answers A shows full
position bias and a symmetrised preference of 1/2; one trained here to prefer correct sorts prefers them in
both orders; fingerprints follow the weights; every bad setting stops with one line."""

import importlib.util
import random
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from prefrun.errors import InputError
from prefrun.judges import (
    LLM_TEMPLATE,
    Judge,
    JudgeError,
    LLMJudge,
    PairwiseJudge,
    RewardModelJudge,
    RuleJudge,
    Verdicts,
)
from prefrun.model import files_fingerprint
from prefrun.tasks import SortDigits

from .conftest import REPO
from .test_judges import (
    PAIR,
    TASK,
    TEMPLATE,
    char_tokenizer,
    direct_logits,
    llama_config,
    one_line,
    save_classifier,
    sigmoid,
    wrong_answers,
)

# Short, so that the tiny judges learn fast; answer_prefix " " puts the answer after "Better: ".
QUESTION = "{prompt}\nA: {a}\nB: {b}\nBetter:"
PREFIX = " "


def save_llm(path, tokenizer, *, seed: int = 0, model=None, **config):
    torch.manual_seed(seed)
    model = model if model is not None else LlamaForCausalLM(llama_config(tokenizer, **config))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llm_judge(path, **settings) -> LLMJudge:
    return LLMJudge(str(path), **{"template": QUESTION, "answer_prefix": PREFIX, "chat_template": "none",
                                  "device": "cpu", **settings})


def train_answers(model, tokenizer, make_batch, steps: int):
    """A few AdamW steps on the CPU (seconds): each text's next token at its end -> the target answer."""
    rng = random.Random(0)
    prompts = TASK.prompts("train", 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and a busy machine makes them spin
    try:
        for _ in range(steps):
            texts, answers = make_batch(rng.sample(prompts, 16), rng)
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            last = batch.attention_mask.sum(1) - 1  # right padding: each text's own end
            logits = model(**batch).logits[torch.arange(len(texts)), last]
            targets = torch.tensor([tokenizer.convert_tokens_to_ids(a) for a in answers])
            loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def question(prompt: str, a: str, b: str) -> str:
    return QUESTION.format(prompt=prompt, a=a, b=b) + PREFIX


@torch.no_grad()
def direct_choice_probabilities(path, texts: list[str], *, add_special_tokens: bool = True) -> np.ndarray:
    """The reference: each text alone (no padding), softmax over the A and B logits at its last position."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    choices = tokenizer.convert_tokens_to_ids(["A", "B"])
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        logits = model(torch.tensor([ids])).logits
        rows.append(torch.softmax(logits[0, -1, choices].double(), -1).numpy())
    return np.array(rows)


@pytest.fixture(scope="module")
def random_llm(tmp_path_factory):
    """Untrained, with large weights (initializer_range 0.5): texts get visibly different verdicts."""
    return save_llm(tmp_path_factory.mktemp("random_llm"), char_tokenizer(padding_side="left"),
                    initializer_range=0.5)


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    return save_llm(tmp_path_factory.mktemp("chat_llm"), char_tokenizer(chat_template=TEMPLATE), seed=1,
                    initializer_range=0.5)


@pytest.fixture(scope="module")
def random_rm(tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("random_rm"), char_tokenizer(), initializer_range=0.5)


@pytest.fixture(scope="module")
def always_a(tmp_path_factory):
    """Fine-tuned to answer A whatever the question: all position bias, no preference."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer))

    def batch(prompts, rng):
        pairs = [(TASK.answer(p), rng.choice(wrong_answers(p) or ["0"])) for p in prompts]
        texts = [question(p, *(pair if rng.random() < 0.5 else pair[::-1]))
                 for p, pair in zip(prompts, pairs)]
        return texts, ["A"] * len(texts)

    train_answers(model, tokenizer, batch, steps=60)
    return save_llm(tmp_path_factory.mktemp("always_a"), tokenizer, model=model)


@pytest.fixture(scope="module")
def sort_llm(tmp_path_factory):
    """Fine-tuned to answer with the letter of the right sort against one of the teacher's errors."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer))

    def batch(prompts, rng):
        texts, answers = [], []
        for p in prompts:
            right, wrong = TASK.answer(p), SortDigits(teacher_error_rate=1.0).teacher(p, rng)
            texts += [question(p, right, wrong), question(p, wrong, right)]
            answers += ["A", "B"]
        return texts, answers

    train_answers(model, tokenizer, batch, steps=250)
    return save_llm(tmp_path_factory.mktemp("sort_llm"), tokenizer, model=model)


PROMPTS = ["sort 4813:", [{"role": "user", "content": "sort 312:"}], "sort 1234567:", "sort 52:"]
FIRST = ["1348", "123", "1234567", ""]
SECOND = ["8431 and then some more text", "321", "7", "25"]


# -- the generative judge ---------------------------------------------------------------------------


def test_llm_verdicts_equal_single_forwards_whatever_the_batch(random_llm):
    texts = [p if isinstance(p, str) else f"user: {p[0]['content']}" for p in PROMPTS]
    forward = direct_choice_probabilities(random_llm, [question(p, a, b)
                                                       for p, a, b in zip(texts, FIRST, SECOND)])
    backward = direct_choice_probabilities(random_llm, [question(p, b, a)
                                                        for p, a, b in zip(texts, FIRST, SECOND)])
    for batch_size in (1, 3):
        verdicts = llm_judge(random_llm, batch_size=batch_size).compare(PROMPTS, FIRST, SECOND)
        assert np.allclose(verdicts.forward, forward[:, 0], atol=1e-5), batch_size
        assert np.allclose(verdicts.backward, backward[:, 1], atol=1e-5), batch_size
    judge = llm_judge(random_llm, batch_size=3)
    judge._load()
    judge._keeps_logits = False  # a model whose forward has no logits_to_keep: every position's logits, read alike
    verdicts = judge.compare(PROMPTS, FIRST, SECOND)
    assert np.allclose(verdicts.forward, forward[:, 0], atol=1e-5)
    assert np.allclose(verdicts.backward, backward[:, 1], atol=1e-5)
    values = np.concatenate([forward[:, 0], backward[:, 1]])
    assert len(set(np.round(values, 4))) == len(values) and np.ptp(values) > 0.05  # the texts do differ


def test_llm_reads_one_user_turn_of_the_chat_template(chat_llm):
    judge = LLMJudge(str(chat_llm), template=QUESTION, answer_prefix=PREFIX)
    verdicts = judge.compare(["sort 21:"], ["12"], ["21"])
    texts = [f"<s><|user|>{QUESTION.format(prompt='sort 21:', a=a, b=b)}</s><|assistant|>{PREFIX}"
             for a, b in (("12", "21"), ("21", "12"))]
    expected = direct_choice_probabilities(chat_llm, texts, add_special_tokens=False)
    assert np.allclose([verdicts.forward[0], verdicts.backward[0]], [expected[0, 0], expected[1, 1]],
                       atol=1e-5)
    plain = llm_judge(chat_llm).compare(["sort 21:"], ["12"], ["21"])  # chat_template=none: another text
    assert abs(plain.forward[0] - verdicts.forward[0]) > 1e-4


def test_llm_scores_k_candidates_from_symmetrised_verdicts(random_llm):
    prompts = ["sort 4813:", "sort 99:", "sort 52:"]
    candidates = [["1348", "8431", "13"], ["99"], ["25", "52"]]
    scores = llm_judge(random_llm, batch_size=1).score(prompts, candidates)
    assert [len(row) for row in scores] == [3, 1, 2] and scores[1] == [0.5]
    judge = llm_judge(random_llm, batch_size=5)
    p = {(i, j): judge.compare([prompts[0]], [candidates[0][i]], [candidates[0][j]]).preference[0]
         for i in range(3) for j in range(3) if i != j}
    means = [np.mean([p[i, j] for j in range(3) if j != i]) for i in range(3)]
    assert np.allclose(scores[0], means, atol=1e-6)
    assert np.allclose([p[i, j] + p[j, i] for i, j in p], 1, atol=1e-9)  # one pair, two orders: consistent
    q = judge.compare([prompts[2]], ["25"], ["52"]).preference[0]
    assert np.allclose(scores[2], [q, 1 - q], atol=1e-6)
    assert np.allclose(sum(judge.score(prompts, candidates), []), sum(scores, []), atol=1e-6)


def test_a_judge_that_always_answers_a_is_all_position_bias(always_a):
    prompts = TASK.prompts("eval", 24)
    right, wrong = [TASK.answer(p) for p in prompts], [(wrong_answers(p) or ["0"])[0] for p in prompts]
    verdicts = llm_judge(always_a, batch_size=8).compare(prompts, right, wrong)
    assert all(f > 0.5 > b for f, b in zip(verdicts.forward, verdicts.backward))  # position-bias rate 1
    assert min(verdicts.forward) > 0.9 and max(verdicts.backward) < 0.1
    assert np.allclose(verdicts.preference, 0.5, atol=0.02), verdicts.preference
    scores = llm_judge(always_a).score(prompts[:6], [[r, w] for r, w in zip(right[:6], wrong)])
    assert np.allclose(scores, 0.5, atol=0.02)  # no candidate stands out


def test_trained_llm_judge_prefers_right_answers_in_both_orders(sort_llm):
    prompts = TASK.prompts("eval", 40)
    pairs = [(p, TASK.answer(p), w) for p in prompts for w in wrong_answers(p)]
    verdicts = llm_judge(sort_llm, batch_size=32).compare(*zip(*pairs))
    both = np.mean([f > 0.5 and b > 0.5 for f, b in zip(verdicts.forward, verdicts.backward)])
    preferred = np.mean(np.array(verdicts.preference) > 0.5)
    # Measured: 0.75 of the pairs in both orders, 0.95 once symmetrised (a tiny judge keeps some
    # position bias).
    assert both >= 0.65 and preferred >= 0.9 and np.mean(verdicts.preference) > 0.7, (both, preferred)
    candidates = [[*wrong_answers(p), TASK.answer(p)] for p in prompts]  # the right one last
    scores = llm_judge(sort_llm, batch_size=64).score(prompts, candidates)
    right_first = np.mean([row[-1] > max(row[:-1]) for row in scores if len(row) > 1])
    assert right_first >= 0.8, right_first  # measured: 0.9


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_llm_judge_through_a_vllm_engine_gives_hfs_verdicts(tmp_path_factory):
    """judge.backend=vllm: the tokenizer here, the weights in an engine child (head_dim 64, as vLLM on a CPU needs);
    verdicts and pool scores are the HF judge's, the cache key is its own, close() stops the engine."""
    path = save_llm(tmp_path_factory.mktemp("llm_head64"), char_tokenizer(), hidden_size=128, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=256, initializer_range=0.5)
    with pytest.raises(InputError, match=r"judge.backend='tgi': choose hf"):
        llm_judge(path, backend="tgi")
    with pytest.raises(InputError, match="judge.backend=vllm with judge.name_or_path=policy"):
        llm_judge("policy", backend="vllm", device="auto")
    for bad, key in (({"device": "cpu"}, "judge.device='cpu'"), ({"trust_remote_code": True}, "judge.trust_remote_code=true"),
                     ({"device": "auto", "engine": {"dtype": "float16"}}, "judge.engine.dtype"),
                     ({"device": "auto", "engine": {"engines": "main"}}, "judge.engine.engines='main'")):
        with pytest.raises(InputError, match=f"judge.backend=vllm with {key}"):
            llm_judge(path, backend="vllm", **bad)
    with pytest.raises(InputError, match="judge.engine is for judge.backend=vllm"):
        llm_judge(path, engine={"max_model_len": 64})
    hf = llm_judge(path)
    engine = llm_judge(path, backend="vllm", device="auto", engine={"kv_cache_memory_bytes": 64 << 20})
    try:
        ours, theirs = engine.compare(PROMPTS, FIRST, SECOND), hf.compare(PROMPTS, FIRST, SECOND)
        assert np.allclose(ours.forward, theirs.forward, atol=1e-5) and np.allclose(ours.backward, theirs.backward,
                                                                                    atol=1e-5)
        assert np.ptp(ours.forward + ours.backward) > 0.05  # the verdicts differ between texts: a real check
        prompts = TASK.prompts("eval", 6)
        candidates = [[TASK.answer(p), *wrong_answers(p)[:2]] for p in prompts]
        assert np.allclose(engine.score(prompts, candidates), hf.score(prompts, candidates), atol=1e-5)
        assert engine._engine.worker_pid is not None and hf._engine is None
        assert "backend='vllm'" in engine.fingerprint() and "files:" in engine.fingerprint()
        assert engine.fingerprint() != hf.fingerprint() and "backend" not in hf.fingerprint()
    finally:
        pid = engine._engine.worker_pid if engine._engine is not None else None
        engine.close()
    assert engine._engine is None and pid is not None and not Path(f"/proc/{pid}").exists()


# -- compare, for every judge -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rule", "reward_model", "pairwise", "llm"])
def test_swapping_the_pair_swaps_the_verdicts(kind, random_rm, random_llm):
    if kind == "rule":
        judge, prompts = RuleJudge(TASK), TASK.prompts("eval", 6)
        first, second = [TASK.answer(p) for p in prompts], [p.split()[1].rstrip(":") for p in prompts]
        first[0] = second[0]  # a tie: 0.5 either way
    else:
        judge = {"reward_model": lambda: RewardModelJudge(str(random_rm), batch_size=3),
                 "pairwise": lambda: PairwiseJudge(str(random_rm), batch_size=3, template=PAIR),
                 "llm": lambda: llm_judge(random_llm, batch_size=3)}[kind]()
        prompts, first, second = PROMPTS, FIRST, SECOND
    one, other = judge.compare(prompts, first, second), judge.compare(prompts, second, first)
    assert isinstance(one, Verdicts) and len(one.forward) == len(one.backward) == len(prompts)
    assert np.allclose(other.forward, 1 - np.array(one.backward), atol=1e-6)
    assert np.allclose(other.backward, 1 - np.array(one.forward), atol=1e-6)
    assert np.allclose(one.preference, (np.array(one.forward) + one.backward) / 2)
    assert len(set(np.round(one.forward, 4))) > 1  # not every verdict the same
    if kind in ("pairwise", "llm"):  # the two orders are read apart
        assert max(abs(f - b) for f, b in zip(one.forward, one.backward)) > 1e-3
    else:  # each response seen alone: the order cannot matter
        assert one.forward == one.backward


def test_reward_model_compare_is_bradley_terry_of_its_scores(random_rm):
    judge = RewardModelJudge(str(random_rm), batch_size=2)
    scores = judge.score(PROMPTS, [[a, b] for a, b in zip(FIRST, SECOND)])
    verdicts = judge.compare(PROMPTS, FIRST, SECOND)
    assert np.allclose(verdicts.forward, [sigmoid(a - b) for a, b in scores], atol=1e-6)
    assert verdicts.backward == verdicts.forward


def test_rule_compare_is_hard():
    prompt = "sort 4813:"
    first, second = ["1348", "1384", "1348", "8431"], ["1384", "1348", "1348", "3418"]
    assert [TASK.score(prompt, c) for c in ["1348", "1384", "8431", "3418"]] == [1.0, 0.5, 0.0, 0.25]
    verdicts = RuleJudge(TASK).compare([prompt] * 4, first, second)
    assert verdicts.forward == verdicts.backward == [1.0, 0.0, 0.5, 0.0]  # not σ(1 - 0.5) = 0.62


def test_pairwise_compare_reads_each_order_once(random_rm):
    verdicts = PairwiseJudge(str(random_rm), template=PAIR, batch_size=3).compare(PROMPTS, FIRST, SECOND)
    texts = [p if isinstance(p, str) else f"user: {p[0]['content']}" for p in PROMPTS]
    pairs = list(zip(texts, FIRST, SECOND))
    l_ab = direct_logits(random_rm, [PAIR.format(prompt=p, a=a, b=b) for p, a, b in pairs])
    l_ba = direct_logits(random_rm, [PAIR.format(prompt=p, a=b, b=a) for p, a, b in pairs])
    assert np.allclose(verdicts.forward, [sigmoid(x) for x in l_ab], atol=1e-5)
    assert np.allclose(verdicts.backward, [1 - sigmoid(x) for x in l_ba], atol=1e-5)


class LengthJudge(Judge):
    """A user's judge that only scores: longer is better."""

    name = "judge=length"

    def _score(self, prompts, candidates):
        return [[len(c) for c in group] for group in candidates]


class BadVerdictsJudge(LengthJudge):
    name = "judge=bad"

    def __init__(self, forward, backward) -> None:
        self._verdicts = Verdicts(forward=forward, backward=backward)

    def _compare(self, prompts, first, second):
        return self._verdicts


def test_a_users_judge_compares_its_scores_hard_and_bad_verdicts_stop_with_one_line():
    verdicts = LengthJudge().compare(["p", "q", "r"], ["abc", "a", "ab"], ["ab", "abc", "ab"])
    assert verdicts.forward == verdicts.backward == [1.0, 0.0, 0.5] and verdicts.preference == [1.0, 0.0, 0.5]
    assert LengthJudge().fingerprint() == repr(LengthJudge()) and RuleJudge(TASK).fingerprint() == repr(
        RuleJudge(TASK))
    for forward, backward, problem in (([0.2, 1.5], [0.5, 0.5], "forward=1.5 for prompt 'q'"),
                                       ([0.2, 0.5], [float("nan"), 0.5], "backward=nan for prompt 'p'"),
                                       ([0.2, 0.5], [0.5, "0.5"], "backward='0.5' for prompt 'q'"),
                                       ([0.2, 0.5], [-0.1, 0.5], "-0.1 is not in [0, 1]")):
        with pytest.raises(JudgeError) as err:
            BadVerdictsJudge(forward, backward).compare(["p", "q"], ["a", "b"], ["c", "d"])
        message = one_line(err)
        assert message.startswith("judge=bad returned") and problem in message, message
    with pytest.raises(JudgeError) as err:
        BadVerdictsJudge([0.5], [0.5, 0.5]).compare(["p", "q"], ["a", "b"], ["c", "d"])
    assert "1 forward verdicts for 2 pairs" in one_line(err)
    with pytest.raises(ValueError, match="2 prompts, 2 first and 1 second responses"):
        LengthJudge().compare(["p", "q"], ["a", "b"], ["c"])


# -- fingerprint --------------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights_and_the_template(tmp_path):
    tokenizer = char_tokenizer()
    path = save_llm(tmp_path / "judge", tokenizer)
    first = llm_judge(path).fingerprint()
    assert llm_judge(path).fingerprint() == first  # the same files: the same judge
    assert llm_judge(path, batch_size=3).fingerprint() == first  # batch_size changes no verdict
    assert repr(QUESTION) in first and llm_judge(path, template="{prompt}|{a}|{b}").fingerprint() != first
    assert llm_judge(path, answer_prefix="  ").fingerprint() != first
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    judge = llm_judge(path)  # a model retrained in place must not be served old verdicts
    model.save_pretrained(path)
    assert judge.fingerprint() != first
    assert judge.fingerprint().split("weights=")[0] == first.split("weights=")[0]  # only the weights differ

    rm = save_classifier(tmp_path / "rm", tokenizer)
    before = RewardModelJudge(str(rm)).fingerprint()
    reward_model = LlamaForSequenceClassification.from_pretrained(rm)
    with torch.no_grad():
        reward_model.score.weight[0, 0] += 1e-3
    reward_model.save_pretrained(rm)
    judge = RewardModelJudge(str(rm))
    assert judge.fingerprint() != before
    judge.close()  # a fresh load hashes the weights again
    assert judge.fingerprint() != before


def test_fingerprint_includes_the_tokenizers_chat_template(tmp_path, chat_llm):
    """chat_template=auto reads the tokenizer's own: the same weights and settings with another template in
    the tokenizer are another judge."""
    other = tmp_path / "other_template"
    AutoModelForCausalLM.from_pretrained(chat_llm).save_pretrained(other)
    char_tokenizer(chat_template=TEMPLATE.replace("<|assistant|>", "<|bot|>")).save_pretrained(other)
    auto, moved = LLMJudge(str(chat_llm)).fingerprint(), LLMJudge(str(other)).fingerprint()
    assert auto.split(" weights=")[0].replace(str(chat_llm), str(other)) == moved.split(" weights=")[0]
    assert auto.split("weights=")[1].split()[0] == moved.split("weights=")[1].split()[0]
    assert auto.split("chat_template=")[-1] != moved.split("chat_template=")[-1]
    plain = LLMJudge(str(chat_llm), chat_template="none").fingerprint()
    other_plain = LLMJudge(str(other), chat_template="none").fingerprint()
    assert other_plain.split("weights=")[1] == plain.split("weights=")[1]


# -- loading, closing and bad settings ---------------------------------------------------------------


def test_llm_judge_loads_at_first_use_and_close_frees_it(random_llm):
    judge = llm_judge(random_llm)
    assert judge._model is None
    first = judge.compare(["sort 21:"], ["12"], ["21"])
    model = weakref.ref(judge._model)
    judge.close()
    assert model() is None and judge._model is None
    assert judge.compare(["sort 21:"], ["12"], ["21"]) == first


def test_bad_llm_judges_stop_with_one_line(tmp_path, random_llm, random_rm):
    cases = [({"choices": ["Yes", "No"]}, "judge.choices: 'Yes' is not one token"),
             ({"choices": [" A", " B"]}, "judge.answer_prefix"),
             ({"template": "{prompt} {a}"}, "lacks {b}"),
             ({"template": "{prompt} {a} {b} {c}"}, "KeyError")]
    for settings, problem in cases:
        with pytest.raises(InputError) as err:
            llm_judge(random_llm, **settings).compare(["sort 21:"], ["12"], ["21"])
        assert problem in one_line(err), settings
    for choices in (["A"], ["A", "A"], ["A", ""], "A"):
        with pytest.raises(InputError) as err:
            llm_judge(random_llm, choices=choices)
        assert "judge.choices=" in one_line(err) and "two different non-empty answers" in str(err.value)

    judge = LLMJudge(str(random_rm))  # composing loads nothing: a wrong model shows at first use
    with pytest.raises(InputError) as err:
        judge.compare(["sort 21:"], ["12"], ["21"])
    assert "LlamaForSequenceClassification checkpoint, not a causal language model" in one_line(err)
    assert str(random_rm) in str(err.value) and "judge=reward_model" in str(err.value)
    with pytest.raises(InputError) as err:
        LLMJudge(str(tmp_path / "missing")).score(["sort 21:"], [["12", "21"]])
    assert "missing': no such directory" in one_line(err)
    with pytest.raises(InputError) as err:  # and the other way round: a causal LM is no reward model
        RewardModelJudge(str(random_llm)).compare(["sort 21:"], ["12"], ["21"])
    assert "not a sequence classifier" in one_line(err) and "judge=llm" in str(err.value)


def test_llm_config_instantiates_without_loading_a_model():
    cfg = OmegaConf.load(REPO / "conf" / "judge" / "llm.yaml")
    assert OmegaConf.is_missing(cfg, "name_or_path")
    cfg.name_or_path = "/no/such/model"
    judge = instantiate(cfg, task=TASK)
    assert isinstance(judge, LLMJudge) and judge._model is None
    assert judge.template == LLM_TEMPLATE and judge.choices == ["A", "B"] and judge.chat_template == "auto"
    assert repr(judge).startswith("LLMJudge(name_or_path='/no/such/model', max_length=2048")
    assert repr(judge).endswith("choices=['A', 'B'], answer_prefix='')")


def test_the_files_fingerprint_is_read_once_while_the_files_are_unchanged(tmp_path, monkeypatch):
    """judge.backend=vllm fingerprints the checkpoint's bytes at every load (every round): a large judge is read once
    per process, and again only when a weight file changes."""
    (tmp_path / "model.safetensors").write_bytes(b"a" * 1000)
    first = files_fingerprint(tmp_path, "judge.name_or_path")
    reads = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self.name) or real_open(self, *a, **k))
    assert files_fingerprint(tmp_path, "judge.name_or_path") == first and reads == []
    (tmp_path / "model.safetensors").write_bytes(b"b" * 1001)
    reads.clear()
    assert files_fingerprint(tmp_path, "judge.name_or_path") != first and reads == ["model.safetensors"]
