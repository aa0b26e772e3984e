"""Online rounds against offline training on the embedded task, with the same prompt budget.

Runs `prefrun train` (exactly as a user types it) for, by default, seeds 0, 1, 2 of:
  apo        experiment=apo_tiny                   3 rounds, α = 0.3
  iterative  experiment=apo_tiny online.alpha=0    3 rounds (≡ experiment=iterdpo_tiny)
  onmcpo     experiment=onmcpo_tiny                3 rounds, mcpo_cd + CD negatives, reference = the start
  onmcpo_previous  the same with online.ref=previous    reference = the policy at each round's start
  dpo        (the default job)                     offline, best-vs-worst pairs of 4 from the reference
  mcpo       experiment=mcpo_tiny                  offline, pools of 8 from the reference
Every job sees the task's 2048 train prompts once (online: 3 disjoint folds of 682) and trains 3 epochs on
each round's data. It prints markdown tables: held-out judged score per round and after (mean ± stderr over
seeds); the pairwise win rate against the starting policy per round (mean ± stderr over seeds, and each
seed's own 95% interval over prompts) and the length-controlled one; wall time and sync time per run.

    python scripts/results_online.py                       # generator=hf: no engine start per run
    python scripts/results_online.py --generator vllm      # the presets' real vLLM engine
    python scripts/results_online.py --seeds 0 1 --only apo iterative --out /tmp/online
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prefrun.report import mean_stderr

JOBS = {
    "apo": ["experiment=apo_tiny"],
    "iterative": ["experiment=apo_tiny", "online.alpha=0"],
    "onmcpo": ["experiment=onmcpo_tiny"],
    "onmcpo_previous": ["experiment=onmcpo_tiny", "online.ref=previous"],
    "dpo": [],
    "mcpo": ["experiment=mcpo_tiny"],
}
ONLINE = {"apo", "iterative", "onmcpo", "onmcpo_previous"}


def run(name: str, seed: int, out: Path, generator: str, extra: list[str]) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        args = [*JOBS[name], f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
        if name in ONLINE:
            args.append(f"generator={generator}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefrun", "train", *args], check=True, stdout=subprocess.DEVNULL)
        print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return json.loads(summary.read_text())


def scores(summary: dict, decoding: str) -> dict:
    """Judged scores: before, per round (θ̂_t; APO also θ_t, extrapolated), after."""
    out = {"before": summary["eval_before"][decoding]["mean"], "after": summary["eval_after"][decoding]["mean"]}
    for r in summary.get("rounds", []):
        out[f"round {r['round']}"] = r[f"round/eval/policy_hat/{decoding}/mean"]
        if f"round/eval/policy/{decoding}/mean" in r:
            out[f"round {r['round']} extrapolated"] = r[f"round/eval/policy/{decoding}/mean"]
    return out


def win_rates(summary: dict, decoding: str, key: str = "win_rate") -> dict:
    """The pairwise win rate against the start (`key`: win_rate or lc_win_rate) per round (θ̂_t; APO's θ_t as
    "extrapolated") and after, with each one's 95% interval over prompts."""
    def entry(pairwise: dict) -> tuple[float, list[float] | None]:
        return pairwise[key], pairwise.get(f"{key}_interval")

    after = summary["eval_after"][decoding].get("vs_start")
    out = {"after": entry(after)} if after else {}
    for r in summary.get("rounds", []):
        for which, label in (("policy_hat", f"round {r['round']}"), ("policy", f"round {r['round']} extrapolated")):
            pairwise = r["eval"].get(which, {}).get(decoding, {}).get("vs_start")
            if pairwise:
                out[label] = entry(pairwise)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--generator", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--out", type=Path, default=Path("outputs/results_online"))
    parser.add_argument("overrides", nargs="*", help="extra prefrun overrides for every job")
    args = parser.parse_args()

    results = {name: [run(name, seed, args.out, args.generator, args.overrides) for seed in args.seeds]
               for name in args.only}
    for decoding in ("sampled", "greedy"):
        columns = ["before", "round 1", "round 1 extrapolated", "round 2", "round 2 extrapolated", "round 3", "after"]
        print(f"\n### judged score, {decoding} (mean ± stderr over seeds {args.seeds})\n")
        print("| job | " + " | ".join(columns) + " | per seed (after) |")
        print("|---" * (len(columns) + 2) + "|")
        for name, summaries in results.items():
            per_run = [scores(s, decoding) for s in summaries]
            cells = [mean_stderr([r[c] for r in per_run if c in r]) for c in columns]
            print(f"| {name} | " + " | ".join(cells) + " | " + ", ".join(f"{r['after']:.3f}" for r in per_run) + " |")
    columns = ["round 1", "round 1 extrapolated", "round 2", "round 2 extrapolated", "round 3", "after"]
    for decoding in ("sampled", "greedy"):
        for key, what in (("win_rate", "win rate"), ("lc_win_rate", "length-controlled win rate")):
            print(f"\n### {what} against the starting policy, {decoding} (mean ± stderr over seeds {args.seeds}; "
                  "per seed: after, [its 95% interval over prompts])\n")
            print("| job | " + " | ".join(columns) + " | per seed (after) |")
            print("|---" * (len(columns) + 2) + "|")
            for name, summaries in results.items():
                per_run = [win_rates(s, decoding, key) for s in summaries]
                cells = [mean_stderr([r[c][0] for r in per_run if c in r]) for c in columns]
                seeds = ", ".join(f"{r['after'][0]:.3f}" + (f" [{r['after'][1][0]:.3f}, {r['after'][1][1]:.3f}]"
                                                            if r["after"][1] else "") for r in per_run if "after" in r)
                print(f"| {name} | " + " | ".join(cells) + f" | {seeds} |")
    print("\n### time per run (mean over seeds)\n")
    print("| job | wall s | generate s | judge s | reference s | train s | eval s | sync s | max sync diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, summaries in results.items():
        wall = statistics.fmean(s["wall_time_s"] for s in summaries)
        parts = []
        for part in ("generate_s", "judge_s", "reference_s", "train_s", "eval_s", "sync_s"):
            values = [sum(r.get(f"round/time/{part}", 0.0) for r in s.get("rounds", [])) for s in summaries]
            parts.append(f"{statistics.fmean(values):.1f}" if name in ONLINE else "—")
        diffs = [r.get("sync/max_abs_logp_diff", 0.0) for s in summaries for r in s.get("rounds", [])]
        diff = f"{max(diffs):.1e}" if diffs else "—"
        print(f"| {name} | {wall:.0f} | " + " | ".join(parts) + f" | {diff} |")


if __name__ == "__main__":
    main()
