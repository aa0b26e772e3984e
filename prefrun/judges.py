"""Judges: score each prompt's candidates (higher = better) and compare two responses, behind one interface.

    judge.score(prompts, candidates) -> scores       # one list per prompt, one float per candidate
    judge.compare(prompts, first, second) -> Verdicts  # one pair per prompt:
        .forward[n]    P(first beats second) with `first` shown in position A (first)
        .backward[n]   P(first beats second) with `first` shown in position B (second)
        .preference[n] (forward + backward) / 2: the order's effect cancelled
    judge.fingerprint() -> str                        # what verdicts depend on: settings, template, weights

rule          the built-in task's graded judge, task.score(prompt, completion) in [0, 1]; compare is hard:
              1 / 0.5 / 0 as the first's score is above, equal to or below the second's
reward_model  a sequence classifier with a single-score head (Skywork-, ArmoRM-style): one forward
              per prompt + candidate, its score as is (unbounded); compare is Bradley-Terry,
              σ(s_first - s_second), the same in both orders (it sees each response alone)
pairwise      a classifier whose single logit l(a, b) is the log-odds that candidate A beats candidate B;
              forward = σ(l(first, second)), backward = 1 - σ(l(second, first))
llm           a local instruct causal LM asked a pairwise template with A or B for an answer; the verdict
              is its next-token probability of A against B (the two renormalised), nothing parsed from text

pairwise and llm score K candidates from every ordered pair: candidate i gets the mean over j of its
symmetrised win probability against j (a lone candidate 0.5). A judge of your own subclasses Judge and
implements `_score`; its compare then scores [first, second] per prompt and compares hard, as the rule
does (override `_compare` for soft verdicts).

Prompts are strings or lists of {role, content} messages; candidates are completion strings. Model
judges load at their first use (composing a config loads nothing) and free their memory at close(),
before training starts. Whatever a judge returns passes check_scores (one finite number per candidate)
or check_verdicts (one probability in [0, 1] per pair and order).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import inspect
import json
import logging
import math
import numbers
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from prefrun import distributed
from prefrun.errors import InputError, PrefrunError
from prefrun.model import DTYPES, files_fingerprint, loaded_whole, weights_of
from prefrun.model import fingerprint as weights_fingerprint

log = logging.getLogger(__name__)

Prompt = str | list[dict]


class JudgeError(PrefrunError):
    """A judge returned something that is not one finite score per candidate (or one probability per pair)."""


@dataclass
class Verdicts:
    """A judge's verdicts on pairs (first, second), one value per pair in each order of showing them."""

    forward: list[float]  # P(first beats second) with `first` shown in position A (first)
    backward: list[float]  # P(first beats second) with `first` shown in position B (second)

    @property
    def preference(self) -> list[float]:
        """(forward + backward) / 2: a judge's preference for whichever position comes first cancels."""
        return [(f + b) / 2 for f, b in zip(self.forward, self.backward)]


class Judge:
    """The interface: `name` for messages, `score`, `compare`, `fingerprint`, `close`. Subclasses implement
    `_score` (and may implement `_compare`); `score` and `compare` check what they return."""

    name: str = "judge"
    # Scores that rank a prompt's candidates against each other only (pairwise, llm: a prompt's mean is 0.5 by
    # construction): a policy is then measured by its win rate against the start, never by a mean score.
    relative: bool = False

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per candidate of each prompt, higher = better."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(candidates)} candidate lists")
        prompts, candidates = list(prompts), [list(group) for group in candidates]
        return check_scores(self.name, prompts, candidates, self._score(prompts, candidates))

    def compare(self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]) -> Verdicts:
        """For each prompt, P(first beats second) with `first` shown first (forward) and shown second
        (backward)."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{self.name}: {len(prompts)} prompts, {len(first)} first and {len(second)} "
                             "second responses; compare takes one (first, second) pair per prompt")
        prompts, first, second = list(prompts), list(first), list(second)
        if self._judgments is not None:  # pools and rounds: verdicts this judge gave before are read back
            return self._judgments.compare(self, prompts, first, second, split=False)[0]
        return self.compare_uncached(prompts, first, second)

    def compare_uncached(self, prompts: list[Prompt], first: list[str], second: list[str]) -> Verdicts:
        """`compare` without the judgment cache (what the cache calls for the pairs it lacks)."""
        return check_verdicts(self.name, prompts, self._compare(prompts, first, second))

    _judgments = None  # a JudgmentCache that compare() reads and adds to (keep_judgments)

    def keep_judgments(self, judgments) -> None:
        """Send every compare() through `judgments` (prefrun/judgments.py), the pairs of K-candidate pools
        included: a rerun, a resumed round or a new run with this judge judges only pairs it has not seen."""
        self._judgments = judgments

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        raise NotImplementedError

    def _compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> Verdicts:
        """The fallback for a judge that only scores: [first, second] scored per prompt and compared hard
        (1, 0.5 or 0), the same in both orders: a score shows each response alone. Hard, because a sigmoid
        of the difference of two graded scores in [0, 1] would squash every verdict toward 0.5."""
        scores = self.score(prompts, [[a, b] for a, b in zip(first, second)])
        hard = [_hard(a, b) for a, b in scores]
        return Verdicts(forward=hard, backward=list(hard))

    def fingerprint(self) -> str:
        """What the verdicts depend on, for a judgment cache on disk: the repr here; model judges add a
        hash of their loaded weights."""
        return repr(self)

    def identity(self) -> str:
        """What this judge's scores depend on, without loading it (keys of judged pools, cached or in shards): the
        repr here; a model judge in a local directory adds its weight files' hash."""
        return repr(self)

    def load(self) -> None:
        """Load the judge's model now (a rule has none), as score() would: before work that the processes make in
        step (a sharded policy's forwards), where loading it inside would keep the others waiting in a collective
        (a hub download can outlast trainer.dist_timeout_s)."""
        loader = getattr(self, "_load", None)
        if loader is not None:
            loader()

    def close(self) -> None:
        """Free the judge's model (a later score() loads it again); nothing to free for a rule."""

    def __repr__(self) -> str:
        """Stable across runs (it keys caches and the pool shards a resumed round reuses): the class and its plain
        settings, never an object's address."""
        plain = (str, int, float, bool, type(None), list, tuple, dict)
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())
                             if not k.startswith("_") and isinstance(v, plain))
        return f"{type(self).__module__}.{type(self).__qualname__}({settings})"


