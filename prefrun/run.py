"""The pipeline of `prefrun train`, top to bottom.

Offline (`online=none`, `run`): load task and policy -> preference data: pairs or pools (generated and judged
when the data is the task's) (+ held-out examples) -> reference log-probs of every candidate (cached) -> judged
eval before -> train (negatives drawn from the pools under the current policy) -> judged eval after, held-out
metrics -> save checkpoint and summary.

Online (`online=iterative|onmcpo|apo`, `run_rounds`): the same pieces per round over disjoint prompt folds:
sync the generator to the policy (verified by a probe) -> generate -> judge -> pairs or pools -> reference
log-probs -> train -> (APO) extrapolate -> judged eval; each round kept under <run dir>/rounds/<t>/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefrun import distributed, faults
from prefrun.checkpoint import Checkpoints
from prefrun.data import (
    GeneratedPreferences,
    attach_reference_logps,
    context_length,
    fitting_prompts,
    prompt_limit,
)
from prefrun.errors import InputError
from prefrun.evaluate import judged_scores, preference_metrics, without_completions
from prefrun.generate import VLLMGenerator, as_chat
from prefrun.judges import RuleJudge
from prefrun.judgments import JudgmentCache
from prefrun.logprobs import use_packed_attention
from prefrun.model import (
    adapter_state,
    check_zero3_writable,
    fingerprint,
    full_weights,
    hold_in_fp32,
    holds_fp32_masters,
    load_policy,
    load_reference,
    load_tokenizer,
    loaded_dtype,
    local_weights,
    mark_deepspeed_16_bit,
    merge_lora_in_fp32,
    merges_lora_in_fp32,
    resharded,
    resolve_model_path,
    save_policy,
    weights_of,
)
from prefrun.online import (
    OnlineConfig,
    Rounds,
    attach_round_reference,
    cpu_state,
    evaluate_start,
    finish_weights,
    log_round,
    merges_adapters,
    prompt_folds,
    read_round_weights,
    restore_round,
    round_row,
    save_sharded_weights,
    save_weights,
    warn_untrained,
)
from prefrun.plan import plan
from prefrun.pools import make_pools, write_pools
from prefrun.runlog import RunLog
from prefrun.samplers import bias_warning
from prefrun.train import make_accelerator, train

log = logging.getLogger("prefrun")


def run(cfg: DictConfig) -> float | None:
    """Run one job; return what sweepers optimise: the held-out judged score after training, or the
    held-out pairs' reward accuracy when there is no judged task."""
    distributed.env_from_job()  # the submitit launcher's tasks (tasks_per_node > 1) as ranks
    if cfg.get("plan"):  # what the run would do and whether it fits; nothing is loaded
        plan(cfg, instantiate(cfg.task) if cfg.get("task") else None)
        return None
    accelerator = make_accelerator(cfg.trainer)
    distributed.quiet_other_processes()  # one console, one train.log: the main process's
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None
    record = RunLog(Path(hydra_cfg.runtime.output_dir), cfg, enabled=accelerator.is_main_process, sweep_name=sweep)
    distributed.shared_directory(record.dir, "the run directory", "give every machine the same run directory on a "
                                 "filesystem they all see, by an absolute path (hydra.run.dir=/shared/...)")
    cache_dir = Path(cfg.cache_dir).expanduser()
    set_seed(cfg.seed)
    log.info("accelerate: %d process(es), %s, %s, mixed precision %s", accelerator.num_processes,
             _distributed_type(accelerator), accelerator.device, accelerator.mixed_precision)

    task = instantiate(cfg.task) if cfg.get("task") else None  # `~task`: no built-in task
    online = instantiate(cfg.online)
    if online.enabled:
        return run_rounds(cfg, online, accelerator=accelerator, record=record, task=task)
    checkpoints = Checkpoints(record.dir / "checkpoints", cfg.trainer.save_every, cfg.trainer.keep_last)
    checkpoints.check_processes(accelerator.num_processes)  # a resume refused before anything loads
    data = instantiate(cfg.data)
    data.check()
    sampler, loss_fn = instantiate(cfg.sampler), instantiate(cfg.loss)
    _warn_if_biased(cfg, sampler)
    policy, tokenizer, name_or_path = _load_policy(cfg, task, cache_dir, accelerator)
    judge, generator = _judge(cfg, task), instantiate(cfg.generator)
    _self_rewarding(judge, policy, tokenizer, accelerator)
    try:
        data.fit_to(policy)
        examples = data.load(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir,
                             generator=generator, judge=judge, pools=sampler.uses_pools)
    finally:
        generator.close()  # a persistent vLLM engine is not needed once the pools exist
    held_out = data.load_eval(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir,
                              pools=sampler.uses_pools)
    _attach_reference(cfg, accelerator, policy, tokenizer, [examples, held_out], cache_dir)

    evaluate = _judged_evaluation(cfg, data, task, judge, tokenizer, context_length(generator, policy))
    before = evaluate(policy, None)
    judge.close()  # a reward model leaves memory while training runs; it loads again for the evaluation after
    last = train(policy, tokenizer, examples, loss_fn=loss_fn, beta=cfg.loss.beta, sampler=sampler,
                 optimizer_factory=instantiate(cfg.optim), cfg=cfg.trainer, accelerator=accelerator, seed=cfg.seed,
                 on_log=record.metrics, on_resume=record.truncate_metrics, checkpoints=checkpoints)
    policy = accelerator.unwrap_model(policy)
    after = evaluate(policy, before)
    judge.close()
    with accelerator.autocast():  # the precision the held-out reference log-probs were computed in
        held_out_after = preference_metrics(policy, tokenizer, held_out, loss_fn=loss_fn, beta=cfg.loss.beta,
                                            batch_size=_scoring_batch(cfg)) if held_out else {}

    _save_final(cfg, accelerator, policy, tokenizer, record.dir)
    if accelerator.is_main_process:
        summary = record.summary({"model": name_or_path, "num_examples": len(examples), "skipped": data.skipped,
                                  "final": last, "eval_before": without_completions(before), "eval_after": after,
                                  "held_out_after": held_out_after})
        _report(summary, cfg.eval.get("primary"), record.dir)
    primary = cfg.eval.get("primary")
    return _primary_value(after, primary) if primary in after else held_out_after.get("rewards/accuracy")


