#!/usr/bin/env python
"""DPO training step on CPU: prefrun's loop vs TRL's DPOTrainer, and vs the model's own limit, on one model.

    python scripts/bench_dpo.py                        # both cases, fp32: prefrun, TRL default, TRL best, limit
    python scripts/bench_dpo.py --precision fp32,bf16  # every ratio at bf16 autocast on both sides too
    python scripts/bench_dpo.py --case short --model <dir>            # any local causal LM + its tokenizer
    python scripts/bench_dpo.py --case long --sides prefrun \
        --prefrun "" --prefrun trainer.padding_free=false --prefrun optim.fused=null   # one change at a time
    python scripts/bench_dpo.py --profile              # where prefrun's step time goes (no TRL run)

Cases (`--case`, comma-separated; `--prompt-len/--completion-len/--steps` override them):
  long   prompts 32-128 tokens, chosen/rejected 16-96, 30 timed steps (matmul-bound)
  short  prompts 16-32, chosen/rejected 4-8, 60 timed steps (per-step overhead dominates)

Sides (`--sides`):
  prefrun   `prefrun.train.train` with conf/trainer/default.yaml and conf/optim/adamw.yaml as shipped (max_steps
            set, logging and checkpoints off), after `attach_reference_logps` (cached reference, timed apart).
            `--prefrun "KEY=VALUE ..."` (repeatable) runs one prefrun side per value with those trainer./optim.
            overrides; "" is the shipped defaults.
  trl       DPOTrainer as shipped: ref_model=None loads a second copy and runs a reference forward each step;
            TRL's default optimiser (adamw_torch_fused) unless --trl-optim.
  trl_best  the same with precompute_ref_log_probs=True; with padding_free=True as well where the installed
            TRL supports it for DPO (1.16 turns it off with a warning: then not run), the faster one counts.
  limit     forward + backward over exactly the batch's real tokens, no padding, no loop: each step's pairs
            packed in one row (position ids restarting, attention per sequence), log-probs of the completion
            tokens only, same model and precision; prefrun's step time is printed as a fraction of it.

Each side runs in its own child process, so its peak memory is its own; the parent imports only the
standard library (a child started with exec inherits its parent's `ru_maxrss`, so children report
`VmHWM`). Data: a byte-level BPE tokenizer trained on synthetic pseudo-word text and a randomly
initialised Llama (`--hidden/--layers/--heads/--intermediate/--vocab`), or `--model DIR`; `batch *
(warmup + steps)` {prompt, chosen, rejected} records with token lengths uniform in the case's ranges.
Both trainers: same records, batch, lr, seed, cosine schedule with 10% warm-up, clipping at 1.0, AdamW
betas 0.9/0.999 eps 1e-8 no weight decay, sigmoid DPO with beta 0.1, no gradient checkpointing.
Throughput is steady state: from the end of optimiser step `--warmup` to the end of the last one
(a post-step hook on the torch optimiser on both sides).
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
OPTIM_YAML = ROOT / "conf" / "optim" / "adamw.yaml"
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
    data.add_argument("--case", default="long,short", help="comma-separated: long, short (default both)")
    data.add_argument("--batch", type=int, default=8, help="preference pairs per optimiser step (default 8)")
    data.add_argument("--steps", type=int, default=None, help="timed optimiser steps (default: the case's)")
    data.add_argument("--warmup", type=int, default=3, help="untimed optimiser steps before them (default 3)")
    data.add_argument("--prompt-len", type=_range, default=None, metavar="MIN-MAX",
                      help="prompt length in tokens, uniform (default: the case's)")
    data.add_argument("--completion-len", type=_range, default=None, metavar="MIN-MAX",
                      help="chosen/rejected length in tokens incl. EOS, uniform (default: the case's)")
    data.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, both sides (default 3e-4)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    data.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (CPU autocast) (default fp32)")
    sides = p.add_argument_group("sides")
    sides.add_argument("--sides", default="prefrun,trl,trl_best,limit",
                       help="comma-separated: prefrun, trl, trl_best, limit (default all)")
    sides.add_argument("--prefrun", action="append", default=None, metavar="OVERRIDES",
                       help='space-separated trainer./optim. overrides for one prefrun side, e.g. '
                            '"trainer.padding_free=false optim.fused=null"; repeat for several sides ("" = defaults)')
    sides.add_argument("--trl-optim", default=None,
                       help="TrainingArguments.optim for TRL (default: TRL's own, adamw_torch_fused)")
    run = p.add_argument_group("run")
    run.add_argument("--profile", action="store_true",
                     help="profile prefrun's step instead (phase breakdown + top torch ops); no other side")
    run.add_argument("--repeat", type=int, default=1,
                     help="run every side this many times, interleaved; report the median run and each run's rate")
    run.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    run.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    run.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                     help="before each timed side, wait up to this long for the machine to be idle (other "
                          "processes < 10%% of the CPU over 3 s), and run a side again (twice at most) when "
                          "others used > 5%% of the CPU during its timed steps; for shared machines "
                          "(default 0: don't wait)")
    # internal: what a child process does
    p.add_argument("--side", choices=["prepare", "prefrun", "trl", "trl_best", "limit"], default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--padding-free", action="store_true", help=argparse.SUPPRESS)  # trl_best's second try
    args = p.parse_args(argv)
    for name, allowed in (("case", CASES), ("precision", ("fp32", "bf16")),
                          ("sides", ("prefrun", "trl", "trl_best", "limit"))):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        if not values or set(values) - set(allowed):
            p.error(f"--{name}: choose from {', '.join(allowed)}")
        setattr(args, name, values)
    if args.side is None:  # a child gets exactly one case's values
        args.prefrun = args.prefrun or [""]
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    if args.warmup < 1 or (args.steps is not None and args.steps < 1):
        p.error("--warmup and --steps must be >= 1")
    return args


CASES = {"long": {"prompt_len": (32, 128), "completion_len": (16, 96), "steps": 30},
         "short": {"prompt_len": (16, 32), "completion_len": (4, 8), "steps": 60}}


def for_case(args: argparse.Namespace, case: str) -> argparse.Namespace:
    """The arguments with one case's lengths and steps, where the command line did not set them."""
    out = argparse.Namespace(**vars(args))
    out.case = [case]
    for key, value in CASES[case].items():
        if getattr(out, key) is None:
            setattr(out, key, value)
    return out


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