def _hard(first: float, second: float) -> float:
    return 1.0 if first > second else 0.5 if first == second else 0.0


def check_scores(judge_name: str, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
                 scores) -> list[list[float]]:
    """`scores` as lists of floats, or one line naming the judge and the prompt whose scores are not
    one finite number per candidate."""
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__len__") or len(scores) != len(prompts):
        count = len(scores) if hasattr(scores, "__len__") else "no"
        raise JudgeError(f"{judge_name} returned {count} score lists for {len(prompts)} prompts "
                         f"({reprlib.repr(scores)}); a judge returns one list of scores per prompt")
    checked = []
    for prompt, group, row in zip(prompts, candidates, scores):
        problem = _score_problem(row, len(group))
        if problem:
            raise JudgeError(f"{judge_name} returned {reprlib.repr(row)} for prompt {reprlib.repr(prompt)}: "
                             f"{problem}; a judge returns one finite number per candidate")
        checked.append([float(value) for value in row])
    return checked


def check_verdicts(judge_name: str, prompts: Sequence[Prompt], verdicts) -> Verdicts:
    """`verdicts` with plain floats, or one line naming the judge and the prompt whose verdict is not one
    probability in [0, 1] per pair and order."""
    checked = {}
    for order in ("forward", "backward"):
        values = getattr(verdicts, order, None)
        listed = not isinstance(values, (str, bytes, dict)) and hasattr(values, "__len__")
        if not listed or len(values) != len(prompts):
            count = len(values) if hasattr(values, "__len__") else "no"
            raise JudgeError(f"{judge_name} returned {count} {order} verdicts for {len(prompts)} pairs "
                             f"({reprlib.repr(verdicts)}); compare returns Verdicts with one probability per "
                             "pair in each order")
        for prompt, value in zip(prompts, values):
            problem = _score_problem([value], 1)
            if problem is None and not 0 <= value <= 1:
                problem = f"{value} is not in [0, 1]"
            if problem:
                raise JudgeError(f"{judge_name} returned {order}={reprlib.repr(value)} for prompt "
                                 f"{reprlib.repr(prompt)}: {problem}; a judge's compare returns one "
                                 "probability in [0, 1] per pair and order")
        checked[order] = [float(value) for value in values]
    return Verdicts(**checked)


def _score_problem(row, expected: int) -> str | None:
    if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__len__"):
        return "not a list of scores"
    if len(row) != expected:
        return f"{len(row)} scores for {expected} candidates"
    for value in row:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{reprlib.repr(value)} is not a number"
        if not math.isfinite(value):
            return f"a score of {value}"
    return None


class RuleJudge(Judge):
    """The built-in task's graded judge: task.score(prompt, completion) in [0, 1]. Without a task
    (`~task`) it is built all the same, since judge=rule is the default and a run may never judge
    anything; scoring then stops with one line. compare is the base's hard comparison of the two
    scores (1 / 0.5 / 0), the same in both orders; its fingerprint is its repr (no weights)."""

    def __init__(self, task=None) -> None:
        if OmegaConf.is_config(task):  # instantiate(cfg.judge, task=task) hands a dataclass task over as a config
            task = OmegaConf.to_object(task)
        self.task = task
        self.name = f"judge=rule (task {getattr(task, 'name', type(task).__name__)})" if task else "judge=rule"

    def __repr__(self) -> str:
        return f"RuleJudge(task={self.task!r})"

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        if self.task is None:
            raise InputError("judge=rule needs a built-in task, but the task is removed (~task): keep task=sort, "
                             "or use judge=reward_model judge.name_or_path=<hub id | dir> (or judge=pairwise)")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InputError(f"{self.name}: prompt {reprlib.repr(prompt)} is a conversation; the task judges "
                                 "its own string prompts: use judge=reward_model for other data")
        return [[self.task.score(prompt, c) for c in group] for prompt, group in zip(prompts, candidates)]


