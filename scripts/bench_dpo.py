#!/usr/bin/env python
"""DPO training step on CPU (fp32): prefrun's loop vs TRL's DPOTrainer on one model and one dataset.

    python scripts/bench_dpo.py                    # defaults: ~6.3M-param Llama, 8 pairs/step, 30 timed steps
    python scripts/bench_dpo.py --trl-precompute   # TRL with cached reference log-probs too (like prefrun)
    python scripts/bench_dpo.py --profile          # where prefrun's step time goes (no TRL run)

The parent process only uses the standard library. It starts one child to build the model and data
(`--side prepare`), then one child per trainer (`--side prefrun`, `--side trl`), so each side's peak
memory is its own process's. A child that calls exec inherits its parent's RSS high-water mark in
`ru_maxrss` (Linux keeps it across exec), so the children report `VmHWM` from /proc/self/status as
the peak and `ru_maxrss` only as a cross-check; with a stdlib-only parent the two agree.

What is built, in a temporary directory:
- a byte-level BPE tokenizer trained with `tokenizers` on synthetic pseudo-word text (BOS prepended,
  EOS `</s>`, pad `<pad>`), saved as a PreTrainedTokenizerFast;
- a randomly initialised Llama (`--hidden/--layers/--heads/--intermediate`, vocab from the tokenizer),
  saved with `save_pretrained`;
- `batch * (warmup + steps)` records {prompt, chosen, rejected} of strings whose lengths in tokens are
  drawn uniformly from `--prompt-len` and `--completion-len` (so both sides see each record once).

Both sides: same records, batch (`--batch` pairs per optimiser step, grad_accum 1), learning rate,
seed, cosine schedule with 10% warm-up and grad clipping 1.0 (conf/trainer/default.yaml), AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), sigmoid DPO loss with beta 0.1, fp32, no gradient
checkpointing. Throughput is steady-state: the time from the end of the `--warmup`-th optimiser
step to the end of the last one (a post-step hook on the torch optimiser, on both sides), so
trainer construction, tokenisation, reference precompute and the first steps are not counted; they
are reported separately.

prefrun goes through its real code path: `tokenize_record` + `PreferenceData.finish` (truncation),
`attach_reference_logps` (reference log-probs computed once and cached; reported as "ref
precompute"), then `prefrun.train.train` with conf/trainer/default.yaml (max_steps set, logging off,
mixed_precision "no"). TRL runs `DPOTrainer` with `ref_model=None`: by default it loads a second copy
of the model and runs a reference forward every step (TRL's default); `--trl-precompute` sets
`precompute_ref_log_probs=True` (reference batch = prefrun's trainer.reference_batch_size, null: the training batch) for an
apples-to-apples comparison. TRL's optimiser is `--trl-optim` (default `adamw_torch`, the same
torch.optim.AdamW prefrun uses; TRL's own default is `adamw_torch_fused`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINER_YAML = ROOT / "conf" / "trainer" / "default.yaml"
BETA = 0.1


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    model = p.add_argument_group("model (a Llama built from a config)")
    model.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    model.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    model.add_argument("--heads", type=int, default=4, help="attention heads; head_dim = hidden/heads (default 4)")
    model.add_argument("--intermediate", type=int, default=None, help="MLP size (default 4*hidden)")
    model.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size to train (default 4096)")
    model.add_argument("--model", type=Path, default=None, metavar="DIR",
                       help="use this local causal LM and its tokenizer (save_pretrained directory) instead of "
                            "building one; the size flags above are then ignored")
    data = p.add_argument_group("data and loop")
    data.add_argument("--batch", type=int, default=8, help="preference pairs per optimiser step (default 8)")
    data.add_argument("--steps", type=int, default=30, help="timed optimiser steps (default 30)")
    data.add_argument("--warmup", type=int, default=3, help="untimed optimiser steps before them (default 3)")
    data.add_argument("--prompt-len", type=_range, default=(32, 128), metavar="MIN-MAX",
                      help="prompt length in tokens, uniform (default 32-128)")
    data.add_argument("--completion-len", type=_range, default=(16, 96), metavar="MIN-MAX",
                      help="chosen/rejected length in tokens incl. EOS, uniform (default 16-96)")
    data.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, both sides (default 3e-4)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    trl = p.add_argument_group("TRL side")
    trl.add_argument("--trl-precompute", action="store_true",
                     help="precompute_ref_log_probs=True (no reference model in memory, no reference forwards)")
    trl.add_argument("--trl-optim", default="adamw_torch",
                     help="TrainingArguments.optim (default adamw_torch = prefrun's torch.optim.AdamW)")
    run = p.add_argument_group("run")
    run.add_argument("--sides", default="prefrun,trl", help="which sides to run, comma-separated")
    run.add_argument("--profile", action="store_true",
                     help="profile prefrun's step instead (phase breakdown + top torch ops); no TRL run")
    run.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    run.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    run.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                     help="before each timed side, wait up to this long for the machine to be idle (other "
                          "processes < 10%% of the CPU over 3 s), and run a side again (twice at most) when "
                          "others used > 5%% of the CPU during its timed steps; for shared machines "
                          "(default 0: don't wait)")
    # internal: what a child process does
    p.add_argument("--side", choices=["prepare", "prefrun", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The options a child needs, as command-line arguments."""
    out = []
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "steps", "warmup", "lr", "seed",
                 "threads", "trl_optim", "model"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    out += ["--prompt-len", "{}-{}".format(*args.prompt_len), "--completion-len", "{}-{}".format(*args.completion_len)]
    if args.trl_precompute:
        out.append("--trl-precompute")
    if args.profile:
        out.append("--profile")
    return out


