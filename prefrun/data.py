"""Preference data -> tokenized examples -> padded batches, plus the cached reference log-probs.

An example is one prompt with its candidate completions; column 0 is the chosen one, the rest
are negatives (one for DPO pairs). Tokenisation follows TRL: the prompt and prompt+completion
(+EOS) are tokenized as whole strings and the completion is what follows their common prefix.

Truncation (`max_length`, `max_prompt_length`): when prompt + longest completion exceeds
`max_length`, the prompt is first cut from the left down to `max_prompt_length` (keeping the
text nearest the completion), then completions are cut from the right to fit. Examples whose
prompt alone fills `max_length` are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prefrun.errors import InputError
from prefrun.generate import hf_generate

log = logging.getLogger(__name__)


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # [chosen, negative, ...]
    reference_logps: list[float] | None = None


@dataclass
class PreferenceData:
    """Base of every `data/` choice: subclasses say where records come from."""

    max_length: int = 512
    max_prompt_length: int | None = None

    def check(self) -> None:
        """Fail fast on what can be checked before any model is loaded (e.g. a missing file)."""

    def records(self, *, policy, tokenizer, task, cache_dir: Path) -> list[dict]:
        raise NotImplementedError

    def load(self, *, policy, tokenizer, task, cache_dir: Path) -> list[Example]:
        records = self.records(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir)
        examples, dropped = [], 0
        for record in records:
            example = self.truncate(tokenize_record(record, tokenizer))
            if example is None:
                dropped += 1
            else:
                examples.append(example)
        if dropped:
            log.warning("data: skipped %d of %d records whose prompt fills max_length=%d", dropped, len(records),
                        self.max_length)
        if not examples:
            raise InputError(f"data: no usable records ({len(records)} read, {dropped} too long)")
        return examples

    def truncate(self, example: Example) -> Example | None:
        prompt = example.prompt_ids
        longest = max(map(len, example.completion_ids))
        if len(prompt) + longest > self.max_length and self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length :]
        room = self.max_length - len(prompt)
        if room < 1:
            return None
        return Example(prompt, [ids[:room] for ids in example.completion_ids])


@dataclass
class JsonlPairs(PreferenceData):
    """A local jsonl file, one `{"prompt", "chosen", "rejected"}` object of strings per line."""

    path: str = ""

    def check(self) -> None:
        if not self.path or not Path(self.path).expanduser().is_file():
            raise InputError(f"data.path={self.path!r}: no such file; give a jsonl of prompt/chosen/rejected")

    def records(self, **_) -> list[dict]:
        self.check()
        path = Path(self.path).expanduser()
        records = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                for key in ("prompt", "chosen", "rejected"):
                    if not isinstance(record, dict) or not isinstance(record.get(key), str):
                        raise InputError(f"{path}:{number}: needs string field {key!r}")
                records.append(record)
        return records


@dataclass
class TaskPairs(PreferenceData):
    """Pairs sampled from the starting policy on the task's train prompts and ranked by its judge:
    `samples_per_prompt` completions each, best vs worst, prompts whose samples all tie skipped.
    Cached per (policy weights, task, these settings)."""

    num_prompts: int = 2048
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0

    def records(self, *, policy, tokenizer, task, cache_dir: Path) -> list[dict]:
        from prefrun.model import fingerprint

        if task is None:
            raise InputError("data=task_pairs samples pairs for a built-in task, but the task is removed (~task): "
                             "keep task=sort or choose data=jsonl")
        settings = {k: getattr(self, k) for k in ("num_prompts", "samples_per_prompt", "temperature",
                                                   "max_new_tokens", "seed")}
        key = _hash(fingerprint(policy), repr(task), settings)
        path = Path(cache_dir).expanduser() / "pairs" / f"{key}.jsonl"
        if path.exists():
            log.info("data: %s (cached pairs)", path)
            return [json.loads(line) for line in path.read_text().splitlines()]
        prompts = task.prompts("train", self.num_prompts)
        samples = hf_generate(policy, tokenizer, prompts, num_samples=self.samples_per_prompt,
                              temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                              batch_size=128, seed=self.seed)
        rng, records = random.Random(self.seed), []
        for prompt, candidates in zip(prompts, samples):
            scored = sorted(((task.score(prompt, c), rng.random(), c) for c in candidates), reverse=True)
            (best, _, chosen), (worst, _, rejected) = scored[0], scored[-1]
            if best > worst:
                records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                "chosen_score": best, "rejected_score": worst})
        log.info("data: %d pairs from %d prompts x %d samples (%d ties skipped)", len(records), len(prompts),
                 self.samples_per_prompt, len(prompts) - len(records))
        _atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
        return records


def tokenize_record(record: dict, tokenizer) -> Example:
    eos = tokenizer.eos_token
    prompt = record["prompt"]
    completions = [record["chosen"], *([record["rejected"]] if "rejected" in record else record["negatives"])]
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = [tokenizer(prompt + c + ("" if c.endswith(eos) else eos)).input_ids for c in completions]
    shared = min(_common_prefix(prompt_ids, ids) for ids in full_ids)
    return Example(prompt_ids[:shared], [ids[shared:] for ids in full_ids])


def collate(examples: list[Example], pad_id: int, columns: list[int] | None = None) -> dict[str, Tensor]:
    """Left-padded rows, example-major: row b*C + c is candidate `columns[c]` of example b."""
    columns = columns if columns is not None else list(range(len(examples[0].completion_ids)))
    rows = [(ex.prompt_ids, ex.completion_ids[c]) for ex in examples for c in columns]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, k = len(prompt) + len(completion), len(completion)
        input_ids[i, width - n :] = torch.tensor(prompt + completion)
        attention_mask[i, width - n :] = 1
        completion_mask[i, width - k :] = 1
    num_candidates = len(columns)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "completion_lengths": completion_mask.sum(1).view(len(examples), num_candidates),
    }
    if examples[0].reference_logps is not None:
        batch["reference_logps"] = torch.tensor([[ex.reference_logps[c] for c in columns] for ex in examples])
    return batch


@torch.no_grad()
def attach_reference_logps(examples: list[Example], reference, tokenizer, *, cache_dir: Path,
                           batch_size: int, weights_key: str) -> str:
    """Fill `example.reference_logps`, from the disk cache when this (weights, token ids) pair was seen."""
    from prefrun.logprobs import sequence_logps

    key = _hash(weights_key, [(ex.prompt_ids, ex.completion_ids) for ex in examples])
    path = Path(cache_dir).expanduser() / "reference_logps" / f"{key}.pt"
    if path.exists():
        logps = torch.load(path)
        log.info("reference log-probs: cache hit %s -> 0 reference forwards", path)
    else:
        was_training = reference.training
        reference.eval()
        device = next(reference.parameters()).device
        chunks, order = [], sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], tokenizer.pad_token_id)
            chunk = sequence_logps(reference, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   batch["completion_mask"].to(device))
            chunks.append(chunk.view(batch["completion_lengths"].shape).cpu())
        reference.train(was_training)
        sorted_logps = torch.cat(chunks)
        logps = torch.empty_like(sorted_logps)
        logps[torch.tensor(order)] = sorted_logps
        buffer = io.BytesIO()
        torch.save(logps, buffer)
        _atomic_write(path, buffer.getvalue())
        log.info("reference log-probs: computed %d reference forwards (%d sequences), cached at %s",
                 -(-len(examples) // batch_size), logps.numel(), path)
    for example, row in zip(examples, logps.tolist()):
        example.reference_logps = row
    return key


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
