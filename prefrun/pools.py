"""Candidate pools: one prompt, K candidate completions, K judge scores.

prefrun writes pools as `{prompt, candidates: [K], scores: [K]}` records (jsonl or parquet). Public pool data
comes in other shapes, read through `data.columns.*` paths (conf/data/pools.yaml):

- SimPO-style flat lists: `data.columns.candidates=all_generated_responses data.columns.scores=all_rm_scores`;
- UltraFeedback-style nested lists, a field path into each element:
  `data.columns.prompt=instruction data.columns.candidates=completions.response
  data.columns.scores=completions.overall_score`.

`read_pool` checks one record and returns (prompt, candidates, scores) with the best candidate first, or the
reason to skip it; `make_pools` generates and judges pools for a list of prompts (used by `prefrun generate`
and by the embedded task when the loss needs pools), writing them in shards so that a killed run continues
where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import reprlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefrun import distributed, faults, storage
from prefrun.errors import InputError, PrefrunError
from prefrun.preemption import Preempted

log = logging.getLogger(__name__)

POOL_COLUMNS = ("prompt", "candidates", "scores")


def field(record: dict, path: str) -> Any:
    """`path` read from `record`: a column name, or `column.key[.key...]` into each element of a list column
    (UltraFeedback's `completions.response`). KeyError names the missing part."""
    column, *inner = path.split(".")
    value = record[column]
    if not inner:
        return value
    if not isinstance(value, list):
        raise TypeError(f"{column!r} is {type(value).__name__}, not a list, so {path!r} cannot index into it")
    out = []
    for element in value:
        for key in inner:
            if not isinstance(element, dict) or key not in element:
                raise KeyError(f"an element of {column!r} has no {key!r}")
            element = element[key]
        out.append(element)
    return out


def read_pool(record: dict, columns: dict, where: Callable[[], str],
              allow_empty: bool = False) -> tuple[Any, list, list[float]] | str:
    """One pool record -> (prompt, candidates, scores), the best-scored candidate first (the first of equal
    best), the others in their order; or the reason to skip it (counted in the log). A record whose fields
    have the wrong type stops the run with one line naming it: that is a wrong column mapping or a broken file.
    `allow_empty`: keep empty candidates (pools the policy generated itself: an immediate EOS is one of its
    samples, and dropping it would bias the pool as a sample of the policy)."""
    values = {}
    for key in POOL_COLUMNS:
        try:
            values[key] = field(record, columns[key])
        except (KeyError, TypeError) as err:
            raise InputError(f"{where()}: cannot read {key} from data.columns.{key}={columns[key]!r} "
                             f"({str(err).strip(chr(39))}); check the column mapping") from None
    prompt, candidates, scores = values["prompt"], values["candidates"], values["scores"]
    if prompt is None or candidates is None or scores is None:
        return f"missing {'prompt' if prompt is None else 'candidates' if candidates is None else 'scores'} (null)"
    if not isinstance(candidates, list) or not isinstance(scores, list):
        bad = "candidates" if not isinstance(candidates, list) else "scores"
        raise InputError(f"{where()}: {bad} ({columns[bad]!r}) is {type(values[bad]).__name__} "
                         f"{reprlib.repr(values[bad])}; expected a list (one entry per candidate)")
    if not isinstance(prompt, (str, list)):
        raise InputError(f"{where()}: prompt ({columns['prompt']!r}) is {type(prompt).__name__} {reprlib.repr(prompt)}; "
                         "expected a string or a list of {role, content} messages")
    for score in scores:
        if score is not None and (isinstance(score, bool) or not isinstance(score, numbers.Real)):
            raise InputError(f"{where()}: score {reprlib.repr(score)} ({columns['scores']!r}) is not a number; "
                             "scores must be numbers (null or NaN skips the pool)")
    if len(candidates) != len(scores):
        return "candidates and scores of different lengths"
    if len(candidates) < 2:
        return "fewer than 2 candidates"
    if any(s is None or math.isnan(s) or math.isinf(s) for s in scores):
        return "a null, NaN or infinite score"
    candidates = [_as_completion(c, prompt, where, columns) for c in candidates]
    if not allow_empty and any(_is_empty(c) for c in candidates):
        return "an empty candidate"
    if max(scores) == min(scores):
        return "all scores equal"
    if isinstance(prompt, str) and isinstance(candidates[0], list):
        prompt = [{"role": "user", "content": prompt}]
    best = scores.index(max(scores))
    order = [best, *(i for i in range(len(scores)) if i != best)]
    return prompt, [candidates[i] for i in order], [float(scores[i]) for i in order]


def _as_completion(candidate: Any, prompt: Any, where: Callable[[], str], columns: dict):
    """A candidate as training tokenizes it: a string next to a string prompt; messages next to a
    conversational prompt (a bare string becomes one assistant message)."""
    if isinstance(candidate, str):
        return [{"role": "assistant", "content": candidate}] if isinstance(prompt, list) else candidate
    if isinstance(candidate, dict) and "role" in candidate:
        candidate = [candidate]
    if isinstance(candidate, list) and all(isinstance(m, dict) and "role" in m for m in candidate):
        return candidate
    raise InputError(f"{where()}: a candidate ({columns['candidates']!r}) is {type(candidate).__name__} "
                     f"{reprlib.repr(candidate)}; expected a string or a list of {{role, content}} messages")


def _is_empty(completion) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return not any(isinstance(m.get("content"), str) and m["content"].strip() for m in completion)


# -- generating pools ---------------------------------------------------------------------------------------


def make_pools(prompts: list, *, generator, judge, model, tokenizer, out_dir: Path, shard_size: int | None = None,
               model_path: str | None = None, job: dict | None = None, seed: int | None = None,
               timings: dict | None = None) -> list[dict]:
    """Generate `generator.num_candidates` completions per prompt, judge them (unless `judge` is None), and write
    `{prompt, candidates, scores}` records in shards `out_dir/shard-00000.jsonl` ... (`shard_size` prompts each;
    None: the generator's `prompts_per_shard`: generator.shard_size, else 256, or 4096 when every call starts
    an engine). Each shard is written
    whole (write, then rename) after its prompts are done, so a killed run loses at most the shard in flight
    and the same call continues after the last complete shard. Under several processes each shard is made by
    one process (`distributed.owner`) and every process returns every record; a shard's seed comes from its
    position, so the records do not depend on the number of processes. `prompts` must be in their final form
    (generate.as_chat applied); `job` describes what made them (model, generator, judge): shards of another
    job in `out_dir` are an error, not reused. `seed` (default: the generator's) is the first shard's sampling seed;
    `timings`, if given, receives generate_s, judge_s, generated_tokens and completions of the work done here
    (seconds: the slowest process's), prompts_per_process (the prompts each process generated) and
    engine_processes (the processes holding a live vLLM engine).
    Returns every record, in prompt order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_size is None:
        shard_size = generator.prompts_per_shard
    if shard_size < 1:
        raise InputError(f"shard_size={shard_size}: give a positive number of prompts per shard, or null")
    manifest = {"num_prompts": len(prompts), "shard_size": shard_size, **(job or {})}
    _check_manifest(out_dir, manifest)
    num_shards = distributed.num_shards(len(prompts), shard_size)
    start, progress = time.perf_counter(), {"prompts": 0, "tokens": 0}
    mine = len(range(distributed.rank(), num_shards, distributed.world_size()))
    # HF generation runs the policy. Sharded (FSDP2, ZeRO-3), the shards stay split and each generate() call is a
    # step the processes make together (distributed.map_shards_in_step).
    in_step = generator.uses_model and distributed.is_sharded(model) and distributed.world_size() > 1
    # Which shards are on disk is decided together, by each shard's owner (the one process that reads or makes it):
    # a damaged one is made again, in the steps counted for it (map_shards_in_step), and on a node-local disk
    # another node's shards count as done (they are, where their owner reads them).
    paths = [out_dir / f"shard-{i:05d}.jsonl" for i in range(num_shards)]
    seen = distributed.gather([distributed.owner(i) == distributed.rank() and storage.read_checked(path) is not None
                               for i, path in enumerate(paths)])
    finished = [seen[distributed.owner(i)][i] for i in range(num_shards)]

    if not all(finished):
        generator.ready(model, tokenizer, prompts)  # every process at once (a sharded policy's engine sync)
    first_seed = generator.seed if seed is None else seed

    def chunk_of(shard: int) -> list:
        return prompts[shard * shard_size : (shard + 1) * shard_size]

    def generate_wave(wave: list[int]) -> dict[int, tuple[list, float]]:
        """One engine, fed by the main process, samples the wave's shards for every process, each shard with its
        own seed (as make_shard would); every process calls this at once and receives its own shard's samples."""
        todo = [shard for shard in wave if not finished[shard]]
        for _ in todo:
            faults.inject("generate")
        began = time.perf_counter()
        sets = generator.generate_many([chunk_of(shard) for shard in todo], model=model, tokenizer=tokenizer,
                                       model_path=model_path, to=[distributed.owner(s) for s in todo],
                                       variants=[{"seed": distributed.shard_seed(first_seed, s)} for s in todo]) \
            if todo else []
        seconds = (time.perf_counter() - began) / max(1, len(todo))
        return {shard: (candidates, seconds) for shard, candidates in zip(todo, sets) if candidates is not None}

    def generate_shard(shard: int, again: bool = False) -> tuple[list, float] | None:
        """The shard's candidates and the seconds they took; None for a shard already on disk (unless `again`)."""
        if finished[shard] and not again:
            return None
        shard_generator = dataclasses.replace(generator, seed=distributed.shard_seed(first_seed, shard))
        faults.inject("generate")
        began = time.perf_counter()
        candidates = shard_generator.generate(chunk_of(shard), model=model, tokenizer=tokenizer, model_path=model_path)
        return candidates, time.perf_counter() - began

    def make_shard(shard: int, made: tuple[list, float] | None = None) -> tuple[list[dict], dict]:
        """The shard's records: read back, or generated (here, or already: `made`, by the main process's engine
        or in step with the other processes), judged and written."""
        path = paths[shard]
        lo, hi = shard * shard_size, min(len(prompts), (shard + 1) * shard_size)
        done = storage.read_checked(path) if finished[shard] else None  # a damaged shard is made again
        if done is not None:
            return [json.loads(line) for line in done.decode().splitlines() if line.strip()], {"resumed": hi - lo}
        chunk = chunk_of(shard)
        candidates, seconds = made or generate_shard(shard, again=True)  # (again: damaged since it was checked)
        generated = time.perf_counter()
        began = generated - seconds
        texts = [c.texts for c in candidates]
        scores = None  # judge None: completions only (prefrun eval judges pairs, not pools)
        try:
            if judge is not None:
                faults.inject("judge")
                scores = judge.score(chunk, texts)
        except Preempted:  # a stop signal while judging: the shard is made again by the same command
            raise
        except PrefrunError as err:  # a judge's wrong answer, named where it happened; finished shards stay
            err.args = (f"{err} (judging shard {shard + 1} of {num_shards}, prompts {lo + 1}-{hi}, for "
                        f"{out_dir}; the finished shards are kept)",)  # (its own type: the exit status says it)
            raise err from None
        work = {"generate_s": generated - began, "judge_s": time.perf_counter() - generated,
                "generated_tokens": sum(len(ids) for c in candidates for ids in c.token_ids),
                "completions": sum(len(c.token_ids) for c in candidates), "prompts": hi - lo}
        rows = [{"prompt": p, "candidates": t} for p, t in zip(chunk, texts)]
        for row, row_scores in zip(rows, scores or []):
            row["scores"] = row_scores
        if distributed.owner(shard) == distributed.rank():  # one writer per shard
            storage.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows), checked=True)
        progress["prompts"] += hi - lo
        progress["tokens"] += work["generated_tokens"]
        elapsed = time.perf_counter() - start
        log.info("pools: shard %d/%d (prompts %d-%d of %d)%s, %.1f prompts/s, %.0f generated tokens/s", shard + 1,
                 num_shards, lo + 1, hi, len(prompts), f", {mine} of the shards on this process (of "
                 f"{distributed.world_size()})" if distributed.world_size() > 1 else "", progress["prompts"] / elapsed,
                 progress["tokens"] / elapsed)
        return rows, work

    fed = getattr(generator, "fed_by_main", False)
    if fed:
        shards = distributed.map_waves(num_shards, generate_wave, make_shard)
    elif in_step:  # judging and writing make no step: their one-line errors wait for the peers' steps
        if judge is not None and not all(finished):
            distributed.together(getattr(judge, "load", lambda: None))  # before the steps, not inside one
        shards = distributed.map_shards_in_step(
            num_shards, generate_shard, then=make_shard, idle=lambda: generator.idle(model, tokenizer),
            steps=lambda shard: 0 if finished[shard] else generator.calls(len(chunk_of(shard))), model=model)
    else:
        shards = distributed.map_shards(num_shards, make_shard)
    records = [row for rows, _ in shards for row in rows]
    resumed = sum(work.get("resumed", 0) for _, work in shards)
    if resumed:
        log.info("pools: %d of %d prompts were already done in %s (resumed)", resumed, len(prompts), out_dir)
    if timings is not None:
        per_process: list[dict] = [{} for _ in range(distributed.world_size())]
        for shard, (_, work) in enumerate(shards):
            into = per_process[distributed.owner(shard)]
            for key, value in work.items():
                into[key] = into.get(key, 0) + value
        for key in ("generate_s", "judge_s"):
            timings[key] = timings.get(key, 0) + max(p.get(key, 0.0) for p in per_process)
        if fed:  # one engine sampled the waves one after the other
            timings["generate_s"] += sum(p.get("generate_s", 0.0) for p in per_process) - \
                max(p.get("generate_s", 0.0) for p in per_process)
        for key in ("generated_tokens", "completions"):
            timings[key] = timings.get(key, 0) + sum(p.get(key, 0) for p in per_process)
        generated = [p.get("prompts", 0) for p in per_process]
        if fed:  # the main process generated every shard; the others judged theirs
            generated = [sum(generated), *[0] * (len(generated) - 1)]
        timings["prompts_per_process"] = generated
        pids = distributed.gather(getattr(generator, "worker_pid", None))
        timings["engine_processes"] = [rank for rank, pid in enumerate(pids) if pid is not None]
    return records


