"""`prefrun eval`: a model against a baseline on one prompt set, in the papers' terms.

    sides (policy, baseline: a model, a run directory's policies, or a file of outputs) -> prompts ->
    each side's answers (generator=, kept in resumable shards) -> every policy x baseline pair of a prompt
    judged (judge=, through the judgment cache) -> win rates, intervals, length control (winrate.py) ->
    eval.json, a table, W&B; each side's answers also in AlpacaEval's format.

Generation, judging and writing follow the pools' rules under `accelerate launch`: whole shards per process,
one writer per file, every process holding every result (distributed.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefrun import distributed, storage, winrate
from prefrun.errors import InputError
from prefrun.generate import VLLMGenerator, as_chat
from prefrun.judgments import JudgmentCache
from prefrun.model import fingerprint, load_policy, load_tokenizer, resolve_model_path, weights_of
from prefrun.pools import make_pools
from prefrun.runlog import RunLog

log = logging.getLogger("prefrun")


@dataclass
class Side:
    """One system being compared: answers come from a model (`model_path`) or from a file (`outputs`: the answers
    by prompt text)."""

    name: str  # its name in tables, eval.json and the outputs directory (model, baseline, round-2, ...)
    source: str  # what the user gave: a hub id, a directory or a file
    model_path: str | None = None
    model_settings: dict | None = None  # the model group's loading keys (dtype, trust_remote_code, ...)
    outputs: dict[str, list[list[str]]] | None = None  # prompt text -> each of its records' answers, in file order


def run(cfg: DictConfig) -> dict:
    distributed.env_from_job()
    distributed.start(cfg.get("dist_timeout_s") or 1800)
    distributed.quiet_other_processes()
    set_seed(cfg.seed)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = RunLog(run_dir, cfg, enabled=distributed.is_main())
    cache_dir = Path(cfg.cache_dir).expanduser()
    task = instantiate(cfg.task) if cfg.get("task") else None
    models = sides(cfg.policy, "policy", cfg, cache_dir)
    if cfg.baseline is None:
        baseline = starting_model(cfg.policy, cache_dir)
    else:
        (baseline,) = sides(cfg.baseline, "baseline", cfg, cache_dir, several=False)
    prompts = eval_prompts(cfg, task, [*models, baseline])
    judge = instantiate(cfg.judge, _partial_=True)(task=task)
    start = time.perf_counter()
    answers = {side.name: side_answers(side, prompts, cfg, task, cache_dir, run_dir / "outputs")
               for side in [baseline, *models]}
    cache = JudgmentCache(cfg.judgments_dir)
    results = {}
    try:
        for side in models:
            results[side.name] = compare_answers(prompts, answers[side.name], answers[baseline.name], judge, cache,
                                                 cfg)
    finally:
        judge.close()
    summary = {"policy": cfg.policy, "baseline": baseline.source, "judge": judge.name, "num_prompts": len(prompts),
               "sides": {s.name: s.source for s in [*models, baseline]}, "results": results,
               "generator": OmegaConf.to_container(cfg.generator, resolve=True)}
    if distributed.is_main():
        storage.write_atomic(run_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
        for side in [baseline, *models]:
            export_alpaca_eval(prompts, answers[side.name], side.name, run_dir / "outputs" / f"{side.name}.json")
        if record.wandb:
            for name, result in results.items():
                record.wandb.summary.update({f"eval/{name}/{k}": v for k, v in result.items()
                                             if isinstance(v, (int, float))})
        record.summary({"eval": summary})
        log.info("%s", table(results, baseline.name, judge.name, len(prompts)))
        log.info("run directory: %s (%.0f s)", run_dir, time.perf_counter() - start)
    return summary


# -- the sides --------------------------------------------------------------------------------------------


def sides(spec: str, name: str, cfg: DictConfig, cache_dir: Path, *, several: bool = True) -> list[Side]:
    """What `spec` (the policy= or baseline= value) names: a file of outputs, a prefrun run directory (its final
    policy; an online run: every round's), or a model (hub id or directory)."""
    path = Path(str(spec)).expanduser()
    settings = {"dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise InputError(f"{name}={spec!r} is a file, but not outputs: give AlpacaEval's .json or .jsonl outputs, "
                             "a model (hub id or directory) or a prefrun run directory")
        return [Side(name, str(spec), outputs=read_outputs(path))]
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").exists():
        policies = run_policies(path)
        if not several and len(policies) > 1:
            policies = policies[-1:]
        return [Side(name if len(policies) == 1 else label, str(where), model_path=str(where), model_settings=settings)
                for label, where in policies]
    if path.suffix in (".json", ".jsonl"):
        raise InputError(f"{name}={spec!r}: no such file of outputs")
    # Checked before anything is generated: a model directory holds config.json (a hub id is never a path)
    if str(spec).startswith(("/", ".", "~")) and not path.exists():
        raise InputError(f"{name}={spec!r}: no such file or directory; give a model (hub id or directory), a prefrun "
                         "run directory or a file of outputs")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise InputError(f"{name}={spec!r}: a directory without config.json (not a model) nor config.yaml (not a "
                         "prefrun run); give a model (hub id or directory), a prefrun run directory or a file of outputs")
    return [Side(name, str(spec), model_path=str(spec), model_settings=settings)]


def run_policies(run_dir: Path) -> list[tuple[str, Path]]:
    """A run directory's policies to evaluate: each kept round's (θ̂_t, and APO's extrapolated θ_t where it
    differs) then checkpoint-final; a run without rounds: checkpoint-final."""
    policies = []
    for round_dir in sorted(run_dir.glob("rounds/*"), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        if not round_dir.name.isdigit():
            continue
        hat, extrapolated = round_dir / "policy_hat", round_dir / "policy"
        if (hat / "config.json").is_file():
            policies.append((f"round-{round_dir.name}", hat))
        if (extrapolated / "config.json").is_file() and not extrapolated.is_symlink():
            policies.append((f"round-{round_dir.name}-extrapolated", extrapolated))
    final = run_dir / "checkpoint-final"
    if (final / "adapter_config.json").is_file() and not (final / "config.json").is_file():
        raise InputError(f"{final} holds LoRA adapters only: evaluate a merged model (train with "
                         "model.lora.merge=true), or give the base model with the adapters merged as policy=<dir>")
    if (final / "config.json").is_file() and not policies:  # an online run's checkpoint-final is its last θ̂_T
        policies.append(("final", final))
    if not policies:
        raise InputError(f"policy={str(run_dir)!r} is a run directory without a policy to evaluate (no "
                         "checkpoint-final, no rounds/<t>/policy_hat): let the run finish (trainer.save_final=true)")
    total = OmegaConf.load(run_dir / "config.yaml").get("online", {}).get("rounds")
    done = sum(1 for t in range(1, (total or 0) + 1) if (run_dir / "rounds" / str(t) / "round.json").is_file())
    if total and done < total and not (final / "config.json").is_file():
        log.warning("policy=%s is an unfinished run: rounds 1-%d of %d are done; evaluating those (the same training "
                    "command finishes it)", run_dir, done, total)
    return policies


def starting_model(spec: str, cache_dir: Path) -> Side:
    """The default baseline: the starting model of the run directory `spec`."""
    run_dir = Path(str(spec)).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise InputError(f"baseline is not set and policy={spec!r} is not a prefrun run directory (its starting "
                         "model would be the baseline): set baseline=<hub id | dir | outputs file>")
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    model_cfg = run_cfg.model
    run_task = instantiate(run_cfg.task) if run_cfg.get("task") else None
    path = resolve_model_path(model_cfg, run_task, cache_dir)
    settings = {"dtype": model_cfg.get("dtype", "auto"), "trust_remote_code": model_cfg.get("trust_remote_code", False)}
    return Side("baseline", f"{path} (the starting model of {run_dir})", model_path=path, model_settings=settings)


def read_outputs(path: Path) -> dict[str, list[list[str]]]:
    """A file of outputs as {prompt text: [answers of each record with that prompt]} (a prompt set may repeat a
    prompt): AlpacaEval's JSON list of {instruction, output, generator}, or JSON lines of
    {prompt | instruction, output | outputs | candidates}."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                     if line.strip()]
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not {'JSON' if path.suffix == '.json' else 'JSON lines'} ({err.msg}, line "
                         f"{err.lineno}): give AlpacaEval's [{{instruction, output, generator}}] (.json) or "
                         "{prompt, output} lines (.jsonl)") from None
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: no records: give a list of {{instruction, output}} records")
    outputs: dict[str, list[list[str]]] = {}
    for i, record in enumerate(records):
        prompt = record.get("instruction", record.get("prompt")) if isinstance(record, dict) else None
        answer = record.get("output", record.get("outputs", record.get("candidates"))) if isinstance(record, dict) \
            else None
        answer = [answer] if isinstance(answer, str) else answer
        if prompt is None or not isinstance(answer, list) or not answer or \
                not all(isinstance(a, str) for a in answer):
            raise InputError(f"{path}, record {i + 1}: needs `instruction` (or `prompt`) and `output` (a string, or "
                             f"`outputs`: a list of strings); it has {sorted(record) if isinstance(record, dict) else record!r:.80}")
        outputs.setdefault(prompt_text(prompt), []).append(answer)
    return outputs


def prompt_text(prompt) -> str:
    """A prompt as AlpacaEval's `instruction`: the string, a single user turn's text, else the messages as JSON."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict) and \
            prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str):
        return prompt[0]["content"]
    return json.dumps(prompt, ensure_ascii=False)


def eval_prompts(cfg: DictConfig, task, all_sides: list[Side]) -> list:
    """prompts.path's prompts; else those of an outputs file (every file must answer them); else the task's
    held-out prompts."""
    files = [s for s in all_sides if s.outputs is not None]
    if cfg.prompts.path:
        prompts = instantiate(cfg.prompts).prompts()
    elif files:  # the file's prompts, each as often as it occurs there
        prompts = [prompt for prompt, records in files[0].outputs.items() for _ in records]
    elif task is not None:
        prompts = task.prompts("eval", cfg.num_prompts)
    else:
        raise InputError("no prompts: set prompts.path=<data set> (and prompts.column), give an outputs file, or "
                         "keep the built-in task")
    for side in files:
        missing = [p for p in prompts if prompt_text(p) not in side.outputs]
        if missing:
            raise InputError(f"{side.name}={side.source!r} answers {len(prompts) - len(missing)} of the {len(prompts)} "
                             f"prompts (none for {prompt_text(missing[0])!r:.80}): give outputs for every prompt, or "
                             "the same prompts (prompts.path=...)")
    return prompts


# -- answers ------------------------------------------------------------------------------------------------


def side_answers(side: Side, prompts: list, cfg: DictConfig, task, cache_dir: Path, out_root: Path) -> list[list[str]]:
    """Each prompt's answers from `side`: read from its file, or generated (num_candidates per prompt) in
    resumable shards under `out_root/<side name>/`."""
    if side.outputs is not None:  # a prompt's k-th occurrence takes its k-th record (the last one when fewer)
        seen: dict[str, int] = {}
        answers = []
        for p in prompts:
            records = side.outputs[prompt_text(p)]
            k = seen[prompt_text(p)] = seen.get(prompt_text(p), -1) + 1
            answers.append(records[min(k, len(records) - 1)])
        return answers
    generator = instantiate(cfg.generator)
    model_cfg = OmegaConf.create({"name_or_path": side.model_path, "build": None, "attn_implementation": None,
                                  "gradient_checkpointing": False, "reference": None, "lora": None,
                                  **side.model_settings})
    if isinstance(generator, VLLMGenerator):  # the engine loads the weights itself (keyed by their files' bytes:
        # answers of a model since retrained into the same directory are another side's)
        policy, tokenizer = None, load_tokenizer(side.model_path, model_cfg)
        weights = weights_of(side.model_path, side.name)
    else:
        policy, tokenizer, _ = load_policy(model_cfg, task, cache_dir, role=side.name)
        policy.to(distributed.device()).eval()
        weights = distributed.receive_weights(policy, fingerprint) or fingerprint(policy)
    chat = as_chat(prompts, tokenizer, generator.chat_template)
    job = {"side": side.source, "weights": weights, "generator": repr(generator),
           "prompts": hashlib.sha256(json.dumps(chat, ensure_ascii=False).encode()).hexdigest()[:16]}
    try:
        records = make_pools(chat, generator=generator, judge=None, model=policy, tokenizer=tokenizer,
                             out_dir=out_root / side.name, shard_size=cfg.shard_size, job=job,
                             model_path=side.model_path if policy is None else None)
    finally:
        generator.close()
    del policy
    return [r["candidates"] for r in records]


def export_alpaca_eval(prompts: list, answers: list[list[str]], generator: str, path: Path) -> None:
    """`path` in AlpacaEval's format ([{instruction, output, generator}], the first answer of each prompt), which
    `alpaca_eval --model_outputs` reads, and `prefrun eval policy=<path>` reads back."""
    records = [{"instruction": prompt_text(p), "output": a[0], "generator": generator} for p, a in zip(prompts, answers)]
    storage.write_atomic(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


# -- judging and the figures -------------------------------------------------------------------------------


def compare_answers(prompts: list, model: list[list[str]], baseline: list[list[str]], judge, cache: JudgmentCache,
                    cfg: DictConfig) -> dict:
    """Every model x baseline pair of each prompt judged (through the cache), and the figures."""
    rows = [(n, a, b) for n in range(len(prompts)) for a in model[n] for b in baseline[n]]
    verdicts, counts = cache.compare(judge, [prompts[n] for n, _, _ in rows], [a for _, a, _ in rows],
                                     [b for _, _, b in rows], shard_size=cfg.judge_shard_size)
    log.info("judged %d new pairs, %d reused from the judgment cache (%s)", counts["judged"], counts["reused"],
             cfg.judgments_dir)
    pairs = winrate.judged_pairs(verdicts.preference, [len(a) for _, a, _ in rows], [len(b) for _, _, b in rows],
                                 [n for n, _, _ in rows], forward=verdicts.forward, backward=verdicts.backward)
    figures = winrate.summary(pairs, resamples=cfg.interval_resamples, seed=cfg.seed)
    return {**figures, "judged_pairs": counts["judged"], "reused_pairs": counts["reused"]}


def table(results: dict, baseline: str, judge: str, num_prompts: int) -> str:
    lines = [f"win rate against {baseline} ({judge}, {num_prompts} prompts):",
             f"  {'policy':<28}{'win rate [95% CI]':>24}{'hard':>8}{'LC':>8}{'pos. bias':>11}{'length':>14}"]
    for name, r in results.items():
        low, high = r["win_rate_interval"]
        bias = r.get("position_bias_rate")
        lines.append(f"  {name:<28}{r['win_rate']:>9.3f} [{low:.3f}, {high:.3f}]{r['hard_win_rate']:>8.3f}"
                     f"{r['lc_win_rate']:>8.3f}{'-' if bias is None else f'{bias:.3f}':>11}"
                     f"{r['mean_model_length']:>7.0f} / {r['mean_baseline_length']:<5.0f}")
    return "\n".join(lines)

