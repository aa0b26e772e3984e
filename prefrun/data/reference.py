"""Reference log-probs: `candidate_logps` (no-grad log-probs of every candidate) and
`attach_reference_logps` (the same, cached on disk per weights and token ids), plus the cache key
`_hash` that the data sources use too. Cache entries carry a digest (storage.py): a damaged one is computed again."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import statistics
from pathlib import Path

import torch
from torch import Tensor

from prefrun import distributed, faults, storage
from prefrun.data.batches import Example, pad_rows, to_device

log = logging.getLogger(__name__)


@torch.no_grad()
def candidate_logps(model, examples: list[Example], pad_id: int, *, batch_size: int) -> tuple[Tensor, Tensor]:
    """log π(y|x) of every candidate of every example, by no-grad forwards of `batch_size` rows sorted by
    length (little padding), packed in one row when the model runs packed rows (then each sequence's numbers
    are the ones training computes). Returns (logps, lengths), both [N, K_max]: pools of fewer candidates are
    padded with logp 0 and length 0."""
    from prefrun.logprobs import check_packing, packing_checked, packs, sequence_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = _longest_first(examples)
    width = max(len(ex.completion_ids) for ex in examples)
    logps = torch.zeros(len(examples), width)
    lengths = torch.zeros(len(examples), width, dtype=torch.long)
    packed = packs(model)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pairs = [(examples[i].prompt_ids, examples[i].completion_ids[c]) for i, c in chunk]
            batch = to_device(pad_rows(pairs, pad_id, packed=packed), device)
            if packed and not packing_checked(model):
                padded = to_device(pad_rows(pairs, pad_id), device)
                if not check_packing(model, batch, padded):
                    packed, batch = False, padded
            values = sequence_logps(model, batch).float().cpu()
            index = torch.tensor(chunk)
            logps[index[:, 0], index[:, 1]] = values
            lengths[index[:, 0], index[:, 1]] = torch.tensor([len(examples[i].completion_ids[c]) for i, c in chunk])
    finally:
        model.train(was_training)
    return logps, lengths


def _longest_first(examples: list[Example]) -> list[tuple[int, int]]:
    """(example, candidate) rows, longest first: the peak memory comes at once, and packing is checked on the
    longest rows."""
    rows = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.completion_ids))]
    rows.sort(key=lambda r: len(examples[r[0]].prompt_ids) + len(examples[r[0]].completion_ids[r[1]]), reverse=True)
    return rows


@torch.no_grad()
def _settle_packing(model, examples: list[Example], pad_id: int, batch_size: int) -> None:
    """`check_packing` on the batch `candidate_logps` would check it on (the longest rows of `examples`): called
    by every process with the same examples, it makes the same forwards everywhere (a sharded model's are
    collectives), and every process takes the same verdict (where their numbers differed, the stricter)."""
    from prefrun.logprobs import check_packing

    was_training = model.training
    model.eval()
    try:
        pairs = [(examples[i].prompt_ids, examples[i].completion_ids[c]) for i, c in _longest_first(examples)[:batch_size]]
        device = next(model.parameters()).device
        check_packing(model, to_device(pad_rows(pairs, pad_id, packed=True), device),
                      to_device(pad_rows(pairs, pad_id), device), together=True)
    finally:
        model.train(was_training)


SCORING_SHARD = 256  # examples per shard when scoring is split over processes (fixed: results do not depend on N)


def split_candidate_logps(model, examples: list[Example], pad_id: int, *, batch_size: int) -> tuple[Tensor, Tensor]:
    """`candidate_logps` of every example, the examples cut in shards of SCORING_SHARD that the processes
    share (each scores its own, all get all). One process scores the same shards one after the other. A sharded
    model (FSDP2, ZeRO-3) runs collective forwards: the shards stay split and the processes with fewer forwards
    to make make a token's forwards until all have made as many (`distributed.map_shards_in_step`). On several
    processes packing, if not checked on the model yet, is checked first by every process on the first shard's
    longest rows (a check makes forwards of its own, which the processes then make together), so that no process
    packs rows where another found packing wrong."""
    from prefrun.logprobs import packing_checked, packs

    size = SCORING_SHARD
    num_shards = distributed.num_shards(len(examples), size)

    def score(shard: int) -> tuple[Tensor, Tensor]:
        faults.inject("reference")
        return candidate_logps(model, examples[shard * size : (shard + 1) * size], pad_id, batch_size=batch_size)

    def steps(shard: int) -> int:  # forwards
        return -(-sum(len(ex.completion_ids) for ex in examples[shard * size : (shard + 1) * size]) // batch_size)

    if distributed.world_size() > 1 and packs(model) and not packing_checked(model):
        _settle_packing(model, examples[:size], pad_id, batch_size)  # not per shard: one verdict for all processes
    if not distributed.is_sharded(model):
        parts = distributed.map_shards(num_shards, score)
    else:
        parts = distributed.map_shards_in_step(num_shards, score, steps=steps,
                                               idle=lambda: idle_forward(model, pad_id), model=model)
    width = max(len(ex.completion_ids) for ex in examples)
    logps = torch.zeros(len(examples), width)
    lengths = torch.zeros(len(examples), width, dtype=torch.long)
    for shard, (part_logps, part_lengths) in enumerate(parts):
        rows = slice(shard * size, shard * size + len(part_logps))
        logps[rows, : part_logps.shape[1]] = part_logps
        lengths[rows, : part_lengths.shape[1]] = part_lengths
    return logps, lengths


@torch.no_grad()
def idle_forward(model, pad_id: int) -> None:
    """One forward of a single token, as scoring makes them (packed or padded): its collectives meet the ones of
    a peer's real forward."""
    from prefrun.logprobs import packs, sequence_logps

    was_training = model.training
    model.eval()
    try:
        batch = pad_rows([([pad_id], [pad_id])], pad_id, packed=packs(model))
        sequence_logps(model, to_device(batch, next(model.parameters()).device))
    finally:
        model.train(was_training)


def attach_reference_logps(examples: list[Example], reference, tokenizer, *, cache_dir: Path,
                           batch_size: int, weights_key: str) -> str:
    """Fill `example.reference_logps` (every candidate), from the disk cache when this (weights, token ids)
    pair was seen. `batch_size` counts prompts; each carries its candidates."""
    key = _hash(weights_key, [(ex.prompt_ids, ex.completion_ids) for ex in examples])
    path = Path(cache_dir).expanduser() / "reference_logps" / f"{key}.pt"
    cached = storage.read_checked(path)
    if distributed.everywhere(cached is not None):
        logps = torch.load(io.BytesIO(cached))
        log.info("reference log-probs: cache hit %s -> 0 reference forwards", path)
    else:
        # Any id pads: padded positions are masked. A tokenizer without a pad token pads with eos.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows_per_forward = batch_size * max(1, round(statistics.fmean(len(ex.completion_ids) for ex in examples)))
        logps, _ = split_candidate_logps(reference, examples, pad_id, batch_size=rows_per_forward)
        buffer = io.BytesIO()
        torch.save(logps, buffer)
        distributed.write_once(path, lambda where: storage.write_atomic(where, buffer.getvalue(), checked=True))
        log.info("reference log-probs: computed %d reference forwards (%d sequences), cached at %s",
                 -(-sum(len(ex.completion_ids) for ex in examples) // rows_per_forward),
                 sum(len(ex.completion_ids) for ex in examples), path)
    for example, row in zip(examples, logps.tolist()):
        example.reference_logps = row[: len(example.completion_ids)]
    return key


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

