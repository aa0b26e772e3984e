#!/usr/bin/env python
"""Candidate generation: vLLM vs HF `generate`, through prefrun's generators, on one model and one set of prompts.

    python scripts/bench_generate.py                    # builds the embedded tiny Llama (~0.5M) and a ~100M Llama
    python scripts/bench_generate.py --model DIR        # any local save_pretrained directory instead
    python scripts/bench_generate.py --json out.json    # the numbers as JSON too

Both sides run prefrun's own code path (`HFGenerator.generate` in this process, `VLLMGenerator` with its
engine in a child process) on the same prompts (the sort task's, tokenized by `prompt_ids`), the same
sampling (`--num-candidates` per prompt at temperature 1, top-p 1) and the same number of tokens: EOS is held
back (`min_new_tokens = max_new_tokens`), so random-weight models generate exactly `--max-new-tokens` per
candidate on both sides (checked). Both return token ids and per-token log-probs.

What is timed (the machine may be shared: each side runs `--repeats` timed calls, the best is reported,
and the 1-minute load average before and after is recorded):
- HF: one warm-up call on `--warmup-prompts` prompts, then the timed calls on all prompts.
- vLLM: one `generate_many` call, i.e. one child: `import vllm`, engine start, a warm-up set (the same
  warm-up prompts; the first batch an engine runs is slower), the timed sets, shutdown. Its fixed cost
  per generate() call is the whole call minus the sets' generation time (saving the policy, child start,
  import, engine start, shutdown); break-even is the number of tokens one call must generate for vLLM's
  faster generation to repay that cost.
Both sides keep the same number of sequences in flight: one HF batch (`--hf-batch-size` prompts x K rows) is
vLLM's `max_num_seqs`, and its KV cache is sized to hold them at full length (`--kv-cache-mib` overrides it).

Models built by default, in a temporary directory (random weights, float32, head_dim 64 as vLLM's CPU
attention requires): the embedded recipe's architecture (prefrun/tiny.py: hidden 128, 2 layers, 2 heads,
character tokenizer), and hidden 768, 12 layers, 12 heads, intermediate 2048 with a byte-level BPE
tokenizer of 8192 tokens trained here (~98M parameters).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefrun.generate import HFGenerator, VLLMGenerator  # noqa: E402
from prefrun.tasks import SortDigits  # noqa: E402
from prefrun.tiny import char_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="a local model directory (repeatable); default: build two")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side; the best one is reported")
    p.add_argument("--warmup-prompts", type=int, default=8)
    p.add_argument("--num-candidates", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hf-batch-size", type=int, default=32,
                   help="prompts per HF generate() call; x K rows = vLLM max_num_seqs (32 x 8 = its CPU default)")
    p.add_argument("--kv-cache-mib", type=int, default=None, help="vLLM KV cache; default: one HF batch's worth")
    p.add_argument("--dtype", default="float32", help="dtype to load --model in (built models are float32)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


# --------------------------------------------------------------------------------------------- models


def build_tiny(path: Path) -> Path:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_100m(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + list("0123456789:.,?")
    corpus = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(40))
              for _ in range(4000)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<pad>", "<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- bench


def kv_bytes_per_token(model) -> int:
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def bench(name: str, path: Path, args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    task = SortDigits(min_digits=6, max_digits=12)
    prompts, warmup = task.prompts("train", args.num_prompts), task.prompts("eval", args.warmup_prompts)
    longest = max(len(tokenizer(p).input_ids) for p in prompts + warmup)
    rows = min(args.hf_batch_size, args.num_prompts) * args.num_candidates
    one_batch = rows * (longest + args.max_new_tokens) * kv_bytes_per_token(model)
    kv_mib = args.kv_cache_mib or max(256, -(-one_batch // 2**20))
    sampling = {"num_candidates": args.num_candidates, "max_new_tokens": args.max_new_tokens,
                "min_new_tokens": args.max_new_tokens, "seed": 0}
    expected = args.num_prompts * args.num_candidates * args.max_new_tokens
    print(f"\n== {name}: {params / 1e6:.1f}M parameters, {args.dtype}; {args.num_prompts} prompts x "
          f"{args.num_candidates} x {args.max_new_tokens} tokens = {expected} tokens per side", flush=True)

    load_before = os.getloadavg()[0]
    hf = HFGenerator(**sampling, batch_size=args.hf_batch_size)
    hf.generate(warmup, model=model, tokenizer=tokenizer)
    hf_times = []
    for _ in range(args.repeats):
        hf_out = hf.generate(prompts, model=model, tokenizer=tokenizer)
        hf_times.append(hf.last_stats["generate_s"])
        check_tokens("hf", hf_out, expected)
    print(f"hf:   {expected / min(hf_times):.0f} tokens/s (best of {args.repeats}: "
          f"{', '.join(f'{t:.1f}' for t in hf_times)} s)", flush=True)

    vllm = VLLMGenerator(**sampling, kv_cache_memory_bytes=kv_mib * 2**20, max_num_seqs=rows)
    start = time.perf_counter()
    _, *vllm_outs = vllm.generate_many([warmup] + [prompts] * args.repeats, model=model, tokenizer=tokenizer)
    whole = time.perf_counter() - start
    for out in vllm_outs:
        check_tokens("vllm", out, expected)
    stats = vllm.last_stats
    vllm_times = stats["set_generate_s"][1:]
    fixed = whole - sum(stats["set_generate_s"])  # save, child start, import, engine start, shutdown
    hf_tps, vllm_tps = expected / min(hf_times), expected / min(vllm_times)
    result = {
        "model": name, "params_m": round(params / 1e6, 1), "dtype": args.dtype, "prompts": args.num_prompts,
        "num_candidates": args.num_candidates, "max_new_tokens": args.max_new_tokens, "tokens": expected,
        "repeats": args.repeats, "hf_batch_size": args.hf_batch_size, "vllm_max_num_seqs": rows,
        "vllm_kv_cache_mib": kv_mib, "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "hf_generate_s": [round(t, 2) for t in hf_times], "hf_tokens_per_s": round(hf_tps),
        "vllm_generate_s": [round(t, 2) for t in vllm_times], "vllm_tokens_per_s": round(vllm_tps),
        "ratio_vllm_over_hf": round(vllm_tps / hf_tps, 2),
        "vllm_import_s": round(stats["import_s"], 1), "vllm_engine_start_s": round(stats["engine_start_s"], 1),
        "vllm_warmup_set_s": round(stats["set_generate_s"][0], 2), "vllm_fixed_cost_per_call_s": round(fixed, 1),
        # vLLM's fixed cost is repaid once a call generates this many tokens (None: it never is)
        "break_even_tokens": round(fixed / (1 / hf_tps - 1 / vllm_tps)) if vllm_tps > hf_tps else None,
    }
    print(f"vllm: {vllm_tps:.0f} tokens/s (best of {args.repeats}: {', '.join(f'{t:.1f}' for t in vllm_times)} s); "
          f"fixed cost per generate() call {fixed:.1f} s = engine start {stats['engine_start_s']:.1f} s + import "
          f"{stats['import_s']:.1f} s + save, child start and shutdown; warm-up set {stats['set_generate_s'][0]:.1f} s",
          flush=True)
    print(f"ratio vLLM / HF tokens/s: {result['ratio_vllm_over_hf']:.2f}x; break-even per call: "
          f"{result['break_even_tokens'] or 'never'} tokens", flush=True)
    return result


def check_tokens(side: str, out, expected: int) -> None:
    got = sum(len(ids) for c in out for ids in c.token_ids)
    if got != expected:
        raise SystemExit(f"{side} generated {got} tokens, expected {expected}: the two sides are not comparable")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        models = [(Path(m).name, Path(m)) for m in args.model] if args.model else \
            [("tiny-0.5M", build_tiny(Path(tmp) / "tiny")), ("llama-100M", build_100m(Path(tmp) / "llama100m"))]
        for name, path in models:
            results.append(bench(name, path, args))
    print("\n| model | params | HF tokens/s | vLLM tokens/s | vLLM/HF | vLLM engine start | vLLM fixed cost per call "
          "| break-even tokens per call | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params_m']}M | {r['hf_tokens_per_s']} | {r['vllm_tokens_per_s']} | "
              f"{r['ratio_vllm_over_hf']:.2f}x | {r['vllm_engine_start_s']} s | {r['vllm_fixed_cost_per_call_s']} s | "
              f"{r['break_even_tokens'] or 'never'} | {r['load_avg_1min'][0]}-{r['load_avg_1min'][1]} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