def _forwarded(args: argparse.Namespace, *, precision: str = "fp32", overrides: str = "") -> list[str]:
    """The options a child needs, as command-line arguments (one case, one precision, one override set)."""
    out = []
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "steps", "warmup", "lr", "seed",
                 "threads", "trl_optim", "model"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    out += ["--prompt-len", "{}-{}".format(*args.prompt_len), "--completion-len", "{}-{}".format(*args.completion_len),
            "--case", args.case[0], "--precision", precision, "--prefrun", overrides]
    if args.profile:
        out.append("--profile")
    return out


def max_length(args) -> int:
    """A bound no example reaches (BOS, re-tokenisation slack): nothing is truncated on either side."""
    return 2 * (args.prompt_len[1] + args.completion_len[1]) + 16


# ------------------------------------------------------------------------------------------ parent


def parent(args: argparse.Namespace) -> int:
    sides = ["prefrun"] if args.profile else args.sides
    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "hf_datasets"),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    everything = {}
    try:
        for case in args.case:
            cargs = for_case(args, case)
            (workdir / case).mkdir()
            prep = _child("prepare", cargs, workdir / case, env, [])
            prep["prefrun_version"] = _git_version()
            print(f"\n=== case {case} ===")
            _print_setup(cargs, prep)
            for precision in args.precision:
                runs: dict[str, list[dict]] = {}
                skipped: dict[str, str] = {}
                for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every side
                    for side in sides:
                        for overrides in (args.prefrun if side == "prefrun" else [""]):
                            label = side if not overrides else f"prefrun {overrides}"
                            if label in skipped:
                                continue
                            result = _side_result(side, cargs, workdir / case, env, precision, overrides)
                            if result.get("skipped"):
                                skipped[label] = result["skipped"]
                            else:
                                runs.setdefault(label, []).append(result)
                results = {label: _median_run(results) for label, results in runs.items()}
                print(f"\n--- {case}, {precision} ---")
                for label, reason in skipped.items():
                    print(f"{label}: not run ({reason})")
                if args.profile:
                    for label, result in results.items():
                        print(label)
                        _print_profile(result)
                else:
                    _print_table(results)
                everything[f"{case}/{precision}"] = {"prepare": prep, **results}
        if len(everything) > 1 and not args.profile:
            _print_summary(everything)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}, **everything}, indent=2) + "\n")
            print(f"\nwrote {args.out}")
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _side_result(side, args, workdir: Path, env: dict, precision: str, overrides: str) -> dict:
    result = _timed_child(side, args, workdir, env, precision, overrides)
    if side == "trl_best":  # and with padding_free, where this TRL has it for DPO; the faster one counts
        pf = _timed_child(side, args, workdir, env, precision, "", ["--padding-free"])
        if pf.get("skipped"):
            result["padding_free_note"] = pf["skipped"]
        elif pf["steps_per_s"] > result["steps_per_s"]:
            result = pf
    return result


