"""The judgment cache: pairwise verdicts kept on disk, so that an evaluation run again, or a new model against
the same baseline, judges only the pairs it has not seen.

    <cache_dir>/judgments/<judge key>/judge.txt          the judge's fingerprint, for people
    <cache_dir>/judgments/<judge key>/part-<digest>.jsonl  verdicts, one {key, forward, backward} per line

The judge key hashes `judge.fingerprint()`: its settings, its template and its loaded weights (not its path: a
retrained reward model or a policy judging its own candidates is another judge). An entry's key hashes the
prompt and both responses in their order; the swapped pair is served from the same entry
(compare(b, a).forward = 1 - compare(a, b).backward). Every part file is written whole by one process, with a
digest beside it (storage.write_atomic), under a name no other writer uses: processes and machines sharing
the directory never write the same file, and a damaged part is ignored (its pairs are judged again).
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
                shard_size: int = 256) -> tuple[Verdicts, dict]:
        """`judge.compare(prompts, first, second)` for the pairs the cache lacks, the rest read from it; the new
        verdicts are added. The new pairs are cut in shards of `shard_size`, each judged by one process (and
        written by it); every process returns every verdict. Also returns counts: judged, reused, pairs."""
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
        unique = sorted({keys[i]: i for i in reversed(missing)}.values())  # the first row of each new key

        def judge_shard(shard: int) -> list[tuple[float, float]]:
            rows = unique[shard * shard_size : (shard + 1) * shard_size]
            faults.inject("judge")
            result = judge.compare([prompts[i] for i in rows], [first[i] for i in rows], [second[i] for i in rows])
            pairs = list(zip(result.forward, result.backward))
            if where is not None and distributed.owner(shard) == distributed.rank():
                lines = "".join(json.dumps({"key": keys[i], "forward": f, "backward": b}) + "\n"
                                for i, (f, b) in zip(rows, pairs))
                name = hashlib.blake2b(lines.encode(), digest_size=12).hexdigest()
                storage.write_atomic(where / f"part-{name}.jsonl", lines, checked=True)
            return pairs

        shards = distributed.map_shards(distributed.num_shards(len(unique), shard_size), judge_shard)
        fresh = {keys[i]: pair for i, pair in zip(unique, (pair for part in shards for pair in part))}
        verdicts = [v if v is not None else fresh[key] for v, key in zip(verdicts, keys)]
        counts = {"pairs": len(keys), "judged": len(unique), "reused": len(keys) - len(missing)}
        return Verdicts(forward=[f for f, _ in verdicts], backward=[b for _, b in verdicts]), counts
