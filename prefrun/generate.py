"""Candidate generation from a policy. The HF backend serves evaluation and small offline jobs;
the vLLM backend (online rounds) plugs in beside it with the same signature."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` completions per prompt (temperature 0 = greedy), decoded without special tokens."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    device = next(model.parameters()).device
    completions: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples if temperature > 0 else 1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            per_prompt = num_samples if temperature > 0 else 1
            for i in range(len(chunk)):
                group = texts[i * per_prompt : (i + 1) * per_prompt]
                completions.append(group * (num_samples // per_prompt))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions
