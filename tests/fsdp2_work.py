"""Run by tests/test_fsdp2.py under torchrun (2 CPU processes, gloo): with an FSDP2-sharded policy (its forwards
are collectives) the split work — reference scoring and HF generation of pools, here 3 shards over 2 processes —
must not leave the processes running different numbers of forwards (a hang). Both stay split: in reference
scoring the process with fewer forwards makes a token's forwards until they are even; in HF generation (whose
forwards depend on when samples end) each generate() call is synced (it forwards until every process's samples
have ended) and the process with fewer calls makes idle calls. Both give the results of one process with the
unsharded model; each shard file has one writer. A vLLM engine lost on one process is not restarted with a
sharded policy (one line instead of a hang). A stop signal caught by one process mid-generation stops both at
the same forward."""

import os
import signal
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import prefrun.data.reference as reference
from prefrun import faults, preemption
from prefrun.data import Example, split_candidate_logps
from prefrun.data.batches import pad_rows
from prefrun.errors import InputError, PrefrunError
from prefrun.generate import HFGenerator
from prefrun.generate.vllm import VLLMGenerator, _EngineSession, _sets_for
from prefrun.generate.worker_process import EngineLost
from prefrun.pools import make_pools
from prefrun.preemption import Preempted
from prefrun.tasks import SortDigits
from prefrun.tiny import char_tokenizer


def tiny(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def work(model, tokenizer, out_dir: Path):
    task = SortDigits()
    prompts = task.prompts("train", 5)
    examples = [Example(tokenizer(p).input_ids, [tokenizer(" 123").input_ids[1:], tokenizer(" 42").input_ids[1:]])
                for p in prompts]
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    scored = faults._counts.get("reference", 0)
    logps, _ = split_candidate_logps(model, examples, tokenizer.pad_token_id, batch_size=4)
    hook.remove()
    shards_scored = faults._counts.get("reference", 0) - scored
    # Samples of different lengths on the two processes: the synced calls must still meet.
    generator = HFGenerator(num_candidates=2, max_new_tokens=6, seed=3, batch_size=2, stop=["1"])
    judge = lambda: None  # noqa: E731
    judge.score = lambda chunk, texts: [[task.score(p, t) for t in row] for p, row in zip(chunk, texts)]
    calls, generate = [0], model.generate

    def counted(*args, **kwargs):
        calls[0] += 1
        return generate(*args, **kwargs)

    model.generate = counted
    made = faults._counts.get("generate", 0)
    pools = make_pools(prompts, generator=generator, judge=judge, model=model, tokenizer=tokenizer,
                       out_dir=out_dir, shard_size=2)
    del model.generate
    generated = faults._counts.get("generate", 0) - made

    # A shard damaged on disk (shard 2, process 0's) is made again, in step: process 1 makes an idle call.
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out_dir / "shard-00002.jsonl").write_text("damaged")
    if dist.is_initialized():
        dist.barrier()
    again = make_pools(prompts, generator=generator, judge=judge, model=model, tokenizer=tokenizer,
                       out_dir=out_dir, shard_size=2)

    # A judge's error on shard 1 (process 1's) stops every process with its line while process 0 is still
    # generating shard 2: process 1 makes an idle call first, so nobody waits in a step never made.
    def refusing(chunk, texts):
        if chunk == prompts[2:4]:
            raise InputError("the judge refused shard 1")
        return judge.score(chunk, texts)

    try:
        make_pools(prompts, generator=generator, judge=SimpleNamespace(score=refusing), model=model,
                   tokenizer=tokenizer, out_dir=out_dir.with_name(out_dir.name + "-refused"), shard_size=2)
        refused = None
    except PrefrunError as err:
        refused = str(err)
    # A prompt that fills the model's context, in shard 1 (process 1's): generate() refuses it before its first
    # forward, while process 0 generates shard 0: process 1 makes that shard's call idle, and both stop with its line.
    try:
        make_pools([*prompts[:2], "sort " + "9" * 80, *prompts[3:]], generator=generator, judge=judge, model=model,
                   tokenizer=tokenizer, out_dir=out_dir.with_name(out_dir.name + "-long"), shard_size=2)
        too_long = None
    except PrefrunError as err:
        too_long = str(err)
    return {"logps": logps, "pools": pools, "forwards": forwards[0], "shards_scored": shards_scored,
            "shards_generated": generated, "generate_calls": calls[0], "again": again, "refused": refused,
            "too_long": too_long}


