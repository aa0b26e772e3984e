"""A separate reference model, LoRA adapters and the precision trainable weights are held in, through the real CLI
on tiny local models."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prefrun import distributed
from prefrun.generate import VLLMGenerator
from prefrun.model import hold_in_fp32, in_loaded_precision, loaded_dtype
from prefrun.online import cpu_state

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

    # Merged, from the model loaded in bf16 at a learning rate whose updates are mostly below half a bf16 step:
    # W + B·A in fp32 (trainer.master_weights=fp32), so every adapted entry moved; merged in bf16, most would not.
    run_cli(job(bpe_model_dir, pairs_jsonl, tmp_path / "merged", "+model/lora=default", "model.lora.r=4",
                "model.lora.merge=true", "model.dtype=bfloat16", "optim.lr=1e-5"), tmp_path)
    merged = load_file(tmp_path / "merged" / "checkpoint-final" / "model.safetensors")
    base = {n: p.detach().to(torch.bfloat16).float() for n, p in AutoModelForCausalLM.from_pretrained(bpe_model_dir)
            .named_parameters()}
    changed = [n for n, b in base.items() if n in merged and not torch.equal(merged[n].float(), b)]
    assert changed and all("proj" in n and merged[n].dtype == torch.float32 for n in changed)  # only LoRA's moved
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] != base[q]).float().mean() > 0.9
    assert (merged[q].to(torch.bfloat16).float() == base[q]).float().mean() > 0.5


def test_the_full_weights_stream_in_bounded_buckets_and_equal_the_whole():
    """The engine push walks `iter_full_weights` in buckets: the same tensors as `full_weights` (a tied weight
    under both names), cut where a bucket would pass its limit, and the names and shapes known without
    gathering anything."""
    from prefrun.generate.weights import _buckets, _layer_of
    from prefrun.model import full_weights, iter_full_weights, weight_shapes

    from .conftest import char_llama

    model, _ = char_llama(hidden=64, heads=1, seed=0, tie_word_embeddings=True)
    whole = full_weights(model, tied=True, buffers=True, to_cpu=False)
    streamed = dict(iter_full_weights(model, tied=True, buffers=True, to_cpu=False))
    assert list(streamed) == list(whole) and all(torch.equal(streamed[n], whole[n]) for n in whole)
    assert "lm_head.weight" in whole and "lm_head.weight" not in full_weights(model)  # tied: once unless asked
    assert weight_shapes(model, tied=True, buffers=True) == {n: tuple(t.shape) for n, t in whole.items()}
    total = sum(t.numel() * t.element_size() for t in whole.values())
    for limit in (40_000, total // 3):
        buckets = list(_buckets(iter(whole.items()), limit))
        assert [n for b in buckets for n in b] == list(whole) and len(buckets) > 2
        layers = [{_layer_of(n) for n in b} for b in buckets]
        for bucket, units in zip(buckets, layers):  # at most the limit, or one layer larger than it alone
            size = sum(t.numel() * t.element_size() for t in bucket.values())
            assert size <= limit or len(units) == 1, (limit, units)
        # a decoder layer is never split (vLLM fuses its q/k/v and gate/up)
        assert all(not (a & b) for i, a in enumerate(layers) for b in layers[i + 1 :])
    assert _layer_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert _layer_of("lm_head.weight") == "lm_head.weight"


def test_building_the_embedded_model_leaves_the_runs_random_state_as_it_was(tmp_path):
    """A run is the same whether its cache held the embedded model or built it: the build seeds its own random
    state and gives the run's back. (It did not: a LoRA run with an empty cache drew other adapters and dropout
    than the same run with the model cached, 0.6560 against 0.6518 at step 2.)"""
    from prefrun.tasks import SortDigits
    from prefrun.tiny import TinyLlama

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    path = TinyLlama(hidden_size=64, num_heads=1, intermediate_size=128, sft_steps=2).materialize(tmp_path, SortDigits())
    assert (path / "config.json").exists() and torch.equal(torch.random.get_rng_state(), before)


def test_the_embedded_model_is_the_same_whatever_the_runs_thread_count(tmp_path):
    """`accelerate launch` gives each process one thread, a plain run one per core: the build's sums were split
    otherwise, its weights ended 3e-3 apart under the same cache key, and a 2-process run with an empty cache
    sampled other pools and losses than one process. The build runs on one thread, and leaves the run's count."""
    from safetensors.torch import load_file

    from prefrun.tasks import SortDigits
    from prefrun.tiny import TinyLlama

    threads, weights = torch.get_num_threads(), []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            path = TinyLlama(sft_steps=2).materialize(tmp_path / str(n), SortDigits())
            assert torch.get_num_threads() == n
            weights.append(load_file(path / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_the_embedded_model_without_a_task_is_one_line(tmp_path):
    """`~task` with the default model (data=jsonl ... ~task, no model=hf): it stopped with an AttributeError."""
    from prefrun.errors import InputError
    from prefrun.tiny import TinyLlama

    with pytest.raises(InputError, match=r"model=tiny .* needs a task.* model=hf model.name_or_path="):
        TinyLlama().materialize(tmp_path, None)


def test_models_are_loaded_whole_under_a_zero3_config(bpe_model_dir):
    """Under a DeepSpeed ZeRO-3 config accelerate leaves transformers a ZeRO-3 config (HfDeepSpeedConfig), and
    from_pretrained then partitions the model at load (deepspeed.zero.Init): empty parameters until
    deepspeed.initialize, while prefrun generates and scores with the policy before prepare() and never prepares
    a reference or a judge. prefrun loads them whole. (In one process, without the process group accelerate
    would start, the config object transformers consults is a stand-in answering is_zero3(); without prefrun's
    guard from_pretrained reaches for deepspeed.zero.Init, which fails here. tests/test_distributed.py runs
    ZeRO-3 for real.)"""
    from omegaconf import OmegaConf
    from transformers.integrations import deepspeed as hf_deepspeed

    from prefrun.model import load_causal_lm

    class Zero3:
        config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}

        def is_zero3(self) -> bool:
            return True

    config = Zero3()
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with pytest.raises(Exception):  # noqa: B017 - a plain load goes to deepspeed.zero.Init: no DeepSpeed, or no group
            AutoModelForCausalLM.from_pretrained(bpe_model_dir)
        cfg = OmegaConf.create({"trust_remote_code": False, "dtype": "float32", "attn_implementation": "sdpa"})
        model = load_causal_lm(str(bpe_model_dir), cfg, key="model.name_or_path")
        assert all(p.numel() > 0 and p.dim() >= 1 for p in model.parameters())
        assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape[-1] == model.config.vocab_size
        assert hf_deepspeed.is_deepspeed_zero3_enabled()  # prepare() partitions the policy under the same config
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_a_bf16_model_trains_in_fp32_master_weights_which_keep_the_updates_bf16_ones_lose(tmp_path, cache_dir,
                                                                                          bpe_model_dir, pairs_jsonl):
    """At a 7B model's learning rate (RMSprop at 5e-7, the APO paper's) an update is far below a bf16 weight's
    resolution (8 significant bits): trained as loaded (trainer.master_weights=model) nearly every weight stays where
    it was; held in fp32 (the default) every one moves."""
    def run(name, *extra):
        run_cli(["train", "model=hf", f"model.name_or_path={bpe_model_dir}", "model.dtype=bfloat16", "data=jsonl",
                 f"data.path={pairs_jsonl}", "~task", "trainer.batch_size=8", "trainer.max_steps=6", "optim=rmsprop",
                 f"hydra.run.dir={tmp_path / name}", *extra], tmp_path)
        final = AutoModelForCausalLM.from_pretrained(tmp_path / name / "checkpoint-final", dtype="auto")
        moved = [(a.float() != b.float()).float().mean().item() for a, b in zip(final.parameters(), start.parameters())]
        return final.dtype, sum(moved) / len(moved)

    start = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.bfloat16)
    held, moved = run("fp32")
    assert held == torch.float32 and moved > 0.9, moved  # checkpoint-final holds the fp32 weights trained
    assert "held and updated in fp32" in (tmp_path / "fp32" / "train.log").read_text()
    as_loaded, moved = run("model", "trainer.master_weights=model")
    assert as_loaded == torch.bfloat16 and moved < 0.2, moved


