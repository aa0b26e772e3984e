"""`prefrun train ... plan=true`: the preflight reads configs only (no weights, nothing built), prints the memory
per device of each phase, and stops in one line when a phase cannot fit."""

import pytest
import torch
from transformers import MistralConfig

from .conftest import run_cli


def _said(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_embedded_job_plans_without_building_anything(tmp_path, cache_dir):
    out = _said(run_cli(["train", "plan=true"], tmp_path))
    assert "plan: 1 process(es), sharding none" in out and "0.5M parameters" in out
    assert "train:" in out and "-> fits" in out and "DOES NOT FIT" not in out
    # Host memory while loading: the process holds the whole policy (fp32 here) until it is on its device.
    assert "plan: loading: 2.1 MiB of a node's host memory (1 process(es) x the whole policy, 2.1 MiB, until it is on " \
        "its device; the node has" in out
    # nothing built (the cache holds only the tests' shared small model), nothing generated or scored
    assert sorted(p.name for p in cache_dir.iterdir()) == ["models"] and len(list((cache_dir / "models").iterdir())) == 1


@pytest.fixture(scope="module")
def mistral_7b(tmp_path_factory):
    """Mistral-7B's config.json alone (the plan needs nothing else)."""
    path = tmp_path_factory.mktemp("mistral-7b")
    MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768).save_pretrained(path)
    return path


@pytest.mark.slow
def test_the_paper_preset_does_not_fit_this_machine_in_full_and_fits_with_lora(tmp_path, mistral_7b):
    job = ["train", "experiment=apo_paper", f"model.name_or_path={mistral_7b}", "judge.name_or_path=none",
           "plan=true"]
    offline = {"HF_HUB_OFFLINE": "1"}  # (the judge "none" is no local directory: not counted, and said so)
    full = run_cli(job, tmp_path, offline, check=False)
    assert full.returncode == 2
    assert "7241.7M parameters" in _said(full) and "RMSprop: 1 per parameter" in _said(full)
    assert "judge.name_or_path='none': cannot read its config.json" in _said(full)
    [line] = [x for x in _said(full).splitlines() if "[ERROR]" in x]
    # one line: what does not fit and what to change (on a CPU the engine's share: sample in process)
    assert "phase needs" in line and "LoRA (+model/lora=default)" in line and "generator=hf" in line
    # bf16 on disk, trainable weights held in fp32 (trainer.master_weights): 4 bytes each for weights, gradients and
    # RMSprop's state (trained as loaded, master_weights=model, half that: the unit test below); on a CPU the
    # engine process holds its own bf16 copy beside them
    assert ("train: 94.7 GiB per process (policy weights 27.0 GiB, gradients 27.0 GiB, optimiser state (RMSprop: 1 "
            "per parameter) 27.0 GiB, vLLM engine (weights + KV cache) 13.7 GiB)") in _said(full)
    # LoRA, in process (the plan reads configs): the fp32 adapters train; beside the engine's own copy of the
    # weights it does not fit here, sampled in process it does
    from prefrun.errors import InputError
    from prefrun.plan import plan

    from .test_config import compose_train

    lora = [*(a for a in job[1:-1] if not a.startswith("judge.")), "judge.name_or_path=policy", "+model/lora=default"]
    with pytest.raises(InputError, match=r"the train phase needs 27.8 GiB") as refused:
        plan(compose_train(lora), None)
    assert "LoRA" not in str(refused.value)  # it has LoRA: not offered again
    fits = plan(compose_train([*lora, "generator=hf"]), None)
    assert fits["peak"]["train"] / 2**30 == pytest.approx(14.0, abs=0.05) and "generate" not in fits["peak"]
    # Loading: the bf16 model whole in host memory (LoRA: its base frozen), 8 processes of a node under FSDP: each
    # holds it whole until it is sharded, which this machine's host memory cannot hold.
    assert fits["loading"]["bytes"] / 2**30 == pytest.approx(13.5, abs=0.1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "8")
        env.setenv("LOCAL_WORLD_SIZE", "8")
        env.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(InputError, match=r"plan: loading needs 10[0-9.]+ GiB of host memory on a node \(8 process"):
            plan(compose_train([*lora, "generator=hf", "trainer.cpu_fsdp=true"]), None)


def test_a_refusal_every_process_makes_before_the_process_group_is_the_main_processs_to_print(monkeypatch):
    # plan=true under accelerate launch: no process group yet; each process refuses alike, one prints it
    from prefrun.distributed import said_by_main

    monkeypatch.setenv("RANK", "1")
    assert said_by_main("plan: ...", known=True) and not said_by_main("its own", known=False)
    monkeypatch.setenv("RANK", "0")
    assert not said_by_main("plan: ...", known=True)


