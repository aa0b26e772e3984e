"""Sequence log-probs and the DPO loss against an independent computation and against TRL."""

import json
import logging
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefrun.data import Example, attach_reference_logps, candidate_logps, collate, tokenize_record
from prefrun.logprobs import check_packing, packs, sequence_logps, use_packed_attention
from prefrun.losses import dpo_loss
from prefrun.model import fingerprint

from .conftest import build_bpe_model


def naive_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """One unpadded sequence at a time, full logits, plain log_softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[-len(completion_ids):].sum()


def test_left_padded_batch_matches_unpadded_sequences(bpe_model_dir, pairs_jsonl):
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    records = [json.loads(line) for line in pairs_jsonl.read_text().splitlines()][:6]
    records[0]["prompt"] *= 4  # very different lengths in one batch
    examples = [tokenize_record(r, tokenizer) for r in records]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        expected = torch.stack([naive_logps(model, ex.prompt_ids, c) for ex in examples for c in ex.completion_ids])
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-6)
    assert batch["completion_lengths"].tolist() == [[len(c) for c in ex.completion_ids] for ex in examples]


def test_logps_and_dpo_loss_agree_with_trl(bpe_model_dir, pairs_jsonl, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reference_dir = build_bpe_model(tmp_path / "reference", seed=1)  # a reference that differs from the policy
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    records = [json.loads(line) for line in pairs_jsonl.read_text().splitlines()][:8]
    beta = 0.3
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, beta=beta,
                         loss_type="sigmoid", max_length=512, bf16=False, fp16=False, gradient_checkpointing=False,
                         use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer)
    trl_rows = [trainer.train_dataset[i] for i in range(len(records))]
    trl_batch = trainer.data_collator(trl_rows)

    # Tokenisation: the same prompt / completion ids as TRL.
    examples = [tokenize_record(r, tokenizer) for r in records]
    for ex, row in zip(examples, trl_rows):
        assert ex.prompt_ids == row["prompt_ids"]
        assert ex.completion_ids == [row["chosen_ids"], row["rejected_ids"]]

    # Log-probs: our left-padded single forward vs TRL's right-padded forward.
    policy.eval()
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(policy, trl_batch)
        batch = collate(examples, tokenizer.pad_token_id)
        ours = sequence_logps(policy, batch).view(-1, 2)
    torch.testing.assert_close(ours[:, 0], trl_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, 1], trl_rejected, atol=1e-5, rtol=1e-5)

    # Loss: ours with cached reference log-probs vs TRL's compute_loss with its reference forward.
    attach_reference_logps(examples, reference, tokenizer, cache_dir=tmp_path / "cache", batch_size=4,
                           weights_key=fingerprint(reference))
    reference_logps = torch.tensor([ex.reference_logps for ex in examples])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, trl_batch)
        our_losses, _ = dpo_loss(ours, reference_logps, batch["completion_lengths"], beta=beta)
    assert our_losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(trl_loss.item() - 0.6931) > 1e-3  # a real comparison, not log 2 at identical models


def _varied_examples(model_dir, pairs_jsonl, n=6):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in pairs_jsonl.read_text().splitlines()][:n]
    records[0]["prompt"] *= 4  # very different lengths in one batch
    records[1]["chosen"] *= 3
    return tokenizer, [tokenize_record(r, tokenizer) for r in records]


@pytest.mark.parametrize("gqa", [False, True])
def test_packed_rows_match_padded_rows_and_their_gradients(tmp_path, pairs_jsonl, gqa):
    """Padding-free batches (one packed row, position ids restarting, attention kept inside each sequence by
    packed_sdpa) give today's padded fp32 log-probs and the same gradients, with grouped-query attention too."""
    model_dir = build_bpe_model(tmp_path / "m", heads=4, kv_heads=2 if gqa else None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer, examples = _varied_examples(model_dir, pairs_jsonl)
    assert use_packed_attention(model)
    padded, packed = collate(examples, tokenizer.pad_token_id), collate(examples, tokenizer.pad_token_id, packed=True)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].numel() == padded["attention_mask"].sum()
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        logps = sequence_logps(model, batch)
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if batch is padded:
            expected = logps.detach()
    torch.testing.assert_close(logps.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    # Without the per-sequence attention (plain causal attention over the packed row) they would differ:
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]),
                      position_ids=packed["position_ids"]).logits[0, packed["logit_positions"]]
    leaky = torch.zeros(len(examples) * 2).index_add(
        0, packed["token_rows"], leaky.log_softmax(-1).gather(1, packed["targets"][:, None])[:, 0])
    assert (leaky - expected).abs().max() > 1e-2


def _random_examples(vocab: int, lengths: list[tuple[int, int]], seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    return [Example(ids(p), [ids(c), ids(c + 3)]) for p, c in lengths]


def _tiny(name: str, **config):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=2, **config)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name", ["Mistral", "Gemma2"])
def test_packed_rows_keep_a_sliding_window(name):
    """Sliding-window attention (every layer: Mistral; every other one: Gemma2), rows longer than the window:
    packed rows give the padded rows' log-probs and gradients under the model's own SDPA, because packed_sdpa
    gives each sequence its block of the window mask transformers builds for the row."""
    model = _tiny(name, sliding_window=8, num_key_value_heads=1, head_dim=32)
    examples = _random_examples(97, [(5, 3), (19, 9), (2, 14), (11, 4)])
    padded, packed = collate(examples, 0), collate(examples, 0, packed=True)
    logps, grads = [], []
    for batch in (padded, packed):  # padded first: under the model's own SDPA
        if batch is packed:
            assert use_packed_attention(model)
        model.zero_grad()
        values = sequence_logps(model, batch)
        values.sum().backward()
        logps.append(values.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(logps[1], logps[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert check_packing(model, packed, padded) and packs(model)


def test_packing_is_refused_where_the_model_tests_for_sdpa_by_name(caplog):
    """Falcon's modelling code takes its SDPA path only when the implementation is named "sdpa", so after the
    switch to packed_sdpa its log-probs are wrong, packed or padded. The check on the first batch scored (here
    the reference's, before anything is cached) puts the model back on SDPA and pads from then on."""
    model, plain = _tiny("Falcon"), _tiny("Falcon")
    examples = _random_examples(97, [(5, 3), (19, 9), (2, 14), (11, 4)])
    assert use_packed_attention(model)
    with caplog.at_level(logging.WARNING, logger="prefrun.logprobs"):
        logps, _ = candidate_logps(model, examples, 0, batch_size=4)
    assert "FalconForCausalLM packed rows give log-probs" in caplog.text and "pads its batches" in caplog.text
    assert model.config._attn_implementation == "sdpa" and not packs(model) and not use_packed_attention(model)
    with torch.no_grad():
        expected = sequence_logps(plain, collate(examples, 0)).view(-1, 2)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)


def test_chunked_logps_for_a_large_vocabulary(tmp_path, pairs_jsonl):
    """Above trainer.logits_budget_mb the head runs in chunks of positions: same log-probs and gradients
    as the whole-logits path, padded and packed."""
    model_dir = build_bpe_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    use_packed_attention(model)
    tokenizer, examples = _varied_examples(model_dir, pairs_jsonl)
    for packed in (False, True):
        batch = collate(examples, tokenizer.pad_token_id, packed=packed)
        results = []
        for budget in (float("inf"), 0.01):  # 0.01 MB: chunks of 8 positions at this vocabulary
            model.zero_grad()
            logps = sequence_logps(model, batch, logits_budget_mb=budget)
            logps.sum().backward()
            results.append((logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)
