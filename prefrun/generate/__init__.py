"""Candidate generation: K completions per prompt from the policy, behind one interface, two backends.

- `HFGenerator` runs `model.generate` on the in-memory policy, in this process.
- `VLLMGenerator` runs a vLLM engine in a child process (`prefrun/vllm_worker.py`). mode="persistent": one
  long-lived engine shared by the generator's copies; each round `sync()` pushes the policy's weights into
  it (safetensors file + `reload_weights`), resets its prefix cache and verifies a fixed probe against the
  trainer's own log-probs, failing the run on a mismatch; every command is bounded by `call_timeout_s`.
  mode="fresh": one child per `generate()` call that loads the weights (`model_path`, the last sync, or the
  model saved to a temporary directory), samples, writes the results and exits, so all of its memory is
  returned before training resumes; bounded by `timeout_s`.
- `auto_generator` picks vLLM where it pays (CUDA and vLLM installed) and HF elsewhere: on a 2-core CPU
  vLLM generated 0.3x-0.9x HF's tokens/s (0.5M-100M models), and each call costs 30-50 s more (import,
  engine start, shutdown; scripts/bench_generate.py).

Every generator has `sync()` (bring it to the trainer's weights, verified; `sync_stats` says how it went),
`sleep()` (free the accelerator while the trainer trains) and `close()`; HF needs none of them.

Both backends tokenize prompts in this process with `prompt_ids` (exactly the ids training sees; vLLM
receives them as token ids), cut each completion at EOS and at the first stop string with the same code, and
return the raw (temperature-1) log-prob of every sampled token under the model. Temperature 0 is
greedy decoding: one completion per prompt, returned `num_candidates` times.

What lives where (imports go one way: base <- hf; base, probe, weights, worker_process <- vllm; hf, vllm <- auto):
- `base.py`: `Candidates`, prompts (`prompt_ids`, `as_chat`), `Sampling` (the settings and interface both
  backends share), tokenizing, EOS ids, cutting completions into `Candidates`, the throughput log line.
- `hf.py`: `HFGenerator` and its logits processor (raw log-probs) and stopping criterion (stop strings).
- `vllm.py`: `VLLMGenerator`: the engine session its copies share, generation, sync, the probe's checks,
  the engine's arguments.
- `probe.py`: the probe's trainer side: building it, the trainer's greedy completions and log-probs.
- `weights.py`: the policy's weights as the engine loads them (LoRA merged), the push file and its checks.
- `worker_process.py`: the worker child (`python -m prefrun.vllm_worker`): starting it, its commands and
  timeouts, reaping its process group, one-line errors.
- `auto.py`: `auto_generator`.
"""

from prefrun.generate.auto import auto_generator
from prefrun.generate.base import Candidates, Sampling, as_chat, prompt_ids
from prefrun.generate.hf import HFGenerator
from prefrun.generate.vllm import CPU_BLOCK_SIZE, CPU_KV_CACHE_BYTES, SMALL_CPU_BLOCK_SIZE, VLLMGenerator
from prefrun.generate.weights import _save_for_engine as _save_for_engine
from prefrun.generate.worker_process import INSTALL_VLLM, UNINSTALL_TORCHVISION

__all__ = [
    "CPU_BLOCK_SIZE",
    "CPU_KV_CACHE_BYTES",
    "INSTALL_VLLM",
    "SMALL_CPU_BLOCK_SIZE",
    "UNINSTALL_TORCHVISION",
    "Candidates",
    "HFGenerator",
    "Sampling",
    "VLLMGenerator",
    "as_chat",
    "auto_generator",
    "prompt_ids",
]
