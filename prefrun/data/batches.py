"""Tokenized examples -> padded batches: `Example` (one prompt with its candidate completions; column 0
is the chosen one, the rest are negatives, one for DPO pairs), `pad_rows` and `collate`."""

from __future__ import annotations

import array
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # [chosen, negative, ...]: a pair, or a pool with its best first
    reference_logps: list[float] | None = None
    scores: list[float] | None = None  # the judge's scores of a pool's candidates (None for pairs)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, *, packed: bool = False) -> dict[str, Tensor]:
    """(prompt ids, completion ids) rows -> a batch for `sequence_logps`.

    Padded (default): left-padded input_ids, attention_mask, completion_mask [R, width]; every completion
    ends at the right edge. Packed: the rows concatenated into input_ids [1, T] with position_ids restarting
    per row, and per completion token its predicting position
    (`logit_positions`), id (`targets`) and row (`token_rows`). Both carry `sequence_lengths` [R]."""
    lengths = long_tensor([len(p) + len(c) for p, c in rows])
    if packed:
        return _pack_rows(rows, lengths)
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, k = len(prompt) + len(completion), len(completion)
        input_ids[i, width - n :] = long_tensor(prompt + completion)
        attention_mask[i, width - n :] = 1
        completion_mask[i, width - k :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "sequence_lengths": lengths}


def _pack_rows(rows: list[tuple[list[int], list[int]]], lengths: Tensor) -> dict[str, Tensor]:
    ids, positions, logit_positions, token_rows = [], [], [], []
    start = 0
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        ids += prompt + completion
        positions += range(n)
        # Token j of the row is predicted at position j - 1; a completion with no prompt loses its first token.
        first = start + max(len(prompt), 1)
        logit_positions += range(first - 1, start + n - 1)
        token_rows += [i] * (start + n - first)
        start += n
    input_ids = long_tensor(ids)[None]
    logit_positions = long_tensor(logit_positions)
    return {"input_ids": input_ids, "position_ids": long_tensor(positions)[None],
            "logit_positions": logit_positions, "targets": input_ids[0, logit_positions + 1],
            "token_rows": long_tensor(token_rows), "attention_mask": torch.ones_like(input_ids),
            "sequence_lengths": lengths}


def to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def long_tensor(values) -> Tensor:
    """An int64 tensor of a list of ints, through a typed buffer: torch.tensor(list) converts element by
    element (~0.2 us each, a millisecond per long-sequence batch on the critical path of every step)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def collate(examples: list[Example], pad_id: int, columns: list[int] | list[list[int]] | None = None, *,
            packed: bool = False) -> dict[str, Tensor]:
    """The candidates `columns` of each example (one list for all, or one list per example; default: all of
    them) as a batch [B, C] (padded, or packed: see `pad_rows`). A candidate drawn twice for an example is padded once: `row_index` [B, C] maps
    each (example, column) to its row of `input_ids`, so that logps = row_logps[row_index]."""
    if columns is None:
        columns = list(range(len(examples[0].completion_ids)))
    per_example = columns if columns and isinstance(columns[0], list) else [columns] * len(examples)
    rows, row_index = [], []
    for example, cols in zip(examples, per_example):
        first_row: dict[int, int] = {}
        for c in cols:
            if c not in first_row:
                first_row[c] = len(rows)
                rows.append((example.prompt_ids, example.completion_ids[c]))
        row_index.append([first_row[c] for c in cols])
    batch = pad_rows(rows, pad_id, packed=packed)
    batch["row_index"] = torch.tensor(row_index)
    batch["completion_lengths"] = long_tensor([len(c) for _, c in rows])[batch["row_index"]]
    if examples[0].reference_logps is not None:
        batch["reference_logps"] = torch.tensor([[ex.reference_logps[c] for c in cols]
                                                 for ex, cols in zip(examples, per_example)])
    return batch
