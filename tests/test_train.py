"""The training loop: gradient accumulation is the same optimisation as a bigger batch; padding-free
batches, the fused optimiser and chunked log-probs are the same optimisation as the plain padded loop;
length-grouped batches keep the epoch's examples; bf16 references start the log-ratio at 0."""

import functools
import json
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.data import attach_reference_logps, candidate_logps, collate, tokenize_record
from prefrun.logprobs import sequence_logps, use_packed_attention
from prefrun.losses import dpo_loss
from prefrun.model import fingerprint
from prefrun.samplers import DatasetSampler
from prefrun.train import _epoch_loader, make_accelerator, train


def train_once(model_dir, pairs_jsonl, cache, *, batch_size, grad_accum, max_steps=2, optimizer=None,
               attn_implementation="sdpa", **trainer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in pairs_jsonl.read_text().splitlines()][:16]
    examples = [tokenize_record(r, tokenizer) for r in records]
    cfg = OmegaConf.create({"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 1, "max_steps": max_steps,
                            "scheduler": "linear", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "mixed_precision": "no",
                            "log_every": 1, **trainer})
    rows = []
    accelerator = make_accelerator(cfg)
    with accelerator.autocast():  # the reference under the training's precision, as run.py does
        attach_reference_logps(examples, model, tokenizer, cache_dir=cache / cfg.mixed_precision, batch_size=8,
                               weights_key=fingerprint(model))
    train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=0.5), beta=0.5,
          sampler=DatasetSampler(), optimizer_factory=optimizer or functools.partial(torch.optim.SGD, lr=0.5),
          cfg=cfg, accelerator=accelerator, seed=0, on_log=rows.append)
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


def test_padding_free_fused_and_chunked_train_like_the_plain_padded_loop(bpe_model_dir, pairs_jsonl, tmp_path):
    """Packed rows and chunked log-probs: the same gradients (SGD, so that Adam's normalisation does not blow up
    rounding-level differences of near-zero gradients); the fused AdamW: the same steps as the for-loop one."""
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, fused=False)
    fused = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)
    runs = {"padded": dict(optimizer=sgd, padding_free=False),
            "packed": dict(optimizer=sgd, padding_free=True),
            "packed + chunked": dict(optimizer=sgd, padding_free=True, logits_budget_mb=0.01),
            "adamw": dict(optimizer=adamw), "fused adamw": dict(optimizer=fused)}
    trained = {name: train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=1, max_steps=3, **kw)
               for name, kw in runs.items()}
    for reference, variant in [("padded", "packed"), ("padded", "packed + chunked"), ("adamw", "fused adamw")]:
        (model_a, rows_a), (model_b, rows_b) = trained[reference], trained[variant]
        for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{variant}: {name}")
        for a, b in zip(rows_a, rows_b, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert trained["packed"][1][-1]["loss"] < 0.69  # it trained


def test_several_processes_get_one_processs_global_batches_and_no_repeated_examples():
    """accelerate deals the batches to the processes in turn and fills a last round of them with repeated examples:
    2 processes of batch 4 trained a step one process of batch 8 drops, on 2 examples counted twice."""
    lengths, cfg = [10] * 13, OmegaConf.create({"batch_size": 4})
    one = [b.tolist() for b in _epoch_loader(lengths, OmegaConf.create({"batch_size": 8}), seed=3, epoch=0)]
    two = [b.tolist() for b in _epoch_loader(lengths, cfg, seed=3, epoch=0, processes=2)]
    assert len(one) == 1 and two == [one[0][:4], one[0][4:]]  # batch i goes to process i % 2: one's global batch
    # Fewer examples than a global batch: an equal share for each process (one is left out), never a repeat.
    assert [b.tolist() for b in _epoch_loader(lengths[:7], cfg, seed=3, epoch=0, processes=2)] == \
        [b.tolist() for b in _epoch_loader(lengths[:7], OmegaConf.create({"batch_size": 3}), seed=3, epoch=0)][:2]
    assert [len(b) for b in _epoch_loader(lengths[:7], cfg, seed=3, epoch=0)] == [4]  # one process: as before
    assert [len(b) for b in _epoch_loader(lengths[:3], cfg, seed=3, epoch=0)] == [3]  # (one short batch)
    # With gradient accumulation an epoch ends on a whole optimiser step (accelerate stepped at the epoch's end, on
    # what a short accumulation had summed, and the run stopped before its last epoch was done).
    accumulated = OmegaConf.create({"batch_size": 4, "grad_accum": 2})
    assert [len(b) for b in _epoch_loader(lengths, accumulated, seed=3, epoch=0)] == [4, 4]
    assert [len(b) for b in _epoch_loader(lengths * 2, accumulated, seed=3, epoch=0, processes=2)] == [4] * 4


def test_length_grouped_batches_keep_the_epoch_and_its_seed():
    lengths = [int(x) for x in torch.randint(5, 200, (37,), generator=torch.Generator().manual_seed(1))]
    plain = [b.tolist() for b in _epoch_loader(lengths, OmegaConf.create({"batch_size": 4}), seed=3, epoch=2)]
    cfg = OmegaConf.create({"batch_size": 4, "group_by_length": 3})
    grouped = [b.tolist() for b in _epoch_loader(lengths, cfg, seed=3, epoch=2)]
    assert grouped == [b.tolist() for b in _epoch_loader(lengths, cfg, seed=3, epoch=2)]  # fixed by (seed, epoch)
    assert grouped != [b.tolist() for b in _epoch_loader(lengths, cfg, seed=3, epoch=3)]
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) and all(len(b) == 4 for b in grouped)  # same drop
    for start in range(0, len(plain), 3):  # each window of 3 batches: the same examples, sorted into batches
        window = sorted(sum(grouped[start : start + 3], []), key=lengths.__getitem__)
        assert sorted(window) == sorted(sum(plain[start : start + 3], []))
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in grouped[start : start + 3])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.6 * padding(plain)


