"""Online rounds, state layer: the prompt folds, what a round keeps on disk, and the policy's weights
between rounds (read, write, extrapolate, swap in the initial ones). The round loop itself is in
`prefrun/run.py`; the APO math is in `prefrun/extrapolate.py`.

A run directory of an online run holds, per round t = 1..T:

    rounds/<t>/pools.jsonl      the round's candidates with their judge scores (shards/ until the round is done)
    rounds/<t>/checkpoints/     resumable training checkpoints while the round trains (removed when it ends)
    rounds/<t>/policy_hat/      θ̂_t: the weights training produced (save_pretrained: a model directory)
    rounds/<t>/policy/          θ_t: what round t + 1 generates from (APO: extrapolated; else a link to policy_hat)
    rounds/<t>/round.json       the round's metrics, written last: a round with it is done and never redone

With LoRA the weights of every adapted module are the merged `W + B·A`: rounds that extrapolate or move
the reference merge each round's adapters into the base and start fresh ones, so a round's weights are
no longer "base + one adapter" and are kept whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prefrun import distributed, faults, storage
from prefrun.data import split_candidate_logps
from prefrun.errors import InputError
from prefrun.extrapolate import extrapolate_parameters
from prefrun.generate.weights import _buckets
from prefrun.model import (
    LocalShards,
    adapter_state,
    full_shape,
    full_weights,
    holds_fp32_fragments,
    is_partitioned,
    iter_gathered,
    loaded_dtype,
    local,
    local_shards,
    local_weights,
    part_of,
    plain_parameters,
    resharded,
    write_local,
    write_weight,
)

log = logging.getLogger(__name__)

ALGORITHMS = ("none", "iterative", "onmcpo", "apo")


@dataclass
class OnlineConfig:
    """The `online=` group (conf/online/*.yaml), checked."""

    algorithm: str = "none"
    rounds: int = 3
    prompts_per_round: int | None = None
    alpha: float = 0.0
    ref: str = "previous"
    beta_schedule: list[float] | None = None
    keep_weights: bool = True
    kl_estimate: bool = True
    num_samples_logged: int = 8

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"online.algorithm={self.algorithm!r}: choose {', '.join(ALGORITHMS)} (online=<name>)")
        if self.algorithm == "none":
            return
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise InputError(f"online.rounds={self.rounds!r}: must be an integer >= 1")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise InputError(f"online.prompts_per_round={self.prompts_per_round!r}: must be >= 1, or null (folds)")
        if self.ref not in ("initial", "previous"):
            raise InputError(f"online.ref={self.ref!r}: choose initial (the starting policy) or previous "
                             "(the policy at the round's start)")
        if self.algorithm in ("iterative", "apo") and self.ref != "previous":
            raise InputError(f"online={self.algorithm} uses the policy at each round's start as the reference: "
                             "online.ref=initial is for online=onmcpo")
        if self.alpha and self.algorithm != "apo":
            raise InputError(f"online.alpha={self.alpha}: extrapolation is APO's (online=apo)")
        if self.beta_schedule is not None:
            self.beta_schedule = [float(b) for b in self.beta_schedule]
            if len(self.beta_schedule) != self.rounds or min(self.beta_schedule) <= 0:
                raise InputError(f"online.beta_schedule={self.beta_schedule}: give one β > 0 per round "
                                 f"(online.rounds={self.rounds}), or null for loss.beta every round")

    @property
    def enabled(self) -> bool:
        return self.algorithm != "none"

    @property
    def extrapolates(self) -> bool:
        """APO extrapolates every round but the last, α = 0 included (θ_t = θ̂_t then, by the same path)."""
        return self.algorithm == "apo"

    def beta(self, t: int, default: float) -> float:
        """β of round t (1-based)."""
        return self.beta_schedule[t - 1] if self.beta_schedule else default


def prompt_folds(prompts: list, rounds: int, per_round: int | None, *, source: str) -> list[list]:
    """Disjoint prompt folds, one per round: `per_round` prompts each, or the prompts split in `rounds` folds."""
    if per_round is None:
        per_round = len(prompts) // rounds
        if per_round == 0:
            raise InputError(f"online: {source} has {len(prompts)} prompts, fewer than online.rounds={rounds}")
    elif len(prompts) < rounds * per_round:
        raise InputError(f"online: {rounds} rounds x online.prompts_per_round={per_round} need {rounds * per_round} "
                         f"prompts, but {source} has {len(prompts)}: lower one of them")
    return [prompts[t * per_round : (t + 1) * per_round] for t in range(rounds)]


class Rounds:
    """The `rounds/` directory of a run: which rounds are done, and where each keeps its parts."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.root, self.enabled = Path(run_dir) / "rounds", enabled

    def dir(self, t: int) -> Path:
        return self.root / str(t)

    def done(self, t: int) -> dict | None:
        path = self.dir(t) / "round.json"
        return json.loads(path.read_text()) if path.exists() else None

    def completed(self, total: int) -> list[dict]:
        """The metrics of rounds 1.. that are done (a prefix: round t + 1 starts only after round t ended), as the
        main process reads them (every process calls this: on a network filesystem another node may see a stale
        listing, and the processes must take the same path)."""
        out = []
        for t in range(1, total + 1):
            done = self.done(t)
            if done is None:
                break
            out.append(done)
        return distributed.broadcast(out)

    def finish(self, t: int, metrics: dict, *, keep_weights: bool) -> None:
        """Mark round t done (atomically), drop its training checkpoints and its pool shards (pools.jsonl holds
        them), and without `keep_weights` the weights of round t - 1, which resume no longer needs."""
        if not self.enabled:
            return
        path = self.dir(t) / "round.json"
        storage.write_atomic(path, json.dumps(metrics, indent=2) + "\n")
        shutil.rmtree(self.dir(t) / "checkpoints", ignore_errors=True)
        shutil.rmtree(self.dir(t) / "shards", ignore_errors=True)
        if not keep_weights and t > 1:
            for name in ("policy", "policy_hat"):
                _remove(self.dir(t - 1) / name)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- the policy's weights ---------------------------------------------------------------------------


def _lora_layers(model) -> dict[str, object]:
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.get_base_model().named_modules() if isinstance(module, LoraLayer)}


def _base(model):
    return model.get_base_model() if hasattr(model, "peft_config") else model


@torch.no_grad()
def set_policy_weights(model, weights: dict[str, Tensor], *, seed: int) -> None:
    """Write `weights` (as `prefrun.model.full_weights` returns them, or a sharded policy's `LocalShards`) into the
    model. With LoRA they go into the base layers and the adapters restart (B = 0, A drawn from `seed`): the
    policy's function is exactly `weights`, and "adapters off" is now this policy, the next round's reference."""
    params = plain_parameters(model)  # (the shards: a gathered FSDP2 module is resharded first)
    missing, unknown = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unknown:
        raise InputError(f"online: saved weights do not fit the policy (missing {missing[:3]}, unknown {unknown[:3]}): "
                         "was the run directory made with another model?")
    parts = isinstance(weights, LocalShards)
    for name, param in params.items():  # this process's part, written in place
        value = weights[name]
        write_weight(model, param, value if parts and is_partitioned(param) else part_of(value, param))
    lora = _lora_layers(model)
    if lora:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for module in lora.values():
            for adapter in list(module.lora_A):
                _reset_adapter(module, adapter)
        torch.random.set_rng_state(state)


def _reset_adapter(module, adapter: str) -> None:
    """PEFT's own adapter initialisation (B = 0, A drawn). Sharded adapters (FSDP2, ZeRO-3) are drawn in full, as
    one process draws them, in plain tensors put in their place for the call, then cut to this process's part:
    drawn on the shards, they came out other than one process's (round 2 of an online LoRA run diverged)."""
    layers = [module.lora_A[adapter], module.lora_B[adapter]]
    sharded = {layer: layer.weight for layer in layers if is_partitioned(layer.weight)}
    for layer, param in sharded.items():
        layer.weight = torch.nn.Parameter(torch.empty(full_shape(param), dtype=param.dtype, device=local(param).device))
    try:
        module.reset_lora_parameters(adapter, True)
    finally:
        for layer, param in sharded.items():
            full = layer.weight.detach()
            layer.weight = param
            write_local(param, part_of(full, param))


def save_weights(model, tokenizer, weights: dict[str, Tensor], path: Path) -> None:
    """`weights` as a model directory (config, safetensors, tokenizer), written whole then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    needed = int(sum(t.numel() * t.element_size() for t in weights.values()) * 1.05)
    storage.ensure_space(path.parent, needed, f"the round's weights ({path.name})")
    try:
        distributed.save_pretrained(_base(model), tmp, state_dict=dict(weights))
        tokenizer.save_pretrained(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if storage.is_full(err):
            raise storage.disk_full(path, needed, err) from None
        raise
    _remove(path)
    os.replace(tmp, path)


WRITE_BUCKET_BYTES = 2**30  # the sharded policy's round weights are written in files of at most this size


def save_sharded_weights(model, tokenizer, shards: LocalShards, path: Path, *, writer: bool) -> None:
    """A sharded policy's weights (each process's `LocalShards`) as a model directory, like `save_weights`:
    gathered tensor by tensor from every process (every process calls this) and written by `writer` alone, in
    files of at most WRITE_BUCKET_BYTES with an index (`model.safetensors.index.json`, as transformers writes
    sharded checkpoints), so that no process ever holds more of the whole than one file. A disk error of the
    writer is raised on every process once the gather is through (one line: a full disk names the path)."""
    from safetensors.torch import save_file

    tmp, failed, index = path.with_name(path.name + ".tmp"), [], {}
    params = plain_parameters(model)
    needed = int(sum(params[n].numel() * shards[n].element_size() for n in shards) * 1.05)  # as written (fp32 masters)

    def attempt(work) -> None:  # only the writer writes; its first error waits for the end of the gather
        if writer and not failed:
            try:
                work()
            except OSError as err:
                failed.append(err)

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        storage.ensure_space(path.parent, needed, f"the round's weights ({path.name})")
        tmp.mkdir(parents=True)

    attempt(start)
    stream = iter_gathered(model, shards)
    if not writer:  # take part in every gather, keep nothing
        for _ in stream:
            pass
    for i, bucket in enumerate(_buckets(stream, WRITE_BUCKET_BYTES) if writer else []):
        name = f"model-{i + 1:05d}.safetensors"
        attempt(lambda bucket=bucket, name=name: save_file({n: t.contiguous() for n, t in bucket.items()},
                                                          str(tmp / name), metadata={"format": "pt"}))
        index.update(dict.fromkeys(bucket, name))

    def finish() -> None:
        base = _base(model)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": needed}, "weight_map": index}, indent=2))
        base.config.save_pretrained(tmp)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _remove(path)
        os.replace(tmp, path)

    attempt(finish)

    def raise_failure() -> None:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
            if storage.is_full(failed[0]):
                raise storage.disk_full(path, needed, failed[0]) from None
            raise failed[0]

    distributed.together(raise_failure)


def link_weights(target: Path, path: Path) -> None:
    """`path` -> `target` (same directory): θ_t is θ̂_t when nothing is extrapolated."""
    _remove(path)
    path.symlink_to(target.name)


def load_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a model directory written by `save_weights`."""
    from safetensors.torch import load_file

    weights = {}
    for file in _weight_files(path):
        weights.update(load_file(file))
    return weights


def _weight_files(path: Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no *.safetensors weights: the round's weights were deleted "
                         "(online.keep_weights=false keeps only the last round's); start a new run directory")
    return files


def read_round_weights(model, path: Path) -> dict[str, Tensor]:
    """A round's weights (`save_weights`' directory, tied weights completed) as `set_policy_weights` and APO's
    extrapolation take them: whole, or for a sharded policy (FSDP2, ZeRO-3) this process's parts (`LocalShards`),
    read a tensor at a time, so that no process holds the whole model (a resumed run's θ̂_{t-1} is kept all round)."""
    if not distributed.is_sharded(model):
        return complete_tied(model, load_weights(path))
    from safetensors import safe_open

    where = {}
    for file in _weight_files(path):
        handle = safe_open(str(file), framework="pt")
        where.update({key: handle for key in handle.keys()})
    params = plain_parameters(model)
    parts = LocalShards()
    for name, key in complete_tied(model, {key: key for key in where}).items():
        whole = where[key].get_tensor(key)
        parts[name] = part_of(whole, params[name]).to("cpu", copy=True) if is_partitioned(params[name]) else whole
    return parts


def complete_tied(model, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """save_pretrained leaves out tied weights (lm_head = embeddings); put them back under every name."""
    out = dict(weights)
    names = {}
    for name, param in _base(model).named_parameters(remove_duplicate=False):
        if "lora_" not in name:
            names.setdefault(param.data_ptr(), []).append(name.replace(".base_layer.", "."))
    for group in names.values():
        present = next((n for n in group if n in out), None)
        for name in group:
            if present is not None:
                out.setdefault(name, out[present])
    kept = {n.replace(".base_layer.", ".") for n, _ in _base(model).named_parameters() if "lora_" not in n}
    return {name: value for name, value in out.items() if name in kept}


@contextmanager
def swapped_in(model, state: dict[str, Tensor]) -> Iterator[None]:
    """Run the block with `state` (a full `model.state_dict()` copy, taken before the model was sharded or not)
    in the model, then put its weights back: the initial weights' log-probs without a second model in memory
    (one extra copy on the CPU). Once the model is sharded (FSDP2, ZeRO-3), `state` keeps only this process's
    part of each tensor from then on (replaced in place): 1/N of the copy. Written part by part, in place
    (`local`): a ZeRO-3 module's state_dict holds no weights."""
    resharded(model)
    own = model.state_dict(keep_vars=True)
    if set(own) != set(state):
        raise InputError(f"online: the initial weights do not fit the policy (missing "
                         f"{sorted(set(own) - set(state))[:3]}, unknown {sorted(set(state) - set(own))[:3]})")
    current = {name: local(tensor).detach().to("cpu", copy=True) for name, tensor in own.items()}
    for name, value in state.items():  # whole the first time (a part's shape is another, or cuts to itself)
        if is_partitioned(own[name]) and tuple(value.shape) == full_shape(own[name]):
            state[name] = part_of(value, own[name]).to("cpu", copy=True)

    def write(values: dict[str, Tensor]) -> None:
        for name, tensor in own.items():
            write_local(tensor, values[name])

    write(state)
    try:
        yield
    finally:
        resharded(model)
        write(current)


# -- the pieces of a round that run.run_rounds calls ------------------------------------------------------


def cpu_state(model) -> dict:
    """The model's state on the CPU (sharded: each process its own part of each tensor). A weight held in fp32
    whose values the dtype the model was loaded in holds exactly (the start of a bf16 model: `hold_in_fp32`) is
    kept in that dtype: half the host memory, nothing lost (`swapped_in` writes it back in the parameter's dtype)."""
    loaded = loaded_dtype(model)

    def kept(tensor):
        tensor = local(tensor).detach().to("cpu", copy=True)  # a sharded model's: this process's part
        if loaded in (torch.bfloat16, torch.float16) and tensor.dtype == torch.float32:
            narrow = tensor.to(loaded)
            if torch.equal(narrow.to(torch.float32), tensor):
                return narrow
        return tensor

    return {name: kept(tensor) for name, tensor in model.state_dict().items()}


def evaluate_start(rounds: Rounds, evaluate, policy) -> dict:
    """The judged evaluation of the starting policy, once per run directory (a resumed run reads it back)."""
    path = rounds.root / "before.json"
    if distributed.everywhere(path.exists()):
        return json.loads(path.read_text())
    before = evaluate(policy, None)
    if rounds.enabled:
        rounds.root.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(path, json.dumps(before))
    return before


def restore_round(policy, tokenizer, rounds: Rounds, t: int, online: OnlineConfig, lora: bool, seed: int) -> None:
    """θ_t, the weights round t left for round t + 1 (LoRA without merging: the adapters themselves)."""
    adapter = rounds.dir(t) / "adapter"
    if distributed.broadcast(adapter.exists()):  # (the main process's view: every process takes the same path)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy, load_file(adapter / "adapter_model.safetensors"))
        return
    set_policy_weights(policy, read_round_weights(policy, rounds.dir(t) / "policy"), seed=seed * 1_000 + t + 1)


def merges_adapters(online: OnlineConfig, lora: bool) -> bool:
    """With LoRA, each round's adapters are merged into the base and restarted, so that "adapters off" is the
    next round's reference and extrapolation acts on W + B·A, except with ref=initial (then "adapters off" must
    stay the starting policy: the adapters keep training across rounds)."""
    return lora and online.ref == "previous"


@torch.no_grad()
def attach_round_reference(online: OnlineConfig, policy, tokenizer, examples, initial, lora: bool, *,
                           batch_size: int) -> tuple[float, float] | None:
    """Attach the round's reference log-probs (ref=previous: the policy now, at the round's start; ref=initial:
    the starting weights, LoRA: adapters off, else swapped in from their CPU copy). Returns the estimate
    E_y~π_t[log π_t(y) − log π_0(y)] of KL(π_t ‖ π_0) over the round's candidates (exact in expectation when
    they are sampled at temperature 1, top-p 1) and its standard error (`kl_estimate`), or None with
    online.kl_estimate=false."""
    faults.inject("reference")
    batch = batch_size * max(1, max(len(ex.completion_ids) for ex in examples))
    pad_id = tokenizer.pad_token_id

    def initial_logps():
        if lora and not merges_adapters(online, lora):
            with policy.disable_adapter():
                return split_candidate_logps(policy, examples, pad_id, batch_size=batch)
        with swapped_in(policy, initial):
            return split_candidate_logps(policy, examples, pad_id, batch_size=batch)

    current = split_candidate_logps(policy, examples, pad_id, batch_size=batch) \
        if online.ref == "previous" or online.kl_estimate else None
    start = initial_logps() if online.ref == "initial" or online.kl_estimate else None
    reference = start[0] if online.ref == "initial" else current[0]
    for example, row in zip(examples, reference.tolist()):
        example.reference_logps = row[: len(example.completion_ids)]
    if not online.kl_estimate:
        return None
    return kl_estimate(current[0] - start[0], current[1] > 0)


def kl_estimate(log_ratios: Tensor, mask: Tensor) -> tuple[float, float]:
    """The mean of the candidates' log π_t(y) − log π_0(y) ([prompts, K], `mask`: the candidates there are) and
    its standard error. A prompt's candidates are not independent draws of the estimate's terms (they share
    the prompt), so the error is the cluster-robust one of a ratio over prompts, Σ_i s_i / Σ_i n_i (s_i: prompt
    i's sum, n_i: its count): √(m/(m−1) Σ_i (s_i − mean·n_i)²) / Σ_i n_i over m prompts. An unbiased
    estimate can come out below 0 when the KL is small; the error says whether it is distinguishable from 0."""
    ratios = torch.where(mask, log_ratios, torch.zeros_like(log_ratios)).double()
    sums, counts = ratios.sum(1), mask.sum(1).double()
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    mean = sums.sum() / total
    prompts = int((counts > 0).sum())
    if prompts < 2:
        return mean.item(), float("nan")
    spread = ((sums - mean * counts) ** 2).sum() * prompts / (prompts - 1)
    return mean.item(), (spread.sqrt() / total).item()


def finish_weights(policy, tokenizer, rounds: Rounds, t: int, online: OnlineConfig, lora: bool, previous_hat, seed: int,
                 evaluate, before, carried: dict | None = None) -> tuple[dict | None, dict]:
    """Keep θ̂_t (rounds/<t>/policy_hat), evaluate it, and leave in `policy` θ_t, what round t + 1 starts from:
    APO's extrapolation (evaluated too), else θ̂_t itself (LoRA: merged, fresh adapters). Returns θ̂_t when APO
    needs it next round, and the evaluations (with their time, `eval_s`). `carried`: the round trained nothing
    (no usable pools), so θ_t = θ̂_t = θ_{t-1}, kept on disk like a trained round's, never extrapolated (APO's
    next momentum starts from θ_{t-1}), and its evaluation is `carried`, θ_{t-1}'s."""
    where, last_round = rounds.dir(t), t == online.rounds
    # A sharded policy: each process keeps its own shard of θ̂_t (the extrapolation and the merge are elementwise)
    # and the writer gets the whole, gathered tensor by tensor: every process takes part, also those that write
    # nothing. Never a whole copy of the model on every process.
    sharded = distributed.is_sharded(policy)
    # ZeRO-1/2 in 16 bits: θ̂_t's fp32 masters are put together from every process's fragment (a collective).
    in_step = sharded or holds_fp32_fragments(policy)
    needs_weights = online.extrapolates or merges_adapters(online, lora) or rounds.enabled or in_step
    hat = None if not needs_weights else local_weights(policy) if in_step else full_weights(policy)
    if sharded and previous_hat is not None and not isinstance(previous_hat, LocalShards):
        previous_hat = local_shards(policy, previous_hat)  # kept whole since the start, or read back on resume
    adapters = adapter_state(policy) if lora and not merges_adapters(online, lora) else None  # gathered if sharded
    if sharded:  # gathered by all, written by one, a file at a time
        save_sharded_weights(policy, tokenizer, hat, where / "policy_hat", writer=rounds.enabled)

    def keep_hat() -> None:  # one writer; a full disk there stops every process with its line
        if rounds.enabled:
            if not sharded:
                save_weights(policy, tokenizer, hat, where / "policy_hat")
            if lora and not merges_adapters(online, lora):  # what resume restores: the adapters keep training
                policy.save_pretrained(where / "adapter", **({} if adapters is None else {"state_dict": adapters}))

    distributed.together(keep_hat)
    clock = time.perf_counter()
    evaluated = {"policy_hat": evaluate(policy, before) if carried is None else carried}
    eval_s = time.perf_counter() - clock
    if online.extrapolates and not last_round and carried is None:
        faults.inject("extrapolate", t)
        extrapolated = extrapolate_parameters(hat, previous_hat, online.alpha)
        if sharded:
            extrapolated = LocalShards(extrapolated)
        set_policy_weights(policy, extrapolated, seed=seed * 1_000 + t + 1)
        if sharded:
            save_sharded_weights(policy, tokenizer, extrapolated, where / "policy", writer=rounds.enabled)
        else:
            distributed.together(lambda: save_weights(policy, tokenizer, extrapolated, where / "policy")
                                 if rounds.enabled else None)
        clock = time.perf_counter()
        evaluated["policy"] = evaluate(policy, before)
        eval_s += time.perf_counter() - clock
    else:
        if merges_adapters(online, lora):
            set_policy_weights(policy, hat, seed=seed * 1_000 + t + 1)
        if rounds.enabled:
            link_weights(where / "policy_hat", where / "policy")
    return (hat if online.extrapolates else None), {**evaluated, "eval_s": eval_s}


def round_row(t: int, step: int, beta: float, records: list[dict], examples, tokenizer, kl, times: dict,
               sync: dict, evaluated: dict, skipped: dict) -> dict:
    texts = [text for r in records for text in r["candidates"]]
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    row = {"round": t, "step": step, "round/beta": beta, "round/num_prompts": len(records),
           "round/num_examples": len(examples), "round/skipped": sum(skipped.values()),
           "round/trained": int(bool(examples)),
           "round/empty_completions": sum(not text.strip() for text in texts) / max(1, len(texts)),
           "round/response_length": sum(lengths) / max(1, len(lengths)),
           "round/judge_score": sum(sum(r["scores"]) / len(r["scores"]) for r in records) / max(1, len(records))}
    if kl is not None:
        row["round/kl_to_initial"], row["round/kl_to_initial_stderr"] = kl
    for which, results in evaluated.items():
        for decoding, result in results.items():
            if not result.get("relative"):  # (a pairwise judge's mean is 0.5 whatever the policy: left out)
                row[f"round/eval/{which}/{decoding}/mean"] = result["mean"]
                row[f"round/eval/{which}/{decoding}/stderr"] = result["stderr"]
            pairwise = result.get("vs_start")
            if pairwise:  # against the starting policy, pairwise (docs/evaluation.md)
                prefix = f"round/eval/{which}/{decoding}"
                row[f"{prefix}/win_rate"] = pairwise["win_rate"]
                row[f"{prefix}/win_rate_low"], row[f"{prefix}/win_rate_high"] = pairwise["win_rate_interval"]
                row[f"{prefix}/lc_win_rate"] = pairwise["lc_win_rate"]
    row.update({f"round/time/{k}": v for k, v in times.items()})
    row.update(sync)
    return row


def warn_untrained(t: int, total: int, records: list[dict], skipped: dict) -> None:
    """The line of a round whose pools were all skipped: it trains nothing and the policy carries over."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]))
    empty = all(not text.strip() for r in records for text in r["candidates"])
    hint = ("; every completion the generator returned is empty: check generator.max_new_tokens, generator.stop "
            "and the end-of-turn token of the chat template") if empty else ""
    log.warning("round %d/%d: no usable pools (%d prompts: %s): the round trains nothing and the policy carries "
                "over%s (round/trained=0)%s", t, total, len(records), reasons or "none", f" to round {t + 1}"
                if t < total else "", hint)


def log_round(row: dict, total: int) -> None:
    def label(key: str) -> str:  # round/eval/<policy_hat|policy>/<decoding>/mean
        _, _, which, decoding, _ = key.split("/")
        return decoding if which == "policy_hat" else f"extrapolated {decoding}"

    scores = ", ".join(f"{label(k)} {v:.3f} ± {row[k.replace('/mean', '/stderr')]:.3f}"
                       for k, v in row.items() if k.startswith("round/eval/") and k.endswith("/mean"))
    wins = ", ".join(f"{label(k.replace('/win_rate', '/mean'))} {v:.3f} [{row[k + '_low']:.3f}, {row[k + '_high']:.3f}]"
                     for k, v in row.items() if k.startswith("round/eval/") and k.endswith("/win_rate"))
    wins = f"; win rate against the start: {wins}" if wins else ""
    split = ", ".join(f"{k.removeprefix('round/time/').removesuffix('_s')} {v:.1f} s" for k, v in row.items()
                      if k.startswith("round/time/"))
    kl = f"KL to initial {row['round/kl_to_initial']:.3f} ± {row['round/kl_to_initial_stderr']:.3f}" \
        if "round/kl_to_initial" in row else ""
    sync = f", sync diff {row['sync/max_abs_logp_diff']:.1e}" if "sync/max_abs_logp_diff" in row else ""
    judged = f"judged {scores}{wins}" if scores else f"judged{wins.removeprefix(';')}" if wins else \
        "no judged evaluation"
    log.info("round %d/%d: %s%s; pool score %.3f, length %.1f%s; time: %s", row["round"], total, judged,
             f", {kl}" if kl else "", row["round/judge_score"], row["round/response_length"], sync, split)
