"""Run by tests/test_fsdp2.py under torchrun (2 CPU processes, gloo): a tiny Llama sharded with torch's
FSDP2 (`fully_shard` per decoder layer and on the root) trains one AdamW step; then `full_weights` gathers
it on every process, tensor by tensor, and APO's extrapolation runs on what it gathered; and shard-wise, as online
rounds do it: each process extrapolates its own shards (`local_weights`), writes them into the policy
(`set_policy_weights`), and what is gathered from the shards for the writer (`iter_gathered`) is the whole; a
round's saved weights read back as this process's parts (`read_round_weights`); a LoRA policy whose root is the PEFT
wrapper, written after a forward that left the root gathered. Each process writes what
it saw next to the output path for the test to compare with the same step on the unsharded model."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from prefrun.extrapolate import extrapolate_parameters
from prefrun.model import LocalShards, full_weights, iter_gathered, local_shards, local_weights
from prefrun.online import read_round_weights, set_policy_weights


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def step(model, batch) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batch = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    initial = full_weights(tiny())
    model = tiny()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    step(model, batch)  # every process the same batch: the averaged gradient is the single-process one
    gathered = full_weights(model)
    extrapolated = extrapolate_parameters(gathered, initial, 0.3)
    shards = local_weights(model)
    shard_sizes = {n: v.numel() for n, v in shards.items()}
    local = LocalShards(extrapolate_parameters(shards, local_shards(model, initial), 0.3))
    set_policy_weights(model, local, seed=0)
    written = dict(iter_gathered(model, local))
    # A round's weights read back on resume (a directory as save_pretrained writes it: the tied head left out): for a
    # sharded policy, this process's parts, read a tensor at a time.
    saved = Path(f"{out}.saved")
    if rank == 0:
        saved.mkdir()
        save_file({n: v for n, v in gathered.items() if n != "lm_head.weight"}, saved / "model.safetensors")
    dist.barrier()
    read = read_round_weights(model, saved)
    expected = local_shards(model, gathered)
    read_back = {"type": type(read).__name__, "equal": read.keys() == expected.keys()
                 and all(torch.equal(read[n], expected[n]) for n in expected)}
    # A LoRA policy: accelerate shards the PEFT wrapper as the root. A forward without a backward (the probe, an
    # evaluation) leaves the root's parameters gathered; writing a round's weights must reshard the wrapper too
    # (only the base model's modules were resharded, and the shards went into the gathered embeddings).
    lora = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for layer in lora.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(lora, mesh=mesh)
    with torch.no_grad():
        lora(input_ids=batch)
    merged = full_weights(lora)
    set_policy_weights(lora, local_shards(lora, merged), seed=0)
    torch.save({"sharded": sharded, "gathered": gathered, "extrapolated": extrapolated, "shard_sizes": shard_sizes,
                "written": written, "in_policy": full_weights(model),
                "lora": {"merged": merged, "in_policy": full_weights(lora)}, "read_back": read_back,
                "engine": {n: tuple(t.shape) for n, t in full_weights(model, tied=True, buffers=True, to_cpu=False).items()}},
               f"{out}.{rank}")
    if rank == 0:
        reference = tiny()
        step(reference, batch)
        torch.save({"gathered": full_weights(reference), "initial": initial}, f"{out}.reference")
    dist.barrier()  # both done before either tears the group down (a peer gone mid-teardown aborts gloo)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