class _ModelJudge(Judge):
    """What the model judges share: settings checked at construction, lazy loading with one-line errors,
    rendering with a chat template, texts cut to max_length, right-padded batches, fingerprint(), close().
    A subclass names its Auto class, checks the config (`_check_config`) and reads each batch's output."""

    kind = ""  # the judge= choice, for messages
    auto_class = AutoModelForSequenceClassification
    _own_code_key = "AutoModelForSequenceClassification"  # auto_map's key for a checkpoint's own model class

    def __init__(self, name_or_path: str, *, batch_size: int, max_length: int, dtype: str, device: str,
                 chat_template: str | None, trust_remote_code: bool) -> None:
        if not name_or_path:
            raise InputError(f"judge.name_or_path is empty: set judge.name_or_path=<hub id | dir> of the {self.kind} "
                             "model")
        if batch_size < 1 or max_length < 2:
            raise InputError(f"judge.batch_size={batch_size}, judge.max_length={max_length}: need batch_size >= 1 "
                             "and max_length >= 2")
        if dtype not in ("auto", *DTYPES):
            raise InputError(f"judge.dtype={dtype!r}: choose auto, float32, bfloat16 or float16")
        try:
            # auto: this process's GPU (accelerate has set it: each process of a job judges on its own device)
            self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else
                           torch.device("cpu")) if device == "auto" else torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"judge.device={device!r}: choose auto, cpu, cuda, cuda:<index> or another torch "
                             "device") from None
        self.name_or_path = str(name_or_path)
        self.name = f"judge={self.kind} ({self.name_or_path})"
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.chat_template = _template_setting(chat_template)
        self._own_template = None if self.chat_template in ("auto", "none") else _read_template(self.chat_template)
        self.trust_remote_code = bool(trust_remote_code)
        self._model = self._tokenizer = None
        self._pad_id: int | None = None
        self._weights: str | None = None  # the loaded weights' hash, made at the first fingerprint()

    def _settings(self) -> dict:
        """What the verdicts depend on besides the weights (not batch_size or device)."""
        return {"name_or_path": self.name_or_path, "max_length": self.max_length, "dtype": self.dtype,
                "chat_template": self.chat_template, "template": getattr(self, "template", None)}

    def __repr__(self) -> str:
        """The settings, for cache keys."""
        settings = self._settings()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items() if v is not None)})"

    def identity(self) -> str:
        """The repr and, for a checkpoint in a local directory, its weight files' hash: a reward model retrained into
        the same directory is another judge (cached pools it scored are not reused). A hub id names its weights;
        the policy as judge is in the pools' key already."""
        if self.name_or_path == "policy":
            return repr(self)
        weights = weights_of(self.name_or_path, f"judge.name_or_path={self.name_or_path!r}")
        return repr(self) if weights == self.name_or_path else f"{self!r} weights={weights}"

    def fingerprint(self) -> str:
        """The repr, a hash of the loaded weights' bytes (not their path: a retrained model must not be
        served old verdicts) and of the chat template in use (the tokenizer's, for chat_template=auto).
        Loads the model if it is not loaded; the hash is made once per load."""
        self._load()
        if self._weights is None:
            self._weights = weights_fingerprint(self._model)
        chat = json.dumps(self._tokenizer.chat_template if self._uses_template else None, sort_keys=True)
        return (f"{self!r} weights={self._weights} "
                f"chat_template={hashlib.blake2b(chat.encode(), digest_size=8).hexdigest()}")

    # -- loading --------------------------------------------------------------------------------

    def _check_config(self, config, key: str) -> bool:
        """Refuse a checkpoint this judge cannot read, in one line; True when the checkpoint's own code
        (trust_remote_code) provides the model class."""
        raise NotImplementedError

    def _config_and_tokenizer(self, key: str):
        """The checkpoint's config, checked (`_check_config`: whether its own code provides the model class), and
        its tokenizer with judge.chat_template applied; each failure one line."""
        from prefrun.model import check_local_path

        trust = self.trust_remote_code
        check_local_path(self.name_or_path, key.split("=")[0])
        try:
            config = AutoConfig.from_pretrained(self.name_or_path, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise InputError(f"{key}: cannot load a model config ({_reason(err)}). Give a local directory with "
                             "config.json or a hub id (judge.trust_remote_code=true for models with their own code)"
                             ) from None
        own_code = self._check_config(config, key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=trust)
        except (OSError, ValueError, TypeError) as err:
            raise InputError(f"{key}: cannot load its tokenizer ({_reason(err)}); save the tokenizer next to the "
                             "model") from None
        if self._own_template is not None:
            tokenizer.chat_template = self._own_template
        return own_code, tokenizer

    def _load(self) -> None:
        if self._model is not None:
            return
        key, trust = f"judge.name_or_path={self.name_or_path!r}", self.trust_remote_code
        own_code, tokenizer = self._config_and_tokenizer(key)
        with loaded_whole():  # never partitioned by a ZeRO-3 config: the judge is not prepared
            model, info = self.auto_class.from_pretrained(
                self.name_or_path, dtype="auto" if self.dtype == "auto" else DTYPES[self.dtype],
                trust_remote_code=trust, device_map=str(self.device), output_loading_info=True)
        missing = info.get("missing_keys") or []
        if missing and not own_code:
            raise InputError(f"{key}: the checkpoint lacks {reprlib.repr(sorted(missing))}, which would start at "
                             f"random; choose a trained {self.kind} model")
        model.eval()
        model.config.use_cache = False
        self._model, self._tokenizer, self._weights = model, tokenizer, None
        try:
            self._loaded()
        except BaseException:
            self._model = self._tokenizer = None
            raise
        log.info("%s: loaded (%s, %.2fM parameters, %s)", self.name, model.dtype,
                 sum(p.numel() for p in model.parameters()) / 1e6, self.device)

    def _loaded(self) -> None:
        """What a subclass settles once the model and tokenizer are there."""

    def close(self) -> None:
        if self._model is None:
            return
        self._model = self._tokenizer = self._weights = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- texts -> model outputs -----------------------------------------------------------------

    @property
    def _uses_template(self) -> bool:
        return self.chat_template != "none" and bool(self._tokenizer.chat_template)

    def _chat(self, messages: list[dict], prompt: Prompt, **kwargs) -> str:
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as err:  # noqa: BLE001 - a template failure on one prompt: name it
            raise InputError(f"{self.name}: the chat template failed on prompt {reprlib.repr(prompt)} "
                             f"({_reason(err)}); fix the prompt or set judge.chat_template") from None

    def _encode(self, texts: list[str], *, templated: bool, shorten: bool = True) -> list[list[int]]:
        """Token ids per text. A rendered chat template carries its own special tokens (no second BOS);
        plain text gets the tokenizer's. A text over max_length tokens keeps its BOS and its last tokens
        (the start of the prompt is cut): the judge reads the end."""
        encoded = self._tokenizer(texts, add_special_tokens=not templated).input_ids
        bos, cut = self._tokenizer.bos_token_id, 0
        model = getattr(self, "_model", None)  # (None: a vLLM engine serves the judge, and its context holds)
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None) if model is not None \
            else None
        limit = min(self.max_length, context or self.max_length)  # past its context a model breaks or makes noise
        if not shorten:  # (tokenisation only: how a text ends)
            return encoded
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                keep = ids[:1] if bos is not None and ids[0] == bos else []
                encoded[i], cut = keep + ids[len(ids) - limit + len(keep):], cut + 1
        if cut:
            why = f"judge.max_length={self.max_length}" if limit == self.max_length else \
                f"the judge model's context (max_position_embeddings; judge.max_length={self.max_length})"
            log.warning("%s: %d of %d texts are longer than %d tokens, %s: their start is cut", self.name, cut,
                        len(texts), limit, why)
        return encoded

    @torch.inference_mode()
    def _forward_batches(self, encoded: list[list[int]], read: Callable[..., torch.Tensor], *, pad_id: int,
                         batch_size: int) -> list[torch.Tensor]:
        """`read(input_ids, attention_mask, lengths)` -> one value (or row) per text of a batch; all of them
        in the texts' order. Right padding: real tokens keep positions 0..n-1 and never see a pad, whatever
        the batch."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths batch together
        results: list[torch.Tensor | None] = [None] * len(encoded)
        with tqdm(total=len(encoded), desc=self.name, unit="text", leave=False,
                  disable=None if distributed.is_main() else True) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = len(encoded[rows[0]])
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    attention_mask[r, : len(encoded[i])] = 1
                lengths = attention_mask.sum(1)
                input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
                values = read(input_ids, attention_mask, lengths)
                for i, value in zip(rows, values.cpu()):
                    results[i] = value
                bar.update(len(rows))
        return results


class _ClassifierJudge(_ModelJudge):
    """The sequence-classifier judges: a single-score head, one score per text."""

    def _check_config(self, config, key: str) -> bool:
        auto_map = getattr(config, "auto_map", None) or {}
        own_code = self.trust_remote_code and self._own_code_key in auto_map  # ArmoRM-style custom heads
        architectures = list(getattr(config, "architectures", None) or [])
        if not own_code and not any(a.endswith("ForSequenceClassification") for a in architectures):
            hint = (" It ships its own model code: set judge.trust_remote_code=true if you trust it."
                    if self._own_code_key in auto_map else "")
            if any(_is_causal_lm(a) for a in architectures):
                hint += " For an instruct language model as a judge, use judge=llm."
            raise InputError(f"{key} is a {', '.join(architectures) or config.model_type} checkpoint, not a sequence "
                             "classifier: AutoModelForSequenceClassification would give it an untrained score head. "
                             f"Choose a {self.kind} model with a single-score head (num_labels=1).{hint}")
        if not own_code and config.num_labels != 1:
            raise InputError(f"{key} has num_labels={config.num_labels}: judge={self.kind} reads one score per text; "
                             "choose a model with a single-score head (num_labels=1)")
        return own_code

    def _loaded(self) -> None:
        tokenizer = self._tokenizer
        text_config = self._model.config.get_text_config()  # where the head looks for pad_token_id
        self._pad_id = text_config.pad_token_id
        if self._pad_id is None and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id,
                                                                   tokenizer.bos_token_id):
            self._pad_id = text_config.pad_token_id = tokenizer.pad_token_id  # a dedicated pad token: safe to batch
        if self._pad_id is None:
            # Llama-style heads read the last token that is not the pad token: without one, no padding.
            log.warning("%s: the model config has no pad_token_id: scoring one text at a time", self.name)

    def _score_texts(self, texts: list[str], *, templated: bool) -> list[float]:
        """The head's score of each text, whatever the batch."""
        if not texts:
            return []

        def head_scores(input_ids, attention_mask, lengths) -> torch.Tensor:
            out = self._model(input_ids=input_ids, attention_mask=attention_mask)
            values = getattr(out, "score", None)  # ArmoRM-style outputs carry the preference score here
            values = (out.logits if values is None else values).float().reshape(len(input_ids), -1)
            if values.shape[1] != 1:
                raise InputError(f"judge.name_or_path={self.name_or_path!r} returns {values.shape[1]} scores "
                                 f"per text: judge={self.kind} reads one; choose a model with a single-score "
                                 "head (num_labels=1)")
            return values[:, 0]

        encoded = self._encode(texts, templated=templated)
        batch_size = self.batch_size if self._pad_id is not None else 1
        values = self._forward_batches(encoded, head_scores, pad_id=self._pad_id or 0, batch_size=batch_size)
        return [value.item() for value in values]


