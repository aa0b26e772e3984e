"""The weight probe's trainer side: the fixed probe (prompts with the trainer's greedy completions, and the
same prompts cycled to fill whole KV blocks) and the trainer's own log-probs the engine's are checked against."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from prefrun.errors import InputError
from prefrun.generate.base import prompt_ids

log = logging.getLogger(__name__)


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