def run_rounds(cfg: DictConfig, online: OnlineConfig, *, accelerator, record: RunLog, task) -> float | None:
    """`online=iterative|onmcpo|apo`: T rounds over disjoint prompt folds, each one generating from the current
    policy (docs/algorithms.md, "Online rounds"). A killed run continues from its last finished round, inside
    a round from its pools on disk and its last training checkpoint."""
    data, sampler = instantiate(cfg.data), instantiate(cfg.sampler)
    _check_online(cfg, online, data)
    if accelerator.distributed_type == "DEEPSPEED":  # refused before anything runs, not after round 1
        check_zero3_writable(accelerator.state.deepspeed_plugin.deepspeed_config)
    _warn_if_biased(cfg, sampler)
    rounds = Rounds(record.dir, enabled=accelerator.is_main_process)
    global_batch = cfg.trainer.batch_size * cfg.trainer.grad_accum * accelerator.num_processes
    _check_resumable(cfg, rounds, online.rounds, global_batch, accelerator.num_processes)
    all_done = len(rounds.completed(online.rounds)) == online.rounds  # (every process: the main one's reading)
    finished = distributed.broadcast(_finished(record.dir, online.rounds) if all_done and accelerator.is_main_process
                                     else None)
    if finished is not None:  # the same command again, after the run ended: nothing loads, nothing is rewritten
        log.info("online: the run is finished (all %d rounds, %s): nothing to do; its results are in summary.json "
                 "(delete it to evaluate and save again)", online.rounds, record.dir)
        primary, after = cfg.eval.get("primary"), finished.get("eval_after") or {}
        return _primary_value(after, primary) if primary in after else None
    cache_dir = Path(cfg.cache_dir).expanduser()
    policy, tokenizer, name_or_path = _load_policy(cfg, task, cache_dir, accelerator)
    generator, judge = instantiate(cfg.generator), _judge(cfg, task)
    _self_rewarding(judge, policy, tokenizer, accelerator)
    limit, why = prompt_limit(data, generator, policy)
    prompts = fitting_prompts(data.train_prompts(task, tokenizer, generator), tokenizer, limit=limit, why=why,
                              source=data.prompt_source)
    folds = prompt_folds(prompts, online.rounds, online.prompts_per_round, source=data.prompt_source)
    evaluate, eval_backend = _round_evaluation(_judged_evaluation(cfg, data, task, judge, tokenizer,
                                                                  context_length(generator, policy)),
                                               cfg, generator, tokenizer, folds[0])
    lora, steps_before = bool(cfg.model.get("lora")), 0
    # Kept only where a round needs them: the starting weights (reference / KL) and θ̂_{t-1} (APO's momentum).
    initial = cpu_state(policy) if online.ref == "initial" or online.kl_estimate else None
    previous_hat = (local_weights(policy) if distributed.is_sharded(policy) else full_weights(policy)) \
        if online.extrapolates else None
    before = evaluate_start(rounds, lambda model, start: evaluate(model, start, 0), policy)
    started = {result.get("generator", "hf") for result in before.values()}
    if started and started != {eval_backend}:  # a resumed run whose start another backend sampled
        log.warning("online: the start's evaluation (%s) was sampled by %s and this run's rounds sample with %s "
                    "(eval.generator): the win rates against the start compare the two backends' samples",
                    rounds.root / "before.json", ", ".join(sorted(started)), eval_backend)
    done = rounds.completed(online.rounds)
    if done:
        t = len(done)
        log.info("online: round%s done (%s); continuing with round %d", f" 1 of {online.rounds} is" if t == 1
                 else f"s 1-{t} of {online.rounds} are", rounds.root, t + 1)
        restore_round(policy, tokenizer, rounds, t, online, lora, cfg.seed)
        if online.extrapolates:
            previous_hat = read_round_weights(policy, rounds.dir(t) / "policy_hat")
        steps_before = done[-1]["step"]
    last, results = {}, list(done)
    try:
        for t in range(len(done) + 1, online.rounds + 1):
            set_seed(cfg.seed * 1_000 + t)  # a round depends on (seed, round, weights): resumable by round
            faults.inject("round", t)
            where, times = rounds.dir(t), {}
            checkpoints = Checkpoints(where / "checkpoints", cfg.trainer.save_every, cfg.trainer.keep_last)
            resume_at = checkpoints.latest()
            # Rows a killed attempt at this round wrote after its last checkpoint are written again.
            record.truncate_metrics(steps_before + (int(resume_at.name.split("-")[1]) if resume_at else 0))
            # (a) the generator serves the current policy: pushed, then verified by the probe
            clock = time.perf_counter()
            # Every process syncs its own engine; a stale one on any process stops them all, naming it.
            distributed.together(generator.sync, accelerator.unwrap_model(policy), tokenizer, probe_prompts=folds[0],
                                 version=t - 1)
            times["sync_s"] = time.perf_counter() - clock
            # (b, c) K candidates per prompt of this round's fold, judged; kept in shards (resumable)
            _self_rewarding(judge, accelerator.unwrap_model(policy), tokenizer, accelerator)
            clock, counts = time.perf_counter(), {}
            records = make_pools(folds[t - 1], generator=generator, judge=judge, model=policy, tokenizer=tokenizer,
                                 out_dir=where / "shards", seed=_round_seed(generator.seed, cfg.seed, t), timings=counts,
                                 job={"round": t, "generator": repr(generator), "judge": judge.identity()})
            times.update({k: counts.get(k, 0.0) for k in ("generate_s", "judge_s")})
            sync = dict(generator.sync_stats)  # the round's push (an evaluation through the engine pushes again)
            if accelerator.is_main_process:
                write_pools(records, where / "pools.jsonl")
            generator.sleep()  # a persistent engine frees the accelerator while training runs (CUDA sleep mode)
            judge.close()
            # (d) pairs (best vs worst) or pools; (e) their reference log-probs. No usable pool (every one tied,
            # or only empty completions): the round trains nothing, θ_{t-1} carries over and is not re-evaluated.
            examples = data.examples(records, tokenizer, pools=sampler.uses_pools, where=str(where / "pools.jsonl"),
                                     allow_none=True)
            beta, kl, trained, carried = online.beta(t, cfg.loss.beta), None, {}, None
            clock = time.perf_counter()
            if examples:
                with accelerator.autocast():  # the training's precision (see _attach_reference)
                    kl = attach_round_reference(online, policy, tokenizer, examples, initial, lora,
                                                batch_size=_scoring_batch(cfg))
            else:
                warn_untrained(t, online.rounds, records, data.skipped.get("train", {}))
                carried = without_completions(before) if t == 1 else \
                    results[-1]["eval"].get("policy", results[-1]["eval"]["policy_hat"])
            times["reference_s"] = time.perf_counter() - clock
            # (f) train from θ_{t-1} with the one training loop; rows carry the round and a run-wide step
            clock = time.perf_counter()
            accelerator.free_memory()  # forget the previous round's prepared objects: a checkpoint holds this round's
            if examples:
                trained = train(policy, tokenizer, examples, loss_fn=instantiate(cfg.loss, beta=beta), beta=beta,
                                sampler=sampler, optimizer_factory=instantiate(cfg.optim), cfg=cfg.trainer,
                                accelerator=accelerator, seed=cfg.seed * 1_000 + t,
                                on_log=lambda row, t=t, s=steps_before: record.metrics(
                                    {**row, "round": t, "round_step": row["step"], "step": s + row["step"]}),
                                checkpoints=checkpoints)
                policy, last = accelerator.unwrap_model(policy), trained
            times["train_s"] = time.perf_counter() - clock
            # (g) keep θ̂_t; APO: θ_t = θ̂_t + α(θ̂_t − θ̂_{t-1}) is what round t + 1 generates from
            clock = time.perf_counter()
            previous_hat, evaluated = finish_weights(policy, tokenizer, rounds, t, online, lora, previous_hat, cfg.seed,
                                                   lambda model, start, t=t: evaluate(model, start, t), before,
                                                   carried)
            times["eval_s"] = evaluated.pop("eval_s")
            times["extrapolate_s"] = time.perf_counter() - clock - times["eval_s"]
            # (h) the round's row: held-out judged scores, KL, lengths, time split, sync
            steps_before += trained.get("step", 0)
            row = round_row(t, steps_before, beta, records, examples, tokenizer, kl, times, sync,
                             evaluated, data.skipped.get("train", {}))
            samples = [{"prompt": r["prompt"], "completion": r["candidates"][0], "score": r["scores"][0]}
                       for r in records[: online.num_samples_logged]]
            record.round(row, samples)
            rounds.finish(t, {**row, "eval": evaluated, "samples": samples, "train/global_batch": global_batch,
                              "generate/prompts_per_process": counts.get("prompts_per_process", []),
                              "generate/engine_processes": counts.get("engine_processes", [])},
                          keep_weights=online.keep_weights)
            results.append({**row, "eval": evaluated, "samples": samples})
            log_round(row, online.rounds)
    finally:
        generator.close()
        judge.close()

    if results and not any(r.get("round/trained", 1) for r in results):
        log.warning("online: none of the %d rounds trained (every pool was skipped, lines above): the final policy "
                    "is the starting one", len(results))
    # θ̂_T: no extrapolation after the last round. With merged LoRA rounds the base holds it, the adapters are fresh.
    _save_final(cfg, accelerator, policy, tokenizer, record.dir, merged_rounds=merges_adapters(online, lora))
    after = results[-1]["eval"].get("policy_hat", {}) if results else {}
    if accelerator.is_main_process:
        summary = record.summary({"model": name_or_path, "online": OmegaConf.to_container(cfg.online), "rounds": results,
                                  "final": last or (results[-1] if results else {}), "eval_before": without_completions(before),
                                  "eval_after": after, "held_out_after": {}})
        _report(summary, cfg.eval.get("primary"), record.dir)
    primary = cfg.eval.get("primary")
    return _primary_value(after, primary) if primary in after else None