def _median_run(results: list[dict]) -> dict:
    """The run with the median throughput (of two: the slower), with every run's steps/s beside it."""
    ordered = sorted(results, key=lambda r: r["steps_per_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["runs_steps_per_s"] = [r["steps_per_s"] for r in results]
    return median


def _timed_child(side, args, workdir: Path, env: dict, precision: str, overrides: str, extra=()) -> dict:
    """One timed side; with --wait-idle, run again (twice at most) when other processes used the CPU."""
    for attempt in range(3 if args.wait_idle else 1):
        if args.wait_idle:
            _wait_idle(args.wait_idle)
        start = time.perf_counter()
        result = _child(side, args, workdir, env, [*_forwarded(args, precision=precision, overrides=overrides),
                                                   *extra])
        result["process_s"] = time.perf_counter() - start
        busy = result.get("others_cpu_share") or 0
        if busy <= 0.05 or result.get("skipped") or not args.wait_idle or attempt == 2:
            break
        print(f"({side}: other processes used {busy:.0%} of the CPU during the timed steps; running it again)",
              flush=True)
    return result


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


def _child(side: str, args, workdir: Path, env: dict, forwarded: list[str]) -> dict:
    forwarded = forwarded or _forwarded(args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--workdir", str(workdir), *forwarded]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        sys.exit(f"bench_dpo: the {side} child failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1])


def _print_setup(args, prep: dict) -> None:
    s = prep["stats"]
    print(f"model: {prep['model_type']} {prep['num_parameters'] / 1e6:.2f}M parameters"
          + ("" if args.model else f" (hidden {args.hidden}, {args.layers} layers, {args.heads} heads x "
                                   f"{args.hidden // args.heads}, intermediate {args.intermediate})")
          + f", vocab {prep['vocab']}, {prep['torch_threads']} torch threads")
    print(f"data: {s['records']} pairs, {args.batch} pairs/step, {args.warmup} warm-up + {args.steps} timed steps; "
          f"tokens/record: prompt {s['prompt_mean']:.0f} ({s['prompt_min']}-{s['prompt_max']}), "
          f"completion {s['completion_mean']:.0f} ({s['completion_min']}-{s['completion_max']}) incl. EOS")
    print(f"prefrun {prep.get('prefrun_version') or '(version unknown)'}; lr {args.lr}, beta {BETA}, seed {args.seed}")


ROWS = [
    ("steps/s (median run)", "steps_per_s", "{:.3f}"),
    ("  steps/s of each run", "runs_steps_per_s", "{}"),
    ("s/step (median; min-max)", "median_s_per_step", "{:.3f}"),
    ("tokens/s (non-pad, policy fwd)", "tokens_per_s", "{:.0f}"),
    ("padding share of positions", "pad_fraction", "{:.1%}"),
    ("peak RSS MB (VmHWM)", "peak_rss_mb", "{:.0f}"),
    ("  peak before the steps (load, ref)", "pre_train_peak_rss_mb", "{:.0f}"),
    ("  peak during the steps", "train_peak_rss_mb", "{:.0f}"),
    ("mean loss (all steps)", "mean_loss", "{:.4f}"),
    ("ref precompute s", "ref_precompute_s", "{:.2f}"),
    ("ref precompute sequences/s", "ref_sequences_per_s", "{:.0f}"),
    ("optimiser", "optim", "{}"),
    ("child process s", "process_s", "{:.1f}"),
    ("own CPU use (cores)", "cpu_util", "{:.2f}"),
    ("  of which kernel (page faults...)", "sys_share", "{:.0%}"),
    ("other processes' CPU share", "others_cpu_share", "{:.0%}"),
]


def _print_table(results: dict) -> None:
    labels = list(results)
    width = max(len(r[0]) for r in ROWS)
    cell = max(22, *(len(label) for label in labels))
    print(f"{'':{width}}  " + "  ".join(f"{label:>{cell}}" for label in labels))
    for label, key, fmt in ROWS:
        cells = []
        for side in labels:
            value = results[side].get(key)
            if key == "runs_steps_per_s" and value is not None:
                value = " ".join(f"{v:.2f}" for v in value)
            text = "-" if value is None else fmt.format(value)
            if key == "median_s_per_step" and value is not None:
                text += f" ({results[side]['min_s_per_step']:.2f}-{results[side]['max_s_per_step']:.2f})"
            cells.append(f"{text:>{cell}}")
        print(f"{label:{width}}  " + "  ".join(cells))
    busy = [s for s in labels if (results[s].get("others_cpu_share") or 0) > 0.05]
    if busy:
        print(f"\nwarning: other processes used >5% of the machine's CPU during the timed steps of {busy}; "
              "the numbers are not reliable (OpenMP threads degrade badly when cores are shared)")
    for line in _ratios(results):
        print(line)


def _ratios(results: dict) -> list[str]:
    """prefrun (the first prefrun side) against each other side: the ratio within each repeat (sides of one
    repeat run back to back, so they share the machine's slow and fast spells), median and range."""
    ours = next((r for label, r in results.items() if label == "prefrun" or label.startswith("prefrun ")), None)
    if ours is None:
        return []

    def per_repeat(other: dict) -> tuple[float, str]:
        values = sorted(a / b for a, b in zip(ours["runs_steps_per_s"], other["runs_steps_per_s"]))
        middle = values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1 : len(values) // 2 + 1]) / 2
        spread = f" (runs {values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
        return middle, spread

    lines, ratios = [], ours.setdefault("ratios", {})
    for label in ("trl", "trl_best"):
        if label in results:
            r = results[label]
            throughput, spread = per_repeat(r)
            ratios[label] = {"throughput": throughput, "peak_memory": ours["peak_rss_mb"] / r["peak_rss_mb"]}
            lines.append(f"prefrun / {label:8}: {throughput:.2f}x throughput{spread}, "
                         f"{ratios[label]['peak_memory']:.2f}x peak memory"
                         + (" (TRL with padding_free)" if r.get("padding_free") else "")
                         + (f" ({r['padding_free_note']})" if r.get("padding_free_note") else ""))
    if "limit" in results:
        share, spread = per_repeat(results["limit"])
        ratios["limit"] = share
        lines.append(f"prefrun at {share:.2f}{spread} of the packed no-padding limit's speed "
                     f"(limit {results['limit']['s_per_step'] * 1e3:.0f} ms/step, prefrun {ours['s_per_step'] * 1e3:.0f} ms)")
    return lines


def _print_summary(everything: dict) -> None:
    print("\n=== summary: prefrun against each side (throughput ratio; memory ratio) ===")
    for key, results in everything.items():
        ours = results.get("prefrun") or {}
        r = ours.get("ratios", {})
        parts = [f"{side} {r[side]['throughput']:.2f}x ({r[side]['peak_memory']:.2f}x mem)" for side in ("trl", "trl_best")
                 if side in r]
        if "limit" in r:
            parts.append(f"limit {r['limit']:.2f}")
        print(f"{key:>14}: " + ", ".join(parts))


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
           "model_type": type(model).__name__.removesuffix("ForCausalLM"),
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


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


class _Clock:
    """Timestamps after each optimiser step (wall, own CPU, machine CPU), and the token counts of
    each policy forward."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu: list[tuple[float, float, float | None]] = []  # this process (user, system), machine CPU s
        self.forwards: list[tuple[int, int]] = []  # (non-pad tokens, padded positions)

    def watch_optimizer(self, optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: self.stamp())

    def stamp(self) -> None:
        self.stamps.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.append((usage.ru_utime, usage.ru_stime, _busy_cpu_s()))

    def watch_model(self, model) -> None:
        def hook(_module, args, kwargs):
            if not torch_grad_enabled():  # the training forwards only (not scoring or checks)
                return
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


def _prefrun_cfg(args):
    """conf/trainer/default.yaml and conf/optim/adamw.yaml as shipped, with the bench's loop settings and
    this side's `--prefrun` overrides (trainer.KEY=VALUE, optim.KEY=VALUE)."""
    import yaml
    from omegaconf import OmegaConf

    trainer, optim = OmegaConf.load(TRAINER_YAML), OmegaConf.load(OPTIM_YAML)
    trainer.batch_size = args.batch
    trainer.grad_accum = 1
    trainer.max_steps = args.warmup + args.steps
    trainer.log_every = 10**9  # only the final step logs (mean over all steps)
    trainer.mixed_precision = "bf16" if args.precision[0] == "bf16" else "no"
    trainer.save_final = False
    trainer.save_every = 0
    optim.lr = args.lr
    for item in (args.prefrun or [""])[0].split():
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        if group not in ("trainer", "optim") or not name or not _:
            sys.exit(f"--prefrun {item!r}: want trainer.KEY=VALUE or optim.KEY=VALUE")
        OmegaConf.update(trainer if group == "trainer" else optim, name, yaml.safe_load(value), force_add=True)
    return trainer, optim


def _reference_batch_size(cfg) -> int:
    """Prompts per reference forward: trainer.reference_batch_size, null meaning the training batch (prefrun's rule)."""
    return int(cfg.get("reference_batch_size") or cfg.batch_size)


def side_prefrun(args) -> None:
    import functools

    torch, model, tokenizer, records, base = _load(args)
    from accelerate.utils import set_seed
    from hydra.utils import instantiate

    import prefrun.train as ptrain
    from prefrun.data import PreferenceData, attach_reference_logps, tokenize_record
    from prefrun.losses import dpo_loss
    from prefrun.model import fingerprint
    from prefrun.samplers import DatasetSampler

    cfg, optim_cfg = _prefrun_cfg(args)
    set_seed(args.seed)
    start = time.perf_counter()
    data = PreferenceData(max_length=max_length(args), max_prompt_length=None)
    items = [tokenize_record(r, tokenizer) for r in records]
    examples = data.finish(items, len(items), "bench", "train")
    if len(examples) != len(records):
        raise RuntimeError("examples were dropped by truncation; raise max_length")
    setup_s = time.perf_counter() - start

    accelerator = ptrain.make_accelerator(cfg)
    start = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="prefrun_cache_", dir=args.workdir)  # fresh: a rerun must not hit it
    with accelerator.autocast():  # what run.py does: the reference under the training precision
        attach_reference_logps(examples, model, tokenizer, cache_dir=cache_dir,
                               batch_size=_reference_batch_size(cfg), weights_key=fingerprint(model))
    precompute_s = time.perf_counter() - start

    before_train = _start_train_peak()
    clock = _Clock()
    clock.watch_model(model)
    phases = _Phases(ptrain) if args.profile else None
    make_optimizer = instantiate(optim_cfg)

    def optimizer_factory(params):
        optimizer = make_optimizer(params=params)
        clock.watch_optimizer(optimizer)
        if phases:
            phases.watch_optimizer(optimizer)
        return optimizer

    if phases:
        phases.watch(model, accelerator)
    start = time.perf_counter()
    last = ptrain.train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=BETA), beta=BETA,
                        sampler=DatasetSampler(), optimizer_factory=optimizer_factory, cfg=cfg,
                        accelerator=accelerator, seed=args.seed, on_log=lambda _metrics: None)
    train_call_s = time.perf_counter() - start
    result = {"side": "prefrun", **clock.result(args.warmup, args.steps), "mean_loss": last["loss"],
              "ref_precompute_s": precompute_s, "ref_sequences_per_s": 2 * len(records) / precompute_s,
              "setup_s": setup_s, "train_call_s": train_call_s, "optim": _optim_name(optim_cfg),
              "base_rss_mb": base, "torch_threads": torch.get_num_threads(), **_train_peak(before_train)}
    if phases:  # the memory numbers above are from before the profiler ran
        result["profile"] = phases.summary(args.warmup, args.steps)
        result["profile"].update(_torch_profile(args, torch, ptrain, model, tokenizer, examples, cfg, make_optimizer))
    _emit(result)