def test_bf16_reference_starts_the_log_ratio_at_zero(bpe_model_dir, pairs_jsonl, tmp_path):
    """bf16 autocast on the CPU: a reference computed under the same autocast (run.py's rule), packed like the
    training batches but in other batches, equals the policy's log-probs at step 1; an fp32 one does not."""
    from accelerate.state import AcceleratorState

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    examples = [tokenize_record(json.loads(line), tokenizer) for line in pairs_jsonl.read_text().splitlines()][:8]
    pad = tokenizer.pad_token_id
    assert use_packed_attention(model)
    fp32_reference, _ = candidate_logps(model, examples, pad, batch_size=5)  # other batches than training's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_reference, _ = candidate_logps(model, examples, pad, batch_size=5)
        with torch.no_grad():
            policy = sequence_logps(model, collate(examples[2:6], pad, packed=True)).view(-1, 2)
    matched, unmatched = (policy - bf16_reference[2:6]).abs().max(), (policy - fp32_reference[2:6]).abs().max()
    assert matched < 1e-5 < 1e-3 < unmatched, (matched, unmatched)  # exactly 0 on this machine

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process, as in a run
    try:
        _, rows = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=8, grad_accum=1, max_steps=3,
                             mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and rows[-1]["loss"] < 0.6


def test_padding_free_falls_back_on_eager_attention(bpe_model_dir, pairs_jsonl, tmp_path, caplog):
    """Eager attention cannot run packed rows: a warning, and the padded loop's result."""
    eager, _ = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=1, padding_free=True,
                          attn_implementation="eager")
    assert "cannot run packed rows exactly; training on padded batches" in caplog.text
    padded, _ = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=1, padding_free=False)
    for a, b in zip(eager.parameters(), padded.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_padding_free_pads_when_attention_crosses_sequences(bpe_model_dir, pairs_jsonl, tmp_path, monkeypatch,
                                                           caplog):
    """A model whose attention ignores the sequence boundaries (as remote code that drops the forward's kwargs
    would): the check on the first micro-batch says so, and the run trains on padded batches, with the
    padded loop's result."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefrun.logprobs import LENGTHS_KEY, PACKED_SDPA

    def leaky(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop(LENGTHS_KEY, None)
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})

    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_SDPA, leaky)
    leaked, _ = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=1, padding_free=True)
    assert "packed rows give log-probs" in caplog.text and "pads its batches" in caplog.text
    assert leaked.config._attn_implementation == "sdpa"
    padded, _ = train_once(bpe_model_dir, pairs_jsonl, tmp_path, batch_size=4, grad_accum=1, padding_free=False)
    for a, b in zip(leaked.parameters(), padded.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dropout_is_off_by_default_so_the_first_log_ratio_is_zero(bpe_model_dir, pairs_jsonl, tmp_path, arch):
    """A model with dropout (GPT-2's Dropout modules; Llama's float attention_dropout): by default the policy
    trains without it, as TRL does, so at step 1 it computes exactly the reference's log-probs (loss ln 2);
    trainer.disable_dropout=false keeps it, and the first loss moves off ln 2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    model_dir = tmp_path / arch
    torch.manual_seed(0)
    if arch == "gpt2":
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                                   resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).save_pretrained(model_dir)
    else:
        AutoModelForCausalLM.from_pretrained(bpe_model_dir, attention_dropout=0.3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    first = {}
    for disable in (True, False):
        model, rows = train_once(model_dir, pairs_jsonl, tmp_path / f"cache{disable}", batch_size=4, grad_accum=1,
                                 max_steps=1, disable_dropout=disable)
        first[disable] = rows[0]["loss"]
    assert first[True] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first[False] - math.log(2)) > 1e-3