def _finished(run_dir: Path, total: int) -> dict | None:
    """The summary.json of a run whose rounds are all done, if it is that run's (written last, after
    checkpoint-final, with its `total` rounds: one of a run since extended, stopped before its summary, is not)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if len(summary.get("rounds") or []) == total else None


def _round_seed(generator_seed: int, seed: int, t: int) -> int:
    """Round t's sampling seed: every round and every run seed samples afresh (offline runs share one data set
    across seeds instead, cached); the same (generator.seed, seed, round) samples the same candidates."""
    return generator_seed + 1_000_003 * t + 1_009 * seed


def _check_resumable(cfg, rounds: Rounds, total: int, global_batch: int, processes: int) -> None:
    """Before anything loads: a run continues with another number of processes only at a round boundary (a round's
    checkpoints hold each process's part) and at the same global batch (the rounds' pools do not depend on it, but
    the training would)."""
    done = rounds.completed(total)
    if len(done) < total:  # first: inside a round, the number of processes is the one thing to change
        Checkpoints(rounds.dir(len(done) + 1) / "checkpoints", cfg.trainer.save_every,
                    cfg.trainer.keep_last).check_processes(processes)
    before = done[-1].get("train/global_batch", global_batch) if done else global_batch
    if before != global_batch:
        raise InputError(f"{rounds.dir(len(done))} trained with a global batch of {before} pairs (trainer.batch_size x "
                         f"trainer.grad_accum x processes) and this run's is {global_batch}: set trainer.batch_size "
                         f"(or grad_accum) so that it stays {before}")


def _check_online(cfg, online: OnlineConfig, data) -> None:
    if not isinstance(data, GeneratedPreferences):
        raise InputError(f"online={online.algorithm} generates its data from the policy every round: use "
                         "data=task_pairs (the task's prompts, or data.prompts.path=<prompts data set>)")
    mcpo = cfg.loss._target_.rsplit(".", 1)[-1].startswith("mcpo")
    if online.algorithm == "onmcpo" and not mcpo:
        raise InputError("online=onmcpo trains with an MC-PO loss: add loss=mcpo_cd sampler=cd (the consistent pairing) "
                         "or use experiment=onmcpo_tiny")
    if online.algorithm in ("iterative", "apo") and mcpo:
        raise InputError(f"online={online.algorithm} is DPO on best-vs-worst pairs: use loss=dpo (or loss=ipo), "
                         "or online=onmcpo for MC-PO")


def _judge(cfg, task):
    """The `judge=` config's judge; the task is passed as is (Hydra would turn a dataclass kwarg into a config).
    Its pairwise verdicts (pools of a pairwise or LLM judge, the win rates) go through the judgment cache."""
    judge = instantiate(cfg.judge, _partial_=True)(task=task)
    directory = (cfg.get("eval") or {}).get("judgments_dir")
    if directory:
        judge.keep_judgments(JudgmentCache(directory))
    return judge


def _self_rewarding(judge, policy, tokenizer, accelerator) -> None:
    """judge=llm judge.name_or_path=policy: the policy judges its own candidates, with its weights as they are
    now (called again each round; the judgment cache keys by those weights)."""
    if getattr(judge, "judges_with_the_policy", False):
        judge.use_policy(policy, tokenizer, will_shard=_distributed_type(accelerator) in ("FSDP", "DEEPSPEED ZeRO-3"))


def _warn_if_biased(cfg, sampler) -> None:
    warning = bias_warning(cfg.loss._target_.rsplit(".", 1)[-1], sampler)
    if warning:
        log.warning("%s", warning)


def _no_evaluation(model, before, engine=None) -> dict:
    return {}


def _judged_evaluation(cfg, data, task, judge, tokenizer, context: int | None):
    """`evaluate(model, before, engine=None) -> results`: completions of held-out prompts judged before and after
    training. The prompts are the task's held-out ones when training on the task, else the data's held-out
    records' (data.eval_size / data.eval_split): a run on a user's data is never scored on the built-in task.
    A prompt that leaves no room for a completion in the model's `context` is skipped (counted in one line)."""
    if not cfg.eval.num_prompts or cfg.eval.judge == "none":
        return _no_evaluation
    prompts = task.prompts("eval", cfg.eval.num_prompts) if data.uses_task else data.eval_prompts(cfg.eval.num_prompts)
    if context:
        prompts = fitting_prompts(prompts, tokenizer, limit=context - 1, source="the held-out prompts",
                                  why=f"the model's context is {context} tokens")
    if not prompts:
        log.info("judged evaluation: off (no held-out prompts: set data.eval_size or data.eval_split)")
        return _no_evaluation
    if cfg.eval.judge != "same":
        raise InputError(f"eval.judge={cfg.eval.judge!r}: choose same (the judge= config) or none")
    if isinstance(judge, RuleJudge) and not data.uses_task:
        log.info("judged evaluation: off (judge=rule scores the built-in task, but the data is yours: "
                 "judge=reward_model judge.name_or_path=<reward model> scores your held-out prompts)")
        return _no_evaluation
    judgments = JudgmentCache(cfg.eval.get("judgments_dir"))
    return lambda model, before, engine=None: judged_scores(model, tokenizer, prompts, judge, cfg.eval, cfg.seed,
                                                            before, judgments, engine=engine)


def _round_evaluation(evaluate, cfg, generator, tokenizer, probe_prompts: list):
    """`evaluate(model, before, version)` for online rounds, and who samples (hf | vllm). With a persistent vLLM
    engine and eval.generator=same the held-out prompts are sampled by the round's engine, first brought to the
    evaluated weights and probed (weight `version`: θ_0 is 0, round t's θ̂_t and APO's θ_t are t); otherwise by HF
    in this process, as offline runs are."""
    choice = cfg.eval.get("generator", "same")
    if choice not in ("same", "hf"):
        raise InputError(f"eval.generator={choice!r}: choose same (the run's generator: its vLLM engine in online "
                         "rounds) or hf")
    if evaluate is _no_evaluation or choice == "hf" or not isinstance(generator, VLLMGenerator) \
            or generator.mode != "persistent":
        return (lambda model, before, version: evaluate(model, before)), "hf"

    def through_engine(model, before, version: int) -> dict:
        # (what training left goes back to the device before the engine wakes: the generator's _make_room)
        distributed.together(generator.sync, model, tokenizer, probe_prompts=probe_prompts, version=version)
        return evaluate(model, before, engine=generator)

    return through_engine, "vllm"


def _load_policy(cfg, task, cache_dir: Path, accelerator):
    policy, tokenizer, name_or_path = load_policy(cfg.model, task, cache_dir)
    # Under FSDP the policy reaches the device as shards (fully_shard moves a layer at a time), never whole: a model
    # whose weights, in fp32 for training, fill a GPU trains sharded as long as its shards fit.
    if accelerator.distributed_type != "FSDP":
        policy.to(accelerator.device)
    # Every process generates and scores with rank 0's weights (FSDP's RAM-efficient loading leaves zeros on the
    # others until prepare()), checked by fingerprint.
    distributed.receive_weights(policy, fingerprint)
    _master_weights(cfg.trainer, accelerator, policy)
    policy = _sharded_from_the_start(accelerator, policy)
    if cfg.trainer.get("padding_free"):
        use_packed_attention(policy)  # scoring packs rows too: reference and training compute the same numbers
    return policy, tokenizer, name_or_path


