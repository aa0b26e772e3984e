"""The HF generator, prompt rendering and the generator configs, on tiny models built here (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.errors import InputError
from prefrun.generate import (
    HFGenerator,
    VLLMGenerator,
    as_chat,
    auto_generator,
    prompt_ids,
)

from .conftest import char_llama, teacher_forced

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Question 3: what is 3 plus 6?", "The quick", "Question 12: what is 12 plus 24? Answer:"]


@pytest.fixture(scope="module")
def bpe(bpe_model_dir):
    """The conftest BPE Llama (random weights) and its tokenizer, given a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    tokenizer.chat_template = TEMPLATE
    return AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval(), tokenizer


@pytest.fixture(scope="module")
def chars():
    """A random 2-layer Llama over the character tokenizer: one token per character, so texts cut exactly."""
    return char_llama(hidden=64, heads=1, seed=1)


def test_candidates_carry_token_ids_and_raw_logprobs(bpe):
    model, tokenizer = bpe
    prompts = [*PROMPTS, [{"role": "user", "content": "what is 3 plus 6?"}]]  # a chat prompt: template ids
    # Temperature and top-p shape the sampling only: the log-probs stay those of the raw logits (T = 1).
    generator = HFGenerator(num_candidates=4, temperature=0.8, top_p=0.9, max_new_tokens=12, batch_size=3)
    out = generator.generate(prompts, model=model, tokenizer=tokenizer)
    assert len(out) == len(prompts)
    worst = 0.0
    for prompt, cands in zip(prompts, out):
        assert len(cands.texts) == len(cands.token_ids) == len(cands.logprobs) == len(cands.finish_reasons) == 4
        for text, ids, logps, reason in zip(cands.texts, cands.token_ids, cands.logprobs, cands.finish_reasons):
            assert 0 < len(ids) <= 12 and len(logps) == len(ids) and tokenizer.eos_token_id not in ids
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            assert reason == ("length" if len(ids) == 12 else "stop")
            worst = max(worst, (torch.tensor(logps) - teacher_forced(model, tokenizer, prompt, ids)).abs().max().item())
    assert worst < 1e-5, worst
    assert len({t for c in out for t in c.texts}) > 8  # real samples, not copies
    stats = generator.last_stats
    assert stats["num_prompts"] == 4 and stats["generated_tokens"] == sum(len(i) for c in out for i in c.token_ids)


def test_same_seed_same_candidates_and_caller_rng_untouched(bpe):
    model, tokenizer = bpe
    rng_before = torch.get_rng_state()
    first = HFGenerator(num_candidates=3, max_new_tokens=10, seed=5).generate(PROMPTS, model=model, tokenizer=tokenizer)
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = HFGenerator(num_candidates=3, max_new_tokens=10, seed=5).generate(PROMPTS, model=model, tokenizer=tokenizer)
    other = HFGenerator(num_candidates=3, max_new_tokens=10, seed=6).generate(PROMPTS, model=model, tokenizer=tokenizer)
    assert first == again
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_stop_strings_cut_text_ids_and_logprobs_alike(chars):
    model, tokenizer = chars
    prompts = [f"sort {d}:" for d in ("4813", "90", "123456", "777", "5", "31")]
    settings = {"num_candidates": 4, "max_new_tokens": 24, "seed": 3, "batch_size": 8}
    full = HFGenerator(**settings).generate(prompts, model=model, tokenizer=tokenizer)
    stopped = HFGenerator(**settings, stop=["a", "e"]).generate(prompts, model=model, tokenizer=tokenizer)
    cut = 0
    for whole, part in zip(full, stopped):
        for text, ids, logps, s_text, s_ids, s_logps, reason in zip(
                whole.texts, whole.token_ids, whole.logprobs, part.texts, part.token_ids, part.logprobs,
                part.finish_reasons):
            first_stop = min((text.find(s) for s in ("a", "e") if s in text), default=None)
            if first_stop is None:  # the same draws: the same completion
                assert (s_text, s_ids) == (text, ids)
                continue
            cut += 1
            # One token per character: the stopped completion is the full one up to the stop string, and the
            # next token of the full one is the stop string's first character.
            assert s_text == text[:first_stop] == tokenizer.decode(s_ids, skip_special_tokens=True)
            assert s_ids == ids[: len(s_ids)] and tokenizer.decode(ids[len(s_ids)]) in ("a", "e") and reason == "stop"
            assert s_logps == pytest.approx(logps[: len(s_ids)], abs=1e-6)
    assert 0 < cut < 24  # the check above saw both kinds


