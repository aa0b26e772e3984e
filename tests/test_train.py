"""The training loop: gradient accumulation is the same optimisation as a bigger batch."""

import functools
import json

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.data import attach_reference_logps, tokenize_record
from prefrun.losses import dpo_loss
from prefrun.model import fingerprint
from prefrun.samplers import DatasetSampler
from prefrun.train import make_accelerator, train


def train_once(model_dir, pairs_jsonl, cache, *, batch_size, grad_accum, max_steps=2):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in pairs_jsonl.read_text().splitlines()][:16]
    examples = [tokenize_record(r, tokenizer) for r in records]
    attach_reference_logps(examples, model, tokenizer, cache_dir=cache, batch_size=8, weights_key=fingerprint(model))
    cfg = OmegaConf.create({"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 1, "max_steps": max_steps,
                            "scheduler": "linear", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "mixed_precision": "no",
                            "log_every": 1})
    rows = []
    train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=0.5), beta=0.5,
          sampler=DatasetSampler(), optimizer_factory=functools.partial(torch.optim.SGD, lr=0.5), cfg=cfg,
          accelerator=make_accelerator(cfg), seed=0, on_log=rows.append)
    return model, rows


def test_gradient_accumulation_matches_the_larger_batch(bpe_model_dir, pairs_jsonl, tmp_path):
    big, big_rows = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=8, grad_accum=1)
    accumulated, acc_rows = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=2)
    assert [r["step"] for r in acc_rows] == [1, 2]
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert acc_rows[-1]["loss"] == big_rows[-1]["loss"] or abs(acc_rows[-1]["loss"] - big_rows[-1]["loss"]) < 1e-5
    untouched = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(untouched.parameters(), big.parameters()))  # it did train