class RewardModelJudge(_ClassifierJudge):
    """A reward model: each prompt + candidate is scored in one forward, the head's value as is.

    With a chat template (the tokenizer's, or judge.chat_template), the text is the template's
    rendering of the prompt's messages (a string prompt becomes one user turn) followed by an
    assistant turn holding the candidate; without one, prompt + candidate as plain text. compare is
    Bradley-Terry on the two scores, σ(s_first - s_second), the same in both orders."""

    kind = "reward_model"

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 1024, dtype: str = "auto",
                 device: str = "auto", chat_template: str | None = "auto", trust_remote_code: bool = False,
                 task=None) -> None:
        super().__init__(name_or_path, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                         chat_template=chat_template, trust_remote_code=trust_remote_code)

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        self._load()
        texts = [self._render(prompt, c) for prompt, group in zip(prompts, candidates) for c in group]
        flat = iter(self._score_texts(texts, templated=self._uses_template))
        return [[next(flat) for _ in group] for group in candidates]

    def _compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> Verdicts:
        self._load()
        texts = [*(self._render(p, a) for p, a in zip(prompts, first)),
                 *(self._render(p, b) for p, b in zip(prompts, second))]
        unique = list(dict.fromkeys(texts))  # a response met in several pairs is scored once
        scores = dict(zip(unique, self._score_texts(unique, templated=self._uses_template)))
        values = torch.tensor([scores[t] for t in texts], dtype=torch.float64)
        # Unbounded scores: a difference of hundreds saturates at 0 or 1 instead of overflowing.
        forward = torch.sigmoid(values[: len(prompts)] - values[len(prompts):]).tolist()
        return Verdicts(forward=forward, backward=list(forward))

    def _render(self, prompt: Prompt, completion: str) -> str:
        if self._uses_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self._chat([*messages, {"role": "assistant", "content": completion}], prompt)
        if _single_user_turn(prompt):  # a string prompt in chat form (generate.as_chat): its text, as a string is
            prompt = prompt[0]["content"]
        if not isinstance(prompt, str):
            raise InputError(f"{self.name}: prompt {reprlib.repr(prompt)} is a list of messages but the reward "
                             "model's tokenizer has no chat template (or judge.chat_template=none): set "
                             "judge.chat_template=<Jinja template or file>")
        return prompt + completion