def max_length(args) -> int:
    """A bound no example reaches (BOS, re-tokenisation slack): nothing is truncated on either side."""
    return 2 * (args.prompt_len[1] + args.completion_len[1]) + 16


# ------------------------------------------------------------------------------------------ parent


def parent(args: argparse.Namespace) -> int:
    sides = ["prefrun"] if args.profile else [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - {"prefrun", "trl"}
    if unknown:
        sys.exit(f"--sides: unknown {sorted(unknown)}; choose from prefrun, trl")
    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "hf_datasets"),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    try:
        results = {}
        for side in ["prepare", *sides]:
            for attempt in range(1 + (2 if args.wait_idle and side != "prepare" else 0)):
                if side != "prepare" and args.wait_idle:
                    _wait_idle(args.wait_idle)
                start = time.perf_counter()
                results[side] = _child(side, args, workdir, env)
                results[side]["process_s"] = time.perf_counter() - start
                busy = results[side].get("others_cpu_share") or 0
                if not args.wait_idle or busy <= 0.05 or attempt == 2:
                    break
                print(f"({side}: other processes used {busy:.0%} of the CPU during the timed steps; running it again)",
                      flush=True)
            if side == "prepare":
                results["prepare"]["prefrun_version"] = _git_version()
                _print_setup(args, results["prepare"])
        if args.profile:
            _print_profile(results["prefrun"])
        else:
            _print_table(args, results)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}, **results}, indent=2) + "\n")
            print(f"\nwrote {args.out}")
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _git_version() -> str | None:
    """The repository's commit, with `+dirty` when prefrun/ or conf/ have uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "prefrun", "conf"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _wait_idle(limit: float, window: float = 3.0, threshold: float = 0.10) -> None:
    deadline = time.monotonic() + limit
    while True:
        before = _busy_cpu_s()
        time.sleep(window)
        after = _busy_cpu_s()
        if before is None or after is None:
            return
        share = (after - before) / (window * (os.cpu_count() or 1))
        if share < threshold:
            return
        if time.monotonic() > deadline:
            print(f"(machine still busy: {share:.0%} CPU used by others; going ahead)", flush=True)
            return


def _child(side: str, args, workdir: Path, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--workdir", str(workdir), *_forwarded(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        sys.exit(f"bench_dpo: the {side} child failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1])


def _print_setup(args, prep: dict) -> None:
    s = prep["stats"]
    print(f"model: Llama {prep['num_parameters'] / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads x {args.hidden // args.heads}, intermediate {args.intermediate}, vocab {prep['vocab']}), "
          f"fp32, {prep['torch_threads']} torch threads")
    print(f"data: {s['records']} pairs, {args.batch} pairs/step, {args.warmup} warm-up + {args.steps} timed steps; "
          f"tokens/record: prompt {s['prompt_mean']:.0f} ({s['prompt_min']}-{s['prompt_max']}), "
          f"completion {s['completion_mean']:.0f} ({s['completion_min']}-{s['completion_max']}) incl. EOS")
    print(f"prefrun {prep.get('prefrun_version') or '(version unknown)'}; lr {args.lr}, beta {BETA}, "
          f"seed {args.seed}; TRL: "
          + ("precompute_ref_log_probs=True" if args.trl_precompute else "reference model + reference forward per step")
          + f", optim {args.trl_optim}\n")


def _print_table(args, results: dict) -> None:
    sides = [s for s in ("prefrun", "trl") if s in results]
    rows = [
        ("steps/s", "steps_per_s", "{:.3f}"),
        ("s/step (mean)", "s_per_step", "{:.3f}"),
        ("s/step (median; min-max)", "median_s_per_step", "{:.3f}"),
        ("tokens/s (non-pad, policy fwd)", "tokens_per_s", "{:.0f}"),
        ("padding share of positions", "pad_fraction", "{:.1%}"),
        ("timed seconds", "timed_s", "{:.1f}"),
        ("peak RSS MB (VmHWM)", "peak_rss_mb", "{:.0f}"),
        ("  peak before train() (load, ref precompute)", "pre_train_peak_rss_mb", "{:.0f}"),
        ("  peak during train()", "train_peak_rss_mb", "{:.0f}"),
        ("  RSS MB after imports", "base_rss_mb", "{:.0f}"),
        ("mean loss (all steps)", "mean_loss", "{:.4f}"),
        ("ref precompute s", "ref_precompute_s", "{:.2f}"),
        ("setup s (tokenize/init)", "setup_s", "{:.2f}"),
        ("train() call s (all steps)", "train_call_s", "{:.1f}"),
        ("child process s", "process_s", "{:.1f}"),
        ("own CPU use (cores)", "cpu_util", "{:.2f}"),
        ("  of which kernel (page faults...)", "sys_share", "{:.0%}"),
        ("other processes' CPU share", "others_cpu_share", "{:.0%}"),
    ]
    labels = {"prefrun": "prefrun", "trl": "TRL" + (" (precompute)" if args.trl_precompute else "")}
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  " + "  ".join(f"{labels[s]:>22}" for s in sides))
    for label, key, fmt in rows:
        cells = []
        for s in sides:
            value = results[s].get(key)
            text = "-" if value is None else fmt.format(value)
            if key == "median_s_per_step" and value is not None:
                text += f" ({results[s]['min_s_per_step']:.2f}-{results[s]['max_s_per_step']:.2f})"
            cells.append(f"{text:>22}")
        print(f"{label:{width}}  " + "  ".join(cells))
    busy = [s for s in sides if (results[s].get("others_cpu_share") or 0) > 0.05]
    if busy:
        print(f"\nwarning: other processes used >5% of the machine's CPU during the timed steps of {busy}; "
              "the numbers are not reliable (OpenMP threads degrade badly when cores are shared)")
    if len(sides) == 2:
        p, t = results["prefrun"], results["trl"]
        print(f"\nprefrun/TRL throughput (steps/s): {p['steps_per_s'] / t['steps_per_s']:.2f}x   "
              f"prefrun/TRL peak memory: {p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
        results["ratios"] = {"throughput": p["steps_per_s"] / t["steps_per_s"],
                             "peak_memory": p["peak_rss_mb"] / t["peak_rss_mb"]}


def _print_profile(result: dict) -> None:
    prof = result["profile"]
    print(f"prefrun step: {result['s_per_step'] * 1e3:.0f} ms ({result['steps_per_s']:.3f} steps/s), "
          f"mean over {prof['steps']} steps")
    print(f"\n{'phase (wall time per step, instrumented run)':<64} {'ms':>7}  {'share':>6}")
    for name, ms in prof["phases_ms"].items():
        print(f"  {name:<62} {ms:7.1f}  {ms / prof['step_ms']:6.1%}")
    print(f"  {'= step':<62} {prof['step_ms']:7.1f}")
    print(f"\ntorch.profiler, {prof['profiled_steps']} steps (self CPU time per step, ms; profiler overhead included)")
    for name, ms in prof["categories_ms"].items():
        print(f"  {name:<52} {ms:7.1f}")
    print(f"  {'= total':<52} {sum(prof['categories_ms'].values()):7.1f}")
    print("\ntop ops by self CPU time per step (ms, calls per step)")
    for op in prof["top_ops"]:
        print(f"  {op['name'][:60]:<60} {op['self_ms']:7.1f}  {op['calls']:7.1f}")


# ------------------------------------------------------------------------------------------ children


def _peak_rss() -> dict:
    """Peak RSS of this process in MB: VmHWM (this address space only) and ru_maxrss."""
    status = Path("/proc/self/status")
    hwm = None
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"peak_rss_mb": hwm if hwm is not None else ru, "ru_maxrss_mb": ru}


def _emit(payload: dict) -> None:
    print(json.dumps({**_peak_rss(), **payload}), flush=True)


def _start_train_peak() -> dict:
    """The peak RSS so far, then reset the high-water mark (Linux: clear_refs 5) so that what
    `_train_peak` reads afterwards is the peak of the training phase alone."""
    before = _peak_rss()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before["reset"] = True
    except OSError:
        before["reset"] = False
    return before


def _train_peak(before: dict) -> dict:
    """Overall peak (max of both phases), peak up to train(), and the training phase's own peak."""
    after = _peak_rss()
    return {"peak_rss_mb": max(before["peak_rss_mb"], after["peak_rss_mb"]),
            "ru_maxrss_mb": max(before["ru_maxrss_mb"], after["ru_maxrss_mb"]),
            "pre_train_peak_rss_mb": before["peak_rss_mb"],
            "train_peak_rss_mb": after["peak_rss_mb"] if before["reset"] else None}


