"""Samplers choose which candidate completions enter the loss as negatives at each step.

The `dataset` sampler takes the negatives as the data gives them (plain DPO on pairs). Samplers
that score a candidate pool with the current policy (cd, hardest, random, reward) come with MC-PO.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DatasetSampler:
    """Every negative the example carries, in order: column 0 is the chosen completion."""

    def columns(self, num_candidates: int) -> list[int]:
        return list(range(num_candidates))
