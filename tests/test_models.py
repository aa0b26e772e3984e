"""A separate reference model and LoRA adapters, through the real CLI on tiny local models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import build_bpe_model, run_cli

pytestmark = pytest.mark.slow


def job(model_dir, pairs_jsonl, run_dir, *extra):
    return ["train", "model=hf", f"model.name_or_path={model_dir}", "data=jsonl", f"data.path={pairs_jsonl}", "~task",
            "trainer.batch_size=8", "trainer.max_steps=2", "trainer.log_every=1", "optim.lr=1e-2",
            f"hydra.run.dir={run_dir}", *extra]


def first_row(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_separate_reference_model(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    other = build_bpe_model(tmp_path / "other", seed=5)
    run_cli(job(bpe_model_dir, pairs_jsonl, tmp_path / "own"), tmp_path)
    run_cli(job(bpe_model_dir, pairs_jsonl, tmp_path / "sep", f"model.reference={other}"), tmp_path)
    own, sep = first_row(tmp_path / "own"), first_row(tmp_path / "sep")
    # Policy = reference at step 1: zero rewards. Another reference: rewards far from zero.
    assert abs(own["rewards/chosen"]) < 1e-4 and own["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert abs(sep["rewards/chosen"]) > 0.05
    assert own["logps/chosen"] == pytest.approx(sep["logps/chosen"], abs=1e-4)  # the same policy


def test_lora_trains_adapters_and_can_merge(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    run_cli(job(bpe_model_dir, pairs_jsonl, tmp_path / "lora", "+model/lora=default", "model.lora.r=4"), tmp_path)
    final = tmp_path / "lora" / "checkpoint-final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    log = (tmp_path / "lora" / "train.log").read_text()
    assert "trainable" in log and "0.00M trainable" not in log
    assert abs(first_row(tmp_path / "lora")["rewards/chosen"]) < 1e-4  # the reference is the base: zero rewards

    run_cli(job(bpe_model_dir, pairs_jsonl, tmp_path / "merged", "+model/lora=default", "model.lora.r=4",
                "model.lora.merge=true"), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "checkpoint-final")
    base = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    changed = [n for (n, a), b in zip(merged.named_parameters(), base.parameters()) if not torch.equal(a, b)]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved
