"""Every config composes through Hydra's compose API, and every `_target_` in it instantiates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prefrun.cli import config_dir
from prefrun.tiny import char_tokenizer

CONF = Path(config_dir())
GLOBAL_GROUPS = ("hydra", "experiment", "hparams_search")  # `# @package _global_` presets, tested below
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in GLOBAL_GROUPS)
# Keys that a group's option leaves for the user (`???`) get a value here.
REQUIRED = {"model=hf": ["model.name_or_path=some/model"], "data=jsonl": ["data.path=pairs.jsonl"],
            "data=hf": ["data.path=pairs.jsonl"], "data=pools": ["data.path=pools.jsonl"],
            "judge=reward_model": ["judge.name_or_path=some/rm"], "judge=pairwise": ["judge.name_or_path=some/ranker"],
            "judge=llm": ["judge.name_or_path=some/llm"],
            "experiment=apo_paper": ["judge.name_or_path=some/ranker"],
            "experiment=onmcpo_paper": ["judge.name_or_path=some/ranker"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("choice", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_instantiates(choice):
    cfg = compose_train([choice, *REQUIRED.get(choice, [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    group = choice.split("=")[0]
    node = cfg[group]
    if group == "model" and node.build is not None:
        node = node.build
    if "_target_" in node:
        instantiate(node)


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes(name):
    cfg = compose_train([f"experiment={name}", *REQUIRED.get(f"experiment={name}", [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for group in ("task", "loss", "sampler", "optim", "data", "generator", "judge", "online"):
        if cfg.get(group) is not None:  # `override /task: null` removes the task
            instantiate(cfg[group])


@pytest.mark.parametrize("name", options("hparams_search"))
def test_every_hparams_search_composes_into_a_maximising_sweep(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        OmegaConf.select(cfg, key, throw_on_missing=True)  # every searched key exists


def test_generate_config_composes_and_its_prompts_instantiate():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("generate", overrides=["prompts.path=prompts.jsonl", "judge=reward_model",
                                             "judge.name_or_path=some/rm"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for node in (cfg.prompts, cfg.generator, cfg.judge):
        instantiate(node)


def test_a_prompt_file_for_sampled_preferences_is_given_as_the_readme_says_and_can_hold_out_prompts(tmp_path):
    """`data.prompts.path=<file>` (the README's words; it was refused: data.prompts was null in the config), and
    `data.eval_size`: a seeded share of those prompts held out for the judged evaluation, never trained on."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "sort {i}{i + 7}:"}}\n' for i in range(40)))
    default = instantiate(compose_train([]).data)
    assert default.uses_task and default.eval_prompts(8) == []
    data = instantiate(compose_train([f"data.prompts.path={path}", "data.eval_size=0.25"]).data)
    assert not data.uses_task and data.prompt_source == f"data.prompts.path={path}"
    trained = data.train_prompts(None, char_tokenizer(), instantiate(compose_train([]).generator))
    held = data.eval_prompts(100)
    assert (len(trained), len(held)) == (30, 10) and not set(trained) & set(held)
    assert held == instantiate(compose_train([f"data.prompts.path={path}", "data.eval_size=10"]).data).eval_prompts(100)
    assert held != instantiate(compose_train([f"data.prompts.path={path}", "data.eval_size=10", "seed=1"]).data
                               ).eval_prompts(100)


def test_default_config_is_the_embedded_job():
    cfg = compose_train([])
    assert cfg.model.name_or_path is None and cfg.model.build is not None
    assert cfg.task._target_ == "prefrun.tasks.SortDigits"
    assert cfg.model.build.hidden_size // cfg.model.build.num_heads == 64  # vLLM can serve it
    assert cfg.eval.num_prompts >= 200


def test_cache_dir_follows_the_environment(monkeypatch):
    monkeypatch.setenv("PREFRUN_CACHE", "/somewhere/else")
    assert compose_train([]).cache_dir == "/somewhere/else"


def test_group_option_typo_gives_hydras_message():
    with pytest.raises(Exception, match="(?s)Could not find 'loss/dpoo'.*Available options"):
        compose_train(["loss=dpoo"])


@pytest.mark.parametrize("name, algorithm, loss, generator", [
    ("iterdpo_tiny", "iterative", "dpo_loss", "VLLMGenerator"), ("apo_tiny", "apo", "dpo_loss", "VLLMGenerator"),
    ("onmcpo_tiny", "onmcpo", "mcpo_cd_loss", "VLLMGenerator"), ("apo_paper", "apo", "dpo_loss", "VLLMGenerator"),
    ("onmcpo_paper", "onmcpo", "mcpo_cd_loss", "VLLMGenerator"),
])
def test_online_presets_choose_their_algorithm(name, algorithm, loss, generator):
    cfg = compose_train([f"experiment={name}", *REQUIRED.get(f"experiment={name}", [])])
    assert cfg.online.algorithm == algorithm and cfg.loss._target_.endswith(loss)
    assert cfg.generator._target_.endswith(generator)
    if name == "apo_paper":
        assert list(cfg.online.beta_schedule) == [0.01, 0.1, 1.0] and cfg.online.alpha == 0.3
        assert cfg.generator.num_candidates == 5 and cfg.generator.temperature == 0.7 and cfg.optim.lr == 5e-7


def test_slurm_step_variables_become_torch_ranks(monkeypatch):
    from prefrun.distributed import env_from_job, first_host, tasks_on_node

    assert first_host("gpu[07-09,12],cpu3") == "gpu07" and first_host("node5,node6") == "node5"
    # a bracket inside the name: the rest of the name is kept (it gave node1, rack1: hosts that do not exist)
    assert first_host("node[1-2]-ib") == "node1-ib" and first_host("rack[1-2]-n[01-02],x") == "rack1-n01"
    assert [tasks_on_node("8(x2),4", node) for node in (0, 1, 2)] == [8, 8, 4]  # uneven nodes: this node's count
    import os

    # A copy of the environment for this test: what env_from_job sets must not reach the next tests' subprocesses.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in (
        "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")})
    monkeypatch.setenv("SLURM_NTASKS", "16")  # the allocation's tasks alone (a batch script) change nothing
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert not env_from_job()
    for name, value in {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_PROCID": "9",
                        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123"}.items():
        monkeypatch.setenv(name, value)
    assert env_from_job()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")] == ["9", "16", "1", "8", "gpu07", "20123"]
    assert not env_from_job()  # a launcher (or this) has set WORLD_SIZE: nothing more to do


def test_the_shipped_deepspeed_config_leaves_accumulation_and_clipping_to_prefrun():
    """accelerate's launcher turns these two keys of a config file into variables that `Accelerator()` reads
    as numbers: "auto" there stopped every ZeRO-3 job at start-up ("invalid literal for int() with base 10:
    'auto'", seen with DeepSpeed 0.19.8 on 2 CPU processes). Left out, trainer.grad_accum and
    trainer.max_grad_norm fill them (train._deepspeed_clips)."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "accelerate" / "deepspeed_zero3.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == 3
    for key in ("gradient_accumulation_steps", "gradient_clipping"):
        value = config["deepspeed_config"].get(key)
        assert value is None or isinstance(value, int | float), (key, value)
