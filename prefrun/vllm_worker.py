"""The vLLM worker, started by `prefrun.generate.VLLMGenerator` (prefrun/generate/vllm.py; the child is
spawned and reaped in prefrun/generate/worker_process.py), in one of two modes.

- `python -m prefrun.vllm_worker JOB.json` (generator.mode=fresh): one process per `generate()` call. It
  builds one engine, optionally scores the weight probe, samples every prompt set of the job, writes the
  result file the job names, shuts the engine down and exits, so that all of its memory (weights, KV cache,
  the engine's own processes) is back with the system before training resumes.
- `python -m prefrun.vllm_worker --serve FD` (generator.mode=persistent): one long-lived engine that answers
  commands on the connection at file descriptor FD (a socketpair end the parent passed down) until told to
  shut down or until the parent goes away. The parent bounds every reply with a timeout.

It imports only the standard library and vLLM; the parent tokenized the prompts and decodes the results.

Job (JSON): {"engine": LLM keyword arguments, "result": path, "sets": [{"prompts": [[token id]],
"sampling": SamplingParams keyword arguments, "seeds": [one per prompt]}], optional "probe": {"rows":
[[token id]], "starts": [first scored position per row], "trainer": [[log-prob]], "tolerance": float}}.
Result (JSON, written atomically): {"engine_start_s", "probe": {...}, "sets": [{"generate_s", "outputs": per
prompt, per sample {"token_ids", "logprobs", "finish_reason"}}]}, or {"error", "stage"} when something failed.

Commands (--serve), each a dict answered by one dict ({"error": one line} when it failed): start {engine},
generate {sets}, score {rows, starts}, push {weights_path, rpc_timeout_s}, reset_prefix_cache, sleep {level},
wake {tags}, shutdown.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)  # the parent never reads a half-written result


def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__


def _sample_set(llm, spec: dict, use_tqdm: bool = True) -> dict:
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = [SamplingParams(**spec["sampling"], seed=seed) for seed in spec["seeds"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    generate_s = time.perf_counter() - start
    per_prompt = []
    for request in outputs:
        samples = []
        for sample in sorted(request.outputs, key=lambda s: s.index):
            ids = list(sample.token_ids)
            # logprobs=1 gives, per position, the sampled token's raw log-prob (plus the top-1 token's).
            logprobs = None if sample.logprobs is None else \
                [sample.logprobs[i][token].logprob for i, token in enumerate(ids)]
            samples.append({"token_ids": ids, "logprobs": logprobs, "finish_reason": sample.finish_reason})
        per_prompt.append(samples)
    return {"generate_s": generate_s, "outputs": per_prompt}


def _score(llm, rows: list[list[int]], starts: list[int]) -> list[list[float]]:
    """Teacher forcing: the engine's log-prob of each token of row[start:] given the tokens before it.
    Requests that ask for prompt log-probs are computed afresh (they skip the prefix cache)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in rows], params, use_tqdm=False)
    return [[out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]
            for out, ids, start in zip(outputs, rows, starts)]


def _choices(llm, rows: list[list[int]], choices: list[int]) -> list[list[float]]:
    """Each row's next-token log-probs of `choices`, renormalised over them: one token generated with only the
    choices allowed, read with logprobs_mode=processed_logprobs (after the mask; temperature 1 leaves them
    the model's). Prefix-cached, and the logits of the last position only."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=len(choices), allowed_token_ids=list(choices),
                            detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in rows], params, use_tqdm=False)
    return [[out.outputs[0].logprobs[0][c].logprob for c in choices] for out in outputs]


def _shutdown(llm) -> None:
    # Explicitly, before exit: left to the interpreter's teardown the process sometimes aborts (rc 134).
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - the parent reaps the process group anyway
        traceback.print_exc()


def _check_probe(llm, probe: dict) -> dict:
    """Score the parent's probe rows; the parent compares the numbers, the job stops here when they disagree."""
    start = time.perf_counter()
    logprobs = _score(llm, probe["rows"], probe["starts"])
    diff = max((abs(a - b) for row, ref in zip(logprobs, probe["trainer"]) for a, b in zip(row, ref)), default=0.0)
    return {"logprobs": logprobs, "max_abs_diff": diff, "time_s": time.perf_counter() - start}


def main(job_path: str) -> int:
    os.dup2(2, 1)  # vLLM logs to stdout: send everything to stderr, keep the parent's stdout clean
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result"])
    stage, llm = "import vllm", None
    try:
        start = time.perf_counter()
        import vllm  # noqa: F401 - timed apart from the engine start

        import_s = time.perf_counter() - start
        stage = "engine start"
        start = time.perf_counter()
        llm = _engine(job["engine"])
        engine_start_s = time.perf_counter() - start
        result = {"import_s": import_s, "engine_start_s": engine_start_s}
        if job.get("probe"):
            stage = "weight check"
            result["probe"] = _check_probe(llm, job["probe"])
            if result["probe"]["max_abs_diff"] > job["probe"]["tolerance"]:
                # Refuse to sample from weights that are not the trainer's: the parent says why.
                _write(result_path, {**result, "error": "the probe disagrees", "stage": stage})
                return 1
        stage = "generation"
        result["sets"] = [_sample_set(llm, spec) for spec in job["sets"]]
        # Results first: whatever happens at shutdown, the work is kept.
        _write(result_path, result)
        stage = "engine shutdown"
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line in the parent
        traceback.print_exc()
        _write(result_path, {"error": _one_line(err), "stage": stage})
    finally:
        if llm is not None:
            _shutdown(llm)
            llm = None
            gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
    return 0 if stage == "engine shutdown" else 1


