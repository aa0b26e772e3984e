"""`prefrun train ... plan=true`: what a run will do and whether it fits, without loading any weights.

It reads the model's config (config.json, or the embedded recipe), counts its parameters on the meta device,
and sets per device, for each phase of a run, what lives there: the policy's weights, gradients and optimiser
state (sharded under FSDP / ZeRO as accelerate's launch says), a separate reference or judge while they
score, and a colocated vLLM engine (its share of the GPU, or its weights and KV cache on a CPU). Activations
are left out (they depend on the batch; `model.gradient_checkpointing` bounds them). A run that cannot fit
stops with one line that names the phase and what to change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from prefrun.errors import InputError

log = logging.getLogger("prefrun")

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMISER_STATES = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "SGD": 0}  # tensors of the parameters' size each


@dataclass
class Launch:
    """How the job was launched: processes and the sharding accelerate was told about."""

    processes: int
    sharding: str  # none (DDP) | fsdp | zero1 | zero2 | zero3

    @classmethod
    def from_env(cls, cpu_fsdp: bool = False, cpu_deepspeed: bool = False) -> Launch:
        """`cpu_fsdp`, `cpu_deepspeed`: trainer.cpu_fsdp / cpu_deepspeed; without them accelerate trains an FSDP
        or DeepSpeed config as DDP on CPU processes."""
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and (torch.cuda.is_available() or cpu_fsdp):
            return cls(processes, "fsdp")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (torch.cuda.is_available()
                                                                                 or cpu_deepspeed):
            return cls(processes, f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}")
        return cls(processes, "none")

    def share(self, what: str) -> int:
        """By how much `what` (weights | grads | optimiser) is divided over the processes."""
        stage = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[self.sharding]
        return self.processes if stage >= {"optimiser": 1, "grads": 2, "weights": 3}[what] else 1


def model_config(cfg: DictConfig, task):
    """The policy's config, read without its weights: config.json of a directory or hub id, or the recipe."""
    if cfg.model.name_or_path is None:
        return instantiate(cfg.model.build).config()
    return _read_config(cfg.model.name_or_path, cfg.model, key="model.name_or_path")


def _read_config(name_or_path: str, model_cfg: DictConfig, *, key: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    except (OSError, ValueError) as err:
        raise InputError(f"plan: {key}={name_or_path!r}: cannot read its config.json "
                         f"({str(err).splitlines()[0]}); the plan needs only that file: give a local directory "
                         "holding it") from None


def parameters(config, lora: DictConfig | None = None) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a causal LM built from `config` on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if not lora:
        return total, total
    from prefrun.model import add_lora

    model = add_lora(model, lora)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def _dtype(cfg: DictConfig, config) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def _trainable_bytes(cfg: DictConfig, launch: Launch, size: int) -> tuple[int, bool]:
    """(bytes the trainer holds a trainable weight in, whether DeepSpeed keeps fp32 masters beside 16-bit weights):
    trainer.master_weights=fp32 holds a 16-bit model's trainable weights in fp32 (their gradients and optimiser
    state follow), except under DeepSpeed with mixed precision, which holds the whole model in 16 bits (an fp32
    one cast as it is loaded) and the fp32 copy in its optimiser."""
    from prefrun.train import mixed_precision

    if launch.sharding.startswith("zero") and mixed_precision(cfg.trainer.mixed_precision) in ("bf16", "fp16"):
        return 2, True
    if size == 4 or cfg.trainer.get("master_weights", "fp32") == "model":
        return size, False
    return 4, False


def _devices(processes: int) -> tuple[str, float]:
    """(what each process runs on, the bytes it may use): its GPU, or its share of the host's memory."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory
    import psutil

    return f"CPU (host memory shared by {processes} process(es))", psutil.virtual_memory().total / processes


def plan(cfg: DictConfig, task) -> dict:
    """Print the plan (on the main process) and return it; InputError when a phase does not fit."""
    launch = Launch.from_env(bool(cfg.trainer.get("cpu_fsdp")), bool(cfg.trainer.get("cpu_deepspeed")))
    config = model_config(cfg, task)
    lora = cfg.model.get("lora")
    total, trainable = parameters(config, lora)
    size = BYTES.get(_dtype(cfg, config), 4)
    held, deepspeed_masters = _trainable_bytes(cfg, launch, size)
    size = held if deepspeed_masters else size  # DeepSpeed's 16-bit module, frozen weights too
    weights = (total - trainable) * size + trainable * held
    optimiser = cfg.optim._target_.rsplit(".", 1)[-1]
    states = OPTIMISER_STATES.get(optimiser, 2)
    device, memory = _devices(launch.processes)
    trainer = {
        "policy weights": weights / launch.share("weights"),
        "gradients": trainable * held / launch.share("grads"),
        f"optimiser state ({optimiser}: {states} per parameter)":
            states * trainable * (4 if deepspeed_masters else held) / launch.share("optimiser"),
    }
    if deepspeed_masters:
        trainer["fp32 master weights (DeepSpeed)"] = trainable * 4 / launch.share("optimiser")
    phases = {"train": dict(trainer)}
    # Pools, reference log-probs and the judged evaluation come before training: under FSDP on the shards (the
    # policy is sharded as it is loaded: whole in host memory, on the device a layer at a time), else the full
    # model on every process (weights sent from rank 0).
    phases["before training"] = {"policy weights (sharded)": weights / launch.share("weights")} \
        if launch.sharding == "fsdp" else {"policy weights (whole, every process)": weights}
    if cfg.model.get("reference"):
        reference = _read_config(cfg.model.reference, cfg.model, key="model.reference")
        phases["before training"]["reference (scoring only)"] = parameters(reference)[0] * size
    judge = _judge_bytes(cfg)
    if judge:  # loaded to judge (pools, each round's candidates, the evaluation), freed before training
        phases["before training"]["judge model (while judging)"] = judge
    engine, placement = _engine(cfg, memory, total * BYTES.get(_engine_dtype(cfg, config), 4)), _placement(cfg, launch)
    if engine and cfg.generator.get("devices"):  # engines=main on GPUs of its own: not on a training device
        engine = {}
    if engine:
        # Between training steps the gradients are freed (zero_grad(set_to_none)); weights and optimiser state stay.
        phases["generate"] = {**{k: v for k, v in trainer.items() if k != "gradients"}, **engine}
        if judge and (cfg.get("online") or {}).get("algorithm", "none") != "none":  # rounds judge between them
            phases["generate"]["judge model (while judging)"] = judge
        phases["before training"].update(engine)
        if torch.cuda.is_available() and cfg.generator.get("sleep_mode", "auto") in ("auto", True):
            phases["train"]["engine (asleep: weights in host memory)"] = 0.0
        else:
            phases["train"].update(engine)
    rows = {name: sum(parts.values()) for name, parts in phases.items()}
    result = {"processes": launch.processes, "sharding": launch.sharding, "device": device, "device_bytes": memory,
              "parameters": total, "trainable": trainable, "dtype_bytes": size, "phases": phases, "peak": rows,
              "held": " (trainable ones held in fp32: trainer.master_weights)" if held > size else "",
              "engines": placement, "loading": _loading(launch, weights, total * size)}
    if int(os.environ.get("RANK", "0")) == 0:
        _print(result, cfg)
    error = _refusal(result, cfg, launch, lora, size, held)
    if error is not None:
        error.printed_by_main = int(os.environ.get("RANK", "0")) != 0  # every process refuses; the main one says it
        raise error
    return result


def _refusal(result: dict, cfg: DictConfig, launch: Launch, lora, size: int, held: int) -> InputError | None:
    """The one line for a plan that does not fit (host memory while loading, else the phase that needs most),
    with only the remedies this configuration has not taken."""
    fp32_masters = held > size and cfg.trainer.get("master_weights", "fp32") == "fp32"
    loading = result["loading"]
    if loading and loading["bytes"] > loading["host_bytes"]:
        remedies = ["fewer processes per node"]
        remedies += ["a 16-bit model (model.dtype=bfloat16)"] if size > 2 else []
        if fp32_masters and launch.sharding == "fsdp":  # (held in fp32 as loaded only under FSDP)
            remedies += ["trainer.master_weights=model (16-bit trainable weights: no fp32 copy)"]
        remedies += [] if lora else ["LoRA (+model/lora=default)"]
        return InputError(f"plan: loading needs {_size(loading['bytes'])} of host memory on a node ({loading['what']}) "
                          f"and the node has {_size(loading['host_bytes'])}: {_or(remedies)}")
    rows, memory = result["peak"], result["device_bytes"]
    worst = max(rows, key=rows.get)
    if rows[worst] <= memory:
        return None
    remedies = ["more processes or nodes" if launch.sharding in ("fsdp", "zero3") else
                "shard the model (accelerate launch --config_file docs/accelerate/fsdp.yaml or deepspeed_zero3.yaml)"]
    remedies += [] if lora else ["LoRA (+model/lora=default)"]
    remedies += ["trainer.master_weights=model (16-bit trainable weights: no fp32 copy)"] if fp32_masters else []
    if any(part.startswith("vLLM engine") for part in result["phases"][worst]):
        remedies += ["sampling in the training process (generator=hf)" if not torch.cuda.is_available() else
                     "a smaller generator.kv_cache_memory_bytes" if cfg.generator.get("kv_cache_memory_bytes") else
                     "a smaller generator.gpu_memory_utilization"]
    return InputError(f"plan: the {worst} phase needs {_size(rows[worst])} per process and a process has "
                      f"{_size(memory)} ({result['device']}): {_or(remedies)}")


def _or(remedies: list[str]) -> str:
    return remedies[0] if len(remedies) == 1 else ", ".join(remedies[:-1]) + " or " + remedies[-1]


def _loading(launch: Launch, held: float, loaded: float) -> dict | None:
    """Host memory while the policy loads: each process of a node holds it whole until it is on its device (in
    the dtype it was loaded in), under FSDP until it is sharded (its trainable weights already held in fp32 there:
    `held`); a ZeRO-3 model is partitioned as it loads (None: nothing whole)."""
    if launch.sharding == "zero3":
        return None
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", launch.processes))
    each = held if launch.sharding == "fsdp" else loaded
    return {"bytes": local * each, "host_bytes": psutil.virtual_memory().total,
            "what": f"{local} process(es) x the whole policy, {_size(each)}, until it is "
                    f"{'sharded' if launch.sharding == 'fsdp' else 'on its device'}"}


def _engine(cfg: DictConfig, memory: float, weights: float) -> dict[str, float]:
    """What a colocated vLLM engine holds on a process's device: on a GPU its share (gpu_memory_utilization, weights
    within it) or its weights (over tensor_parallel_size GPUs) and a fixed KV cache; on a CPU its own copy of the
    weights (the engine process loads them) and its KV cache."""
    target = str(cfg.generator.get("_target_", ""))
    if "VLLM" not in target and not (target.endswith("auto_generator") and torch.cuda.is_available()):
        return {}
    if torch.cuda.is_available():
        if cfg.generator.get("kv_cache_memory_bytes"):
            parallel = int(cfg.generator.get("tensor_parallel_size") or 1)
            return {"vLLM engine (weights + KV cache)": weights / parallel + float(cfg.generator.kv_cache_memory_bytes)}
        return {f"vLLM engine (gpu_memory_utilization {cfg.generator.gpu_memory_utilization})":
                cfg.generator.gpu_memory_utilization * memory}
    return {"vLLM engine (weights + KV cache)": weights + float(cfg.generator.get("kv_cache_memory_bytes")
                                                                 or 256 * 1024**2)}


def _engine_dtype(cfg: DictConfig, config) -> str:
    """The dtype the engine serves: generator.dtype, or (auto) the one the policy was loaded in."""
    dtype = str(cfg.generator.get("dtype") or "auto")
    return _dtype(cfg, config) if dtype == "auto" else dtype


def _judge_bytes(cfg: DictConfig) -> float:
    """A judge model's weights (judge=reward_model, pairwise, llm with its own model; 0 for the task's rule or the
    policy judging itself), from its config.json."""
    from omegaconf import OmegaConf

    judge = cfg.get("judge") or {}
    if "name_or_path" not in judge or OmegaConf.is_missing(judge, "name_or_path") or \
            judge.name_or_path in (None, "policy"):
        return 0.0
    try:
        config = _read_config(judge.name_or_path, judge, key="judge.name_or_path")
    except InputError as err:
        log.warning("%s; the judge's memory is not counted", err)
        return 0.0
    try:
        count = parameters(config)[0]
    except ValueError:  # no causal LM of that architecture (a classifier's own): its base model
        from transformers import AutoModel

        with torch.device("meta"):
            count = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    dtype = str(judge.get("dtype") or "auto")
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return float(count * BYTES.get(dtype.removeprefix("torch."), 4))


def _placement(cfg: DictConfig, launch: Launch) -> str | None:
    """Where the vLLM engines run, in words (None without vLLM)."""
    target = str(cfg.generator.get("_target_", ""))
    if "VLLM" not in target and not (target.endswith("auto_generator") and torch.cuda.is_available()):
        return None
    gpus = cfg.generator.get("tensor_parallel_size", 1) * cfg.generator.get("data_parallel_size", 1)
    if cfg.generator.get("engines", "per_process") != "main":
        each = f" ({gpus} GPU(s) each)" if torch.cuda.is_available() else ""
        return f"{launch.processes} engine(s), one per process, on its device{each}"
    devices = cfg.generator.get("devices")
    if devices:
        if gpus > len(devices):
            raise InputError(f"plan: generator.devices={list(devices)} holds {len(devices)} GPU(s) and the engine "
                             f"takes tensor_parallel_size x data_parallel_size = {gpus}: give that many")
        return (f"one engine on GPU(s) {list(devices)} (tensor_parallel_size {cfg.generator.tensor_parallel_size}; "
                f"generator.gpu_memory_utilization {cfg.generator.gpu_memory_utilization} of each), fed by the main "
                "process; not on a training device")
    return "one engine on the main process's device, fed by it (the phases below are the main process's)"


def _print(result: dict, cfg: DictConfig) -> None:
    lines = [f"plan: {result['processes']} process(es), sharding {result['sharding']}, each on {result['device']} "
             f"({_size(result['device_bytes'])})",
             f"plan: policy {result['parameters'] / 1e6:.1f}M parameters ({result['trainable'] / 1e6:.1f}M trainable), "
             f"{result['dtype_bytes']} bytes each{result['held']}; generator {cfg.generator.get('_target_', '?').rsplit('.', 1)[-1]}; "
             f"judge {cfg.judge.get('_target_', '?').rsplit('.', 1)[-1]}"]
    if result["engines"]:
        lines.append(f"plan: vLLM: {result['engines']}")
    for phase, parts in result["phases"].items():
        what = ", ".join(f"{name} {_size(value)}" for name, value in parts.items())
        fits = "fits" if result["peak"][phase] <= result["device_bytes"] else "DOES NOT FIT"
        lines.append(f"plan: {phase}: {_size(result['peak'][phase])} per process ({what}) -> {fits}")
    loading = result["loading"]
    if loading:
        fits = "fits" if loading["bytes"] <= loading["host_bytes"] else "DOES NOT FIT"
        lines.append(f"plan: loading: {_size(loading['bytes'])} of a node's host memory ({loading['what']}; the node "
                     f"has {_size(loading['host_bytes'])}) -> {fits}")
    lines.append("plan: activations are not included (batch-dependent; model.gradient_checkpointing bounds them)")
    for line in lines:
        log.info("%s", line)


def _size(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 1024**2:.1f} MiB"
