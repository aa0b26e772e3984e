"""Run by tests/test_eval.py under torchrun (2 CPU processes, gloo), as two nodes with their own caches (each
process its node's local main): process 0's cache already holds half of the pairs, process 1's none. Split
over the processes, both return every verdict, and afterwards each node's cache holds every pair."""

import json
import math
import os
import sys
from pathlib import Path

import torch.distributed as dist

from prefrun.judges import Judge, Verdicts
from prefrun.judgments import JudgmentCache


class LengthJudge(Judge):
    """The longer answer wins; counts the pairs it judges."""

    def __init__(self) -> None:
        self.judged = 0

    def _compare(self, prompts, first, second) -> Verdicts:
        self.judged += len(prompts)
        p = [1 / (1 + math.exp(len(b) - len(a))) for a, b in zip(first, second)]
        return Verdicts(forward=p, backward=p)


PROMPTS = [f"prompt {i}" for i in range(6)]
FIRST = [f"{i}" * (1 + i % 3) for i in range(6)]
SECOND = [f"{i}" * 2 for i in range(6)]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = "0"  # two one-process nodes
    cache = JudgmentCache(Path(out).parent / f"node{rank}")
    before = LengthJudge()
    if rank == 0:  # this node judged half of the pairs before, alone
        cache.compare(before, PROMPTS[:3], FIRST[:3], SECOND[:3], split=False)
    dist.barrier()
    judge = LengthJudge()
    verdicts, counts = cache.compare(judge, PROMPTS, FIRST, SECOND, shard_size=2)
    dist.barrier()
    again = LengthJudge()
    _, counts_again = cache.compare(again, PROMPTS, FIRST, SECOND, shard_size=2)
    Path(f"{out}.{rank}").write_text(json.dumps({
        "forward": verdicts.forward, "backward": verdicts.backward, "counts": counts, "judged": judge.judged,
        "counts_again": counts_again, "judged_again": again.judged}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
