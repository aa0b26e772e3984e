"""Shared fixtures: tiny models and tokenizers built here and saved with save_pretrained (no network)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Several tests at a time (pytest-xdist): the cores are shared out, a thread per core, before torch starts
# here or in the processes the tests start. (OpenMP threads spin while they wait: two tests of two threads
# each on two cores ran up to five times slower.)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# The suite runs two tests at a time (pytest-xdist, `-n auto` in pyproject.toml; a module is a worker's unit), a
# thread each (above). Every module shares the cores, also those whose jobs run two processes (one thread each)
# or a vLLM engine: run alone, with the machine to itself, such modules kept 1.6 cores busy at most (vLLM ones
# 0.8-1.3) and, run last, one after the other, made the suite 21 minutes; sharing, 18.5 (2026-12-06).


# Seconds each long module took on one worker of the full suite (2026-12-06, 2 cores): only the order of the
# modules depends on it. A module not listed counts 20 s per end-to-end (`slow`) test.
MODULE_S = {"test_distributed": 650, "test_online_vllm": 240, "test_online": 210, "test_mcpo": 200,
            "test_faults": 130, "test_errors": 130, "test_vllm_sync": 120, "test_models": 105, "test_eval": 100,
            "test_default_job": 65, "test_cli": 60, "test_gpu_check": 50, "test_resume": 40, "test_vllm": 35,
            "test_sweeps": 30, "test_data": 30, "test_fsdp2": 27, "test_llm_judge": 25, "test_plan": 18}


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first (test_distributed.py starts at once on one worker while the other takes the rest),
    so that each worker ends on short ones: with the modules ordered by their number of end-to-end tests, two
    long single-test modules (the default job, the GPU script) came last, and one core idled for 95 s at the end."""
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))

    def seconds(item) -> float:
        name = item.module.__name__
        return MODULE_S.get(name.rsplit(".", 1)[-1], 20 * slow[name])

    items.sort(key=lambda item: -seconds(item))


def build_bpe_model(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 2, vocab: int = 320,
                    bos: bool = True, seed: int = 0, kv_heads: int | None = None) -> Path:
    """A byte-level BPE tokenizer trained on a small corpus and a randomly initialised Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"Question {i}: what is {i} plus {2 * i}? Answer: {3 * i}. The quick brown fox {i}." for i in range(300)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def char_llama(*, hidden: int, heads: int, seed: int, **config):
    """A random 2-layer Llama over prefrun's character tokenizer (one token per character, so texts cut
    exactly; head_dim 64, as vLLM on a CPU needs), in eval mode, and the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefrun.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **{"max_position_embeddings": 128, **config})
    return LlamaForCausalLM(config).eval(), tokenizer