def _distributed_type(accelerator) -> str:
    """accelerate's distributed type, with DeepSpeed's ZeRO stage."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
        kind += f" ZeRO-{zero.get('stage', 0)}"
    return kind


def _master_weights(cfg, accelerator, policy) -> None:
    """trainer.master_weights=fp32: the trainable weights of a 16-bit model held in fp32 from the start, so that
    pools, reference log-probs and training all see the same weights (DeepSpeed with bf16 or fp16 keeps fp32
    masters in its optimiser itself, and casts the model to 16 bits: `_in_deepspeed_precision`)."""
    choice = cfg.get("master_weights", "fp32")
    if choice not in ("fp32", "model"):
        raise InputError(f"trainer.master_weights={choice!r}: choose fp32 (trainable weights held in fp32) or model "
                         "(trained in the dtype the model was loaded in)")
    if choice == "fp32" and hasattr(policy, "peft_config") and loaded_dtype(policy) in (torch.bfloat16, torch.float16):
        merge_lora_in_fp32(policy)  # online rounds merge the adapters into a kept fp32 copy of the base's weights
    if accelerator.distributed_type == "DEEPSPEED" and accelerator.mixed_precision != "no":
        _in_deepspeed_precision(accelerator, policy)
        return
    if choice == "model":
        return
    upcast, loaded = hold_in_fp32(policy), str(loaded_dtype(policy)).removeprefix("torch.")
    if upcast:
        log.info("policy: %.2fM trainable weights loaded in %s are held and updated in fp32 (trainer.master_weights); "
                 "training computes in %s, sampling in %s", upcast / 1e6, loaded,
                 accelerator.mixed_precision.replace("no", "fp32"), loaded)


def _in_deepspeed_precision(accelerator, policy) -> None:
    """DeepSpeed with bf16 or fp16 casts the whole module to 16 bits when prepare() builds its engine (norms and
    embeddings too; its optimiser keeps the fp32 masters). The policy is cast as it is loaded, so that the pools,
    the reference log-probs and the evaluation before training compute what the first training step computes:
    scored with autocast over fp32 weights, a 2-process ZeRO-2 run in bf16 started at a step-1 loss of 0.6952,
    not ln 2. (A ZeRO-3 model that DeepSpeed partitioned as it was loaded is in its dtype already.)"""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is None:
        return
    mark_deepspeed_16_bit(policy)  # a round's fp32 weights become the next optimiser's masters
    params = list(policy.parameters())
    if not any(hasattr(p, "ds_id") for p in params) and any(p.dtype != dtype for p in params if p.is_floating_point()):
        policy.to(dtype)
        log.info("policy: cast to %s as DeepSpeed trains it (its optimiser holds fp32 master weights)",
                 str(dtype).removeprefix("torch."))


def _sharded_from_the_start(accelerator, policy):
    """Under FSDP the policy is sharded as soon as it is loaded (accelerate's prepare(): fully_shard with the
    config's mixed precision), not when round 1 trains: pools, reference log-probs and the evaluation before
    training run on the shards, each process holding its part of the model instead of all of it, and with the
    numbers training computes (FSDP's mixed precision casts every parameter to bf16, norms and embeddings
    included; autocast over whole fp32 weights does not, and the step-1 log-ratio would start off 0). train()
    prepares the model again with its optimiser (a sharded model stays as it is)."""
    if accelerator.distributed_type != "FSDP":
        return policy
    sharded = accelerator.prepare(policy)  # (FSDP2 takes a model without its optimiser through prepare() only)
    accelerator.free_memory()  # forget it: the training's prepare() registers it (a checkpoint saves it once)
    policy = accelerator.unwrap_model(sharded)
    # One forward through the root module, on every process: FSDP2 learns there which module is its root. The first
    # forward would otherwise come from PEFT's generate(), past the root (LoRA): "FSDP requires a single root".
    with torch.no_grad():
        policy(input_ids=torch.zeros(1, 1, dtype=torch.long, device=accelerator.device))
    resharded(policy)
    return policy


def _attach_reference(cfg, accelerator, policy, tokenizer, parts, cache_dir: Path) -> None:
    """The reference is the policy's starting weights (with LoRA: the base, adapters being zero at
    start) unless model.reference names another model. Its log-probs are computed (or loaded from
    the cache) before training, so no second model is held in memory while training; under the
    training's precision (bf16 autocast gives other log-probs than fp32: the cache keys by it), so
    that the policy/reference log-ratio starts at 0."""
    reference = load_reference(cfg.model)
    if reference is not None:
        reference.to(accelerator.device)
        distributed.receive_weights(reference, fingerprint, "reference")
        if cfg.trainer.get("padding_free"):
            use_packed_attention(reference)
    reference = reference or policy
    weights_key = fingerprint(reference) + _precision(accelerator)
    for examples in parts:
        if examples:
            with accelerator.autocast():
                attach_reference_logps(examples, reference, tokenizer, cache_dir=cache_dir,
                                       batch_size=_scoring_batch(cfg), weights_key=weights_key)


def _precision(accelerator) -> str:
    """What the cache keys by: fp32 keeps the key earlier runs wrote. FSDP's mixed precision computes other
    numbers than autocast (every parameter cast, not only the matmuls'): its own key."""
    if accelerator.mixed_precision == "no":
        return ""
    return f"/{accelerator.mixed_precision}" + ("/fsdp" if accelerator.distributed_type == "FSDP" else "")


def _scoring_batch(cfg) -> int:
    """Prompts per no-grad forward; by default the training micro-batch, which is known to fit."""
    return cfg.trainer.reference_batch_size or cfg.trainer.batch_size


def _save_final(cfg, accelerator, policy, tokenizer, run_dir: Path, *, merged_rounds: bool = False) -> None:
    """checkpoint-final. `merged_rounds`: online LoRA rounds merged each round's adapters into the base weights
    (`merges_adapters`): the adapters alone would be the last round's fresh ones, over a base that is no longer the
    one loaded, so the merged full model is saved whatever model.lora.merge says."""
    if not cfg.trainer.save_final:
        return
    lora = cfg.model.get("lora")
    merge = bool(lora and (lora.merge or merged_rounds))
    if lora and merged_rounds and not lora.merge:
        log.info("checkpoint-final holds the merged full model: online LoRA rounds merge each round's adapters into "
                 "the base weights (online.ref=previous), so adapters alone cannot hold the policy")
    path = run_dir / "checkpoint-final"
    if not lora and holds_fp32_masters(policy):  # DeepSpeed in 16 bits: the fp32 masters, as the rounds' files hold
        weights = local_weights(policy)  # put together from every process's fragments (ZeRO-1/2): a collective
        if distributed.is_sharded(policy):  # ZeRO-3: gathered a tensor at a time, written by the main process
            save_sharded_weights(policy, tokenizer, weights, path, writer=accelerator.is_main_process)
        else:
            distributed.together(lambda: save_weights(policy, tokenizer, weights, path)
                                 if accelerator.is_main_process else None)
        return
    # Every process takes part: under FSDP or DeepSpeed ZeRO-3 this gathers the shards (with LoRA under FSDP2:
    # the adapters, or the merged weights).
    if lora and (distributed.is_sharded(policy) or merge and merges_lora_in_fp32(policy)):
        # (a 16-bit base merged in fp32, from the kept copies a round left: merge_and_unload would merge in 16 bits)
        state_dict = full_weights(policy, buffers=True) if merge else adapter_state(policy)
    else:  # DeepSpeed gathers through its engine (the prepared model), not the module it wraps
        engine = next((m for m in accelerator._models if hasattr(m, "zero_gather_16bit_weights_on_model_save")),
                      policy)
        state_dict = None if lora else accelerator.get_state_dict(engine)
    if accelerator.is_main_process:
        save_policy(policy, tokenizer, path, merge_lora=merge, state_dict=state_dict)


def _primary_value(after: dict, primary: str) -> float | None:
    """What a job returns to a sweeper: eval.primary's judged score, or, where the judge's scores are relative
    (pairwise, llm: a prompt's mean is 0.5 whatever the policy), its win rate against the start."""
    result = after[primary]
    if not result.get("relative"):
        return result["mean"]
    return (result.get("vs_start") or {}).get("win_rate")


def _report(summary: dict, primary: str | None, run_dir: Path) -> None:
    for name in summary["eval_before"]:
        b, a = summary["eval_before"][name], summary["eval_after"][name]
        d = a["decoding"]
        how = "greedy" if d["temperature"] == 0 else f"T={d['temperature']}, top_p={d['top_p']}, n={d['num_samples']}"
        pairwise = a.get("vs_start")
        win = (f", win rate against the start {pairwise['win_rate']:.3f} [{pairwise['win_rate_interval'][0]:.3f}, "
               f"{pairwise['win_rate_interval'][1]:.3f}] (length-controlled {pairwise['lc_win_rate']:.3f})"
               if pairwise else "")
        if a.get("relative"):  # a prompt's mean is 0.5 by construction: only the comparison with the start says
            log.info("judged [%s%s] (%s, %d held-out prompts, %s; its scores rank a prompt's samples against each "
                     "other only)%s", name, ", primary" if name == primary else "", a["judge"], b["num_prompts"],
                     how, win or ": no comparison with the start")
            continue
        log.info("judged score [%s%s] (%s, %d held-out prompts, %s): before %.3f ± %.3f -> after %.3f ± %.3f%s",
                 name, ", primary" if name == primary else "", a["judge"], b["num_prompts"], how, b["mean"],
                 b["stderr"], a["mean"], a["stderr"], win)
    held_out = summary["held_out_after"]
    if held_out:
        log.info("held-out examples (%d): loss %.4f, reward accuracy %.3f, margin %.3f", held_out["num_examples"],
                 held_out["loss"], held_out["rewards/accuracy"], held_out["rewards/margin"])
    log.info("run directory: %s (%.0f s)", run_dir, summary["wall_time_s"])


def _job_output(output: Path) -> Path:
    """`output`, inside a grid (-m) under each job's own directory when relative: the jobs of `prefrun generate -m
    generator.temperature=0.5,1.0` all wrote pools.jsonl in the working directory (the second refused its shards)."""
    from hydra.core.hydra_config import HydraConfig

    if output.is_absolute() or not HydraConfig.initialized() or HydraConfig.get().mode.name != "MULTIRUN":
        return output
    return Path(HydraConfig.get().runtime.output_dir) / output


def generate_pools(cfg: DictConfig) -> Path:
    """`prefrun generate`: prompts (a data set's column, or the built-in task's train prompts) -> K candidates
    each from the model (generator=) -> judge scores (judge=) -> `cfg.output` as {prompt, candidates, scores}.
    Work is kept in shards beside the output: the same command, killed anywhere, continues where it stopped.
    Under `accelerate launch` the processes share the shards (each makes its own) and one writes the output."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    distributed.env_from_job()
    distributed.start(cfg.get("dist_timeout_s") or 1800)
    distributed.quiet_other_processes()
    set_seed(cfg.seed)
    task = instantiate(cfg.task) if cfg.get("task") else None
    generator, judge = instantiate(cfg.generator), _judge(cfg, task)
    if cfg.prompts.path:
        prompts = instantiate(cfg.prompts).prompts()
    elif task is not None:
        prompts = task.prompts("train", cfg.num_prompts)
    else:
        raise InputError("no prompts: set prompts.path=<data set> (and prompts.column), or keep the built-in task")
    if isinstance(generator, VLLMGenerator) and not cfg.model.get("lora"):
        # The engine loads the weights from their directory in its own process: none are needed here.
        name_or_path = resolve_model_path(cfg.model, task, cache_dir)
        policy, tokenizer = None, load_tokenizer(name_or_path, cfg.model)
    else:
        policy, tokenizer, name_or_path = load_policy(cfg.model, task, cache_dir)
        policy.to(distributed.device())
        received = distributed.receive_weights(policy, fingerprint)  # (their fingerprint, under several processes)
    prompts = as_chat(prompts, tokenizer, generator.chat_template)
    output = _job_output(Path(cfg.output).expanduser())
    # The weights, not only their path: shards of a model since retrained in the same directory are another job's.
    weights = (received or fingerprint(policy)) if policy is not None else weights_of(name_or_path, "model.name_or_path")
    job = {"model": name_or_path, "weights": weights, "lora": bool(cfg.model.get("lora")),
           "generator": repr(generator), "judge": judge.identity(),
           "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]}
    start = time.perf_counter()
    try:
        records = make_pools(prompts, generator=generator, judge=judge, model=policy, tokenizer=tokenizer,
                             out_dir=output.with_name(output.name + ".shards"), shard_size=cfg.shard_size, job=job,
                             model_path=None if cfg.model.get("lora") else name_or_path)
    finally:
        generator.close()
    judge.close()
    distributed.write_once(output, lambda path: write_pools(records, path))
    best = [max(r["scores"]) for r in records]
    mean = [sum(r["scores"]) / len(r["scores"]) for r in records]
    log.info("pools: %d prompts x %d candidates -> %s (%.0f s); %s: mean score %.3f, mean best %.3f",
             len(records), generator.num_candidates, output, time.perf_counter() - start, judge.name,
             sum(mean) / len(mean), sum(best) / len(best))
    return output

