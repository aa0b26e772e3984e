"""Judges: score each prompt's candidates, higher = better, behind one signature.

    judge.score(prompts, candidates) -> scores   # one list per prompt, one float per candidate

rule          the built-in task's graded judge, task.score(prompt, completion) in [0, 1]
reward_model  a sequence classifier with a single-score head (Skywork-, ArmoRM-style): one forward
              per prompt + candidate, its score as is (unbounded)
pairwise      a classifier whose single logit is the log-odds that candidate A beats candidate B;
              every ordered pair is compared and each candidate gets its mean win probability

Prompts are strings or lists of {role, content} messages; candidates are completion strings. Model
judges load at the first score() (composing a config loads nothing) and free their memory at close(),
before training starts. Whatever a judge returns passes check_scores: one finite number per candidate.
"""

from __future__ import annotations

import gc
import logging
import math
import numbers
import reprlib
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from prefrun import distributed
from prefrun.errors import InputError, PrefrunError
from prefrun.model import DTYPES

log = logging.getLogger(__name__)

Prompt = str | list[dict]


class JudgeError(PrefrunError):
    """A judge returned something that is not one finite score per candidate."""


class Judge:
    """The interface: `name` for messages, `score`, `close`. Subclasses implement `_score`; `score`
    checks what it returns."""

    name: str = "judge"

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per candidate of each prompt, higher = better."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(candidates)} candidate lists")
        prompts, candidates = list(prompts), [list(group) for group in candidates]
        return check_scores(self.name, prompts, candidates, self._score(prompts, candidates))

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the judge's model (a later score() loads it again); nothing to free for a rule."""

    def __repr__(self) -> str:
        """Stable across runs (it keys caches and the pool shards a resumed round reuses): the class and its plain
        settings, never an object's address."""
        plain = (str, int, float, bool, type(None), list, tuple, dict)
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items())
                             if not k.startswith("_") and isinstance(v, plain))
        return f"{type(self).__module__}.{type(self).__qualname__}({settings})"


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
    anything; scoring then stops with one line."""

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


class _ClassifierJudge(Judge):
    """What the model judges share: lazy loading with one-line errors, rendering, right-padded
    batches of one score per text, close()."""

    kind = ""  # the judge= choice, for messages

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

    def __repr__(self) -> str:
        """What the scores depend on (not batch_size or device), for cache keys."""
        settings = {"name_or_path": self.name_or_path, "max_length": self.max_length, "dtype": self.dtype,
                    "chat_template": self.chat_template, "template": getattr(self, "template", None)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items() if v is not None)})"

    # -- loading --------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        key, trust = f"judge.name_or_path={self.name_or_path!r}", self.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(self.name_or_path, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise InputError(f"{key}: cannot load a model config ({_reason(err)}). Give a local directory with "
                             "config.json or a hub id (judge.trust_remote_code=true for models with their own code)"
                             ) from None
        auto_map = getattr(config, "auto_map", None) or {}
        own_code = trust and "AutoModelForSequenceClassification" in auto_map  # ArmoRM-style custom heads
        architectures = list(getattr(config, "architectures", None) or [])
        if not own_code and not any(a.endswith("ForSequenceClassification") for a in architectures):
            hint = (" It ships its own model code: set judge.trust_remote_code=true if you trust it."
                    if "AutoModelForSequenceClassification" in auto_map else "")
            raise InputError(f"{key} is a {', '.join(architectures) or config.model_type} checkpoint, not a sequence "
                             "classifier: AutoModelForSequenceClassification would give it an untrained score head. "
                             f"Choose a {self.kind} model with a single-score head (num_labels=1).{hint}")
        if not own_code and config.num_labels != 1:
            raise InputError(f"{key} has num_labels={config.num_labels}: judge={self.kind} reads one score per text; "
                             "choose a model with a single-score head (num_labels=1)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=trust)
        except (OSError, ValueError, TypeError) as err:
            raise InputError(f"{key}: cannot load its tokenizer ({_reason(err)}); save the tokenizer next to the "
                             "model") from None
        if self._own_template is not None:
            tokenizer.chat_template = self._own_template
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, dtype="auto" if self.dtype == "auto" else DTYPES[self.dtype],
            trust_remote_code=trust, device_map=str(self.device), output_loading_info=True)
        missing = info.get("missing_keys") or []
        if missing and not own_code:
            raise InputError(f"{key}: the checkpoint lacks {reprlib.repr(sorted(missing))}, which would start at "
                             f"random; choose a trained {self.kind} model")
        model.eval()
        model.config.use_cache = False
        text_config = model.config.get_text_config()  # where the head looks for pad_token_id
        self._pad_id = text_config.pad_token_id
        if self._pad_id is None and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id,
                                                                   tokenizer.bos_token_id):
            self._pad_id = text_config.pad_token_id = tokenizer.pad_token_id  # a dedicated pad token: safe to batch
        if self._pad_id is None:
            # Llama-style heads read the last token that is not the pad token: without one, no padding.
            log.warning("%s: the model config has no pad_token_id: scoring one text at a time", self.name)
        self._model, self._tokenizer = model, tokenizer
        log.info("%s: loaded (%s, %.0fM parameters, %s)", self.name, model.dtype,
                 sum(p.numel() for p in model.parameters()) / 1e6, self.device)

    def close(self) -> None:
        if self._model is None:
            return
        self._model = self._tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- texts -> scores ------------------------------------------------------------------------

    @property
    def _uses_template(self) -> bool:
        return self.chat_template != "none" and bool(self._tokenizer.chat_template)

    def _chat(self, messages: list[dict], prompt: Prompt, **kwargs) -> str:
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as err:  # noqa: BLE001 - a template failure on one prompt: name it
            raise InputError(f"{self.name}: the chat template failed on prompt {reprlib.repr(prompt)} "
                             f"({_reason(err)}); fix the prompt or set judge.chat_template") from None

    @torch.inference_mode()
    def _score_texts(self, texts: list[str], *, templated: bool) -> list[float]:
        """One score per text. A rendered chat template carries its own special tokens (no second
        BOS); plain text gets the tokenizer's. A text over max_length tokens keeps its BOS and its
        last tokens (the start of the prompt is cut): the head reads the end."""
        if not texts:
            return []
        encoded = self._tokenizer(texts, add_special_tokens=not templated).input_ids
        bos, cut = self._tokenizer.bos_token_id, 0
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                keep = ids[:1] if bos is not None and ids[0] == bos else []
                encoded[i], cut = keep + ids[len(ids) - self.max_length + len(keep):], cut + 1
        if cut:
            log.warning("%s: %d of %d texts are longer than judge.max_length=%d tokens: their start is cut",
                        self.name, cut, len(texts), self.max_length)
        batch_size = self.batch_size if self._pad_id is not None else 1
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths batch together
        scores = [0.0] * len(encoded)
        with tqdm(total=len(encoded), desc=self.name, unit="text", leave=False,
                  disable=None if distributed.is_main() else True) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = len(encoded[rows[0]])
                # Right padding: real tokens keep positions 0..n-1 and never see a pad, whatever the batch.
                input_ids = torch.full((len(rows), width), self._pad_id or 0, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    attention_mask[r, : len(encoded[i])] = 1
                out = self._model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
                for i, value in zip(rows, self._head_scores(out, len(rows)).tolist()):
                    scores[i] = value
                bar.update(len(rows))
        return scores

    def _head_scores(self, out, rows: int) -> torch.Tensor:
        values = getattr(out, "score", None)  # ArmoRM-style outputs carry the preference score here
        values = (out.logits if values is None else values).float().reshape(rows, -1)
        if values.shape[1] != 1:
            raise InputError(f"judge.name_or_path={self.name_or_path!r} returns {values.shape[1]} scores per text: "
                             f"judge={self.kind} reads one; choose a model with a single-score head (num_labels=1)")
        return values[:, 0].cpu()


class RewardModelJudge(_ClassifierJudge):
    """A reward model: each prompt + candidate is scored in one forward, the head's value as is.

    With a chat template (the tokenizer's, or judge.chat_template), the text is the template's
    rendering of the prompt's messages (a string prompt becomes one user turn) followed by an
    assistant turn holding the candidate; without one, prompt + candidate as plain text."""

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


class PairwiseJudge(_ClassifierJudge):
    """A PairRM-style ranker: a sequence classifier whose single logit l(a, b) is the log-odds that
    candidate a beats candidate b for the prompt, reading `template` filled with {prompt}, {a}, {b}
    (a conversation prompt fills {prompt} as `role: content` lines; with a chat template the filled
    text is one user turn, ready for the assistant's reply).

    For K candidates every ordered pair (i, j), i != j, is compared: K(K-1) forwards. Against position
    bias, p(i > j) = (σ(l(i, j)) + 1 - σ(l(j, i))) / 2, and candidate i scores the mean over j of
    p(i > j), in [0, 1] (a lone candidate scores 0.5). PairRM's own ranking averages the logit
    differences l(i, j) - l(j, i) instead: the same idea, unbounded. PairRM itself does not load here:
    its DebertaV2PairRM head lives in the llm-blender package (0.0.2), which fails to import with
    transformers 5 (it imports the removed `transformers.utils.hub.TRANSFORMERS_CACHE`)."""

    kind = "pairwise"

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 1024,
                 template: str = "{prompt}\n<A>{a}\n<B>{b}", dtype: str = "auto", device: str = "auto",
                 chat_template: str | None = "none", trust_remote_code: bool = False, task=None) -> None:
        super().__init__(name_or_path, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                         chat_template=chat_template, trust_remote_code=trust_remote_code)
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"judge.template={template!r}: {_reason(err)}; use only the fields {{prompt}}, {{a}} "
                             "and {b}, and double any other brace") from None
        missing = [field for field in ("{prompt}", "{a}", "{b}") if field not in template]
        if missing:
            raise InputError(f"judge.template={template!r} lacks {', '.join(missing)}: the classifier must see the "
                             "prompt and both candidates")
        self.template = template

    def _score(self, prompts: list[Prompt], candidates: list[list[str]]) -> list[list[float]]:
        self._load()
        pairs = [(n, i, j) for n, group in enumerate(candidates) for i in range(len(group)) for j in range(len(group))
                 if i != j]
        texts = [self._render(prompts[n], candidates[n][i], candidates[n][j]) for n, i, j in pairs]
        logits = torch.tensor(self._score_texts(texts, templated=self._uses_template), dtype=torch.float64)
        wins = dict(zip(pairs, torch.sigmoid(logits).tolist()))  # σ(l(i, j)): i shown first beats j
        scores = []
        for n, group in enumerate(candidates):
            others = range(len(group))
            scores.append([sum((wins[n, i, j] + 1 - wins[n, j, i]) / 2 for j in others if j != i) / (len(group) - 1)
                           if len(group) > 1 else 0.5 for i in range(len(group))])
        return scores

    def _render(self, prompt: Prompt, a: str, b: str) -> str:
        text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        filled = self.template.format(prompt=text, a=a, b=b)
        if self._uses_template:
            return self._chat([{"role": "user", "content": filled}], prompt, add_generation_prompt=True)
        return filled


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
