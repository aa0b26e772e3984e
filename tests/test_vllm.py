"""The vLLM generator against a real engine (one engine start for the module), and its child process's
failure handling (a stand-in `vllm` package on the child's PYTHONPATH makes it fail, hang or die on cue)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.errors import PrefrunError
from prefrun.generate import HFGenerator, VLLMGenerator, prompt_ids
from prefrun.tasks import SortDigits
from prefrun.tiny import TinyLlama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

K, MAX_NEW = 4, 16
# One engine serves every variant (generate_many); each is what one generate() call with those settings returns.
VARIANTS = {
    "base": {},
    "base_again": {},
    "seed1": {"seed": 1},
    "tempered": {"temperature": 0.7, "top_p": 0.9},
    "stop": {"stop": ["5"]},
    "greedy": {"temperature": 0},
    "held": {"min_new_tokens": MAX_NEW},
    "long": {},  # long prompts: more prompt tokens than one engine step takes (4096 on a CPU)
}


def live_processes_of_group(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in "ZX":
            alive.append(int(stat.parent.name))
    return alive


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded model's recipe (head_dim 64), briefly warmed up on the sort task, so it emits digits and EOS."""
    task = SortDigits()
    path = TinyLlama(sft_steps=25, sft_batch_size=32, sft_lr=1e-2).materialize(tmp_path_factory.mktemp("cache"), task)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, model, AutoTokenizer.from_pretrained(path), task.prompts("eval", 12)


def long_prompts(n: int = 12) -> list[str]:
    """~100 tokens each: K x 12 of them are ~4800 prompt tokens, so the engine must spread them over steps."""
    return [f"sort {str(7 ** (i + 200))[:95]}:" for i in range(n)]


@pytest.fixture(scope="module")
def engine_run(tiny, tmp_path_factory):
    _, model, tokenizer, prompts = tiny
    scratch = tmp_path_factory.mktemp("scratch")
    generator = VLLMGenerator(num_candidates=K, max_new_tokens=MAX_NEW, mode="fresh")  # the child-per-call mode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))  # where the policy is saved for the engine
        vllm_here_before = "vllm" in sys.modules
        start = time.perf_counter()
        prompt_sets = [long_prompts() if name == "long" else prompts for name in VARIANTS]
        sets = generator.generate_many(prompt_sets, variants=list(VARIANTS.values()), model=model,
                                       tokenizer=tokenizer)
        stats = {**generator.last_stats, "wall_s": time.perf_counter() - start,
                 "imported_vllm_here": "vllm" in sys.modules and not vllm_here_before}
    print(f"\nvLLM worker: import {stats['import_s']:.1f} s, engine start {stats['engine_start_s']:.1f} s, "
          f"generation {stats['generate_s']:.1f} s, whole call {stats['wall_s']:.1f} s")
    return dict(zip(VARIANTS, sets)), stats, scratch


@pytest.mark.slow
def test_candidates_with_token_ids_and_logprobs(tiny, engine_run):
    _, _, tokenizer, prompts = tiny
    sets, _, _ = engine_run
    out = sets["base"]
    assert len(out) == len(prompts)
    for cands in out:
        assert len(cands.texts) == len(cands.token_ids) == len(cands.logprobs) == len(cands.finish_reasons) == K
        for text, ids, logps, reason in zip(cands.texts, cands.token_ids, cands.logprobs, cands.finish_reasons):
            assert len(logps) == len(ids) <= MAX_NEW and tokenizer.eos_token_id not in ids
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            assert reason == ("length" if len(ids) == MAX_NEW else "stop")
    texts = [t for c in out for t in c.texts]
    assert len(set(texts)) > len(prompts)  # K real samples per prompt
    assert sum(t.isdigit() for t in texts) > len(texts) / 2  # the warmed-up model answers in digits and stops


def teacher_forced(model, rows: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """HF log_softmax at each completion token, for (prompt ids, completion ids) rows in one right-padded forward."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in rows])
    mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in rows])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    return [logps[i, torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c, dtype=torch.long)]
            for i, (p, c) in enumerate(rows)]


@pytest.mark.slow
def test_logprobs_match_an_hf_teacher_forced_forward(tiny, engine_run):
    _, model, tokenizer, prompts = tiny
    sets, _, _ = engine_run
    rows, engine_logps = [], []
    for name in ("base", "tempered", "long"):  # tempered: sampled at T 0.7 / top-p 0.9, log-probs still raw
        for prompt, cands in zip(long_prompts() if name == "long" else prompts, sets[name]):
            for ids, logps in zip(cands.token_ids, cands.logprobs):
                if ids:
                    rows.append((prompt_ids(tokenizer, prompt), ids))
                    engine_logps.append(torch.tensor(logps))
    worst = max((a - b).abs().max().item() for a, b in zip(engine_logps, teacher_forced(model, rows)))
    print(f"\nmax |vLLM - HF| log-prob over {sum(map(len, engine_logps))} tokens: {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_same_seed_same_candidates(engine_run):
    sets, _, _ = engine_run
    assert sets["base"] == sets["base_again"]
    assert [c.token_ids for c in sets["base"]] != [c.token_ids for c in sets["seed1"]]


@pytest.mark.slow
def test_stop_strings_cut_text_ids_and_logprobs_alike(tiny, engine_run):
    _, _, tokenizer, _ = tiny
    sets, _, _ = engine_run
    cut = 0
    for whole, part in zip(sets["base"], sets["stop"]):  # same seeds: the same draws until the stop string
        for text, ids, logps, s_text, s_ids, s_logps in zip(whole.texts, whole.token_ids, whole.logprobs,
                                                             part.texts, part.token_ids, part.logprobs):
            assert "5" not in s_text
            if "5" not in text:
                assert (s_text, s_ids) == (text, ids)
                continue
            cut += 1
            assert s_text == text[: text.index("5")] == tokenizer.decode(s_ids, skip_special_tokens=True)
            assert s_ids == ids[: len(s_ids)] and s_logps == pytest.approx(logps[: len(s_ids)], abs=1e-6)
    assert cut > 0


@pytest.mark.slow
def test_greedy_repeats_one_completion_and_agrees_with_hf(tiny, engine_run):
    _, model, tokenizer, prompts = tiny
    sets, _, _ = engine_run
    hf = HFGenerator(num_candidates=K, temperature=0, max_new_tokens=MAX_NEW).generate(prompts, model=model,
                                                                                       tokenizer=tokenizer)
    for engine, local in zip(sets["greedy"], hf):
        assert len(set(engine.texts)) == 1 and len(engine.texts) == K
        assert engine.token_ids == local.token_ids


@pytest.mark.slow
def test_min_new_tokens_holds_eos_back(engine_run):
    sets, _, _ = engine_run
    assert any(len(ids) < MAX_NEW for c in sets["base"] for ids in c.token_ids)
    assert all(len(ids) == MAX_NEW for c in sets["held"] for ids in c.token_ids)


@pytest.mark.slow
def test_the_child_exits_and_takes_its_memory_with_it(engine_run):
    _, stats, scratch = engine_run
    assert stats["worker_returncode"] == 0
    assert live_processes_of_group(stats["worker_pid"]) == []  # the worker, its engine core and workers: gone
    assert not stats["imported_vllm_here"]  # the engine never lived in this process
    assert list(scratch.iterdir()) == []  # the policy saved for the engine is deleted


# -- the child's failures, with a stand-in `vllm` ----------------------------------------------------------


@pytest.fixture()
def stand_in_vllm(tmp_path, monkeypatch):
    """Write a `vllm` package whose import runs `code`, first on the child's PYTHONPATH."""
    def make(code: str) -> Path:
        package = tmp_path / "stand_in" / "vllm"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(textwrap.dedent(code))
        monkeypatch.setenv("PYTHONPATH", str(package.parent))
        monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
        return tmp_path / "pids"
    return make


def one_line_error(bpe_model_dir, **settings) -> str:
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    with pytest.raises(PrefrunError) as err:
        VLLMGenerator(num_candidates=2, max_new_tokens=4, **settings).generate(["Question 1:"], tokenizer=tokenizer,
                                                                                model_path=str(bpe_model_dir))
    assert "\n" not in str(err.value) and str(err.value).startswith("generator=vllm: ")
    return str(err.value)


def test_no_prompts_start_no_engine(bpe_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    generator = VLLMGenerator(timeout_s=1)  # an engine could not even start in that time
    assert generator.generate([], tokenizer=tokenizer, model_path=str(bpe_model_dir)) == []


def test_broken_torchvision_says_to_uninstall_it(stand_in_vllm, bpe_model_dir):
    stand_in_vllm('raise RuntimeError("operator torchvision::nms does not exist")')
    message = one_line_error(bpe_model_dir)
    assert "torchvision" in message and "must be uninstalled" in message
    assert "pip uninstall -y torchvision torchaudio torchcodec" in message


def test_engine_that_fails_to_start_is_one_line(stand_in_vllm, bpe_model_dir):
    stand_in_vllm("""
        class LLM:
            def __init__(self, **kwargs):
                raise ValueError("Head size 32 is not supported by the CPU attention backend.\\nmore detail")
        SamplingParams = TokensPrompt = dict
    """)
    message = one_line_error(bpe_model_dir)
    assert "engine did not start: ValueError: Head size 32 is not supported" in message


def test_hung_worker_is_stopped_at_timeout_with_its_children(stand_in_vllm, bpe_model_dir):
    pids = stand_in_vllm("""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        open(os.environ["PIDS"], "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(300)
    """)
    start = time.perf_counter()
    message = one_line_error(bpe_model_dir, timeout_s=3)
    assert "timeout_s=3" in message and time.perf_counter() - start < 30
    worker, grandchild = map(int, pids.read_text().split())
    assert live_processes_of_group(worker) == []  # the worker and the process it started are both gone
    assert grandchild not in live_processes_of_group(worker) and not is_alive(grandchild)


def test_slurms_early_warning_signals_do_not_end_the_engine(stand_in_vllm, bpe_model_dir):
    # SLURM signals every process of a step (--signal=USR1@90; submitit: USR2), the engine's own session too:
    # it must live on while the trainer finishes its work; so must the engine's own processes.
    stand_in_vllm("""
        import os, signal, subprocess, sys
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            os.kill(os.getpid(), signum)
        code = "import os, signal; os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGUSR2)"
        raise ValueError(f"still here, its child exited {subprocess.run([sys.executable, '-c', code]).returncode}")
    """)
    assert "ValueError: still here, its child exited 0" in one_line_error(bpe_model_dir)  # not "killed by signal 10"


def test_worker_killed_before_results_is_one_line(stand_in_vllm, bpe_model_dir):
    stand_in_vllm("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert "was killed by signal 9" in one_line_error(bpe_model_dir)