class _ReadsPairs:
    """What the judges that read both responses at once share (pairwise, llm): a template with {prompt},
    {a}, {b}, rendered as one user turn when there is a chat template, and K candidates scored from
    every ordered pair's verdicts."""

    relative = True  # (Judge.relative)

    def _set_template(self, template: str) -> None:
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"judge.template={template!r}: {_reason(err)}; use only the fields {{prompt}}, {{a}} "
                             "and {b}, and double any other brace") from None
        missing = [field for field in ("{prompt}", "{a}", "{b}") if field not in template]
        if missing:
            raise InputError(f"judge.template={template!r} lacks {', '.join(missing)}: the judge must see "
                             "the prompt and both candidates")
        self.template = template

    def _render(self, prompt: Prompt, a: str, b: str) -> str:
        """The filled template (a conversation prompt fills {prompt} as `role: content` lines); with a chat
        template, that text as one user turn followed by the generation prompt."""
        text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        filled = self.template.format(prompt=text, a=a, b=b)
        if self._uses_template:
            return self._chat([{"role": "user", "content": filled}], prompt, add_generation_prompt=True)
        return filled

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        """Each unordered pair {i, j} of a prompt's candidates compared once in both orders, i.e. every
        ordered pair: p(i > j) is the pair's symmetrised preference, p(j > i) = 1 - p(i > j), and candidate
        i scores the mean of p(i > j) over the others (a lone candidate 0.5)."""
        pairs = [(n, i, j) for n, group in enumerate(candidates) for i in range(len(group))
                 for j in range(i + 1, len(group))]
        verdicts = self.compare([prompts[n] for n, _, _ in pairs], [candidates[n][i] for n, i, _ in pairs],
                                [candidates[n][j] for n, _, j in pairs])
        wins = {}
        for (n, i, j), p in zip(pairs, verdicts.preference):
            wins[n, i, j], wins[n, j, i] = p, 1 - p
        return [[sum(wins[n, i, j] for j in range(len(group)) if j != i) / (len(group) - 1) if len(group) > 1
                 else 0.5 for i in range(len(group))] for n, group in enumerate(candidates)]