def test_min_new_tokens_and_every_eos_id(bpe_model_dir):
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    ends = set(range(3, 120))  # chat models list several EOS ids in their generation config; here a third of the vocab
    model.generation_config.eos_token_id = sorted(ends)
    free = HFGenerator(num_candidates=4, max_new_tokens=8).generate(PROMPTS, model=model, tokenizer=tokenizer)
    held = HFGenerator(num_candidates=4, max_new_tokens=8, min_new_tokens=8).generate(PROMPTS, model=model,
                                                                                      tokenizer=tokenizer)
    free_ids = [ids for c in free for ids in c.token_ids]
    assert sum(len(ids) < 8 for ids in free_ids) > 6 and not any(set(ids) & ends for ids in free_ids)
    for prompt, cands in zip(PROMPTS, held):
        assert all(len(ids) == 8 for ids in cands.token_ids) and set(cands.finish_reasons) == {"length"}
        for ids, logps in zip(cands.token_ids, cands.logprobs):  # still the raw log-probs, EOS not masked out
            assert torch.allclose(torch.tensor(logps), teacher_forced(model, tokenizer, prompt, ids), atol=1e-5)


def test_greedy_is_the_argmax_repeated(chars):
    model, tokenizer = chars
    prompts = ["sort 4813:", "sort 90:"]
    out = HFGenerator(num_candidates=3, temperature=0, max_new_tokens=10).generate(prompts, model=model,
                                                                                    tokenizer=tokenizer)
    again = HFGenerator(num_candidates=3, temperature=0, max_new_tokens=10, seed=9).generate(prompts, model=model,
                                                                                              tokenizer=tokenizer)
    assert out == again
    for prompt, cands in zip(prompts, out):
        assert len(set(map(tuple, cands.token_ids))) == 1 and len(cands.texts) == 3
        context = prompt_ids(tokenizer, prompt) + cands.token_ids[0]
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0]
        n = len(cands.token_ids[0])
        assert logits[len(context) - n - 1 : -1].argmax(-1).tolist() == cands.token_ids[0]


def test_hf_generation_keeps_to_the_models_context():
    """As vLLM's engine: a prompt that fills the context is one line, completions end at the context (a GPT-2 failed
    with torch's "index out of range in self"; a rotary model went on past its training)."""
    model, tokenizer = char_llama(hidden=64, heads=1, seed=0, max_position_embeddings=16)
    out = HFGenerator(num_candidates=2, max_new_tokens=30, min_new_tokens=30).generate(["sort 4813:"], model=model,
                                                                                        tokenizer=tokenizer)
    width = len(prompt_ids(tokenizer, "sort 4813:"))
    assert [len(ids) for ids in out[0].token_ids] == [16 - width] * 2
    with pytest.raises(InputError, match="generator=hf: a prompt has 22 tokens, and the model.s context is 16 .max_position_embeddings."):
        HFGenerator(max_new_tokens=4).generate(["sort 123456789012345:"], model=model, tokenizer=tokenizer)


def test_prompt_ids_and_as_chat_with_a_chat_template(bpe):
    _, tokenizer = bpe
    assert prompt_ids(tokenizer, "what is 3") == tokenizer("what is 3").input_ids
    assert prompt_ids(tokenizer, "what is 3")[0] == tokenizer.bos_token_id  # special tokens included, as in training
    messages = [{"role": "user", "content": "what is 3"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert prompt_ids(tokenizer, messages) == list(expected)
    assert tokenizer.decode(prompt_ids(tokenizer, messages)).endswith("what is 3\nassistant:")
    assert as_chat(["what is 3", messages], tokenizer) == [messages, messages]  # auto: the template is there
    assert as_chat(["what is 3"], tokenizer, chat_template=True) == [messages]
    assert as_chat(["what is 3", messages], tokenizer, chat_template=False) == ["what is 3", messages]


def test_prompt_ids_and_as_chat_without_a_chat_template(bpe_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    assert not tokenizer.chat_template
    assert as_chat(["what is 3"], tokenizer) == ["what is 3"]  # auto: strings stay strings
    with pytest.raises(InputError, match="chat_template=true.*no chat template"):
        as_chat(["what is 3"], tokenizer, chat_template=True)
    with pytest.raises(InputError, match=r"no chat template: set one \(model.chat_template=<Jinja template or file>\)"):
        prompt_ids(tokenizer, [{"role": "user", "content": "what is 3"}])
    with pytest.raises(InputError, match="string or a non-empty list"):
        prompt_ids(tokenizer, 42)


def test_model_chat_template_gives_any_command_a_template(tmp_path, bpe_model_dir):
    """The key the line above names, for every command (data.chat_template is data=hf's alone): a file or a string."""
    from prefrun.model import load_tokenizer

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (tmp_path / "chat.jinja").write_text(template)
    for given in (str(tmp_path / "chat.jinja"), template):
        tokenizer = load_tokenizer(str(bpe_model_dir), OmegaConf.create({"trust_remote_code": False,
                                                                          "chat_template": given}))
        ids = prompt_ids(tokenizer, [{"role": "user", "content": "what is 3"}])
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "<user>whatis3<assistant>"
    with pytest.raises(InputError, match="model.chat_template='nope.jinja': no such file"):
        load_tokenizer(str(bpe_model_dir), OmegaConf.create({"trust_remote_code": False, "chat_template": "nope.jinja"}))


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"num_candidates": 0}, {"stop": [""]},
                                 {"min_new_tokens": 40}, {"chat_template": "yes"}, {"batch_size": 0}])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(InputError, match=f"generator.{next(iter(bad))}="):
        HFGenerator(**bad)