def _setup_torch(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch


SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ish", "orn", "el", "an", "th", "str",
             "ble", "ing", "er", "ou", "ax", "ym", "dr", "gl", "pr", "wo", "yu", "ce", "fi"]


def _lexicon(rng, size: int = 4000) -> list[str]:
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _sentence_words(rng, lexicon: list[str], weights: list[float], n: int) -> str:
    words = rng.choices(lexicon, weights=weights, k=n)
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % 11 == 10:
            out[-1] += rng.choice([".", ",", "?", ";"])
    return " ".join(out)


def side_prepare(args) -> None:
    """Build the tokenizer, the model and the records into the work directory."""
    import random

    torch = _setup_torch(args)
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(args.seed)
    lexicon = _lexicon(rng)
    rng.shuffle(lexicon)  # Zipf ranks independent of spelling
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(lexicon))]  # Zipf-like
    corpus = [_sentence_words(rng, lexicon, weights, rng.randint(8, 40)) for _ in range(20000)]

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        decode = tokenizer.decode
    else:
        tokenizer, encode, decode = _build_tokenizer(args, corpus)

    def text_of(n_tokens: int, lead: str = "") -> str:
        """A string of about n_tokens tokens: the first n_tokens of a longer random text, decoded."""
        return decode(encode(lead + _sentence_words(rng, lexicon, weights, n_tokens + 8))[:n_tokens])

    records = []
    for _ in range(args.batch * (args.warmup + args.steps)):
        records.append({
            "prompt": text_of(rng.randint(*args.prompt_len) - 1),  # the BOS token is the -1
            "chosen": text_of(rng.randint(*args.completion_len) - 1, " "),  # and the EOS here
            "rejected": text_of(rng.randint(*args.completion_len) - 1, " "),
        })
    with (args.workdir / "records.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    prompt_lens = [len(tokenizer(r["prompt"]).input_ids) for r in records]
    completion_lens = [len(tokenizer(r[k]).input_ids) for r in records for k in ("chosen", "rejected")]  # BOS ~ EOS
    stats = {"records": len(records),
             "prompt_mean": sum(prompt_lens) / len(prompt_lens), "prompt_min": min(prompt_lens),
             "prompt_max": max(prompt_lens),
             "completion_mean": sum(completion_lens) / len(completion_lens), "completion_min": min(completion_lens),
             "completion_max": max(completion_lens)}

    if args.model:
        (args.workdir / "model").symlink_to(Path(args.model).resolve())
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
            head_dim=args.hidden // args.heads, max_position_embeddings=max_length(args),
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(args.workdir / "model")
        tokenizer.save_pretrained(args.workdir / "model")
    _emit({"num_parameters": model.num_parameters(), "vocab": len(tokenizer), "stats": stats,
           "torch_threads": torch.get_num_threads()})


def _build_tokenizer(args, corpus):
    """A byte-level BPE tokenizer trained on the synthetic corpus (BOS prepended, EOS `</s>`, pad `<pad>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    return tokenizer, (lambda text: backend.encode(text, add_special_tokens=False).ids), backend.decode


def _load(args):
    torch = _setup_torch(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _peak_rss()["peak_rss_mb"]
    path = str(args.workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # as prefrun's model loader does
        tokenizer.pad_token = tokenizer.eos_token
    records = [json.loads(line) for line in (args.workdir / "records.jsonl").read_text().splitlines()]
    return torch, model, tokenizer, records, base


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used (from /proc/stat), None where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _Clock:
    """Timestamps after each optimiser step (wall, own CPU, machine CPU), and the token counts of
    each policy forward."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu: list[tuple[float, float, float | None]] = []  # this process (user, system), machine CPU s
        self.forwards: list[tuple[int, int]] = []  # (non-pad tokens, padded positions)

    def watch_optimizer(self, optimizer) -> None:
        def hook(*_):
            self.stamps.append(time.perf_counter())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu.append((usage.ru_utime, usage.ru_stime, _busy_cpu_s()))

        optimizer.register_step_post_hook(hook)

    def watch_model(self, model) -> None:
        def hook(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.forwards.append((int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def result(self, warmup: int, steps: int) -> dict:
        if len(self.stamps) != warmup + steps:
            raise RuntimeError(f"expected {warmup + steps} optimiser steps, saw {len(self.stamps)}")
        timed = self.stamps[-1] - self.stamps[warmup - 1]
        window = self.forwards[warmup : warmup + steps]
        real, padded = sum(f[0] for f in window), sum(f[1] for f in window)
        durations = sorted(b - a for a, b in zip(self.stamps[warmup - 1 :], self.stamps[warmup:]))
        (user0, sys0, all0), (user1, sys1, all1) = self.cpu[warmup - 1], self.cpu[-1]
        own = (user1 - user0) + (sys1 - sys0)
        others = None if all0 is None else max(0.0, (all1 - all0) - own) / (timed * (os.cpu_count() or 1))
        return {"steps_per_s": steps / timed, "s_per_step": timed / steps, "timed_s": timed,
                "median_s_per_step": durations[len(durations) // 2], "min_s_per_step": durations[0],
                "max_s_per_step": durations[-1], "tokens_per_s": real / timed,
                "pad_fraction": 1 - real / padded if padded else 0.0, "policy_forwards": len(self.forwards),
                "cpu_util": own / timed, "sys_share": (sys1 - sys0) / own if own else 0.0,
                "others_cpu_share": others}


def _trainer_cfg(args):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(TRAINER_YAML)
    cfg.batch_size = args.batch
    cfg.grad_accum = 1
    cfg.max_steps = args.warmup + args.steps
    cfg.log_every = 10**9  # only the final step logs (mean over all steps)
    cfg.mixed_precision = "no"
    cfg.save_final = False
    if "save_every" in cfg:
        cfg.save_every = 0  # no resumable checkpoints (train() is called without any anyway)
    return cfg


def _reference_batch_size(cfg) -> int:
    """Prompts per reference forward: trainer.reference_batch_size, null meaning the training batch (prefrun's rule)."""
    return int(cfg.get("reference_batch_size") or cfg.batch_size)


def side_prefrun(args) -> None:
    import functools

    torch, model, tokenizer, records, base = _load(args)
    from accelerate.utils import set_seed

    import prefrun.train as ptrain
    from prefrun.data import PreferenceData, attach_reference_logps, tokenize_record
    from prefrun.losses import dpo_loss
    from prefrun.model import fingerprint
    from prefrun.samplers import DatasetSampler

    cfg = _trainer_cfg(args)
    set_seed(args.seed)
    start = time.perf_counter()
    data = PreferenceData(max_length=max_length(args), max_prompt_length=None)
    items = [tokenize_record(r, tokenizer) for r in records]
    if hasattr(data, "finish"):  # truncation + skip accounting, as PreferenceData.load does
        examples = data.finish(items, len(items), "bench", "train")
    else:
        examples = [ex for ex in map(data.truncate, items) if ex is not None]
    if len(examples) != len(records):
        raise RuntimeError("examples were dropped by truncation; raise max_length")
    setup_s = time.perf_counter() - start

    start = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="prefrun_cache_", dir=args.workdir)  # fresh: a rerun must not hit it
    attach_reference_logps(examples, model, tokenizer, cache_dir=cache_dir,
                           batch_size=_reference_batch_size(cfg), weights_key=fingerprint(model))
    precompute_s = time.perf_counter() - start

    before_train = _start_train_peak()
    clock = _Clock()
    clock.watch_model(model)
    phases = _Phases(ptrain) if args.profile else None

    def optimizer_factory(params):
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        clock.watch_optimizer(optimizer)
        if phases:
            phases.watch_optimizer(optimizer)
        return optimizer

    accelerator = ptrain.make_accelerator(cfg)
    if phases:
        phases.watch(model, accelerator)
    start = time.perf_counter()
    last = ptrain.train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=BETA), beta=BETA,
                        sampler=DatasetSampler(), optimizer_factory=optimizer_factory, cfg=cfg,
                        accelerator=accelerator, seed=args.seed, on_log=lambda _metrics: None)
    train_call_s = time.perf_counter() - start
    result = {"side": "prefrun", **clock.result(args.warmup, args.steps), "mean_loss": last["loss"],
              "ref_precompute_s": precompute_s, "setup_s": setup_s, "train_call_s": train_call_s,
              "base_rss_mb": base, "torch_threads": torch.get_num_threads(), **_train_peak(before_train)}
    if phases:  # the memory numbers above are from before the profiler ran
        result["profile"] = phases.summary(args.warmup, args.steps)
        result["profile"].update(_torch_profile(args, torch, ptrain, model, tokenizer, examples, cfg))
    _emit(result)


def side_trl(args) -> None:
    torch, model, tokenizer, records, base = _load(args)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg = _trainer_cfg(args)
    clock, timings = _Clock(), {}
    total = args.warmup + args.steps

    class Trainer(DPOTrainer):  # timing only
        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            timings["ref_precompute_s"] = timings.get("ref_precompute_s", 0.0) + time.perf_counter() - start
            return out

    class Stamp(TrainerCallback):
        def on_train_begin(self, _args, _state, _control, optimizer=None, **_):
            clock.watch_optimizer(getattr(optimizer, "optimizer", optimizer))

    config = DPOConfig(
        output_dir=str(args.workdir / "trl_out"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=args.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * total), max_grad_norm=cfg.max_grad_norm or 0.0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim=args.trl_optim,
        beta=BETA, loss_type="sigmoid", max_length=max_length(args),
        precompute_ref_log_probs=args.trl_precompute, precompute_ref_batch_size=_reference_batch_size(cfg),
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        seed=args.seed,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(records),
                      processing_class=tokenizer, callbacks=[Stamp()])
    init_s = time.perf_counter() - start
    before_train = _start_train_peak()
    clock.watch_model(trainer.model)
    start = time.perf_counter()
    output = trainer.train()
    train_call_s = time.perf_counter() - start
    precompute_s = timings.get("ref_precompute_s")
    _emit({"side": "trl", **clock.result(args.warmup, args.steps), "mean_loss": output.training_loss,
           "ref_precompute_s": precompute_s, "setup_s": init_s - (precompute_s or 0.0), "train_call_s": train_call_s,
           "reference_model": trainer.ref_model is not None, "base_rss_mb": base,
           "torch_threads": torch.get_num_threads(), **_train_peak(before_train)})


# ------------------------------------------------------------------------------------------ profile


class _Phases:
    """Wall-clock marks around the parts of prefrun's step, from outside its code: collate (module
    global wrapped), sequence_logps (module global wrapped) and the model forward inside it (hooks),
    accelerator.backward / clip_grad_norm_ (instance attributes wrapped), optimizer.step (hooks)."""

    def __init__(self, ptrain) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.stamps: list[float] = []
        ptrain.collate = self._timed("collate", ptrain.collate)
        ptrain.sequence_logps = self._timed("sequence_logps", ptrain.sequence_logps)

    def _timed(self, name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spans.setdefault(name, []).append((start, time.perf_counter()))

        return wrapper

    def watch(self, model, accelerator) -> None:
        open_ = {}
        model.register_forward_pre_hook(lambda *_: open_.__setitem__("fwd", time.perf_counter()))
        model.register_forward_hook(
            lambda *_: self.spans.setdefault("forward", []).append((open_.pop("fwd"), time.perf_counter())))
        accelerator.backward = self._timed("backward", accelerator.backward)
        accelerator.clip_grad_norm_ = self._timed("clip_grad_norm", accelerator.clip_grad_norm_)

    def watch_optimizer(self, optimizer) -> None:
        open_ = {}
        optimizer.register_step_pre_hook(lambda *_: open_.__setitem__("opt", time.perf_counter()))

        def post(*_):
            now = time.perf_counter()
            self.spans.setdefault("optimizer.step", []).append((open_.pop("opt"), now))
            self.stamps.append(now)

        optimizer.register_step_post_hook(post)

    def summary(self, warmup: int, steps: int) -> dict:
        lo, hi = self.stamps[warmup - 1], self.stamps[-1]

        def ms(name):
            return sum(b - a for a, b in self.spans.get(name, []) if a >= lo and b <= hi) * 1e3 / steps

        fwd, logps = ms("forward"), ms("sequence_logps")
        phases = {
            "collate (padding, tensors; in DataLoader)": ms("collate"),
            "model forward (HF Llama, logits_to_keep)": fwd,
            "log-probs: slice/.float()/cross-entropy/mask": logps - fwd,
            "backward": ms("backward"),
            "clip_grad_norm": ms("clip_grad_norm"),
            "optimizer.step (AdamW, for-loop impl)": ms("optimizer.step"),
        }
        step = (hi - lo) * 1e3 / steps
        phases["rest: loss, isfinite sync, sched, zero_grad, metrics, loader"] = step - sum(phases.values())
        return {"steps": steps, "step_ms": step, "phases_ms": phases}


def _torch_profile(args, torch, ptrain, model, tokenizer, examples, cfg) -> dict:
    """A second short train() (from the trained weights; same shapes) under torch.profiler."""
    import functools

    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from prefrun.losses import dpo_loss
    from prefrun.samplers import DatasetSampler

    warm, active = 2, min(5, args.steps)
    cfg = cfg.copy()
    cfg.max_steps = warm + active + 1  # a profiler step runs from one policy forward to the next
    state = {}
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=warm, active=active, repeat=1))

    def enter(*_):
        prof.step()  # outside any other range, unlike a hook on optimizer.step (ranges must nest)
        state["rf"] = record_function("bench::model_forward")
        state["rf"].__enter__()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(lambda *_: state.pop("rf").__exit__(None, None, None))

    def optimizer_factory(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    with prof:
        ptrain.train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=BETA), beta=BETA,
                     sampler=DatasetSampler(), optimizer_factory=optimizer_factory, cfg=cfg,
                     accelerator=ptrain.make_accelerator(cfg), seed=args.seed + 1, on_log=lambda _m: None)

    categories: dict[str, float] = {}
    for event in prof.events():
        root = event
        while root.cpu_parent is not None and not root.cpu_parent.name.startswith("ProfilerStep"):
            root = root.cpu_parent
        name = root.name
        if name.startswith("ProfilerStep"):
            cat = "no op running (Python: loop, hooks, module calls)"
        elif name.startswith("autograd::engine::evaluate_function"):
            cat = "backward ops"
        elif name == "bench::model_forward":
            cat = "forward: Python in the HF modules" if event is root else "forward ops (model)"
        elif name.startswith("Optimizer.step"):
            cat = "optimizer.step ops"
        elif name.startswith("Optimizer.zero_grad"):
            cat = "zero_grad"
        elif name.startswith("enumerate(DataLoader)"):
            cat = "data loading + collate ops"
        else:
            cat = "other top-level ops (log-probs, loss, clip, metrics)"
        categories[cat] = categories.get(cat, 0.0) + event.self_cpu_time_total / 1e3 / active
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    return {
        "profiled_steps": active,
        "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / active, "calls": e.count / active}
                    for e in top],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side is None:
        return parent(args)
    {"prepare": side_prepare, "prefrun": side_prefrun, "trl": side_trl}[args.side](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