# -- the long-lived engine (--serve) ------------------------------------------------------------------


def _engine(settings: dict):
    """`LLM(**settings)`; prefrun's own `prefrun_single_process` keeps vLLM's engine core in this process."""
    settings = dict(settings)
    if settings.pop("prefrun_single_process", False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by vLLM when the engine is made
    from vllm import LLM

    return LLM(**settings)


def _start(state: dict, msg: dict) -> dict:
    state["stage"] = "import vllm"
    start = time.perf_counter()
    import vllm  # noqa: F401 - timed apart from the engine start

    import_s = time.perf_counter() - start
    state["stage"] = "engine start"
    start = time.perf_counter()
    state["llm"] = _engine(msg["engine"])
    engine_start_s = time.perf_counter() - start
    try:  # what the platform made of block_size: the parent's probe fills whole blocks
        block_size = state["llm"].llm_engine.vllm_config.cache_config.block_size
    except AttributeError:
        block_size = None
    return {"import_s": import_s, "engine_start_s": engine_start_s, "block_size": block_size}


def _push(llm, msg: dict) -> dict:
    start = time.perf_counter()
    try:
        llm.collective_rpc("reload_weights", timeout=msg.get("rpc_timeout_s"),
                           kwargs={"weights_path": msg["weights_path"]})
    except Exception as err:
        if "weights_path" not in str(err):
            raise
        import vllm

        raise RuntimeError(f"vLLM {getattr(vllm, '__version__', '?')} cannot reload weights from files (its "
                           "reload_weights takes no weights_path; vLLM's layerwise reloading, 2026, added it): "
                           "install a newer vllm (prefrun is tested with 0.32), or use generator.mode=fresh") from err
    return {"push_s": time.perf_counter() - start}


def _reset_prefix_cache(llm, msg: dict) -> dict:
    if not llm.reset_prefix_cache():
        raise RuntimeError("reset_prefix_cache() returned False (requests still running)")
    return {}


def _sleep(llm, msg: dict) -> dict:
    llm.sleep(level=msg.get("level", 1))
    return {}


def _wake(llm, msg: dict) -> dict:
    llm.wake_up(tags=msg.get("tags"))
    return {}


_COMMANDS = {
    "generate": lambda llm, msg: {"sets": [_sample_set(llm, spec, msg.get("use_tqdm", True)) for spec in msg["sets"]]},
    "score": lambda llm, msg: {"logprobs": _score(llm, msg["rows"], msg["starts"])},
    "choices": lambda llm, msg: {"logprobs": _choices(llm, msg["rows"], msg["choices"])},
    "push": _push,
    "reset_prefix_cache": _reset_prefix_cache,
    "sleep": _sleep,
    "wake": _wake,
}


def _chain(err: BaseException) -> list[BaseException]:
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _answer(state: dict, msg: dict) -> dict:
    op = msg.get("op")
    if op == "start":
        return _start(state, msg)
    if op == "shutdown":
        return {}
    if op not in _COMMANDS:
        raise ValueError(f"unknown command {op!r}")
    if state.get("llm") is None:
        raise RuntimeError(f"command {op!r} before the engine started")
    return _COMMANDS[op](state["llm"], msg)


def serve(fd: int) -> int:
    """Answer the parent's commands until `shutdown` or until the parent's end of the connection closes."""
    from multiprocessing.connection import Connection

    os.dup2(2, 1)  # vLLM logs to stdout: keep it off everything the parent reads (the channel is its own fd)
    conn = Connection(fd)
    state: dict = {"llm": None}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody to serve
                return 0
            try:
                reply = _answer(state, msg)
            except BaseException as err:  # noqa: BLE001 - every failure becomes one line in the parent
                traceback.print_exc()
                reply = {"error": _one_line(err)}
                # vLLM's engine core (a process of its own in vLLM's layout) died: the engine is lost, not wrong
                reply["engine_dead"] = any(type(e).__name__ == "EngineDeadError" for e in _chain(err))
                if msg.get("op") == "start":
                    reply["stage"] = state.get("stage", "engine start")
            if msg.get("op") == "shutdown":
                if state["llm"] is not None:
                    _shutdown(state["llm"])
                    state["llm"] = None
                    gc.collect()
                conn.send(reply)
                return 0
            conn.send(reply)
    finally:
        if state["llm"] is not None:
            _shutdown(state["llm"])
            state["llm"] = None
            gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()


def _ignore_warnings() -> None:
    """SLURM's early warning (`--signal=USR1@90`) and submitit's preemption signal (USR2) reach every process
    of a step, this one too though it runs in its own session; their default action would end the engine
    under the trainer, which is finishing its work to stop. The parent stops the engine itself (a shutdown,
    then SIGKILL to its group); ignored signals stay ignored in the engine's own processes."""
    import signal

    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    _ignore_warnings()
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        sys.exit(serve(int(sys.argv[2])))
    sys.exit(main(sys.argv[1]))
