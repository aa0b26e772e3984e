"""Load the policy and its tokenizer: a hub id, a local directory, or the embedded tiny recipe."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefrun import distributed
from prefrun.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(cfg: DictConfig, task, cache_dir: str | Path, role: str = "policy"):
    """Return (model, tokenizer, name_or_path) for `cfg` (the `model` group), with LoRA adapters if
    `model.lora` is set (then only the adapters train, and the frozen base is the reference). `role` names
    the model in the log (`prefrun eval` loads a baseline and the rounds' policies the same way)."""
    name_or_path = resolve_model_path(cfg, task, cache_dir)
    model = load_causal_lm(name_or_path, cfg, key="model.name_or_path")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.get("lora"):
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input when the base is frozen
        model = add_lora(model, cfg.lora)
    tokenizer = load_tokenizer(name_or_path, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %s (%s, %.2fM parameters, %.2fM trainable)", role, name_or_path, model.dtype,
             sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6)
    return model, tokenizer, name_or_path


def resolve_model_path(cfg: DictConfig, task, cache_dir: str | Path) -> str:
    """`model.name_or_path`, or the embedded model's directory (built on first use)."""
    if cfg.name_or_path is not None:
        return cfg.name_or_path
    if cfg.build is None:
        raise InputError("model.name_or_path is null and model.build is null: set model.name_or_path=<hub id | dir>")
    with distributed.in_turn():  # one process per filesystem builds it; the others find it built
        return str(instantiate(cfg.build).materialize(cache_dir, task))


def load_tokenizer(name_or_path: str, cfg: DictConfig):
    """The model's tokenizer, with a pad token (eos when it has none) and a check that it has an eos token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=bool(cfg.trust_remote_code))
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"model.name_or_path={name_or_path!r}: cannot load its tokenizer ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0]}); save the tokenizer next to the model") from None
    template = read_chat_template(cfg.get("chat_template"), "model.chat_template")
    if template and tokenizer.chat_template != template:
        log.info("tokenizer: using model.chat_template")
        tokenizer.chat_template = template  # saved with the checkpoints, so that inference renders the same way
    if not tokenizer("a 1", add_special_tokens=False).input_ids:  # transformers makes an empty one from nothing
        raise InputError(f"model.name_or_path={name_or_path!r}: its tokenizer turns text into no tokens ({len(tokenizer)} "
                         "in its vocabulary): its files are missing there (tokenizer.json or the vocabulary, "
                         "tokenizer_config.json); save the tokenizer next to the model")
    if tokenizer.eos_token_id is None:
        raise InputError(f"model.name_or_path={name_or_path!r}: the tokenizer has no eos token; completions need one")
    if tokenizer.pad_token_id is None:
        log.info("tokenizer has no pad token: padding with eos (%r); padded positions are masked", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_chat_template(value: str | None, key: str) -> str | None:
    """A chat template given as a Jinja string, or as the path of a file holding one (`key` names the setting)."""
    if not value:
        return None
    if "{" in value:
        return value
    file = Path(value).expanduser()
    if not file.is_file():
        raise InputError(f"{key}={value!r}: no such file; give a Jinja template or its file")
    return file.read_text()


def load_reference(cfg: DictConfig):
    """A separate reference model (`model.reference`), or None: the policy's starting weights."""
    if not cfg.get("reference"):
        return None
    return load_causal_lm(cfg.reference, cfg, key="model.reference").eval()


@contextmanager
def loaded_whole() -> Iterator[None]:
    """Models loaded in this block are whole on every process. Under a DeepSpeed ZeRO-3 config accelerate tells
    transformers (HfDeepSpeedConfig, whatever zero3_init_flag says) to partition every model it loads
    (deepspeed.zero.Init): parameters stay empty until deepspeed.initialize wraps the model. prefrun generates,
    scores and fingerprints with the policy before prepare() (which partitions it), and never wraps a reference
    or a judge: they are loaded whole ("'weight' must be 2-D" in the first forward otherwise)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # what accelerate set (transformers keeps only a weak ref)
    config = ref() if ref is not None else None
    if config is None or not config.is_zero3():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)  # prepare() partitions the policy under the same config


def check_local_path(name_or_path: str, key: str) -> None:
    """A name written as a path (absolute, ./, ../, ~) that does not exist is a missing directory, not a hub id:
    said so, rather than the hub's "Repo id must be in the form 'repo_name'" that transformers gives."""
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
        raise InputError(f"{key}={name_or_path!r}: no such directory; give the model's directory or a hub id")


def load_causal_lm(name_or_path: str, cfg: DictConfig, *, key: str):
    """AutoModelForCausalLM.from_pretrained with prefrun's checks: one clear line for a bad path or
    a model that is not a causal LM."""
    trust = bool(cfg.trust_remote_code)
    check_local_path(name_or_path, key)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise InputError(
            f"{key}={name_or_path!r}: cannot load a model config ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). Give a local directory with config.json or a hub id."
        ) from None
    if type(config) not in AutoModelForCausalLM._model_mapping and not trust:
        raise InputError(
            f"{key}={name_or_path!r} is a {config.model_type!r} model, not a causal LM "
            "(AutoModelForCausalLM cannot load it): choose a decoder-only language model."
        )
    if cfg.dtype not in ("auto", *DTYPES):
        raise InputError(f"model.dtype={cfg.dtype!r}: choose auto, float32, bfloat16 or float16")
    try:
        with loaded_whole():
            return AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=trust,
            )
    except OSError as err:  # transformers' "no file named model.safetensors ..." (no errno: not a system error)
        if err.errno is not None and not isinstance(err, FileNotFoundError):
            raise
        raise InputError(f"{key}={name_or_path!r}: cannot load its weights ({str(err).splitlines()[0]}); give a "
                         "directory with config.json and its weights (model.safetensors or pytorch_model.bin, or "
                         "their shards and index), or a hub id") from None