def teacher_forced(model, tokenizer, prompt: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of one unpadded forward over prompt + completion, at the completion's tokens."""
    from prefrun.generate import prompt_ids

    context = prompt_ids(tokenizer, prompt)
    with torch.no_grad():
        logits = model(torch.tensor([context + ids])).logits[0].float()
    positions = torch.arange(len(context) - 1, len(context) + len(ids) - 1)
    return torch.log_softmax(logits, -1)[positions, torch.tensor(ids, dtype=torch.long)]


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory) -> Path:
    return build_bpe_model(tmp_path_factory.mktemp("bpe_llama"))


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {2 * i}?", "chosen": f" Answer: {3 * i}.",
             "rejected": f" Answer: {3 * i + 1}, the quick fox."} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_job_model(tmp_path_factory) -> Path:
    """The embedded model of TINY_JOB's recipe, built once per session: CLI tests start from a cache holding it
    (the build is the same every time; pools, reference log-probs and tokenized data are still computed anew)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[a for a in TINY_JOB if a.startswith("model.build.")])
    # The task as the CLI instantiates it (its repr is part of the model's cache key).
    return instantiate(cfg.model.build).materialize(tmp_path_factory.mktemp("tiny-job-cache"), instantiate(cfg.task))


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch, tiny_job_model) -> Path:
    path = tmp_path / "cache"
    shutil.copytree(tiny_job_model, path / "models" / tiny_job_model.name)
    monkeypatch.setenv("PREFRUN_CACHE", str(path))
    return path


# Overrides that make the embedded job take seconds: a short warm-up, few pairs, few eval prompts.
TINY_JOB = ["model.build.sft_steps=20", "model.build.hidden_size=64", "model.build.num_heads=1",
            "model.build.intermediate_size=128", "data.num_prompts=64", "eval.num_prompts=8", "trainer.batch_size=8",
            "trainer.log_every=2", "trainer.epochs=1"]


def fsdp_on_cpu(where) -> tuple[str, str]:
    """The shipped FSDP config (FSDP2, RAM-efficient loading, sharded checkpoints) and the key that runs it as real
    FSDP2 on CPU processes (accelerate itself would fall back to DDP there): `--config_file` and the override."""
    config = where / "fsdp.yaml"
    shutil.copy(REPO / "docs" / "accelerate" / "fsdp.yaml", config)
    return str(config), "trainer.cpu_fsdp=true"


def free_port() -> str:
    """A port no one listens on now: each multi-process job its own rendezvous (pytest-xdist runs two tests at once,
    and accelerate's default port, 29500, is one for every job)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def accelerate_launch(*how: str) -> list[str]:
    """`accelerate launch <how>` on a rendezvous port of its own; `how` ends with `-m prefrun` and its arguments."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", free_port(), *how]


def sharded_checkpoint(path) -> None:
    """A checkpoint written by FSDP2 through torch.distributed.checkpoint: each process wrote its own shards."""
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (path / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], path


def torchrun(script: str, out, cwd) -> None:
    """`torchrun --standalone --nproc_per_node 2 tests/<script> <out>`: each process writes `<out>.<rank>`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / script), str(out)]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# Variables that the libraries prefrun imports read as they are imported (the zygote read them once).
_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                   "CUDA", "NCCL_", "DS_", "ACCELERATE_", "VLLM_", "PYTHON", "LD_")


class _Zygote:
    """tests/zygote.py, one per test worker, started at its first use: `prefrun <args>` forked from a process that
    has imported prefrun's dependencies (5-6 s of CPU a run, a hundred runs in the suite). A run whose environment
    differs from the zygote's in a variable read at import time gets a fresh interpreter instead."""

    def __init__(self) -> None:
        self.proc, self.env = None, {}

    def fits(self, env: dict) -> bool:
        if os.environ.get("PREFRUN_TEST_FRESH"):  # every run in a fresh interpreter (PREFRUN_TEST_FRESH=1 pytest)
            return False
        if self.proc is None:
            self.env = dict(os.environ)
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py")], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=self.env)
        keys = {k for k in (*env, *self.env) if k.startswith(_READ_AT_IMPORT)}
        return self.proc.poll() is None and all(env.get(k) == self.env.get(k) for k in keys)

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import signal
        import tempfile
        import threading

        with tempfile.TemporaryDirectory() as out:
            request = {"args": args, "cwd": str(cwd), "env": env, "stdout": f"{out}/stdout", "stderr": f"{out}/stderr"}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            expired = threading.Event()

            def stop() -> None:
                expired.set()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

            timer = threading.Timer(timeout, stop)
            timer.start()
            try:
                code = json.loads(self.proc.stdout.readline())["returncode"]
            finally:
                timer.cancel()
            said = [Path(request[k]).read_text(errors="replace") for k in ("stdout", "stderr")]
        if expired.is_set():
            raise subprocess.TimeoutExpired(["prefrun", *args], timeout, said[0], said[1])
        return subprocess.CompletedProcess(["prefrun", *args], code, *said)


_ZYGOTE = _Zygote()


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`prefrun <args>` as a user types it: what `python -m prefrun` runs, in a process forked from this worker's
    zygote (tests/zygote.py: the imports done once) or, where the environment asks for it, a fresh interpreter."""
    env = {**os.environ, **(env_extra or {})}
    if _ZYGOTE.fits(env):
        proc = _ZYGOTE.run(args, cwd, env, timeout=600)
    else:
        proc = subprocess.run([sys.executable, "-m", "prefrun", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