def test_auto_picks_hf_on_a_cpu_unless_forced():
    assert not torch.cuda.is_available()  # this suite runs on CPUs; the GPU branch is checked on a GPU machine
    picked = auto_generator(num_candidates=2, batch_size=4, timeout_s=5, dtype="float32")
    assert picked == HFGenerator(num_candidates=2, batch_size=4)  # each backend takes its own keys
    forced = auto_generator(on_cpu="vllm", num_candidates=2, batch_size=4, timeout_s=5)
    assert forced == VLLMGenerator(num_candidates=2, timeout_s=5)
    with pytest.raises(InputError, match="unknown key.*num_candidate"):
        auto_generator(num_candidate=2)
    with pytest.raises(InputError, match="generator.on_cpu"):
        auto_generator(on_cpu="gpu")


@pytest.mark.parametrize("name", ["hf", "vllm", "auto"])
def test_generator_configs_instantiate_and_comment_every_key(name):
    path = REPO / "conf" / "generator" / f"{name}.yaml"
    generator = instantiate(OmegaConf.load(path))
    assert isinstance(generator, (HFGenerator, VLLMGenerator))
    keys = [line for line in path.read_text().splitlines() if line and not line.startswith(("#", " "))]
    assert all("#" in line for line in keys if not line.startswith("_target_")), path


def test_lora_policy_is_saved_merged_for_the_engine(tmp_path, bpe, bpe_model_dir):
    """vLLM loads a plain checkpoint: a LoRA policy is saved with its adapters merged, and stays as it was."""
    from peft import LoraConfig, get_peft_model

    from prefrun.generate import _save_for_engine

    model, tokenizer = bpe
    base = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # fresh adapters are the identity: make them matter
    ids = torch.tensor([tokenizer("Question 3: what is").input_ids])
    with torch.no_grad():
        before = policy(ids).logits
        _save_for_engine(policy, tmp_path / "merged", bucket_bytes=1)  # made a tensor at a time, a layer per file
        after = policy(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        plain = model(ids).logits
    assert torch.equal(before, after)  # the policy is untouched
    assert (merged - before).abs().max() < 1e-5 and (plain - before).abs().max() > 1e-3
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > base.config.num_hidden_layers


def test_the_engine_child_does_not_inherit_the_launchers_job(monkeypatch):
    """Under `accelerate launch` each training process starts its own engine child; vLLM must not see the
    trainers' RANK / WORLD_SIZE / MASTER_* (it would try to join their process group)."""
    from prefrun.generate.worker_process import LAUNCHER_VARIABLES, _worker_env

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"}.items():
        monkeypatch.setenv(name, value)
    env = _worker_env()
    assert not set(env) & {*LAUNCHER_VARIABLES, "ACCELERATE_MIXED_PRECISION"}
    assert "PYTHONPATH" in env


@pytest.mark.parametrize(("bad", "says"), [
    ({"engines": "shared"}, "generator.engines='shared'"),
    ({"engines": "main", "mode": "fresh"}, "generator.engines='main'.*persistent"),
    ({"devices": [4, 5]}, "generator.devices=.*engines=main"),
    ({"engines": "main", "devices": []}, "generator.devices="),
])
def test_engine_placement_keys_are_checked(bad, says):
    with pytest.raises(InputError, match=says):
        VLLMGenerator(**bad)


def test_the_engine_placement_does_not_change_what_is_sampled_nor_the_pools_job_key():
    """engines / devices say where the engine runs, not what it samples: a run resumed with the other placement
    finds its pools' shards (their manifest keys by the generator's repr), and one process has no main engine to
    share (fed_by_main is off), nor a GPU to put it on (one line)."""
    main = VLLMGenerator(engines="main")
    assert repr(main) == repr(VLLMGenerator()) and main == VLLMGenerator()
    assert not main.fed_by_main
    with pytest.raises(InputError, match=r"generator.devices=\[1\]: there are no CUDA GPUs here"):
        VLLMGenerator(engines="main", devices=[1])._visible_devices()


def test_map_waves_on_one_process_is_map_shards():
    from prefrun import distributed

    made = []
    out = distributed.map_waves(3, lambda wave: made.append(wave) or {s: s * 10 for s in wave},
                                lambda shard, x: (shard, x))
    assert out == [(0, 0), (1, 10), (2, 20)] and made == [[0], [1], [2]]
    assert distributed.map_shards(5, lambda s: s, shards=range(2, 4)) == [2, 3]


def test_a_generation_call_is_bounded_by_call_timeout_s_per_million_tokens_it_may_make():
    """A shard is one engine call: the APO paper's (256 prompts x 5 candidates x 2,048 tokens, 2.6M tokens) gets
    three bounds, a small one call_timeout_s itself."""
    paper = VLLMGenerator(num_candidates=5, max_new_tokens=2048, call_timeout_s=600)
    assert paper._generation_timeout([paper], [[[1, 2]] * 256]) == 1800
    small = VLLMGenerator(num_candidates=4, max_new_tokens=16, call_timeout_s=600)
    assert small._generation_timeout([small, small], [[[1]] * 8, [[1]] * 8]) == 600
