#!/usr/bin/env python
"""Peak memory of the log-prob step with a large vocabulary: whole logits vs chunked (trainer.logits_budget_mb).

    python scripts/bench_vocab.py                       # a tiny Llama with a 150k-token vocabulary
    python scripts/bench_vocab.py --vocab 32000 --rows 32 --completion 128

Builds a randomly initialised Llama (hidden 64, 2 layers, untied head) with `--vocab` tokens and random
token ids (`--rows` sequences of `--prompt` + `--completion` tokens), then, in one child process per
setting, runs `--steps` forward + backward passes of `prefrun.logprobs.sequence_logps` on the training
layout (packed rows, as trainer.padding_free=true; `--padded` for left-padded rows). Settings: the
whole-logits path (`logits_budget_mb` = inf: what prefrun did before chunking, [positions x vocab] fp32
logits, their log-softmax and gradient all alive at once) and each `--budgets` value. Each child prints its
peak RSS (VmHWM, the child's own), the mean step time, and its log-probs; the parent prints the largest
difference from the whole-logits log-probs and gradient norm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--vocab", type=int, default=150_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rows", type=int, default=16, help="sequences per forward (default 16: 8 pairs)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (default 64)")
    p.add_argument("--completion", type=int, default=96, help="completion tokens per sequence (default 96)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budgets", default="256,64", help="comma-separated logits_budget_mb values (default 256,64)")
    p.add_argument("--padded", action="store_true", help="left-padded rows instead of packed ones")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from prefrun.data import pad_rows
    from prefrun.logprobs import sequence_logps, use_packed_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.workdir / "model", dtype=torch.float32)
    use_packed_attention(model)
    ids = torch.randint(3, args.vocab, (args.rows, args.prompt + args.completion)).tolist()
    rows = [(r[: args.prompt], r[args.prompt :]) for r in ids]
    batch = pad_rows(rows, pad_id=0, packed=not args.padded)
    budget = float(args.child)
    base = peak_rss_mb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch, logits_budget_mb=budget)
        logps.sum().backward()
        times.append(time.perf_counter() - start)
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    print(json.dumps({"budget": budget, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base,
                      "s_per_step": sum(times[1:]) / max(1, len(times) - 1), "logps": logps.tolist(),
                      "grad_norm": grad_norm}), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return 0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="bench_vocab_") as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, head_dim=args.hidden,
                             max_position_embeddings=args.prompt + args.completion + 8, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        model.save_pretrained(workdir / "model")
        params = model.num_parameters()
        del model
        positions = args.rows * args.completion
        print(f"Llama {params / 1e6:.1f}M parameters, vocab {args.vocab}, {args.rows} rows of {args.prompt} + "
              f"{args.completion} tokens, {'padded' if args.padded else 'packed'}: whole logits = {positions} x "
              f"{args.vocab} fp32 = {positions * args.vocab * 4 / 2**20:.0f} MB per copy\n")
        results = []
        for budget in ["inf", *args.budgets.split(",")]:
            cmd = [sys.executable, __file__, "--child", budget, "--workdir", str(workdir),
                   *[f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "rows", "prompt", "completion", "steps")],
                   *(["--padded"] if args.padded else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                sys.exit(f"bench_vocab: the child for budget {budget} failed")
            results.append(json.loads(lines[-1]))
        whole = results[0]
        print(f"{'logits_budget_mb':>18} {'peak RSS MB':>12} {'vs whole':>9} {'s/step':>8} {'max |Δ logp|':>13} "
              f"{'(relative)':>11} {'Δ grad norm (rel)':>18}")
        for r in results:
            diff = max(abs(a - b) for a, b in zip(r["logps"], whole["logps"]))
            relative = max(abs(a - b) / abs(b) for a, b in zip(r["logps"], whole["logps"]))
            grad = abs(r["grad_norm"] - whole["grad_norm"]) / whole["grad_norm"]
            label = "inf (whole)" if r["budget"] == float("inf") else f"{r['budget']:g}"
            print(f"{label:>18} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / whole['peak_rss_mb']:8.2f}x "
                  f"{r['s_per_step']:8.2f} {diff:13.2e} {relative:11.1e} {grad:18.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