def test_pools_of_different_sizes_are_checked_for_packing_before_prepare(bpe_model_dir, tmp_path):
    """The packed-vs-padded check runs before prepare() (under FSDP2 a forward is a collective: every process must
    run it at the same time) on the first batch; here the model has not been checked yet (as when the reference
    log-probs come from the cache) and the first batch's pools hold 5 and 3 candidates."""
    from prefrun.data import Example
    from prefrun.logprobs import packing_checked
    from prefrun.samplers import CDSampler

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    examples = []
    for i in range(8):
        k = 5 if i % 2 == 0 else 3
        ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        examples.append(Example(tokenizer(f"Question {i}:").input_ids, [ids(f" Answer: {3 * i + j}.") for j in range(k)],
                                scores=[float(-j) for j in range(k)], reference_logps=[-5.0 - j for j in range(k)]))
    cfg = OmegaConf.create({"batch_size": 4, "grad_accum": 1, "epochs": 1, "max_steps": 2, "scheduler": "linear",
                            "warmup_ratio": 0.0, "max_grad_norm": 1.0, "mixed_precision": "no", "log_every": 1,
                            "padding_free": True, "reference_batch_size": None})
    assert not packing_checked(model)
    rows = []
    train(model, tokenizer, examples, loss_fn=functools.partial(dpo_loss, beta=0.5), beta=0.5,
          sampler=CDSampler(num_negatives=1), optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
          cfg=cfg, accelerator=make_accelerator(cfg), seed=0, on_log=rows.append)
    assert packing_checked(model) and [r["step"] for r in rows] == [1, 2]


def test_a_launchers_mixed_precision_that_trainer_mixed_precision_overrides_is_said(monkeypatch, caplog):
    # the shipped fsdp.yaml's mixed_precision: bf16 on a CPU: prefrun ran fp32 and said nothing
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = OmegaConf.create({"batch_size": 2, "grad_accum": 1, "mixed_precision": "no"})
    with caplog.at_level(logging.WARNING, logger="prefrun"):
        assert make_accelerator(cfg).mixed_precision == "no"
    assert "the launcher asked for mixed precision bf16" in caplog.text
    assert "set trainer.mixed_precision=bf16 to follow the launcher" in caplog.text