def stopped_by_a_signal(model, tokenizer, out_dir: Path) -> dict:
    """Process 1 alone catches a stop signal at its third forward of the pools' generation (a signal raised at once
    left process 0 waiting in a forward's collective): both stop at the same forward, with the signal."""
    preemption.listen(["USR1"])
    task = SortDigits()
    judge = SimpleNamespace(score=lambda chunk, texts: [[task.score(p, t) for t in row] for p, row in zip(chunk, texts)])
    forwards = [0]

    def count(*_) -> None:
        forwards[0] += 1
        if forwards[0] == 3 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    hook = model.register_forward_pre_hook(count)
    try:
        make_pools(task.prompts("train", 5), generator=HFGenerator(num_candidates=2, max_new_tokens=6, seed=3,
                                                                    batch_size=2),
                   judge=judge, model=model, tokenizer=tokenizer, out_dir=out_dir, shard_size=2)
        said = None
    except Preempted as err:
        said = str(err)
    finally:
        hook.remove()
    return {"said": said, "forwards": forwards[0]}


def pool_draws(model, tokenizer) -> dict:
    """MC-PO's negatives under the sharded policy, the pools of different sizes on the two processes (legal with
    data=pools) and their scores kept for later steps (sampler.refresh_every=0): each process made the scoring
    forwards its own pools needed (a hang); now as many as the busiest, and a pool another process scored is not
    scored again. Returns the columns drawn at step 0 (own pools) and step 1 (the other process's pools)."""
    from prefrun.samplers import CDSampler
    from prefrun.train import PoolDraws

    ids = lambda text: tokenizer(text).input_ids  # noqa: E731
    pools = [Example(ids("sort 31:"), [ids(" 13")[1:], ids(" 31")[1:]], reference_logps=[-5.0, -6.0], scores=[1.0, 0.0]),
             Example(ids("sort 52:"), [ids(" 25")[1:], ids(" 52")[1:], ids(" 22")[1:], ids(" 5")[1:]],
                     reference_logps=[-5.0, -6.0, -7.0, -4.0], scores=[1.0, 0.0, 0.5, 0.2])]
    draws = PoolDraws(CDSampler(refresh_every=0), pools, beta=0.5, pad_id=tokenizer.pad_token_id, seed=0, batch_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    first = draws(model, [rank], {"step": 0})[0]  # process 0: 2 candidates (2 forwards), process 1: 4
    after_first = forwards[0]
    second = draws(model, [1 - rank], {"step": 1})[0]  # scored by the other process at step 0: no forward
    hook.remove()
    return {"first": first, "second": second, "forwards": [after_first, forwards[0] - after_first],
            "cached": sorted(draws.cache)}


def packing_verdict(tokenizer) -> dict:
    """`check_packing(together=True)`, process 1's check made to disagree (its padded rows are other sequences
    than its packed ones, as a model whose attention leaks across packed sequences gives): both processes pad."""
    from prefrun.logprobs import check_packing, packs, use_packed_attention

    model = tiny(tokenizer)
    use_packed_attention(model)
    rows = [(tokenizer("sort 31:").input_ids, tokenizer(" 13").input_ids[1:]),
            (tokenizer("sort 52:").input_ids, tokenizer(" 25").input_ids[1:])]
    padded_rows = rows if dist.get_rank() == 0 else rows[::-1]
    pad = tokenizer.pad_token_id
    agreed = check_packing(model, pad_rows(rows, pad, packed=True), pad_rows(padded_rows, pad), together=True)
    return {"verdict": agreed, "packs": packs(model)}


def main(out: str) -> None:
    reference.SCORING_SHARD = 2  # 5 examples: 3 shards over 2 processes
    tokenizer = char_tokenizer()
    # Before the process group, each process alone, in a directory of its own.
    single = work(tiny(tokenizer), tokenizer, Path(out).with_name(f"single-shards-{os.environ['RANK']}"))
    dist.init_process_group("gloo")
    model = tiny(tokenizer)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = work(model, tokenizer, Path(out).with_name("sharded-shards"))
    # An engine lost on one process is not restarted with a sharded policy (loading a new one is collective).
    try:
        VLLMGenerator()._restart(EngineLost("the vLLM engine died"), "generation", model)
        refused = None
    except PrefrunError as err:
        refused = str(err)
    # One engine fed by the main process (generator.engines=main): its answer for two prompt sets reaches each
    # process as its own set only (scattered), the other set as its time and token count.
    session = _EngineSession()
    session.fed = True
    answer = {"sets": [{"generate_s": 1.0, "outputs": [[{"token_ids": [5, 6], "logprobs": [-1.0, -2.0]}]]},
                       {"generate_s": 2.0, "outputs": [[{"token_ids": [7], "logprobs": [-0.5]}]]}]}
    delivered = session.on_engine(lambda: answer if dist.get_rank() == 0 else None, partial(_sets_for, [0, 1]))
    stopped = stopped_by_a_signal(model, tokenizer, Path(out).with_name("stopped-shards"))
    torch.save({"single": single, "sharded": sharded, "restart": refused, "delivered": delivered, "stopped": stopped,
                "pool_draws": pool_draws(model, tokenizer),
                "packing": packing_verdict(tokenizer)}, f"{out}.{dist.get_rank()}")
    dist.barrier()  # both done before either tears the group down (a peer gone mid-teardown aborts gloo)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
