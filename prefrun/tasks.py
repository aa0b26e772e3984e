"""Built-in tasks: prompts with a programmatic, graded judge, so that a run needs no downloads.

A task gives train / eval prompts (disjoint, reproducible), a judge `score(prompt, completion)`
in [0, 1], and a noisy *teacher* whose demonstrations warm up the embedded tiny model. The
teacher is deliberately imperfect: the warmed-up reference then puts real probability on wrong
answers, and preference optimisation has something to fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefrun.errors import InputError


@dataclass
class SortDigits:
    """`sort 4813:` -> `1348`.

    Judge: the fraction of answer positions that hold the right digit, divided by the longer of
    the two lengths (so a dropped, extra or misplaced digit costs partial credit; 1.0 is exact).
    Teacher: the right answer with probability `1 - teacher_error_rate`, otherwise one of
    `teacher_errors` applied to it.
    """

    name: str = "sort"
    min_digits: int = 3
    max_digits: int = 8
    teacher_error_rate: float = 0.75
    teacher_errors: tuple[str, ...] = ("echo", "descending", "swap", "drop")
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise InputError(f"task: need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        unknown = set(self.teacher_errors) - {"echo", "descending", "swap", "drop"}
        if unknown:
            raise InputError(f"task.teacher_errors: unknown {sorted(unknown)}; choose from echo, descending, swap, drop")

    def prompts(self, split: str, n: int) -> list[str]:
        """`n` prompts of `split` ("train" or "eval"); eval prompts never occur in train."""
        offsets = {"train": 1, "eval": 2}
        if split not in offsets:
            raise InputError(f"unknown split {split!r}: use 'train' or 'eval'")
        rng = random.Random(self.seed * 1000 + offsets[split])
        out: list[str] = []
        while len(out) < n:
            digits = "".join(str(rng.randrange(10)) for _ in range(rng.randint(self.min_digits, self.max_digits)))
            # Hash-split on the digit string, so the two splits can never share a prompt.
            if (hash_split(digits) == "eval") == (split == "eval"):
                out.append(f"sort {digits}:")
        return out

    def answer(self, prompt: str) -> str:
        return "".join(sorted(self._digits(prompt)))

    def score(self, prompt: str, completion: str) -> float:
        answer, given = self.answer(prompt), completion.strip()
        hits = sum(a == b for a, b in zip(answer, given))
        return hits / max(len(answer), len(given))

    def teacher(self, prompt: str, rng: random.Random) -> str:
        answer = self.answer(prompt)
        if rng.random() >= self.teacher_error_rate:
            return answer
        error = rng.choice(self.teacher_errors)
        if error == "echo":
            return self._digits(prompt)
        if error == "descending":
            return answer[::-1]
        i = rng.randrange(len(answer) - 1) if len(answer) > 1 else 0
        if error == "swap":
            return answer[:i] + answer[i + 1 : i + 2] + answer[i] + answer[i + 2 :]
        return answer[:i] + answer[i + 1 :]  # drop

    @staticmethod
    def _digits(prompt: str) -> str:
        return prompt.removeprefix("sort ").removesuffix(":")


def hash_split(text: str, eval_share: int = 10) -> str:
    """A stable train/eval split by content (Python's `hash` is salted per process, so use our own)."""
    h = 0
    for ch in text:
        h = (h * 131 + ord(ch)) % 1_000_003
    return "eval" if h % eval_share == 0 else "train"
