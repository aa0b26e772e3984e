#!/usr/bin/env python
"""An MC-PO training step against a DPO step on the same model and batch (CPU, fp32), in one run.

    python scripts/bench_mcpo.py                      # ~6.3M-param Llama, 8 prompts/step, K = 8, M = 2
    python scripts/bench_mcpo.py --model <dir>        # any local causal LM
    python scripts/bench_mcpo.py --pool 8 --negatives 2 --refresh 1

Both sides run prefrun's real loop (`prefrun.train.train`, conf/trainer/default.yaml, AdamW, no logging)
on the same prompts: DPO on pairs (the pool's first two candidates, `sampler=dataset`), MC-PO on the
whole pools (`loss=mcpo_cd sampler=cd`: a no-grad forward over all K candidates to score them, then the
chosen one and the M draws, deduplicated, through the forward with gradient). Token ids are random, with
prompt and completion lengths drawn uniformly from --prompt-len and --completion-len. Time per optimiser
step is steady-state (the steps after --warmup), from a hook on the optimiser. Sides alternate
(--repeats) so that machine noise hits both. The cost model: a forward is ~1/3 of a forward + backward,
so per prompt DPO costs 2 × 3 = 6 forward units and MC-PO K (the scoring pass over the whole pool) +
3·S (S = y_w and the distinct draws, which the scoring pass cannot spare: they need a graph), i.e.
MC-PO / DPO ≈ (K + 3·S) / 6 on a matmul-bound step; a no-grad forward is a little cheaper than 1/3.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split("-"))
    return lo, hi


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a local causal LM (default: build a random Llama)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="prompts per optimiser step")
    p.add_argument("--pool", type=int, default=8, help="K candidates per prompt")
    p.add_argument("--negatives", type=int, default=2, help="M draws per prompt")
    p.add_argument("--refresh", type=int, default=1, help="sampler.refresh_every")
    p.add_argument("--prompt-len", type=_range, default=(32, 128))
    p.add_argument("--completion-len", type=_range, default=(16, 96))
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps per side and repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args()


def build(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                             intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                             num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                             max_position_embeddings=512))
    return model


def examples(args, vocab: int, num: int):
    import random

    from prefrun.data import Example

    rng = random.Random(args.seed)
    out = []
    for _ in range(num):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))]
        pool = [[rng.randrange(3, vocab) for _ in range(rng.randint(*args.completion_len))] + [2]
                for _ in range(args.pool)]
        out.append(Example(prompt, pool, scores=[float(args.pool - i) for i in range(args.pool)]))
    return out


def run_side(side: str, args, model_state, build_model, pool_examples) -> dict:
    import torch
    from omegaconf import OmegaConf

    import prefrun.train as ptrain
    from prefrun.data import Example
    from prefrun.losses import dpo_loss, mcpo_cd_loss
    from prefrun.samplers import CDSampler, DatasetSampler

    model = build_model()
    model.load_state_dict(model_state)
    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "trainer" / "default.yaml")
    cfg.batch_size, cfg.max_steps, cfg.log_every, cfg.mixed_precision, cfg.save_every = \
        args.batch, args.warmup + args.steps, 10**9, "no", 0
    if side == "dpo":
        data = [Example(ex.prompt_ids, ex.completion_ids[:2], ex.reference_logps[:2]) for ex in pool_examples]
        loss, sampler = functools.partial(dpo_loss, beta=0.1), DatasetSampler()
    else:
        data = pool_examples
        loss = functools.partial(mcpo_cd_loss, beta=0.1)
        sampler = CDSampler(num_negatives=args.negatives, refresh_every=args.refresh)
    stamps: list[float] = []

    def optimizer_factory(params):
        optimizer = torch.optim.AdamW(params, lr=3e-4)
        optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
        return optimizer

    last = ptrain.train(model, SimpleNamespace(pad_token_id=0), data, loss_fn=loss, beta=0.1, sampler=sampler,
                        optimizer_factory=optimizer_factory, cfg=cfg, accelerator=ptrain.make_accelerator(cfg),
                        seed=args.seed, on_log=lambda _row: None)
    timed = stamps[args.warmup :]
    return {"step_s": (timed[-1] - timed[0]) / (len(timed) - 1), "sequences_with_grad": last["sequences/with_grad"],
            "loss": last["loss"]}


def main() -> None:
    args = parse()
    import torch

    from prefrun.data import attach_reference_logps

    model = build(args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vocab = model.config.vocab_size
    data = examples(args, vocab, args.batch * (args.warmup + args.steps))
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        attach_reference_logps(data, model, SimpleNamespace(pad_token_id=0), cache_dir=cache, batch_size=args.batch,
                               weights_key="bench")
    results: dict[str, list[dict]] = {"dpo": [], "mcpo": []}
    for _ in range(args.repeats):
        for side in ("dpo", "mcpo"):
            results[side].append(run_side(side, args, state, lambda: build(args), data))
    dpo = statistics.median(r["step_s"] for r in results["dpo"])
    mcpo = statistics.median(r["step_s"] for r in results["mcpo"])
    k = args.pool
    distinct = results["mcpo"][0]["sequences_with_grad"] / args.batch  # S per prompt
    model_ratio = (k + 3 * distinct) / 6
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {params:.1f}M params, batch {args.batch} prompts, K = {k}, M = {args.negatives}, refresh_every {args.refresh}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"DPO step   {dpo * 1e3:8.1f} ms  ({results['dpo'][0]['sequences_with_grad']:.0f} sequences with grad)")
    print(f"MC-PO step {mcpo * 1e3:8.1f} ms  ({results['mcpo'][0]['sequences_with_grad']:.1f} sequences with grad "
          f"after deduplication, {k} without)")
    print(f"MC-PO / DPO = {mcpo / dpo:.2f}x  (target <= 2.5x; cost model (K + 3·S)/6 = {model_ratio:.2f}x)")
    print("runs (s/step): dpo " + ", ".join(f"{r['step_s']:.3f}" for r in results["dpo"]) + "; mcpo "
          + ", ".join(f"{r['step_s']:.3f}" for r in results["mcpo"]))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                        "ratio": mcpo / dpo}, indent=2))


if __name__ == "__main__":
    main()