def _optim_name(optim_cfg) -> str:
    fused = optim_cfg.get("fused")
    return optim_cfg._target_.rsplit(".", 1)[-1] + (" fused" if fused else " foreach" if optim_cfg.get("foreach") else "")


def side_trl(args, best: bool = False) -> None:
    torch, model, tokenizer, records, base = _load(args)
    import trl
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg = OmegaConf.load(TRAINER_YAML)
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

    optim = {"optim": args.trl_optim} if args.trl_optim else {}
    config = DPOConfig(
        output_dir=str(args.workdir / "trl_out"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=args.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * total), max_grad_norm=cfg.max_grad_norm or 0.0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=BETA, loss_type="sigmoid",
        max_length=max_length(args), precompute_ref_log_probs=best, padding_free=args.padding_free,
        precompute_ref_batch_size=args.batch, bf16=args.precision[0] == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=args.seed, **optim,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(records),
                      processing_class=tokenizer, callbacks=[Stamp()])
    init_s = time.perf_counter() - start
    if args.padding_free and not getattr(trainer, "padding_free", False):
        _emit({"side": "trl_best", "skipped": f"TRL {trl.__version__} turns padding_free off for DPO"})
        return
    before_train = _start_train_peak()
    clock.watch_model(trainer.model)
    start = time.perf_counter()
    output = trainer.train()
    train_call_s = time.perf_counter() - start
    precompute_s = timings.get("ref_precompute_s")
    _emit({"side": "trl_best" if best else "trl", **clock.result(args.warmup, args.steps),
           "mean_loss": output.training_loss, "ref_precompute_s": precompute_s,
           "ref_sequences_per_s": 2 * len(records) / precompute_s if precompute_s else None,
           "setup_s": init_s - (precompute_s or 0.0), "train_call_s": train_call_s, "optim": str(config.optim),
           "padding_free": bool(getattr(trainer, "padding_free", False)),
           "reference_model": trainer.ref_model is not None, "base_rss_mb": base,
           "torch_threads": torch.get_num_threads(), **_train_peak(before_train)})


