"""Tokenized examples -> padded batches: `Example` (one prompt with its candidate completions; column 0
is the chosen one, the rest are negatives, one for DPO pairs), `pad_rows` and `collate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # [chosen, negative, ...]: a pair, or a pool with its best first
    reference_logps: list[float] | None = None
    scores: list[float] | None = None  # the judge's scores of a pool's candidates (None for pairs)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """(prompt ids, completion ids) rows -> left-padded input_ids, attention_mask, completion_mask [R, width]:
    every completion ends at the right edge (what `sequence_logps` relies on)."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, k = len(prompt) + len(completion), len(completion)
        input_ids[i, width - n :] = torch.tensor(prompt + completion)
        attention_mask[i, width - n :] = 1
        completion_mask[i, width - k :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate(examples: list[Example], pad_id: int, columns: list[int] | list[list[int]] | None = None) -> dict[str, Tensor]:
    """The candidates `columns` of each example (one list for all, or one list per example; default: all of
    them) as a batch [B, C]. A candidate drawn twice for an example is padded once: `row_index` [B, C] maps
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
    batch = pad_rows(rows, pad_id)
    batch["row_index"] = torch.tensor(row_index)
    batch["completion_lengths"] = batch["completion_mask"].sum(1)[batch["row_index"]]
    if examples[0].reference_logps is not None:
        batch["reference_logps"] = torch.tensor([[ex.reference_logps[c] for c in cols]
                                                 for ex, cols in zip(examples, per_example)])
    return batch
