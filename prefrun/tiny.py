"""The embedded default model: a tiny Llama built on this machine and warmed up on a built-in task.

Nothing is downloaded. The character-level tokenizer and the model are saved with
`save_pretrained`, so every later step (and vLLM) loads them exactly like a hub model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefrun import distributed, storage
from prefrun.errors import InputError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, BOS prepended, EOS `</s>`, pad `<pad>`."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# The embedded model is built on one thread, whatever the run's own (one per process under `accelerate launch`,
# one per core in a plain run): the weights then depend on the recipe alone. (Built on the run's threads, 1
# against 2 ended the warm-up 3e-3 apart under one cache key, and a 2-process run with an empty cache sampled
# other pools and losses than one process.) One, not more: beside other work on the cores, two threads that spin
# while they wait took 108 s for the build that one thread does in 34 s.
BUILD_THREADS = 1


@dataclass
class TinyLlama:
    """Recipe for the embedded model. Every field enters the cache key: change one, get a new model."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads = 64, the size vLLM's CPU kernels serve
    intermediate_size: int = 512
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    seed: int = 0

    def path(self, cache_dir: str | Path, task) -> Path:
        """Where this recipe's model lives: keyed by the recipe and the task (its teacher)."""
        built_on = {"device": "cuda"} if torch.cuda.is_available() else {}  # a GPU's warm-up sums in another order
        spec = json.dumps({"recipe": asdict(self), "task": repr(task), "threads": BUILD_THREADS, **built_on},
                          sort_keys=True)
        return Path(cache_dir).expanduser() / "models" / f"tiny-llama-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"

    def materialize(self, cache_dir: str | Path, task) -> Path:
        """Return the model directory, building it first if the cache does not have it."""
        if task is None:
            raise InputError("model=tiny (the embedded model, warmed up on the built-in task) needs a task, and `~task` "
                             "removed it: give your model with model=hf model.name_or_path=<hub id or directory>")
        path = self.path(cache_dir, task)
        if (path / "config.json").exists():
            log.info("embedded model: %s (cached)", path)
            return path
        if self.hidden_size // self.num_heads != 64:
            log.warning("embedded model: head_dim %d != 64; vLLM's CPU backend will not serve it",
                        self.hidden_size // self.num_heads)
        log.info("embedded model: building a %d-layer Llama and warming it up on task %r (%d SFT steps)",
                 self.num_layers, task.name, self.sft_steps)
        start = time.time()
        tokenizer = char_tokenizer()
        threads = torch.get_num_threads()
        torch.set_num_threads(BUILD_THREADS)  # (sums split over other threads round otherwise)
        try:
            with torch.random.fork_rng():  # building the cache entry leaves the run's random state as it was: a run
                model = self._warm_up(self._init_model(tokenizer), tokenizer, task)  # is the same, cached or not
        finally:
            torch.set_num_threads(threads)
        tmp = storage.temporary(path)
        shutil.rmtree(tmp, ignore_errors=True)
        distributed.save_pretrained(model, tmp)  # also on a node's local main process (its own cache)
        tokenizer.save_pretrained(tmp)
        (tmp / "prefrun_recipe.json").write_text(json.dumps({"recipe": asdict(self), "task": repr(task)}, indent=2))
        try:
            tmp.rename(path)  # atomic: a half-written model is never seen as cached
        except OSError:  # another process built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("embedded model: built in %.0f s -> %s", time.time() - start, path)
        return path

    def _init_model(self, tokenizer) -> LlamaForCausalLM:
        torch.manual_seed(self.seed)
        return LlamaForCausalLM(self.config(tokenizer))

    def config(self, tokenizer=None) -> LlamaConfig:
        """The model's config (what `prefrun train plan=true` sizes without building anything)."""
        tokenizer = tokenizer or char_tokenizer()
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def _warm_up(self, model, tokenizer, task) -> LlamaForCausalLM:
        """Supervised fine-tuning on the task's noisy teacher (completion tokens only), on this process's GPU where
        it has one (a 100M recipe warms up in seconds there, in most of an hour on one CPU thread)."""
        device = distributed.device()
        model.to(device)
        rng = random.Random(self.seed)
        prompts = task.prompts("train", self.sft_steps * self.sft_batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.sft_lr, weight_decay=0.0)
        warmup = max(1, self.sft_steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / self.sft_steps)
        )
        model.train()
        for step in range(self.sft_steps):
            batch = prompts[step * self.sft_batch_size : (step + 1) * self.sft_batch_size]
            input_ids, labels = [], []
            for prompt in batch:
                prompt_ids = tokenizer(prompt).input_ids
                target = tokenizer(task.teacher(prompt, rng), add_special_tokens=False).input_ids
                target += [tokenizer.eos_token_id]
                input_ids.append(prompt_ids + target)
                labels.append([-100] * len(prompt_ids) + target)
            width = max(map(len, input_ids))
            ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in input_ids])
            lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
            ids, lab = ids.to(device), lab.to(device)
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == self.sft_steps - 1:
                log.info("embedded model: SFT step %d/%d loss %.3f", step + 1, self.sft_steps, loss.item())
        return model.cpu().eval()
