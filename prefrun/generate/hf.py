"""`HFGenerator`: `model.generate` on the in-memory policy, in this process, with the raw log-prob of every
sampled token and stop strings matched as vLLM matches them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from prefrun import distributed
from prefrun.errors import InputError
from prefrun.generate.base import Candidates, Sampling, _candidates, _eos_ids, _log_rate, _tokenize
from prefrun.model import in_loaded_precision, root_gathered

log = logging.getLogger(__name__)


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


NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}


def _synced(model) -> bool:
    """A sharded policy (FSDP2, ZeRO-3) forwards collectively: each process's generate() call then keeps making
    forwards until every process's samples have ended (transformers' `synced_gpus`), so that processes sampling
    different prompts, or one sampling and one idle (`HFGenerator.idle`), stay in step."""
    return distributed.is_sharded(model) and distributed.world_size() > 1


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
        # The model's context, as vLLM's engine keeps to it: a prompt that fills it is refused, completions end at it
        # (past it a model with position embeddings failed inside torch, a rotary one went on beyond its training).
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        longest = max(map(len, ids), default=0)
        if context and longest >= context:
            raise InputError(f"generator=hf: a prompt has {longest} tokens, and the model's context is {context} "
                             "(max_position_embeddings): shorten the prompts")
        if context and longest + self.max_new_tokens > context:
            log.warning("generator=hf: completions of the longest prompts end at %d tokens of context (the model's "
                        "limit), before max_new_tokens=%d", context, self.max_new_tokens)
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
        was_training = model.training
        model.eval()
        results: list[Candidates] = []
        generated, start = 0, time.perf_counter()
        bar = tqdm(total=len(ids), desc="generate (hf)", unit="prompt", dynamic_ncols=True, leave=False,
                   disable=not distributed.is_main())
        # The caller's RNG (training's dropout, say) is left as it was: sampling draws from a forked one.
        rng_devices = [device] if device.type == "cuda" else []
        synced = _synced(model)
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
                    # per call: a call is the unit that peers' calls meet (`idle`)
                    with root_gathered(model), in_loaded_precision(model):
                        out = model.generate(
                            input_ids=input_ids, attention_mask=attention_mask,
                            max_new_tokens=min(self.max_new_tokens, context - width) if context else self.max_new_tokens,
                            num_return_sequences=per_prompt, pad_token_id=pad_id, eos_token_id=eos_ids,
                            logits_processor=LogitsProcessorList(processors),
                            stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, self.stop, width)]
                                                                   if self.stop else []),
                            synced_gpus=synced, **NEUTRAL, **sampling,
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

    def calls(self, num_prompts: int) -> int:
        """The model.generate() calls that `num_prompts` prompts take: under a sharded policy each is one step
        that every process makes together (`distributed.map_shards_in_step`)."""
        return -(-num_prompts // self.batch_size)

    @torch.no_grad()
    def idle(self, model, tokenizer) -> None:
        """One model.generate() call that samples nothing of use (one greedy token after one token), made by a
        process that has fewer calls to make than a peer under a sharded policy: synced, it keeps forwarding
        until the peer's call has ended, and so meets each of the peer's collective forwards."""
        eos_ids = _eos_ids(tokenizer, model.generation_config)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with root_gathered(model), in_loaded_precision(model):
                model.generate(input_ids=torch.tensor([[pad_id]], device=device),
                               attention_mask=torch.ones(1, 1, dtype=torch.long, device=device), max_new_tokens=1,
                               do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids, synced_gpus=_synced(model),
                               **NEUTRAL)
        finally:
            model.train(was_training)
