"""Time per online round, split into its parts, with vLLM kept alive across rounds (generator.mode=persistent)
against a fresh engine per round (mode=fresh), on the embedded task, for the tiny model and a ~10M one.

Runs `prefrun train experiment=iterdpo_tiny` as a user would, reads each round's `round/time/*` and `sync/*`
from summary.json, and prints one table: seconds per part (mean over the rounds after the first, whose sync
starts the engine), and the share of a round spent on the weight push + probe.

    python scripts/bench_online.py
    python scripts/bench_online.py --sizes tiny --modes persistent --rounds 3 --prompts 256
    python scripts/bench_online.py --model-size 10m -- trainer.max_steps=20     # extra overrides after --
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Embedded-model sizes (head_dim 64, as vLLM's CPU kernels need).
SIZES = {
    "tiny": [],  # the default ~0.5M
    "10m": ["model.build.hidden_size=320", "model.build.num_heads=5", "model.build.num_layers=6",
            "model.build.intermediate_size=1280", "model.build.sft_steps=150"],
}
PARTS = ("sync_s", "generate_s", "judge_s", "reference_s", "train_s", "extrapolate_s", "eval_s")


def run(size: str, mode: str, args, out: Path) -> dict:
    run_dir = out / f"{size}-{mode}"
    command = [sys.executable, "-m", "prefrun", "train", "experiment=iterdpo_tiny", f"generator.mode={mode}",
               f"online.rounds={args.rounds}", f"online.prompts_per_round={args.prompts}",
               f"data.num_prompts={args.rounds * args.prompts}", "eval.num_prompts=64", "trainer.epochs=1",
               f"hydra.run.dir={run_dir}", *SIZES[size], *args.overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["command_s"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--modes", nargs="+", choices=["persistent", "fresh"], default=["persistent", "fresh"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=256, help="prompts per round")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-online-"))

    print(f"rounds {args.rounds} x {args.prompts} prompts x 4 candidates, 1 epoch per round; seconds per round, "
          "mean over rounds 2.. (round 1's sync starts the engine)\n")
    print("| model | mode | " + " | ".join(p.removesuffix("_s") for p in PARTS)
          + " | round | push + probe | share of round | engine start (round 1 sync) | max probe diff |")
    print("|---" * (len(PARTS) + 7) + "|")
    for size in args.sizes:
        for mode in args.modes:
            summary = run(size, mode, args, out)
            later = summary["rounds"][1:] or summary["rounds"]
            mean = {p: statistics.fmean(r.get(f"round/time/{p}", 0.0) for r in later) for p in PARTS}
            total = sum(mean.values())
            push = statistics.fmean(r["sync/time_s"] for r in later)
            if mode == "fresh":  # the engine starts inside generate: the push is the save, the rest is generate's
                push = mean["sync_s"]
            diff = max(r["sync/max_abs_logp_diff"] for r in summary["rounds"])
            first = summary["rounds"][0]["round/time/sync_s"]
            print(f"| {size} | {mode} | " + " | ".join(f"{mean[p]:.2f}" for p in PARTS)
                  + f" | {total:.1f} | {push:.3f} | {100 * push / total:.1f}% | {first:.1f} | {diff:.1e} |")
    print(f"\nrun directories: {out}")


if __name__ == "__main__":
    main()