def _changes(old: dict, new: dict) -> str:
    """What differs between two manifests, setting by setting inside a generator's or judge's repr."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        settings = (_settings(a), _settings(b)) if isinstance(a, str) and isinstance(b, str) else (None, None)
        if all(settings):
            sa, sb = settings
            diff = [f"{k} {sa.get(k, '(none)')} -> {sb.get(k, '(none)')}" for k in sorted(set(sa) | set(sb))
                    if sa.get(k) != sb.get(k)]
            if diff:
                out.append(f"{key}: {', '.join(diff)}")
                continue
        out.append(f"{key}: {reprlib.repr(a)} -> {reprlib.repr(b)}")
    return "; ".join(out)


def _settings(text: str) -> dict | None:
    """`Name(a=1, b=[2, 3], c='x, y')` -> {a: '1', b: '[2, 3]', c: "'x, y'"}: the top level's settings."""
    if "(" not in text or not text.endswith(")"):
        return None
    body, parts, depth, quote, start = text[text.index("(") + 1 : -1], {}, 0, None, 0
    for i, char in enumerate(body + ","):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            name, _, value = body[start:i].strip().partition("=")
            if name:
                parts[name] = value
            start = i + 1
    return parts


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    """Shards of an earlier run are reused only when they were cut the same way."""
    path = out_dir / "manifest.json"

    def check() -> None:
        if path.exists():
            old = json.loads(path.read_text())
            if old != manifest:
                raise InputError(f"{out_dir} holds pools of another job (changed: {_changes(old, manifest)}): write "
                                 "elsewhere or delete it")

    # Every process has read the old manifest before one writes the new; a node-local directory holding another
    # job's on one node only stops every process with that node's line.
    distributed.together(check)
    if not distributed.everywhere(path.exists()):
        distributed.write_once(path, lambda p: storage.write_atomic(p, json.dumps(manifest)))


def write_pools(records: list[dict], path: Path) -> None:
    """All records as one file: `.jsonl`, or `.parquet` (written through `datasets`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        from datasets import Dataset

        tmp = storage.temporary(path)
        try:
            Dataset.from_list(records).to_parquet(str(tmp))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if storage.is_full(err):
                raise storage.disk_full(path, None, err) from None
            raise
    elif path.suffix == ".jsonl":
        storage.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    else:
        raise InputError(f"output={str(path)!r}: write pools as .jsonl or .parquet")

