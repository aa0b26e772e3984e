"""The judgment cache: pairwise verdicts kept on disk, so that an evaluation run again, or a new model against
the same baseline, judges only the pairs it has not seen.

    <cache_dir>/judgments/<judge key>/judge.txt          the judge's fingerprint, for people
    <cache_dir>/judgments/<judge key>/part-<digest>.jsonl  verdicts, one {key, forward, backward} per line
                                               (part-<rank>-<digest>: judged inside one process's pool shard)

The judge key hashes `judge.fingerprint()`: its settings, its template and its loaded weights (not its path: a
retrained reward model or a policy judging its own candidates is another judge). An entry's key hashes the
prompt and both responses in their order; the swapped pair is served from the same entry
(compare(b, a).forward = 1 - compare(a, b).backward). Every part file is written whole by one process, with a
digest beside it (storage.write_atomic), and a damaged part is ignored (its pairs are judged again). Split over
processes, each shard's part is written by the process that judged it; a node that cannot see it afterwards
(node-local caches) gets its own copy from its local main process, so one filesystem has one writer per file.
The processes judge what is new to any of them: their caches may differ (nodes; a part landing mid-read).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from prefrun import distributed, faults, storage
from prefrun.judges import Judge, Verdicts

log = logging.getLogger(__name__)


def pair_key(prompt, first: str, second: str) -> str:
    return hashlib.blake2b(json.dumps([prompt, first, second], ensure_ascii=False).encode(),
                           digest_size=16).hexdigest()


class JudgmentCache:
    """Verdicts of one judge, read from and added to `root` (None: no cache, every pair is judged)."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()

    def _read(self, where: Path) -> dict[str, tuple[float, float]]:
        known: dict[str, tuple[float, float]] = {}
        for part in sorted(where.glob("part-*.jsonl")):
            data = storage.read_checked(part)
            if data is None:  # damaged: its pairs are judged again
                continue
            for line in data.decode().splitlines():
                entry = json.loads(line)
                known[entry["key"]] = (entry["forward"], entry["backward"])
        return known

    def compare(self, judge: Judge, prompts: Sequence, first: Sequence[str], second: Sequence[str], *,
                shard_size: int = 256, split: bool = True) -> tuple[Verdicts, dict]:
        """`judge.compare(prompts, first, second)` for the pairs the cache lacks, the rest read from it; the new
        verdicts are added. The new pairs are cut in shards of `shard_size`, each judged by one process (and
        written by it); every process returns every verdict. `split=False`: this process judges and writes
        them all, with no collective (a pool shard that one process makes). Also returns counts: judged,
        reused, pairs."""
        if not (len(prompts) == len(first) == len(second)):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} first and {len(second)} second responses")
        keys = [pair_key(p, a, b) for p, a, b in zip(prompts, first, second)]
        known: dict[str, tuple[float, float]] = {}
        where = None
        if self.root is not None:
            identity = judge.fingerprint()  # loads a model judge's weights: a hash of them is part of it
            where = self.root / hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()
            known = self._read(where)
            if distributed.is_main():
                storage.write_atomic(where / "judge.txt", identity + "\n")
        verdicts: list[tuple[float, float] | None] = []
        for key, p, a, b in zip(keys, prompts, first, second):
            if key in known:
                verdicts.append(known[key])
            elif (swapped := known.get(pair_key(p, b, a))) is not None:
                verdicts.append((1.0 - swapped[1], 1.0 - swapped[0]))
            else:
                verdicts.append(None)
        # Each pair judged once even when it occurs twice (the same completion sampled twice).
        missing = [i for i, v in enumerate(verdicts) if v is None]
        unique = {keys[i]: i for i in reversed(missing)}  # the first row of each new key
        if split:  # what is new to any process: caches differ between nodes, and a part may land mid-read
            for theirs in distributed.gather(unique):
                for key, i in theirs.items():
                    unique[key] = min(i, unique.get(key, i))
        unique = sorted(unique.values())

        def part(shard: int, pairs: list[tuple[float, float]]) -> tuple[Path, str]:
            rows = unique[shard * shard_size : (shard + 1) * shard_size]
            lines = "".join(json.dumps({"key": keys[i], "forward": f, "backward": b}) + "\n"
                            for i, (f, b) in zip(rows, pairs))
            name = hashlib.blake2b(lines.encode(), digest_size=12).hexdigest()
            return where / (f"part-{name}.jsonl" if split else f"part-{distributed.rank()}-{name}.jsonl"), lines

        def judge_shard(shard: int) -> list[tuple[float, float]]:
            rows = unique[shard * shard_size : (shard + 1) * shard_size]
            if split:  # (inside a pool shard, make_pools has marked the judging already)
                faults.inject("judge")
            result = judge.compare_uncached([prompts[i] for i in rows], [first[i] for i in rows],
                                            [second[i] for i in rows])
            pairs = list(zip(result.forward, result.backward))
            if where is not None:  # written by the process that judged it, as soon as it is judged
                storage.write_atomic(*part(shard, pairs), checked=True)
            return pairs

        count = distributed.num_shards(len(unique), shard_size)
        shards = distributed.map_shards(count, judge_shard) if split else [judge_shard(i) for i in range(count)]
        if split and where is not None and distributed.local_rank() == 0:
            # A node whose cache does not see another node's parts (node-local disks) keeps them too: its
            # local main process writes what the others judged, where the owner's file is not to be seen.
            if not (where / "judge.txt").exists():
                storage.write_atomic(where / "judge.txt", judge.fingerprint() + "\n")
            for shard, pairs in enumerate(shards):
                path, lines = part(shard, pairs)
                if distributed.owner(shard) != distributed.rank() and not path.exists():
                    storage.write_atomic(path, lines, checked=True)
        fresh = {keys[i]: pair for i, pair in zip(unique, (pair for judged in shards for pair in judged))}
        verdicts = [v if v is not None else fresh[key] for v, key in zip(verdicts, keys)]
        counts = {"pairs": len(keys), "judged": len(unique), "reused": len(keys) - len(missing)}
        return Verdicts(forward=[f for f, _ in verdicts], backward=[b for _, b in verdicts]), counts
