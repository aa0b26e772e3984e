#!/usr/bin/env python
"""Candidate generation: vLLM vs HF `generate`, through prefrun's generators, on one model and one set of prompts.

    python scripts/bench_generate.py                    # builds the embedded tiny Llama (0.4M) and a ~100M Llama
    python scripts/bench_generate.py --model DIR        # any local save_pretrained directory instead
    python scripts/bench_generate.py --json out.json    # the numbers as JSON too

Both sides run prefrun's own code path (`HFGenerator.generate` in this process, `VLLMGenerator` with its
engine in a child process) on the same prompts (the sort task's, tokenized by `prompt_ids`), the same
sampling (`--num-candidates` per prompt at temperature 1, top-p 1) and the same number of tokens: EOS is held
back (`min_new_tokens = max_new_tokens`), so random-weight models generate exactly `--max-new-tokens` per
candidate on both sides (checked). Both return token ids and per-token log-probs.

What is timed:
- HF: one warm-up call on `--warmup-prompts` prompts, then the timed call on all prompts (`generate_s`).
- vLLM: one `generate_many` call, i.e. one child: `import vllm`, engine start, a warm-up set (the same
  warm-up prompts; the first batch an engine runs is slower), the timed set, shutdown. Steady-state
  tokens/s is the timed set alone; "whole call" is what one generate() costs from the caller's side
  (save the policy, child start, import, engine start, both sets, shutdown).
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
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--warmup-prompts", type=int, default=8)
    p.add_argument("--num-candidates", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hf-batch-size", type=int, default=64, help="prompts per HF generate() call")
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

    hf = HFGenerator(**sampling, batch_size=args.hf_batch_size)
    hf.generate(warmup, model=model, tokenizer=tokenizer)
    start = time.perf_counter()
    hf_out = hf.generate(prompts, model=model, tokenizer=tokenizer)
    hf_total = time.perf_counter() - start
    hf_tokens = sum(len(ids) for c in hf_out for ids in c.token_ids)
    print(f"hf:   {hf_tokens / hf.last_stats['generate_s']:.0f} tokens/s ({hf.last_stats['generate_s']:.1f} s)",
          flush=True)

    vllm = VLLMGenerator(**sampling, kv_cache_memory_bytes=kv_mib * 2**20, max_num_seqs=rows)
    start = time.perf_counter()
    _, vllm_out = vllm.generate_many([warmup, prompts], model=model, tokenizer=tokenizer)
    whole = time.perf_counter() - start
    stats = vllm.last_stats
    vllm_tokens = sum(len(ids) for c in vllm_out for ids in c.token_ids)
    if hf_tokens != expected or vllm_tokens != expected:
        raise SystemExit(f"token counts differ: hf {hf_tokens}, vllm {vllm_tokens}, expected {expected}")
    steady = stats["set_generate_s"][1]
    result = {
        "model": name, "params_m": round(params / 1e6, 1), "dtype": args.dtype, "prompts": args.num_prompts,
        "num_candidates": args.num_candidates, "max_new_tokens": args.max_new_tokens, "tokens": expected,
        "hf_batch_size": args.hf_batch_size, "vllm_max_num_seqs": rows, "vllm_kv_cache_mib": kv_mib,
        "hf_generate_s": round(hf.last_stats["generate_s"], 2),
        "hf_tokens_per_s": round(hf_tokens / hf.last_stats["generate_s"]),
        "vllm_generate_s": round(steady, 2), "vllm_tokens_per_s": round(vllm_tokens / steady),
        "ratio_vllm_over_hf": round(hf.last_stats["generate_s"] / steady, 2),
        "vllm_import_s": round(stats["import_s"], 1), "vllm_engine_start_s": round(stats["engine_start_s"], 1),
        "vllm_first_set_s": round(stats["set_generate_s"][0], 2), "vllm_whole_call_s": round(whole, 1),
        "hf_whole_call_s": round(hf_total, 1),
        "whole_call_ratio_vllm_over_hf": round(hf_total / whole, 2),
    }
    print(f"vllm: {result['vllm_tokens_per_s']} tokens/s ({steady:.1f} s) steady state; engine start "
          f"{result['vllm_engine_start_s']} s (+ import {result['vllm_import_s']} s, warm-up set "
          f"{result['vllm_first_set_s']} s); whole generate() call {result['vllm_whole_call_s']} s vs hf "
          f"{result['hf_whole_call_s']} s", flush=True)
    print(f"ratio vLLM / HF tokens/s: {result['ratio_vllm_over_hf']:.2f}x steady state, "
          f"{result['whole_call_ratio_vllm_over_hf']:.2f}x per whole call", flush=True)
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        models = [(Path(m).name, Path(m)) for m in args.model] if args.model else \
            [("tiny-0.4M", build_tiny(Path(tmp) / "tiny")), ("llama-100M", build_100m(Path(tmp) / "llama100m"))]
        for name, path in models:
            results.append(bench(name, path, args))
    print("\n| model | params | HF tokens/s | vLLM tokens/s | vLLM/HF | engine start | vLLM whole call | HF whole call |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params_m']}M | {r['hf_tokens_per_s']} | {r['vllm_tokens_per_s']} | "
              f"{r['ratio_vllm_over_hf']:.2f}x | {r['vllm_engine_start_s']} s (+{r['vllm_import_s']} s import) | "
              f"{r['vllm_whole_call_s']} s | {r['hf_whole_call_s']} s |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
