"""`full_weights` (the engine push's and APO's extrapolation's weights) on FSDP2-sharded parameters: torch's
`fully_shard` on a CPU mesh with gloo (torchrun, 2 processes), forward, backward and an AdamW step, then the
weights gathered tensor by tensor on every process equal the same step on the unsharded model."""

import pytest
import torch

from prefrun.extrapolate import extrapolate_parameters

from .conftest import torchrun

pytestmark = pytest.mark.slow


def test_full_weights_gathers_fsdp2_shards_on_every_process(tmp_path):
    out = tmp_path / "weights.pt"
    torchrun("fsdp2_weights.py", out, tmp_path)
    reference = torch.load(f"{out}.reference")
    for rank in (0, 1):
        seen = torch.load(f"{out}.{rank}")
        assert set(seen["sharded"].values()) == {"DTensor"}  # really sharded: every parameter a DTensor
        assert set(seen["gathered"]) == set(reference["gathered"])
        for name, value in reference["gathered"].items():
            assert type(seen["gathered"][name]) is torch.Tensor and seen["gathered"][name].shape == value.shape
            torch.testing.assert_close(seen["gathered"][name], value, atol=1e-6, rtol=1e-5)
        expected = extrapolate_parameters(reference["gathered"], reference["initial"], 0.3)
        for name, value in expected.items():
            torch.testing.assert_close(seen["extrapolated"][name], value, atol=1e-6, rtol=1e-5)
        # the push's view: tied weights under both names, full shapes
        assert seen["engine"]["lm_head.weight"] == seen["engine"]["model.embed_tokens.weight"] == (64, 32)
        # shard-wise: each process held half of every weight, and what it wrote into the policy, and what is gathered
        # from the shards for the writer, is the extrapolation of the whole
        assert all(2 * size == reference["gathered"][name].numel() for name, size in seen["shard_sizes"].items())
        for name, value in expected.items():
            torch.testing.assert_close(seen["in_policy"][name], value, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(seen["written"][name], value, atol=1e-6, rtol=1e-5)
        assert seen["read_back"] == {"type": "LocalShards", "equal": True}  # a resumed round's weights, as parts
        # LoRA, after a forward that left the root (the PEFT wrapper) gathered: the merged weights are all there (the
        # root's embeddings and final norm were left out), and written into the shards they are the policy.
        lora = seen["lora"]
        assert set(lora["merged"]) == set(reference["initial"])
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(lora["merged"][q], reference["initial"][q])  # B·A merged in (B drawn non-zero)
        for name, value in lora["merged"].items():
            torch.testing.assert_close(lora["in_policy"][name], value, atol=0, rtol=0)


def test_split_work_with_a_sharded_policy_keeps_every_process_in_step_and_does_not_hang(tmp_path):
    out = tmp_path / "work.pt"
    torchrun("fsdp2_work.py", out, tmp_path)  # split as before, the processes crashed on mismatched collectives
    for rank in (0, 1):
        seen = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(seen["sharded"]["logps"], seen["single"]["logps"], atol=1e-5, rtol=1e-5)
        assert seen["sharded"]["pools"] == seen["single"]["pools"]  # same candidates, same scores
        # The scoring was split (shards 0 and 2 on process 0, shard 1 on process 1) and the forwards even: process 1
        # made one real forward and one of a token.
        assert (seen["single"]["shards_scored"], seen["sharded"]["shards_scored"]) == (3, [2, 1][rank])
        assert (seen["single"]["forwards"], seen["sharded"]["forwards"]) == (3, 2)
        # Generation too: shards 0 and 2 on process 0, shard 1 on process 1, which then made an idle call.
        assert (seen["single"]["shards_generated"], seen["sharded"]["shards_generated"]) == (3, [2, 1][rank])
        assert (seen["single"]["generate_calls"], seen["sharded"]["generate_calls"]) == (3, 2)
        # A damaged shard made again (in step), and a judge's error on one process: one line on both, no hang.
        assert seen["sharded"]["again"] == seen["single"]["again"] == seen["single"]["pools"]
        assert "the judge refused shard 1" in seen["sharded"]["refused"] and "judging shard 2 of 3" in seen["sharded"]["refused"]
        assert seen["single"]["refused"].startswith("the judge refused shard 1")
        for run in ("single", "sharded"):  # (sharded: raised on process 1 before its shard's first step; it hung)
            assert "a prompt has 86 tokens, and the model's context is 64" in seen[run]["too_long"], seen[run]["too_long"]
        # The fed engine's answer: each process received its own set's samples, of the other only the count.
        own, other = seen["delivered"]["sets"][rank], seen["delivered"]["sets"][1 - rank]
        assert own["outputs"] is not None and other == {"generate_s": [2.0, 1.0][rank], "outputs": None,
                                                         "generated": [1, 2][rank]}
        assert "not restarted: the policy is sharded" in seen["restart"]
        # MC-PO's pool scoring: as many forwards on both (4, the 4-candidate pool's), none for a pool already scored
        # by the other process (sampler.refresh_every=0), whose scores both keep.
        draws = seen["pool_draws"]
        assert draws["forwards"] == [4, 0] and draws["cached"] == [0, 1], draws
        # Caught by process 1 at its third forward (before the processes ask each other there): both stopped at that
        # forward, no hang.
        # Packing checked on each process's own rows, process 1's disagreeing: neither packs (one packing would
        # train on numbers the other's check refused).
        assert seen["packing"] == {"verdict": False, "packs": False}
        assert seen["stopped"] == {"said": "stopped by SIGUSR1 outside training (finished shards, rounds and "
                                           "checkpoints are on disk)", "forwards": 3}
    assert sorted(p.name for p in (tmp_path / "sharded-shards").glob("shard-*")) == [
        "shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