def add_lora(model, cfg: DictConfig):
    """Wrap `model` with peft LoRA adapters; the base weights freeze."""
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules
    target = target if isinstance(target, str) else list(target)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise InputError(f"model.lora.target_modules={target!r}: {str(err).splitlines()[0]}") from None


def hold_in_fp32(model) -> int:
    """`trainer.master_weights=fp32`: the trainable parameters of a model loaded in 16 bits are held, and so
    updated, in fp32 (the other parameters stay as loaded); returns how many elements were upcast. A 16-bit
    weight cannot take an update much smaller than itself: bf16 keeps 8 significant bits, so at a 7B model's
    learning rates (5e-7) nearly every update rounds away (docs/results.md, "Master weights"). The config keeps
    the loaded dtype: generation computes in it (`in_loaded_precision`), engines load in it."""
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    for param in upcast:
        param.data = param.data.float()
    return sum(p.numel() for p in upcast)


def loaded_dtype(model) -> torch.dtype | None:
    """The dtype the model was loaded in (its config's; `hold_in_fp32` does not change it)."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dtype, str):
        return getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


@contextmanager
def in_loaded_precision(model) -> Iterator[None]:
    """Sampling from a policy whose weights `hold_in_fp32` upcast computes in the dtype it was loaded in
    (autocast), as it did before: its memory and speed on a GPU, not fp32's. A no-op otherwise."""
    dtype, first = loaded_dtype(model), next(model.parameters())
    if first.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    with torch.autocast(first.device.type, dtype=dtype):
        yield


