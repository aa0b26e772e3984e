"""The vLLM worker: `python -m prefrun.vllm_worker JOB.json`, started by `prefrun.generate.VLLMGenerator`.

One process per `generate()` call: it builds one engine, samples every prompt set of the job, writes
the result file the job names, shuts the engine down and exits, so that all of its memory (weights,
KV cache, the engine's own processes) is back with the system before training resumes. It imports
only the standard library and vLLM; the parent tokenized the prompts and decodes the results.

Job (JSON): {"engine": LLM keyword arguments, "result": path, "sets": [{"prompts": [[token id]],
"sampling": SamplingParams keyword arguments, "seeds": [one per prompt]}]}.
Result (JSON, written atomically): {"engine_start_s", "sets": [{"generate_s", "outputs": per prompt,
per sample {"token_ids", "logprobs", "finish_reason"}}]}, or {"error", "stage"} when something failed.
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


def _sample_set(llm, spec: dict, sampling_params_cls, tokens_prompt_cls) -> dict:
    prompts = [tokens_prompt_cls(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = [sampling_params_cls(**spec["sampling"], seed=seed) for seed in spec["seeds"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
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


def main(job_path: str) -> int:
    os.dup2(2, 1)  # vLLM logs to stdout: send everything to stderr, keep the parent's stdout clean
    job = json.loads(Path(job_path).read_text())
    result_path = Path(job["result"])
    stage, llm = "import vllm", None
    try:
        start = time.perf_counter()
        from vllm import LLM, SamplingParams, TokensPrompt

        import_s = time.perf_counter() - start
        stage = "engine start"
        start = time.perf_counter()
        llm = LLM(**job["engine"])
        engine_start_s = time.perf_counter() - start
        stage = "generation"
        sets = [_sample_set(llm, spec, SamplingParams, TokensPrompt) for spec in job["sets"]]
        # Results first: whatever happens at shutdown, the work is kept.
        _write(result_path, {"import_s": import_s, "engine_start_s": engine_start_s, "sets": sets})
        stage = "engine shutdown"
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line in the parent
        traceback.print_exc()
        lines = [line for line in str(err).splitlines() if line.strip()]
        error = f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
        _write(result_path, {"error": error, "stage": stage})
    finally:
        if llm is not None:
            # Explicitly, before exit: left to the interpreter's teardown the process sometimes aborts (rc 134).
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - the parent reaps the process group anyway
                traceback.print_exc()
            llm = None
            gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
    return 0 if stage == "engine shutdown" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