class PairwiseJudge(_ReadsPairs, _ClassifierJudge):
    """A PairRM-style ranker: a sequence classifier whose single logit l(a, b) is the log-odds that
    candidate a beats candidate b for the prompt, reading `template` filled with {prompt}, {a}, {b}
    (a conversation prompt fills {prompt} as `role: content` lines; with a chat template the filled
    text is one user turn, ready for the assistant's reply).

    compare: forward = σ(l(first, second)), backward = 1 - σ(l(second, first)). For K candidates every
    ordered pair (i, j), i != j, is read: K(K-1) forwards. Against position bias, p(i > j) = (σ(l(i, j))
    + 1 - σ(l(j, i))) / 2, and candidate i scores the mean over j of p(i > j), in [0, 1] (a lone
    candidate scores 0.5). PairRM's own ranking averages the logit differences l(i, j) - l(j, i)
    instead: the same idea, unbounded. PairRM itself does not load here: its DebertaV2PairRM head lives
    in the llm-blender package (0.0.2), which fails to import with transformers 5 (it imports the
    removed `transformers.utils.hub.TRANSFORMERS_CACHE`)."""

    kind = "pairwise"

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 1024,
                 template: str = "{prompt}\n<A>{a}\n<B>{b}", dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = "none", trust_remote_code: bool = False, task=None) -> None:
        super().__init__(name_or_path, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                         chat_template=chat_template, trust_remote_code=trust_remote_code)
        self._set_template(template)

    def _compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> Verdicts:
        self._load()
        texts = ([self._render(p, a, b) for p, a, b in zip(prompts, first, second)]
                 + [self._render(p, b, a) for p, a, b in zip(prompts, first, second)])
        logits = torch.tensor(self._score_texts(texts, templated=self._uses_template), dtype=torch.float64)
        wins = torch.sigmoid(logits)  # σ(l(a, b)): a, shown first, beats b
        return Verdicts(forward=wins[: len(prompts)].tolist(), backward=(1 - wins[len(prompts):]).tolist())


ENGINE_ROWS = 4096  # judge.backend=vllm: questions per engine call


def _checkpoint_dir(name_or_path: str, key: str) -> Path:
    """The local directory of a checkpoint: the path itself, or a hub id's snapshot (downloaded if need be)."""
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - hub errors are many: one line naming the key
        raise InputError(f"{key}: not a local directory and not on the hub ({_reason(err)})") from None


LLM_TEMPLATE = ("Which response answers the prompt better?\n\n[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n"
                "[Response B]\n{b}\n\nAnswer with one letter, A or B.")


