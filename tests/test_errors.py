"""Bad models, unset keys and a diverging loss end the run with one line, and lose nothing."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from .conftest import TINY_JOB, run_cli

pytestmark = pytest.mark.slow


def one_line_failure(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), errors


def test_missing_model_dir(tmp_path, cache_dir, pairs_jsonl):
    proc = run_cli(["train", "model=hf", "model.name_or_path=/no/such/model", "data=jsonl", f"data.path={pairs_jsonl}",
                    "~task"], tmp_path, check=False)
    one_line_failure(proc, "model.name_or_path='/no/such/model': no such directory")


def test_model_that_is_not_a_causal_lm(tmp_path, cache_dir, pairs_jsonl):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    proc = run_cli(["train", "model=hf", f"model.name_or_path={tmp_path / 'vit'}", "data=jsonl",
                    f"data.path={pairs_jsonl}", "~task"], tmp_path, check=False)
    one_line_failure(proc, "'vit' model, not a causal LM")


def test_model_without_a_tokenizer(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(bpe_model_dir).save_pretrained(tmp_path / "bare")
    proc = run_cli(["train", "model=hf", f"model.name_or_path={tmp_path / 'bare'}", "data=jsonl",
                    f"data.path={pairs_jsonl}", "~task"], tmp_path, check=False)
    one_line_failure(proc, "cannot load its tokenizer")


def test_a_model_directory_without_weights_or_whose_tokenizer_files_are_missing(tmp_path, cache_dir, bpe_model_dir,
                                                                               pairs_jsonl):
    """Without weights: transformers' OSError and its traceback. A Qwen2 without tokenizer files: transformers 5
    made an empty tokenizer, every text no tokens, and the run failed in the reference log-probs."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.copytree(bpe_model_dir, tmp_path / "no_weights")
    for weights in (tmp_path / "no_weights").glob("*.safetensors"):
        weights.unlink()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(tmp_path / "no_tokens")
    for model, says in (("no_weights", "cannot load its weights (Error no file named model.safetensors"),
                        ("no_tokens", "its tokenizer turns text into no tokens")):
        proc = run_cli(["train", "model=hf", f"model.name_or_path={tmp_path / model}", "data=jsonl",
                        f"data.path={pairs_jsonl}", "~task"], tmp_path, check=False)
        one_line_failure(proc, says)


def test_unset_mandatory_key(tmp_path, cache_dir, pairs_jsonl):
    proc = run_cli(["train", "model=hf", "data=jsonl", f"data.path={pairs_jsonl}", "~task"], tmp_path, check=False)
    one_line_failure(proc, "model.name_or_path is not set")


@pytest.mark.parametrize("override, line", [
    ("trainer.max_steps=abc", "trainer.max_steps='abc': give a whole number"),  # default null: the trainer checks
    ("optim.lr=fast", "optim.lr='fast': give a number (the default is"),  # any key whose default is a number
    ("trainer.save_final=maybe", "trainer.save_final='maybe': give true or false"),
    # a count of 0: numpy's bootstrap failed after training, before checkpoint-final was saved
    ("eval.interval_resamples=0", "eval.interval_resamples=0: give a whole number >= 1")])
def test_a_value_of_the_wrong_type_stops_at_the_start_in_one_line(tmp_path, cache_dir, override, line):
    """`trainer.max_steps=abc` built pools, scored the reference and evaluated the start (30 s) before a TypeError."""
    proc = run_cli(["train", *TINY_JOB, override], tmp_path, check=False)
    one_line_failure(proc, line)
    assert "pools" not in proc.stdout + proc.stderr


def test_diverging_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "model=hf", f"model.name_or_path={bpe_model_dir}", "data=jsonl",
                    f"data.path={pairs_jsonl}", "~task", "trainer.batch_size=4", "trainer.max_steps=6",
                    "trainer.save_every=1", "trainer.max_grad_norm=0", "optim._target_=torch.optim.SGD",
                    "~optim.betas", "~optim.weight_decay", "optim.lr=1e30", f"hydra.run.dir={run_dir}"],
                   tmp_path, check=False)
    one_line_failure(proc, "loss is", "lower optim.lr")
    kept = sorted((run_dir / "checkpoints").glob("step-*"))
    assert kept and not any(p.name.endswith(".tmp") for p in kept)
    from safetensors.torch import load_file

    weights = load_file(kept[-1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # the last good checkpoint, untouched


def test_out_of_memory_in_training_names_what_to_lower_and_a_smaller_batch_continues(tmp_path, cache_dir):
    run = tmp_path / "run"
    job = [*TINY_JOB, "trainer.max_steps=6", "trainer.save_every=2", "eval.num_prompts=0", f"hydra.run.dir={run}"]
    oom = {"PREFRUN_FAULT": "train:3:oom"}  # torch's OutOfMemoryError after step 3, as a GPU raises it
    proc = run_cli(["train", *job], tmp_path, oom, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert "Traceback" not in out and len(errors) == 1, errors
    assert ("out of memory training (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.10 GiB of which 1.06 GiB is free): lower trainer.batch_size and raise trainer.grad_accum") in errors[0]
    # What the line says to do: the same optimiser steps in smaller micro-batches, from the last checkpoint.
    run_cli(["train", *job, "trainer.batch_size=4", "trainer.grad_accum=2"], tmp_path, oom)
    log = (run / "train.log").read_text()
    assert "(the checkpoint's: 8, 1): the same optimiser steps" in log and "resuming from" in log
    assert (run / "summary.json").exists()


def test_an_accumulation_set_in_the_accelerate_config_that_differs_from_trainer_grad_accum_is_one_line(tmp_path, cache_dir):
    """accelerate would accumulate over the config's count (its ACCELERATE_GRADIENT_ACCUMULATION_STEPS), while
    prefrun counts steps, epochs and checkpoints by trainer.grad_accum: each step would take other examples."""
    proc = run_cli(["train", *TINY_JOB, "trainer.max_steps=2"], tmp_path,
                   {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, check=False)
    one_line_failure(proc, "the accelerate config's gradient_accumulation_steps is 4 and trainer.grad_accum=1",
                     "give trainer.grad_accum=4")
