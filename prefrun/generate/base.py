"""What both generators share: `Candidates`, prompts (`prompt_ids`, `as_chat`), `Sampling` (the settings
every generator has, and the interface: generate, sync, sleep, close), and the helpers both backends run in
this process: tokenizing prompts, EOS ids, cutting completions at EOS and stop strings, the throughput log."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prefrun.errors import InputError

log = logging.getLogger(__name__)


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
                             "(model.chat_template=<Jinja template or file>) or give string prompts")
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
                         "(model.chat_template=<Jinja template or file>) or use generator.chat_template=auto")
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
    shard_size: int | None = None  # prompts per shard of pools (each its own seed, one process); None: the backend's
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
            ("shard_size", self.shard_size is None or (isinstance(self.shard_size, int) and self.shard_size >= 1),
             "an integer >= 1, or null"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise InputError(f"generator.{key}={getattr(self, key)!r}: must be {want}")
        _check_chat_template(self.chat_template)

    @property
    def samples_per_prompt(self) -> int:
        """What the backend samples: K, or one greedy completion that is then repeated K times."""
        return self.num_candidates if self.temperature > 0 else 1

    @property
    def uses_model(self) -> bool:
        """Whether generate() runs the in-memory policy (HF) rather than an engine of its own (vLLM)."""
        return True

    @property
    def prompts_per_shard(self) -> int:
        """Prompts per shard of pools (`make_pools`): `shard_size`, else 256. Under N processes a fold of P prompts
        is split in P / shard_size shards, so smaller shards share a small fold better; the size is part of what
        the pools are (each shard samples with its own seed)."""
        return self.shard_size or 256

    def sync(self, model, tokenizer, *, probe_prompts: list, version: int) -> None:
        """Bring the generator to `model`'s current weights (`version`: a number the caller raises every round)
        and verify it; `sync_stats` then says how it went. Here (HF) generation samples from the model in
        memory, so there is nothing to push and nothing that could be stale."""
        self.sync_stats = {"sync/max_abs_logp_diff": 0.0, "sync/probe_change": 0.0,
                           "sync/weight_version": int(version), "sync/time_s": 0.0}

    def ready(self, model, tokenizer, prompts: list) -> None:
        """Called by every process together before the shards of a job are split over them (`make_pools`): what a
        generator must do with every process at once. Nothing here (HF generates from the policy in memory)."""

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
