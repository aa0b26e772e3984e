"""`auto_generator`: vLLM where it pays (CUDA and vLLM installed), HF elsewhere."""

from __future__ import annotations

import dataclasses
import logging

import torch

from prefrun.errors import InputError
from prefrun.generate.hf import HFGenerator
from prefrun.generate.vllm import VLLMGenerator, _vllm_installed

log = logging.getLogger(__name__)


def auto_generator(*, on_cpu: str = "hf", **settings) -> HFGenerator | VLLMGenerator:
    """vLLM when CUDA is available and vLLM is installed; otherwise HF, unless `on_cpu="vllm"` forces vLLM on a
    machine without CUDA. `settings` are the fields of either generator; each backend takes its own."""
    if on_cpu not in ("hf", "vllm"):
        raise InputError(f"generator.on_cpu={on_cpu!r}: use hf or vllm")
    fields = {cls: {f.name for f in dataclasses.fields(cls) if f.init} for cls in (HFGenerator, VLLMGenerator)}
    unknown = sorted(set(settings) - fields[HFGenerator] - fields[VLLMGenerator])
    if unknown:
        raise InputError(f"generator: unknown key(s) {unknown} for generator=auto; see conf/generator/auto.yaml")
    if torch.cuda.is_available():
        backend = VLLMGenerator if _vllm_installed() else HFGenerator
        if backend is HFGenerator:
            log.info("generator=auto: vLLM is not installed, so generating with HF (`pip install vllm` for vLLM)")
    else:
        backend = VLLMGenerator if on_cpu == "vllm" else HFGenerator
    return backend(**{k: v for k, v in settings.items() if k in fields[backend]})