def save_policy(model, tokenizer, path: Path, *, merge_lora: bool, state_dict: dict | None = None) -> None:
    """save_pretrained; a LoRA policy saves its adapters, or the merged full model if asked.
    `state_dict`: the full weights gathered from sharded training, if any (accelerate's state dict; with LoRA
    merged, `full_weights`: the merged weights under the base model's names)."""
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload() if state_dict is None else model.get_base_model()
    if state_dict is not None:
        state_dict = _untied(model, state_dict)
    distributed.save_pretrained(model, path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def _untied(model, state_dict: dict) -> dict:
    """A gathered state dict without the copies of tied weights (an output embedding tied to the input one):
    save_pretrained drops them only when they share storage, which gathered tensors do not. Tied as loaded
    (`all_tied_weights_keys`: a checkpoint with a head of its own loads untied whatever its config says) and
    equal in the gathered weights, or kept."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return state_dict
    copies = {target for target, source in tied.items() if target in state_dict and source in state_dict
              and torch.equal(state_dict[target], state_dict[source])}
    return {name: tensor for name, tensor in state_dict.items() if name not in copies}


def adapter_state(model) -> dict[str, torch.Tensor] | None:
    """A LoRA policy's adapters as `save_pretrained(state_dict=...)` takes them, gathered when sharded (FSDP2: a
    collective, every process calls it, in the same order); None when they are not sharded (save_pretrained
    reads them itself)."""
    from torch.distributed.tensor import DTensor

    zero3 = [p for name, p in model.named_parameters() if "lora_" in name and _zero3(p)]
    if zero3:  # DeepSpeed ZeRO-3: the partitioned adapters gathered (they are small), copied, released
        with _zero3_gathered(zero3):
            return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()
                    if "lora_" in name}
    adapters = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    if not any(isinstance(tensor, DTensor) for tensor in adapters.values()):
        return None
    return {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
            for name, tensor in adapters.items()}


@contextmanager
def root_gathered(model) -> Iterator[None]:
    """FSDP2 gathers a module's parameters in that module's forward. PEFT's `generate` calls the base model's
    `generate`, past the root module's forward, so the parameters the root holds (embeddings, final norm, head)
    would stay sharded ("mixed torch.Tensor and DTensor"): they are gathered around such a call (a collective:
    every process makes it) and freed after. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _zero3(tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _zero3_gathered(params: list):
    """DeepSpeed ZeRO-3 partitions: `params` gathered whole on every process inside the block (a collective),
    released after; a no-op for parameters that are not partitioned."""
    params = [p for p in params if _zero3(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_weights(model, *, tied: bool = False, buffers: bool = False, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The policy's full weights as a plain checkpoint names them (the base model's HF names): the one function
    behind the engine push and APO's extrapolation, all at once (`iter_full_weights` gives them one tensor at a
    time). LoRA adapters are merged in (W + B·A, the adapters' function, never the factors: anything linear done
    to the weights must act on B·A); sharded parameters (FSDP2 DTensors) are gathered one tensor at a time with
    `full_tensor()`, a collective, so every process calls this, in the same order. `tied`: a tied weight under
    each of its names (the engine push), else once (the first name, as save_pretrained keeps it). `buffers`:
    persistent buffers too (all a checkpoint holds), else parameters only. `to_cpu`: copies on the CPU (a round's
    weights, kept), else tensors on the model's device (written out at once)."""
    return dict(iter_full_weights(model, tied=tied, buffers=buffers, to_cpu=to_cpu))


def iter_full_weights(model, *, tied: bool = False, buffers: bool = False,
                      to_cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`full_weights` one (name, tensor) at a time, in the same order on every process: a sharded policy is
    gathered tensor by tensor and a caller that writes each out (the engine push, in bounded buckets) never holds
    the whole model. Only a tied weight is kept until its last name is given."""
    from torch.distributed.tensor import DTensor

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        if _zero3(tensor):  # gathered, copied, released
            with _zero3_gathered([tensor]):
                return tensor.detach().to("cpu" if to_cpu else tensor.device, copy=True)
        tensor = tensor.detach()
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return tensor.to("cpu", copy=True) if to_cpu else tensor

    def base(tensor: torch.Tensor, lora: list) -> torch.Tensor:  # a LoRA weight from its kept fp32 value, if any
        if not (lora and merges_lora_in_fp32(model) and getattr(tensor, _MASTER, None) is not None):
            return whole(tensor)
        full = _whole_from_parts(master_or_local(tensor), tensor)  # (a collective where sharded)
        return full.to("cpu", copy=True) if to_cpu else full.to(local(tensor).device)

    entries = _weight_entries(model, tied=tied, buffers=buffers)
    uses: dict[int, int] = {}
    for _, tensor, _ in entries:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    kept: dict[int, torch.Tensor] = {}
    for name, tensor, lora in entries:
        key = id(tensor)
        value = kept[key] if key in kept else base(tensor, lora)
        uses[key] -= 1
        if uses[key]:
            kept[key] = value
        else:
            kept.pop(key, None)
        if lora and merges_lora_in_fp32(model):
            value = value.float()
        for delta in lora:  # the adapters' W + B·A (a new tensor: the policy is left untouched)
            value = value + whole(delta()).to(value.device, value.dtype)
        yield name, value


def weight_shapes(model, *, tied: bool = False, buffers: bool = False) -> dict[str, tuple[int, ...]]:
    """name -> shape of what `iter_full_weights` gives, without gathering anything (a DTensor knows its global
    shape): what a push can be checked against before any of it is sent."""
    return {name: full_shape(tensor) for name, tensor, _ in _weight_entries(model, tied=tied, buffers=buffers)}


def _weight_entries(model, *, tied: bool, buffers: bool) -> list[tuple[str, torch.Tensor, list]]:
    """(plain checkpoint name, the model's tensor, the LoRA deltas to add: callables) in state_dict order. A
    sharded policy's as shards (`resharded`: a gathered FSDP2 root's state_dict and parameters are not the same
    tensors, and its weights were left out)."""
    resharded(model)
    peft = hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    deltas: dict[str, list] = {}
    if peft:
        from peft.tuners.lora import LoraLayer

        def delta(module, adapter: str) -> torch.Tensor:  # B·A; ZeRO-3: from the factors gathered
            factors = [*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()]
            with _zero3_gathered(factors):
                value = module.get_delta_weight(adapter)
                return value.clone() if any(_zero3(p) for p in factors) else value

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                deltas[f"{name}.weight"] = [(lambda module=module, adapter=adapter: delta(module, adapter))
                                            for adapter in module.active_adapters if adapter in module.lora_A]
    entries, seen = [], set()
    parameters = {id(p) for p in base.parameters()}
    for name, tensor in base.state_dict(keep_vars=True).items():
        if not buffers and id(tensor) not in parameters:
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise InputError("LoRA with modules_to_save: its weights cannot be merged into a plain checkpoint (engine "
                             "push, online rounds); adapt linear layers only (model.lora.target_modules)")
        if "lora_" in name or (not tied and id(tensor) in seen):
            continue
        seen.add(id(tensor))
        plain = name.replace(".base_layer.", ".")
        entries.append((plain, tensor, deltas.get(plain, [])))
    return entries


def resharded(model) -> None:
    """FSDP2 leaves the root module's parameters gathered after a forward (it expects the backward next): the
    module then registers the gathered copies as its parameters, the next forward uses them, and resharding
    frees them. Weights written in that state are lost (or written into freed memory). Reshard every FSDP2
    module first, so that the registered parameters are the shards (a no-op for a model that is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # a LoRA policy's root is the PEFT wrapper (what accelerate shards)
        if isinstance(module, FSDPModule):
            module.reshard()


def local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of `param`, in place (writing it writes the parameter): an FSDP2 shard, a DeepSpeed
    ZeRO-3 partition (the flattened parameter's slice for this rank, zero-padded at the end of the last one),
    else the parameter itself."""
    if _zero3(param):
        return param.ds_tensor
    return param.to_local() if _is_dtensor(param) else param


@torch.no_grad()
def write_local(param: torch.Tensor, part: torch.Tensor) -> None:
    """Write this process's part of `param` (as `local` holds it), in place. A ZeRO-3 parameter that is gathered
    at the moment (a small one DeepSpeed keeps whole between steps, or one a forward left gathered for reuse)
    would go on being used as gathered: it is released, so that its next use gathers what was written."""
    if _zero3(param):
        _check_writable(param)
    target = local(param)
    target.copy_(part.to(target.device, target.dtype))
    if _zero3(param) and param.ds_status.name == "AVAILABLE":
        param.partition()


# A parameter DeepSpeed trains in 16 bits keeps its fp32 value between rounds here, as a `_Master`.
_MASTER = "_prefrun_fp32_master"
_DEEPSPEED_16_BIT = "_prefrun_deepspeed_16_bit"
_LORA_FP32 = "_prefrun_lora_fp32"


class _Master(NamedTuple):
    """A kept fp32 value: the whole parameter (`whole`: a round's weights written in), this process's ZeRO-3
    partition (`partition`), or this process's slice of the flattened parameter in a ZeRO-1/2 optimiser's flat
    fp32 buffer (`fragment`, from element `start`; empty where this process holds none of it)."""

    value: torch.Tensor
    form: str
    start: int = 0


def mark_deepspeed_16_bit(model) -> None:
    """The policy is trained by DeepSpeed in bf16 or fp16: a round's fp32 weights written into it are kept as the
    next optimiser's masters (`write_weight`)."""
    setattr(model, _DEEPSPEED_16_BIT, True)


def merge_lora_in_fp32(model) -> None:
    """`trainer.master_weights=fp32` on a LoRA policy whose base is 16-bit: a LoRA weight's `W + B·A` is computed
    in fp32 (`iter_full_weights`, `local_weights`), and a round's fp32 weights written into the frozen 16-bit base
    (online rounds that merge their adapters) are kept as the base's fp32 value (`write_weight`: a CPU copy of
    each adapted weight, or of this process's part of it), from which the next merge goes on. Merged straight into
    16 bits, an update below half a step of the weight rounds away at every round boundary (docs/results.md,
    "LoRA rounds merged into a 16-bit base"). The policy computes with the 16-bit rounding, as fp32 masters under
    16-bit compute do."""
    setattr(model, _LORA_FP32, True)


def merges_lora_in_fp32(model) -> bool:
    """True when `merge_lora_in_fp32` marked the policy."""
    return getattr(model, _LORA_FP32, False)


def _zero12(param) -> bool:
    """A parameter a DeepSpeed ZeRO-1/2 (or bf16) optimiser holds in 16 bits, its fp32 master split over the
    processes in flat buffers (DeepSpeed links every such parameter, on every process, also one it holds no part
    of)."""
    return not _zero3(param) and hasattr(param, "_hp_mapping") and hasattr(param, "_dp_group") \
        and param.dtype != torch.float32


def keep_fp32_masters(model) -> None:
    """At the end of training under DeepSpeed in bf16 or fp16: each trainable parameter's fp32 master, as far as
    this process's optimiser holds it (a ZeRO-3 partition, a ZeRO-1/2 fragment), kept beside the parameter (a CPU
    copy: 1/N of the fp32 model per process). DeepSpeed builds each round's optimiser from the 16-bit module, so
    without it every round boundary rounds the weights to 16 bits (at a 7B learning rate a round's update is often
    below half a bf16 step). `local_weights` reads it (θ̂_t and APO's extrapolation in fp32), `write_weight`
    replaces it, `restore_fp32_masters` gives it to the next optimiser."""
    from deepspeed.utils import safe_get_local_fp32_param

    for param in model.parameters():
        if not param.requires_grad:
            continue
        if _zero3(param) and param.ds_tensor.dtype != torch.float32 \
                and getattr(param, "_z3_optimizer", None) is not None:
            setattr(param, _MASTER, _Master(safe_get_local_fp32_param(param).detach().to("cpu", copy=True),
                                            "partition"))
        elif _zero12(param):
            mapping = param._hp_mapping
            fragment = mapping.get_hp_fragment().detach().to("cpu", torch.float32, copy=True) if mapping is not None \
                else torch.empty(0)
            setattr(param, _MASTER, _Master(fragment, "fragment",
                                            mapping.lp_fragment_address.start if mapping is not None else 0))


def restore_fp32_masters(model) -> None:
    """After prepare() built a DeepSpeed optimiser from the 16-bit module: its fp32 masters start from the kept
    values (`keep_fp32_masters`, or a round's fp32 weights `write_weight` wrote: an extrapolation, a resume), not
    from their 16-bit rounding. Each process sets its own part (nothing is sent)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, param in model.named_parameters():
        kept = getattr(param, _MASTER, None)
        if kept is None or not param.requires_grad:  # a frozen LoRA base keeps its own (`merge_lora_in_fp32`)
            continue
        delattr(param, _MASTER)
        if _zero3(param):
            value = kept.value if kept.form == "partition" else part_of(kept.value, param)
            safe_set_local_fp32_param(param, value.to(param.ds_tensor.device))
        elif kept.form == "whole":
            safe_set_full_fp32_param(param, value=kept.value.to(param.device))
        elif kept.form == "fragment" and kept.value.numel():
            mapping = getattr(param, "_hp_mapping", None)
            address = None if mapping is None else mapping.lp_fragment_address
            if address is None or (address.start, address.numel) != (kept.start, kept.value.numel()):
                raise RuntimeError(f"{name}: DeepSpeed's optimiser splits its fp32 masters otherwise than last round's "
                                   "(another ZeRO stage or number of processes inside one run?)")
            fragment = mapping.get_hp_fragment()
            fragment.data.copy_(kept.value.to(fragment.device, fragment.dtype))


def master_or_local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of `param` (`local`) at full precision: its kept fp32 master (`keep_fp32_masters`), a
    ZeRO-1/2 parameter's put together from every process's fragment (a collective: every process calls this for
    the same parameters in the same order), else `local(param)`."""
    kept = getattr(param, _MASTER, None)
    if kept is None:
        return local(param)
    if kept.form == "fragment":
        import torch.distributed as dist

        whole = torch.zeros(param.numel(), dtype=torch.float32, device=distributed.device())
        whole.narrow(0, kept.start, kept.value.numel()).copy_(kept.value)
        dist.all_reduce(whole, group=param._dp_group)  # each element is held by exactly one process
        return whole.view(param.shape)
    return kept.value if (kept.form == "partition") == _zero3(param) else local(param)


def holds_fp32_masters(model) -> bool:
    """True when the policy keeps fp32 masters beside its 16-bit parameters (`keep_fp32_masters`: DeepSpeed in bf16
    or fp16): its weights at full precision are `local_weights`, not the parameters."""
    return any(getattr(p, _MASTER, None) is not None for p in model.parameters())


def holds_fp32_fragments(model) -> bool:
    """True when the policy keeps ZeRO-1/2 fp32 masters split over the processes (`keep_fp32_masters`): reading
    its weights at full precision is then a collective (`master_or_local`)."""
    return any(getattr(getattr(p, _MASTER, None), "form", None) == "fragment" for p in model.parameters())


def write_weight(model, param: torch.Tensor, part: torch.Tensor) -> None:
    """`write_local` for a round's weights: into a policy DeepSpeed trains in 16 bits (`mark_deepspeed_16_bit`) the
    parameter gets the rounded value, and an fp32 value is kept as its master for the next round's optimiser
    (`restore_fp32_masters`); into the frozen 16-bit base of a LoRA policy that merges in fp32
    (`merge_lora_in_fp32`) likewise, kept as the value the next merge starts from."""
    write_local(param, part)
    keeps = getattr(model, _DEEPSPEED_16_BIT, False) if param.requires_grad else merges_lora_in_fp32(model)
    if keeps and part.dtype == torch.float32 and local(param).dtype != torch.float32:
        # A partition is copied (it may be a view of a whole tensor); a whole one is kept as given.
        setattr(param, _MASTER, _Master(part.detach().to("cpu", copy=_zero3(param)),
                                        "partition" if _zero3(param) else "whole"))
    elif hasattr(param, _MASTER):
        delattr(param, _MASTER)


HPZ = ("DeepSpeed ZeRO++ hierarchical partitions (zero_optimization.zero_hpz_partition_size > 1) keep a second copy "
       "of each partition that prefrun does not write: online rounds need it unset (1) in the DeepSpeed config")
NVME = ("DeepSpeed ZeRO-3 with parameters offloaded to NVMe (zero_optimization.offload_param.device: nvme): online "
        "rounds write each round's weights into the partitions in memory; offload them to cpu instead")


def check_zero3_writable(config: dict) -> None:
    """Refuse, before anything runs, a DeepSpeed config whose ZeRO-3 partitions online rounds cannot write."""
    zero = config.get("zero_optimization", {}) or {}
    if zero.get("stage") != 3:
        return
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise InputError(HPZ)
    if str((zero.get("offload_param") or {}).get("device", "")).lower() == "nvme":
        raise InputError(NVME)


def _check_writable(param) -> None:
    """A ZeRO-3 parameter whose partition is not the only copy DeepSpeed reads is refused before it is written
    (writing the partition alone would leave the other copy stale: silently other weights)."""
    if getattr(param, "ds_secondary_tensor", None) is not None:
        raise InputError(HPZ)
    if str(getattr(param.ds_tensor, "final_location", "")).endswith("nvme"):
        raise InputError(NVME)


def part_of(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` cut as `local(target)` holds it. Every process holds the same full tensor and cuts its own part
    (nothing is sent)."""
    if _zero3(target):
        import torch.distributed as dist

        size = target.ds_tensor.ds_numel
        start = size * dist.get_rank(group=target.ds_process_group)
        part = full.reshape(-1)[start : start + size]
        return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part
    if _is_dtensor(target) and not _is_dtensor(full):  # (src_data_rank=None: each process cuts its own shard)
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
    return full


def is_partitioned(param: torch.Tensor) -> bool:
    """True when this process holds only a part of `param` (FSDP2, ZeRO-3)."""
    return _zero3(param) or _is_dtensor(param)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape: a ZeRO-3 parameter's own is empty, a DTensor's is already the global one."""
    return tuple(param.ds_shape if _zero3(param) else param.shape)


def _whole_from_parts(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Every process's `part` of `param` (as `local` holds it) put together, on every process (a collective)."""
    from torch.distributed.tensor import DTensor

    if _zero3(param):
        import torch.distributed as dist

        group = param.ds_process_group
        # Where the process group's collectives run; fp32 masters of 16-bit partitions stay fp32.
        part = part.to(distributed.device(), part.dtype if part.dtype == torch.float32 else param.dtype)
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
    if _is_dtensor(param):  # (fp32 parts of a 16-bit parameter, its kept fp32 value, stay fp32)
        dtype = part.dtype if part.dtype == torch.float32 else param.dtype
        return DTensor.from_local(part.to(param.device, dtype), param.device_mesh, param.placements,
                                  run_check=False, shape=param.shape, stride=param.stride()).full_tensor()
    return part


class LocalShards(dict):
    """name -> this process's part (a plain CPU tensor, `local`) of each weight of a sharded policy (FSDP2 shards,
    ZeRO-3 partitions), LoRA merged, under the names `full_weights` gives: what APO's extrapolation (elementwise)
    and a round's merge work on, without a whole copy of the model on every process. `iter_gathered` gives the
    whole of it, a tensor at a time, to a writer."""


def local_weights(model) -> LocalShards:
    """`full_weights` of a sharded policy, each process keeping only its own part of every weight (`local`: read
    in place; only a LoRA delta is gathered, one tensor at a time, a collective: every process calls this, in the
    same order). A weight that is not sharded is kept whole."""
    from torch.distributed.tensor import DTensor

    out = LocalShards()  # (_weight_entries reshards first)
    for name, tensor, lora in _weight_entries(model, tied=False, buffers=False):
        value = master_or_local(tensor).detach().to("cpu", copy=True)
        if lora and merges_lora_in_fp32(model):
            value = value.float()
        for delta in lora:
            full = delta().detach()
            full = full.full_tensor() if isinstance(full, DTensor) else full
            value = value + part_of(full, tensor).to("cpu", value.dtype)
        out[name] = value
    return out


def local_shards(model, weights: dict[str, torch.Tensor]) -> LocalShards:
    """Whole weights (`full_weights`, or read from disk) as this process's parts of the sharded policy."""
    params = plain_parameters(model)
    return LocalShards({name: part_of(value, params[name]).to("cpu", copy=True)
                        if is_partitioned(params[name]) else value for name, value in weights.items()})


def iter_gathered(model, shards: LocalShards) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) from every process's parts, one tensor at a time on every process (a collective:
    every process runs it to the end); what the writer of the round's weights writes, file by file."""
    params = plain_parameters(model)
    for name, value in shards.items():
        yield name, _whole_from_parts(value, params[name]).to("cpu")


def plain_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The base model's parameters (no LoRA factors) under plain checkpoint names (`.base_layer.` dropped); a
    sharded policy's as shards (`resharded`: after a forward without a backward FSDP2's root holds gathered
    copies)."""
    resharded(model)
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    return {name.replace(".base_layer.", "."): param for name, param in base.named_parameters() if "lora_" not in name}


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sharded_compute_dtype(model) -> torch.dtype | None:
    """The dtype an FSDP2 policy computes in when its mixed precision casts every parameter (accelerate's FSDP
    with bf16: norms and embeddings too), else None. Its samples differ from those of the same weights unsharded
    (fp32, or autocast over the matmuls only): what it generates is cached under its own key."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    policy = getattr(model._get_fsdp_state(), "_mp_policy", None)
    return getattr(policy, "param_dtype", None)


def fingerprint(model) -> str:
    """A hash of the starting weights' bytes: what the reference log-prob cache is keyed by. Fresh
    LoRA adapters are left out: they start as the identity (B = 0), so the function is the base's."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        if _is_dtensor(tensor):  # a sharded model's: the whole tensor (a collective: every process, same order)
            tensor = tensor.full_tensor()
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}  # (directory, its weight files' names, sizes, mtimes) -> files_fingerprint


def files_fingerprint(directory: Path, key: str) -> str:
    """A hash of a checkpoint's weight files' bytes (the judge's weights, for a judge that does not hold them).
    Kept for the life of the process while the files keep their sizes and modification times: a judge
    reloaded every round does not read a large checkpoint again."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise InputError(f"{key}: {directory} holds no weights (*.safetensors or *.bin)")
    stamp = (str(directory.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp in _FINGERPRINTS:
        return _FINGERPRINTS[stamp]
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    _FINGERPRINTS[stamp] = "files:" + digest.hexdigest()
    return _FINGERPRINTS[stamp]


def weights_of(name_or_path: str, key: str) -> str:
    """What a model an engine loads from its files is, for keys of work done with it (shards of answers, pools): a
    local directory's weight files' hash (a model retrained into the same directory is another), else the hub id.
    Read by the main process once; every process gets it."""
    local = Path(name_or_path).expanduser()  # (a directory the main process sees: every process takes its answer)
    return distributed.from_main(lambda: files_fingerprint(local, key) if local.is_dir() else name_or_path)