def test_under_deepspeed_with_mixed_precision_the_plan_counts_its_fp32_masters_beside_16_bit_weights():
    from omegaconf import OmegaConf

    from prefrun.plan import Launch, _trainable_bytes

    cfg = OmegaConf.create({"trainer": {"master_weights": "fp32", "mixed_precision": "bf16"}})
    assert _trainable_bytes(cfg, Launch(8, "none"), 2) == (4, False)  # prefrun holds them in fp32 (FSDP too)
    assert _trainable_bytes(cfg, Launch(8, "fsdp"), 2) == (4, False)
    assert _trainable_bytes(cfg, Launch(8, "zero3"), 2) == (2, True)  # bf16 module, fp32 copy in the optimiser
    assert _trainable_bytes(OmegaConf.merge(cfg, {"trainer": {"mixed_precision": "no"}}), Launch(8, "zero3"), 2) == (4, False)
    assert _trainable_bytes(OmegaConf.merge(cfg, {"trainer": {"master_weights": "model"}}), Launch(8, "none"), 2) == (2, False)
    assert _trainable_bytes(cfg, Launch(1, "none"), 4) == (4, False)  # an fp32 model: nothing to hold apart
    # DeepSpeed casts an fp32 model to 16 bits too (prefrun as it loads it), whatever master_weights says.
    assert _trainable_bytes(cfg, Launch(8, "zero2"), 4) == (2, True)
    assert _trainable_bytes(OmegaConf.merge(cfg, {"trainer": {"master_weights": "model"}}), Launch(8, "zero3"), 2) == (2, True)


def test_an_fsdp_or_deepspeed_launch_on_cpu_processes_is_planned_as_ddp_unless_trainer_cpu_fsdp(monkeypatch):
    """accelerate trains an FSDP or DeepSpeed config as DDP on CPU processes; trainer.cpu_fsdp / cpu_deepspeed make
    them shard for real."""
    from prefrun.plan import Launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Launch.from_env().sharding == "none" and Launch.from_env(cpu_fsdp=True).sharding == "fsdp"
    assert Launch.from_env(cpu_fsdp=True).share("optimiser") == 2 and Launch.from_env().share("optimiser") == 1
    # The same for DeepSpeed, and trainer.cpu_deepspeed.
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert Launch.from_env().sharding == "none" and Launch.from_env(cpu_deepspeed=True).sharding == "zero3"
    assert Launch.from_env(cpu_deepspeed=True).share("weights") == 2


def test_the_plan_places_one_engine_fed_by_the_main_process_off_the_training_devices():
    """generator.engines=main generator.devices=[...] (the separate-engine mode): the engine is not on a training
    device, so no phase counts it; an engine wider than its GPUs is one line. (In process: the plan reads configs.)"""
    from prefrun.errors import InputError
    from prefrun.plan import plan

    from .test_config import compose_train

    job = ["experiment=iterdpo_tiny", "generator.engines=main", "generator.devices=[4,5,6,7]"]
    apart = plan(compose_train([*job, "generator.tensor_parallel_size=4"]), None)
    assert apart["engines"].startswith("one engine on GPU(s) [4, 5, 6, 7] (tensor_parallel_size 4")
    assert not any("engine" in part for parts in apart["phases"].values() for part in parts)  # no phase holds it
    shared = plan(compose_train(["experiment=iterdpo_tiny"]), None)
    assert shared["engines"].startswith("1 engine(s), one per process")
    assert any("engine" in part for part in shared["phases"]["generate"])
    with pytest.raises(InputError, match=r"generator.devices=\[4, 5, 6, 7\] holds 4 GPU\(s\).* = 8"):
        plan(compose_train([*job, "generator.tensor_parallel_size=8"]), None)


def test_the_plan_counts_a_cpu_engines_own_weights_and_a_judge_model(tmp_path):
    """On a CPU the engine process loads its own copy of the weights beside its KV cache, and a judge model
    (reward model, pairwise, LLM) is loaded while judging: the plan counted neither (a 7B policy with a 7B reward
    model "fit" a 23.5 GiB machine). (In process: the plan reads configs.)"""
    from transformers import LlamaConfig

    from prefrun.plan import parameters, plan

    from .test_config import compose_train

    judge = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
    judge.save_pretrained(tmp_path / "judge")
    judge_bytes = parameters(judge)[0] * 4
    job = ["experiment=iterdpo_tiny", "generator=vllm"]
    tiny = plan(compose_train(job), None)
    assert tiny["phases"]["generate"]["vLLM engine (weights + KV cache)"] == tiny["parameters"] * 4 + 256 * 2**20
    judged = plan(compose_train([*job, "judge=reward_model", f"judge.name_or_path={tmp_path / 'judge'}"]), None)
    for phase in ("before training", "generate"):
        assert judged["phases"][phase]["judge model (while judging)"] == judge_bytes
    assert judged["peak"]["generate"] == tiny["peak"]["generate"] + judge_bytes