class LLMJudge(_ReadsPairs, _ModelJudge):
    """A local instruct causal LM asked `template` (with {prompt}, {a}, {b}); the verdict is read from its
    next-token logits at the end of the rendered text: p = softmax over the two `choices` tokens' logits
    only, renormalised, so nothing is parsed from generated text and the verdict is soft.

    The text: with a chat template (the tokenizer's for auto, or judge.chat_template) the filled template
    as one user turn plus the generation prompt; with none, the filled text as is; then `answer_prefix`.
    Each choice must be one token right there (checked at load). compare: forward = P(choices[0]) with
    (first, second) as (a, b); backward = P(choices[1]) with (second, first) as (a, b). score ranks K
    candidates from every ordered pair, as judge=pairwise does. Right-padded batches read each row's last
    real position: the verdicts do not depend on batch_size."""

    kind = "llm"
    auto_class = AutoModelForCausalLM
    _own_code_key = "AutoModelForCausalLM"

    def __init__(self, name_or_path: str, template: str = LLM_TEMPLATE, choices: Sequence[str] = ("A", "B"),
                 chat_template: str | None = "auto", answer_prefix: str = "", batch_size: int = 8,
                 max_length: int = 2048, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, backend: str = "hf", engine: dict | None = None,
                 task=None) -> None:
        super().__init__(name_or_path, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                         chat_template=chat_template, trust_remote_code=trust_remote_code)
        if backend not in ("hf", "vllm"):
            raise InputError(f"judge.backend={backend!r}: choose hf (the model in this process) or vllm (a vLLM "
                             "engine in a child process)")
        engine = dict(engine or {})
        if backend == "vllm":
            refused = [(self.judges_with_the_policy, "judge.name_or_path=policy: the policy judges in memory, as "
                        "it is at that moment"),
                       (trust_remote_code, "judge.trust_remote_code=true: the engine loads vLLM's own model classes"),
                       (device != "auto", f"judge.device={device!r}: the engine takes its process's device"),
                       ("dtype" in engine, "judge.engine.dtype: set judge.dtype (it is part of the cache key)"),
                       (engine.get("engines", "per_process") != "per_process",
                        f"judge.engine.engines={engine.get('engines')!r}: each process judges its own shards, at its "
                        "own pace, with an engine of its own (per_process)")]
            why = next((reason for bad, reason in refused if bad), None)
            if why:
                raise InputError(f"judge.backend=vllm with {why}; use judge.backend=hf, or leave the key out")
        elif engine:
            raise InputError("judge.engine is for judge.backend=vllm: remove it, or set judge.backend=vllm")
        self.backend, self.engine = backend, engine
        self._engine = self._directory = None  # backend=vllm: the VLLMGenerator holding the judge, its checkpoint
        self._set_template(template)
        choices = list(choices) if not isinstance(choices, str) else [choices]
        if len(choices) != 2 or not all(isinstance(c, str) and c for c in choices) or len(set(choices)) < 2:
            raise InputError(f"judge.choices={choices!r}: give two different non-empty answers, the first "
                             "for response A and the second for response B (e.g. [A, B])")
        self.choices = [str(c) for c in choices]
        self.answer_prefix = str(answer_prefix or "")
        self._choice_ids: list[int] | None = None  # settled at load, where the tokenizer is
        self._keeps_logits = False  # whether the model's forward takes logits_to_keep

    def _settings(self) -> dict:
        return {**super()._settings(), "choices": self.choices, "answer_prefix": self.answer_prefix,
                **({"backend": "vllm"} if self.backend == "vllm" else {})}

    # -- the policy judging its own candidates (judge.name_or_path=policy) ----------------------

    @property
    def judges_with_the_policy(self) -> bool:
        """Self-rewarding: judge.name_or_path=policy, the policy being trained is the judge."""
        return self.name_or_path == "policy"

    def use_policy(self, model, tokenizer, *, will_shard: bool = False) -> None:
        """For judge.name_or_path=policy: judge with `model` (the policy, in memory, as it is now). Called
        again whenever its weights changed (each online round), so that the fingerprint, and with it the
        judgment cache's key, follows the weights. `will_shard`: the run shards it later (ZeRO-3 partitions
        the policy when training starts, and the evaluation after it would judge with a collective forward)."""
        if (will_shard or distributed.is_sharded(model)) and distributed.world_size() > 1:
            raise InputError("judge.name_or_path=policy with a sharded policy (FSDP2 / ZeRO-3) is not supported: "
                             "its forward is a collective; judge with a copy (judge.name_or_path=<its directory>)")
        self._policy = (model, tokenizer)
        self.device = next(model.parameters()).device
        self._model = self._tokenizer = self._weights = None  # _load takes the policy as it is now

    def _load(self) -> None:
        if self.backend == "vllm":
            return self._load_engine()
        if not self.judges_with_the_policy:
            return super()._load()
        if self._model is not None:
            return
        if getattr(self, "_policy", None) is None:
            raise InputError("judge.name_or_path=policy: the policy judges its own candidates only inside "
                             "prefrun train (pools and online rounds); elsewhere give the model's directory")
        model, tokenizer = self._policy
        if self._own_template is not None:
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = self._own_template
        self._model, self._tokenizer = model, tokenizer
        self._loaded()

    def _load_engine(self) -> None:
        """backend=vllm: the tokenizer here, the weights in a persistent vLLM engine (a child process, started
        from the checkpoint's files, which the fingerprint hashes)."""
        if self._engine is not None:
            return
        from prefrun.generate import VLLMGenerator

        key = f"judge.name_or_path={self.name_or_path!r}"
        _, tokenizer = self._config_and_tokenizer(key)
        directory = _checkpoint_dir(self.name_or_path, key)
        weights = files_fingerprint(directory, key)
        self._tokenizer = tokenizer
        self._loaded()
        try:
            engine = VLLMGenerator(**{"dtype": self.dtype, **self.engine, "logprobs_mode": "processed_logprobs"})
        except TypeError as err:
            raise InputError(f"judge.engine: {_reason(err)}; its keys are generator=vllm's (conf/generator/vllm.yaml)"
                             ) from None
        engine.start(tokenizer=tokenizer, model_path=str(directory))
        self._engine, self._directory, self._weights = engine, directory, weights
        log.info("%s: loaded in a vLLM engine (worker pid %s)", self.name, engine.worker_pid)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = self._tokenizer = self._weights = None
            return
        if self.judges_with_the_policy:  # the policy is not ours to free
            self._model = self._tokenizer = self._weights = None
            return
        super().close()

    def _check_config(self, config, key: str) -> bool:
        auto_map = getattr(config, "auto_map", None) or {}
        own_code = self.trust_remote_code and self._own_code_key in auto_map
        architectures = list(getattr(config, "architectures", None) or [])
        causal = (any(_is_causal_lm(a) for a in architectures) if architectures
                  else type(config) in AutoModelForCausalLM._model_mapping)
        if not own_code and not causal:
            hint = (" It ships its own model code: set judge.trust_remote_code=true if you trust it."
                    if self._own_code_key in auto_map else "")
            if any(a.endswith("ForSequenceClassification") for a in architectures):
                hint += " For a reward model use judge=reward_model, for a pairwise ranker judge=pairwise."
            raise InputError(f"{key} is a {', '.join(architectures) or config.model_type} checkpoint, not a "
                             "causal language model: judge=llm reads the next-token logits of an instruct "
                             f"model (AutoModelForCausalLM).{hint}")
        return own_code

    def _loaded(self) -> None:
        """Each choice's token, read where the answer is: after the rendered text (a placeholder prompt
        and responses: only the end of the text, the same for every prompt, decides how it tokenises)."""
        context = self._render("x", "y", "z") + self.answer_prefix
        ids = self._encode([context, *(context + c for c in self.choices)], templated=self._uses_template, shorten=False)
        context_ids, choice_ids = ids[0], []
        for choice, full in zip(self.choices, ids[1:]):
            if len(full) != len(context_ids) + 1 or full[: len(context_ids)] != context_ids:
                pieces = self._tokenizer.convert_ids_to_tokens(full[len(_common_prefix(context_ids, full)):])
                raise InputError(f"judge.choices: {choice!r} is not one token after the judge's text (there "
                                 f"it reads as {pieces}); choose answers that are one token each there, e.g. "
                                 "[A, B], or move a shared start such as a space into judge.answer_prefix")
            choice_ids.append(full[-1])
        if choice_ids[0] == choice_ids[1]:
            raise InputError(f"judge.choices={self.choices!r} read as the same token: choose two different "
                             "answers")
        self._choice_ids = choice_ids
        tokenizer = self._tokenizer
        # The pad never reaches a real token's attention (right padding, masked): any id does.
        self._pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self._keeps_logits = self._model is not None and \
            "logits_to_keep" in inspect.signature(self._model.forward).parameters

    def _encode(self, texts: list[str], *, templated: bool, shorten: bool = True) -> list[list[int]]:
        """As the base, less an EOS that a tokenizer appends to plain text: the answer is read at the end."""
        encoded = super()._encode(texts, templated=templated, shorten=shorten)
        eos, eos_text = self._tokenizer.eos_token_id, self._tokenizer.eos_token
        if eos is None or templated:
            return encoded
        return [ids[:-1] if len(ids) > 1 and ids[-1] == eos and not text.endswith(eos_text or "\0") else ids
                for text, ids in zip(texts, encoded)]

    def _choice_probabilities(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), 2): P(choice A), P(choice B) renormalised over the two, at each text's end."""
        if not texts:
            return torch.zeros((0, 2), dtype=torch.float64)
        if self._engine is not None:
            return self._engine_choice_probabilities(texts)
        choice_ids = torch.tensor(self._choice_ids)

        def choice_probabilities(input_ids, attention_mask, lengths) -> torch.Tensor:
            last = (lengths - 1).to(self.device)
            rows = torch.arange(len(input_ids), device=self.device)
            if self._keeps_logits:
                # Logits only from the shortest row's end on (rows batch by length: a few positions), not a
                # vocabulary's worth for every position.
                first_kept = int(last.min())
                out = self._model(input_ids=input_ids, attention_mask=attention_mask,
                                  logits_to_keep=input_ids.shape[1] - first_kept)
                logits = out.logits[rows, last - first_kept]
            else:
                logits = self._model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, last]
            return torch.softmax(logits[:, choice_ids.to(self.device)].double(), dim=-1)

        encoded = self._encode([t + self.answer_prefix for t in texts], templated=self._uses_template)
        return torch.stack(self._forward_batches(encoded, choice_probabilities, pad_id=self._pad_id,
                                                 batch_size=self.batch_size))

    def _engine_choice_probabilities(self, texts: list[str]) -> torch.Tensor:
        """backend=vllm: the two choice tokens' next-token log-probs after each text, renormalised over the two
        by the engine (only they are allowed; read after the mask): the HF path's softmax over their logits."""
        encoded = self._encode([t + self.answer_prefix for t in texts], templated=self._uses_template)
        logprobs = []
        for start in range(0, len(encoded), ENGINE_ROWS):
            logprobs += self._engine.choice_logprobs(encoded[start : start + ENGINE_ROWS], self._choice_ids,
                                                     tokenizer=self._tokenizer, model_path=str(self._directory),
                                                     what=self.name)
        return torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=-1)  # sums to 1 exactly

    def _compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> Verdicts:
        self._load()
        texts = ([self._render(p, a, b) for p, a, b in zip(prompts, first, second)]
                 + [self._render(p, b, a) for p, a, b in zip(prompts, first, second)])
        if self._engine is not None:
            probabilities = self._choice_probabilities(texts)
        else:
            training = self._model.training  # the policy as judge may be in training mode (dropout)
            self._model.eval()
            try:
                probabilities = self._choice_probabilities(texts)
            finally:
                self._model.train(training)
        return Verdicts(forward=probabilities[: len(prompts), 0].tolist(),
                        backward=probabilities[len(prompts):, 1].tolist())


def _is_causal_lm(architecture: str) -> bool:
    return architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or architecture.endswith(
        ("ForCausalLM", "LMHeadModel"))


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _single_user_turn(prompt: Prompt) -> bool:
    return (not isinstance(prompt, str) and len(prompt) == 1 and prompt[0].get("role") == "user"
            and isinstance(prompt[0].get("content"), str))


def _template_setting(chat_template: str | None) -> str:
    """auto | none | a Jinja template or its file (null means none)."""
    if chat_template is None or str(chat_template).lower() in ("none", "null", ""):
        return "none"
    return str(chat_template)


def _read_template(template: str) -> str:
    if "{" in template:
        return template
    file = Path(template).expanduser()
    if not file.is_file():
        raise InputError(f"judge.chat_template={template!r}: no such file; give auto, none, a Jinja template or "
                         "its file")
    return file.read_text()


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