def side_limit(args) -> None:
    """Forward + backward over each step's real tokens only: the step's pairs packed in one row (attention per
    sequence, prefrun's packed_sdpa), log-probs of the completion tokens, no optimiser, no loop around it."""
    torch, model, tokenizer, records, base = _load(args)
    from prefrun.data import collate, tokenize_record
    from prefrun.logprobs import check_packing, sequence_logps, use_packed_attention
    from prefrun.train import disable_dropout

    if not use_packed_attention(model):
        sys.exit(f"limit: {type(model).__name__} has no SDPA / flash attention to run packed rows")
    examples = [tokenize_record(r, tokenizer) for r in records]
    batches = [collate(examples[i : i + args.batch], tokenizer.pad_token_id, packed=True)
               for i in range(0, len(examples), args.batch)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision[0] == "bf16")
    with autocast:
        if not check_packing(model, batches[0], collate(examples[: args.batch], tokenizer.pad_token_id)):
            _emit({"side": "limit", "skipped": f"packed rows give {type(model).__name__} other log-probs than "
                                               "padded rows: there is no packed limit to time on this model"})
            return
    before = _start_train_peak()
    clock = _Clock()
    clock.watch_model(model)
    model.train()
    disable_dropout(model)  # as both trainers do by default
    for batch in batches[: args.warmup + args.steps]:
        with autocast:
            logps = sequence_logps(model, batch, logits_budget_mb=float("inf"))
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        clock.stamp()
    _emit({"side": "limit", **clock.result(args.warmup, args.steps), "base_rss_mb": base,
           "torch_threads": torch.get_num_threads(), **_train_peak(before)})


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
            "collate (packing or padding rows)": ms("collate"),
            "model forward (incl. LM head on completion positions)": fwd,
            "log-probs: cross-entropy, sum per sequence": logps - fwd,
            "backward": ms("backward"),
            "clip_grad_norm": ms("clip_grad_norm"),
            "optimizer.step": ms("optimizer.step"),
        }
        step = (hi - lo) * 1e3 / steps
        phases["rest: loss, isfinite sync, sched, zero_grad, metrics, loader"] = step - sum(phases.values())
        return {"steps": steps, "step_ms": step, "phases_ms": phases}


def _torch_profile(args, torch, ptrain, model, tokenizer, examples, cfg, make_optimizer) -> dict:
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
        return make_optimizer(params=params)

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
    sides = {"prepare": side_prepare, "prefrun": side_prefrun, "trl": side_trl, "limit": side_limit,
             "trl_best": lambda a: side_trl(a, best=True)}
    sides[args.side](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