def test_weights_held_in_fp32_are_still_sampled_and_served_in_the_dtype_they_were_loaded_in(bpe_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.bfloat16)
    assert hold_in_fp32(model) == sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32} and loaded_dtype(model) == torch.bfloat16
    distributed.save_pretrained(model, tmp_path / "saved")  # transformers sets the config's dtype to the files'
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "float32"
    assert loaded_dtype(model) == torch.bfloat16  # in memory, the loaded one stays
    ids = torch.tensor([[1, 2, 3]])
    with in_loaded_precision(model):  # HF generation samples in bf16, as before the upcast
        assert model(ids).logits.dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.float32  # training and scoring: the weights' own (or mixed_precision)
    assert VLLMGenerator()._dtype(model, model.config) == "bfloat16"  # an engine loads it in bf16
    # The start kept on the CPU (reference / KL swap of online rounds): in bf16 where that is exact, else fp32
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[0, 0] += 1e-6  # no longer a bf16 value
    start = cpu_state(model)
    assert start["model.embed_tokens.weight"].dtype == torch.float32
    assert {t.dtype for name, t in start.items() if name != "model.embed_tokens.weight"} == {torch.bfloat16}


def test_a_gathered_checkpoint_drops_a_tied_heads_copy_and_keeps_a_head_of_its_own(tmp_path):
    """save_pretrained drops a tied weight only when it shares storage, which gathered tensors (FSDP2, ZeRO-3,
    merged LoRA) do not; a checkpoint whose config ties but whose head is its own loads untied and keeps it."""
    from prefrun.model import _untied, save_policy

    from .conftest import char_llama

    model, tokenizer = char_llama(hidden=64, heads=1, seed=0, tie_word_embeddings=True)
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # no shared storage
    save_policy(model, tokenizer, tmp_path / "tied", merge_lora=False, state_dict=gathered)
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    own = {**gathered, "lm_head.weight": gathered["lm_head.weight"] + 1}
    model.save_pretrained(tmp_path / "own", state_dict=own)
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "own")  # its config still says tie_word_embeddings
    assert "lm_head.weight" in _untied(untied, {name: tensor.clone() for name, tensor in untied.state_dict().items()})
