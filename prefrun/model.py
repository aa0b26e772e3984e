"""Load the policy and its tokenizer: a hub id, a local directory, or the embedded tiny recipe."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefrun.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(cfg: DictConfig, task, cache_dir: str | Path):
    """Return (model, tokenizer, name_or_path) for `cfg` (the `model` group)."""
    name_or_path = cfg.name_or_path
    if name_or_path is None:
        if cfg.build is None:
            raise InputError("model.name_or_path is null and model.build is null: set model.name_or_path=<hub id | dir>")
        name_or_path = str(instantiate(cfg.build).materialize(cache_dir, task))
    trust = bool(cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise InputError(
            f"model.name_or_path={name_or_path!r}: cannot load a model config ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). Give a local directory with config.json or a hub id."
        ) from None
    if type(config) not in AutoModelForCausalLM._model_mapping and not trust:
        raise InputError(
            f"model.name_or_path={name_or_path!r} is a {config.model_type!r} model, not a causal LM "
            "(AutoModelForCausalLM cannot load it): choose a decoder-only language model."
        )
    if cfg.dtype not in ("auto", *DTYPES):
        raise InputError(f"model.dtype={cfg.dtype!r}: choose auto, float32, bfloat16 or float16")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=trust,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust)
    if tokenizer.eos_token_id is None:
        raise InputError(f"model.name_or_path={name_or_path!r}: the tokenizer has no eos token; completions need one")
    if tokenizer.pad_token_id is None:
        log.info("tokenizer has no pad token: padding with eos (%r); padded positions are masked", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    log.info("policy: %s (%s, %.2fM parameters)", name_or_path, model.dtype, model.num_parameters() / 1e6)
    return model, tokenizer, name_or_path


def fingerprint(model) -> str:
    """A hash of the weights' bytes: what the reference log-prob cache is keyed by."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
