"""Preference data -> tokenized examples -> padded batches, plus the cached reference log-probs.

An example is one prompt with its candidate completions; column 0 is the chosen one, the rest
are negatives (one for DPO pairs). Records come in TRL's preference formats and are tokenized
as TRL 1.16's `DPOTrainer` does (tests/test_data.py checks the ids against it):

- strings `{prompt, chosen, rejected}`: the EOS token's text is appended to each completion
  (unless already there); prompt and prompt+completion are tokenized as whole strings (special
  tokens such as BOS included) and the completion is what follows their common prefix;
- conversational: `prompt`, `chosen`, `rejected` are lists of `{role, content}` messages,
  rendered with the tokenizer's chat template (the prompt with `add_generation_prompt=True`,
  prompt+completion without); no EOS is appended, the template closes the turn; again the
  completion is what follows the common prefix;
- implicit prompt `{chosen, rejected}` (either kind): the prompt is their longest common start
  (TRL's `extract_prompt`: characters for strings, whole messages for conversations). A string
  `prompt` next to conversational chosen/rejected (UltraFeedback style) is treated the same way,
  as TRL's `maybe_extract_prompt` does.

Truncation (`max_length`, `max_prompt_length`): when prompt + longest completion exceeds
`max_length`, the prompt is first cut from the left down to `max_prompt_length` (keeping the
text nearest the completion), then completions are cut from the right to fit. Examples whose
prompt alone fills `max_length` are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import reprlib
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefrun.errors import InputError
from prefrun.pools import POOL_COLUMNS, read_pool

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected")
# Local data files by suffix -> the `datasets` builder that reads them.
DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Per-record arguments of the chat template that TRL honours too; kept when a data set has them.
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
TOKENIZE_VERSION = 2  # part of the tokenized-cache key: bump it when tokenisation changes
ROWS_PER_PROCESS = 500  # below this many rows per worker, `num_proc` workers cost more than they save


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # [chosen, negative, ...]: a pair, or a pool with its best first
    reference_logps: list[float] | None = None
    scores: list[float] | None = None  # the judge's scores of a pool's candidates (None for pairs)


@dataclass
class PreferenceData:
    """Base of every `data/` choice: subclasses say where records come from."""

    max_length: int = 512
    max_prompt_length: int | None = None
    # Records skipped per part ("train", "eval") and reason, for the run summary.
    skipped: dict = field(default_factory=dict, init=False, repr=False)

    def check(self) -> None:
        """Fail fast on what can be checked before any model is loaded (e.g. a missing file)."""

    def records(self, *, policy, tokenizer, task, cache_dir: Path) -> list[dict]:
        raise NotImplementedError

    def load(self, *, policy, tokenizer, task, cache_dir: Path, generator=None, judge=None,
             pools: bool = False) -> list[Example]:
        """The training examples, tokenized and truncated. `pools`: the sampler draws from pools (a source
        that builds its own data keeps whole pools; pairs read from files become pools of two). `generator`
        and `judge` serve sources that build their data from the policy."""
        records = self.records(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir)
        return self.finish((tokenize_record(r, tokenizer) for r in records), len(records), "data", "train")

    def load_eval(self, *, policy, tokenizer, task, cache_dir: Path) -> list[Example]:
        """Held-out examples for evaluation; none unless the data source defines them."""
        return []

    # Whether the data comes from the built-in task (then its held-out prompts are judged).
    uses_task = False

    def eval_prompts(self, n: int) -> list:
        """Up to `n` held-out prompts (strings or message lists) for judged evaluation; none by default."""
        return []

    def truncate(self, example: Example) -> Example | None:
        prompt = example.prompt_ids
        longest = max(map(len, example.completion_ids))
        if len(prompt) + longest > self.max_length and self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length :]
        room = self.max_length - len(prompt)
        if room < 1:
            return None
        return Example(prompt, [ids[:room] for ids in example.completion_ids], scores=example.scores)

    def finish(self, items: Iterable[Example | str], total: int, source: str, part: str) -> list[Example]:
        """Truncate the examples, count what is skipped and why (an item that is a string is the
        reason its record was skipped), log the counts, and refuse to go on with nothing."""
        examples, skipped = [], Counter()
        too_long = f"prompt alone fills data.max_length={self.max_length} (raise it or set data.max_prompt_length)"
        for item in items:
            if isinstance(item, Example):
                item = self.truncate(item) or too_long
            if isinstance(item, str):
                skipped[item] += 1
            else:
                examples.append(item)
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        self.skipped[part] = dict(skipped)
        if not examples:
            raise InputError(f"{source}: no usable {part} records ({total} read{': ' + reasons if reasons else ''}); "
                             "fix those records, or the data.* keys they point to")
        if skipped:
            log.warning("%s: skipped %d of %d %s records: %s", source, total - len(examples), total, part, reasons)
        return examples


@dataclass
class HFPreferenceData(PreferenceData):
    """Preference pairs from any data set `datasets` reads: a hub id, a local .jsonl / .json /
    .parquet / .csv / .arrow file, a directory of such files (splits from the file names, e.g.
    train.jsonl and test.jsonl), or a `save_to_disk` directory. See the module docstring for the
    record formats and conf/data/hf.yaml for the keys.

    Caching: the raw data goes through `datasets`' own cache (HF_DATASETS_CACHE). The tokenized
    records are an Arrow file written by `datasets.map` under `<cache_dir>/tokenized/`, keyed by
    the data's fingerprint (its files and their modification times, the selected rows), the
    tokenizer (vocabulary, special tokens, chat template) and the column mapping: a second run
    reads it instead of tokenizing. `num_proc` > 1 tokenizes in that many processes when the data
    is large enough for it to pay off (ROWS_PER_PROCESS rows per process)."""

    path: str | None = None
    name: str | None = None
    split: str = "train"
    columns: dict = field(default_factory=lambda: {c: c for c in COLUMNS})  # + candidates, scores for pools
    max_samples: int | None = None
    eval_split: str | None = None
    eval_size: float = 0
    seed: int = 0
    num_proc: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.columns = {**{c: c for c in COLUMNS}, "candidates": None, "scores": None, **dict(self.columns or {})}
        # Pools ({prompt, candidates, scores}) when data.columns.candidates names a column, else pairs.
        self.pools = bool(self.columns["candidates"])
        self._splits: dict[str, Any] = {}  # split name -> raw Dataset with prefrun's column names
        self._files: list[Path] = []  # local data files read, to find the line at fault when decoding fails

    def check(self) -> None:
        """Read the data (not the model): a missing file, an unknown hub id or split, no records,
        missing columns or inconsistent settings end the run here, before a model loads."""
        self._check_settings()
        self._raw(self.split, "split")
        if self.eval_split:
            self._raw(self.eval_split, "eval_split")

    def load(self, *, policy=None, tokenizer, task=None, cache_dir: Path, generator=None, judge=None,
             pools: bool = False) -> list[Example]:
        """The training examples: the train split less any held-out share, at most `max_samples`."""
        dataset, rows, split = self._part("train")
        return self._examples(dataset, rows, split, "train", tokenizer, Path(cache_dir).expanduser())

    def eval_prompts(self, n: int) -> list:
        """The prompts of the first `n` usable held-out records (data.eval_split or data.eval_size)."""
        dataset, rows, split = self._part("eval")
        if dataset is None:
            return []
        where = _Where(self.path, split)
        prompts = []
        for row in rows if rows is not None else range(len(dataset)):
            record = dataset[row]
            item = (read_pool(record, self.columns, lambda r=row: where(r)) if self.pools
                    else _pair(record, lambda r=row: where(r), self.columns))
            if not isinstance(item, str):
                prompts.append(item[0])
            if len(prompts) == n:
                break
        return prompts

    def load_eval(self, *, policy=None, tokenizer, task=None, cache_dir: Path) -> list[Example]:
        """The held-out examples: all of `eval_split`, or the `eval_size` share carved from the
        train split; an empty list when neither is set."""
        dataset, rows, split = self._part("eval")
        if dataset is None:
            return []
        return self._examples(dataset, rows, split, "eval", tokenizer, Path(cache_dir).expanduser())

    # -- reading ---------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        if not self.path:
            raise InputError("data.path is not set: give a hub id, a .jsonl/.json/.parquet/.csv file, a directory of "
                             "them or a save_to_disk directory (data.path=...)")
        unknown = set(self.columns) - {*COLUMNS, *POOL_COLUMNS}
        if unknown:
            raise InputError(f"data.columns.{sorted(unknown)[0]}: unknown key; data.columns maps prompt, chosen and "
                             "rejected (pairs) or prompt, candidates and scores (pools) to your column names")
        if self.pools:
            for key in POOL_COLUMNS:
                if not self.columns[key]:
                    raise InputError(f"data.columns.{key} is empty: pools need a prompt, candidates and scores column "
                                     "(a field path such as completions.response reads into a list of objects)")
            self._check_common()
            return
        for key in ("chosen", "rejected"):
            if not self.columns[key]:
                raise InputError(f"data.columns.{key} is empty: name the column that holds the {key} completions")
        named = [self.columns[k] for k in COLUMNS if self.columns[k]]
        if len(set(named)) < len(named):
            raise InputError(f"data.columns={self.columns}: two keys name the same column")
        self._check_common()

    def _check_common(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise InputError(f"data.max_samples={self.max_samples}: give a positive count, or null for all records")
        if self.eval_size < 0 or (self.eval_size >= 1 and self.eval_size != int(self.eval_size)):
            raise InputError(f"data.eval_size={self.eval_size}: give a fraction below 1, a whole count of records, "
                             "or 0 for no held-out split")
        if self.eval_size and self.eval_split:
            raise InputError(f"data.eval_split={self.eval_split!r} and data.eval_size={self.eval_size} are both set: "
                             "evaluate on a split of the data set or on a share of the train split, not both")
        if self.eval_split and self.eval_split == self.split:
            raise InputError(f"data.eval_split={self.eval_split!r} is also data.split: the held-out records would be "
                             "trained on; choose another split or use data.eval_size")
        if self.num_proc is not None and self.num_proc < 1:
            raise InputError(f"data.num_proc={self.num_proc}: give a positive number of processes, or null")

    def _raw(self, split: str, key: str):
        """One split with prefrun's column names (prompt, chosen, rejected), read once."""
        if split not in self._splits:
            dataset = self._read(split, key)
            self._splits[split] = self._select_columns(dataset, split)
        return self._splits[split]

    def _read(self, split: str, key: str):
        from datasets import DatasetDict, load_dataset, load_from_disk

        path = Path(self.path).expanduser()
        here = f"data.path={self.path!r}"
        if path.is_file():
            builder = DATA_FILES.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"{here}: unknown file type {path.suffix!r}; give a .jsonl, .json, .parquet, .csv or "
                                 ".arrow file, a directory of them, a save_to_disk directory or a hub id")
            if self.name:
                raise InputError(f"data.name={self.name!r} names a hub configuration, but {here} is a file: "
                                 "leave data.name null")
            if _is_blank(path):
                raise InputError(f"{here}: the file is empty (0 records)")
            self._files = [path]
            return self._call(lambda: load_dataset(builder, data_files=str(path), split=split), split, key)
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                try:
                    loaded = load_from_disk(str(path))
                except Exception as err:  # noqa: BLE001 - any failure is one line for the user
                    raise InputError(f"{here}: not a readable save_to_disk directory ({_reason(err)})") from None
                if not isinstance(loaded, DatasetDict):
                    if key == "eval_split":
                        raise InputError(f"data.eval_split={split!r}: {here} is one data set without splits; hold "
                                         "out part of it with data.eval_size instead")
                    return loaded  # a Dataset saved alone is the train split, whatever data.split says
                if split not in loaded:
                    raise InputError(f"data.{key}={split!r}: {here} has no such split (its splits: {list(loaded)})")
                return loaded[split]
            self._files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_FILES)
            return self._call(lambda: load_dataset(str(path), self.name, split=split), split, key)
        if _looks_local(self.path):
            raise InputError(f"{here}: no such file or directory; give a .jsonl/.json/.parquet/.csv file, a directory "
                             "of them, a save_to_disk directory or a hub id")
        return self._call(lambda: load_dataset(self.path, self.name, split=split), split, key, hub=True)

    def _call(self, read: Callable, split: str, key: str, hub: bool = False):
        """Run a `datasets` reader and turn its failure into one line naming the file (and, for
        text files, the line at fault) or the hub id."""
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - anything `datasets` raises becomes one line
            if isinstance(err, ValueError) and str(err).startswith("Unknown split"):
                splits = str(err).partition("Should be one of ")[2].rstrip(".") or "?"
                hint = "; hold out part of the train split with data.eval_size instead" if key == "eval_split" else ""
                raise InputError(f"data.{key}={split!r}: data.path={self.path!r} has no such split "
                                 f"(its splits: {splits}){hint}") from None
            if "corresponds to no data" in str(err):  # `datasets` on a split of 0 rows
                raise InputError(f"data.path={self.path!r}: split {split!r} has no records") from None
            self._diagnose()
            if hub:
                raise InputError(
                    f"data.path={self.path!r}: not a local file or directory, and no data set by that id could be "
                    f"loaded from the Hugging Face hub or its cache ({_reason(err)}); check data.path (and data.name) "
                    "or the network") from None
            raise InputError(f"data.path={self.path!r}: `datasets` could not read it ({_reason(err)})") from None

    def _diagnose(self) -> None:
        """Raise one line naming the file and line at fault, if a local text data file has one."""
        for file in self._files:
            _diagnose_text_file(file, self.columns)

    def _select_columns(self, dataset, split: str):
        present = list(dataset.column_names)
        if self.pools:  # fields are read by path in read_pool: keep the root columns as they are
            roots = list(dict.fromkeys(self.columns[k].split(".")[0] for k in POOL_COLUMNS))
            for key in POOL_COLUMNS:
                root = self.columns[key].split(".")[0]
                if root not in present:
                    raise InputError(f"data.path={self.path!r} (split {split!r}): no {key} column {root!r} (its "
                                     f"columns: {present}); name yours with data.columns.{key}=<column or field path>")
            if len(dataset) == 0:
                raise InputError(f"data.path={self.path!r}: split {split!r} has no records")
            return dataset.select_columns(roots + [c for c in TEMPLATE_COLUMNS if c in present and c not in roots])
        prompt = self.columns["prompt"]
        implicit = not prompt or (prompt == "prompt" and prompt not in present)
        mapping = {key: self.columns[key] for key in COLUMNS if not (key == "prompt" and implicit)}
        for key, column in mapping.items():
            if column not in present:
                raise InputError(f"data.path={self.path!r} (split {split!r}): no {key} column {column!r} (its "
                                 f"columns: {present}); name yours with data.columns.{key}=<column>")
        if len(dataset) == 0:
            raise InputError(f"data.path={self.path!r}: split {split!r} has no records")
        if implicit:
            log.info("data: no prompt column in %s: the prompt is what chosen and rejected share at the start "
                     "(TRL's implicit prompt)", self.path)
        extra = [c for c in TEMPLATE_COLUMNS if c in present and c not in mapping.values()]
        dataset = dataset.select_columns([*mapping.values(), *extra])
        renames = {column: key for key, column in mapping.items() if column != key}
        return dataset.rename_columns(renames) if renames else dataset

    def _part(self, part: str) -> tuple[Any, list[int] | None, str]:
        """(raw dataset, rows to use or None for all, split name) of the train or eval part.

        The held-out share is drawn with `seed` from the whole train split before `max_samples`
        applies, so that it does not change with `max_samples`."""
        self._check_settings()
        if part == "eval" and self.eval_split:
            return self._raw(self.eval_split, "eval_split"), None, self.eval_split
        train = self._raw(self.split, "split")
        n = len(train)
        rows, held = list(range(n)), []
        if self.eval_size:
            k = math.ceil(self.eval_size * n) if self.eval_size < 1 else int(self.eval_size)
            if k >= n:
                raise InputError(f"data.eval_size={self.eval_size} holds out {k} of the {n} records of split "
                                 f"{self.split!r}, leaving none to train on: lower it")
            order = list(range(n))
            random.Random(self.seed).shuffle(order)
            held = sorted(order[:k])
            chosen_out = set(held)
            rows = [i for i in rows if i not in chosen_out]
        if part == "eval":
            return (train, held, self.split) if held else (None, None, self.split)
        if self.max_samples:
            rows = rows[: self.max_samples]
        return train, (None if len(rows) == n else rows), self.split

    # -- tokenizing ------------------------------------------------------------------------------

    def _examples(self, dataset, rows: list[int] | None, split: str, part: str, tokenizer,
                  cache_dir: Path) -> list[Example]:
        self._use_chat_template(tokenizer)
        if rows is not None:
            dataset = dataset.select(rows)
        try:
            return self._tokenize(dataset, rows, split, part, tokenizer, cache_dir)
        except UnicodeDecodeError as err:  # the json reader may pass bad bytes on to the first read of a value
            self._diagnose()
            raise InputError(f"data.path={self.path!r}: not valid UTF-8 ({_reason(err)}); re-save it as UTF-8") from None

    def _tokenize(self, dataset, rows: list[int] | None, split: str, part: str, tokenizer,
                  cache_dir: Path) -> list[Example]:
        from datasets import Features, Sequence, Value

        first = dataset[0]
        conversational = (isinstance(first.get(self.columns["prompt"]), list) if self.pools
                          else any(isinstance(first.get(key), list) for key in COLUMNS))
        if conversational and not tokenizer.chat_template:
            raise InputError(_no_template(self.path))
        if tokenizer.eos_token is None:
            raise InputError("the tokenizer has no eos token; completions need one (set it in the tokenizer config)")
        key = _hash(TOKENIZE_VERSION, dataset._fingerprint, _tokenizer_key(tokenizer), self.columns)
        cache = cache_dir / "tokenized" / f"{key}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
        cached = any(cache.parent.glob(f"{key}*.arrow"))
        num_proc = self.num_proc if self.num_proc and len(dataset) >= ROWS_PER_PROCESS * self.num_proc > 1 else None
        local = Path(self.path).expanduser()
        where = _Where(self.path, split, str(local) if local.suffix == ".jsonl" and split == "train" else None)
        ids = Sequence(Value("int32"))
        start = time.perf_counter()
        tokenized = dataset.map(
            _tokenize_row, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
            fn_kwargs={"tokenizer": tokenizer, "where": where, "rows": rows, "columns": self.columns,
                       "pools": self.pools},
            features=Features({"prompt_ids": ids, "completion_ids": Sequence(ids), "scores": Sequence(Value("float64")),
                               "skip": Value("string"), "prompt_cut": Value("bool")}),
            cache_file_name=str(cache), new_fingerprint=key, desc=f"Tokenizing {part} records")
        log.info("data: %d %s records of %s (split %r) tokenized%s", len(dataset), part, self.path, split,
                 " (cached)" if cached else f" in {time.perf_counter() - start:.1f} s, cached in {cache.parent}")
        table = tokenized.to_dict()
        cut = sum(table["prompt_cut"])
        if cut:
            log.warning("data: in %d of %d %s records the tokenized prompt is not a prefix of prompt + completion (a "
                        "chat template that renders the prompt alone differently, or tokens merging across the "
                        "boundary); as in TRL the completion starts where they part", cut, len(dataset), part)
        items = (reason or Example(prompt, completions, scores=scores if self.pools else None)
                 for prompt, completions, scores, reason
                 in zip(table["prompt_ids"], table["completion_ids"], table["scores"], table["skip"]))
        return self.finish(items, len(dataset), f"data.path={self.path!r}", part)

    def _use_chat_template(self, tokenizer) -> None:
        """`data.chat_template` (a Jinja string or a file) replaces the tokenizer's; it is saved with
        the checkpoint so that inference renders prompts the same way."""
        if not self.chat_template:
            return
        template = self.chat_template
        if "{" not in template:
            file = Path(template).expanduser()
            if not file.is_file():
                raise InputError(f"data.chat_template={template!r}: no such file; give a Jinja template or its file")
            template = file.read_text()
        if tokenizer.chat_template != template:
            log.info("data: using data.chat_template for the tokenizer")
            tokenizer.chat_template = template


@dataclass
class HFPrompts(HFPreferenceData):
    """Prompts for `prefrun generate`: the `column` (a column name, or a field path such as
    `conversation.content`) of any data set data=hf reads. Records whose prompt is null or empty are skipped
    and counted; a prompt that is neither a string nor a list of {role, content} messages stops with one line."""

    column: str = "prompt"

    def _check_settings(self) -> None:
        if not self.path:
            raise InputError("prompts.path is not set: give a hub id, a data file, a directory of them or a "
                             "save_to_disk directory, or null for the built-in task's prompts")
        if not self.column:
            raise InputError("prompts.column is empty: name the column (or field path) that holds the prompts")
        self._check_common()

    def _select_columns(self, dataset, split: str):
        root = self.column.split(".")[0]
        if root not in dataset.column_names:
            raise InputError(f"prompts.path={self.path!r} (split {split!r}): no prompt column {root!r} (its columns: "
                             f"{list(dataset.column_names)}); name yours with prompts.column=<column>")
        if len(dataset) == 0:
            raise InputError(f"prompts.path={self.path!r}: split {split!r} has no records")
        return dataset.select_columns([root])

    def prompts(self) -> list:
        from prefrun.pools import field

        dataset = self._raw(self.split, "split")
        where, prompts, skipped = _Where(self.path, self.split), [], Counter()
        for row in range(min(len(dataset), self.max_samples or len(dataset))):
            prompt = field(dataset[row], self.column)
            if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or prompt == []:
                skipped["empty prompt"] += 1
                continue
            if not isinstance(prompt, str):
                _kind(prompt, "prompt", lambda r=row: where(r), {"prompt": self.column})
            prompts.append(prompt)
        if skipped:
            log.warning("prompts.path=%r: skipped %d records (%s)", self.path, sum(skipped.values()), dict(skipped))
        if not prompts:
            raise InputError(f"prompts.path={self.path!r}: no usable prompts in column {self.column!r}")
        return prompts


@dataclass
class GeneratedPreferences(PreferenceData):
    """Preferences sampled from the starting policy: `generator.num_candidates` completions for each prompt
    (the task's train prompts, or `prompts`, a data set's prompt column), scored by the configured judge.
    With a pool sampler (MC-PO) every prompt keeps its whole pool; otherwise best vs worst becomes a pair.
    Prompts whose candidates all tie are skipped. Cached per (policy weights, prompts, generator, judge), in
    the pool format of `prefrun generate`, in shards (a killed run continues where it stopped). Held-out
    prompts for the judged evaluation: the task's, or `eval_split` of the prompts' data set."""

    num_prompts: int = 2048
    prompts: Any = None  # an HFPrompts (conf/generate.yaml's `prompts` keys), or None: the task's prompts
    eval_split: str | None = None

    @property
    def uses_task(self) -> bool:
        return self.prompts is None

    def eval_prompts(self, n: int) -> list:
        if self.prompts is None or not self.eval_split:
            return []
        return dataclasses.replace(self.prompts, split=self.eval_split, max_samples=n).prompts()

    def load(self, *, policy, tokenizer, task, cache_dir: Path, generator=None, judge=None,
             pools: bool = False) -> list[Example]:
        from prefrun.generate import as_chat
        from prefrun.model import fingerprint
        from prefrun.pools import make_pools

        if self.prompts is None and task is None:
            raise InputError("data=task_pairs samples preferences for a built-in task, but the task is removed (~task): "
                             "keep task=sort, set data.prompts.path=<prompts> or choose data=hf data.path=<your data>")
        prompts = task.prompts("train", self.num_prompts) if self.prompts is None else self.prompts.prompts()
        prompts = as_chat(prompts, tokenizer, generator.chat_template)
        key = _hash(fingerprint(policy), prompts, repr(generator), repr(judge))
        out_dir = Path(cache_dir).expanduser() / "pools" / key
        done = out_dir / "pools.jsonl"
        if done.exists():
            log.info("data: %s (cached pools)", done)
            records = [json.loads(line) for line in done.read_text().splitlines()]
        else:
            records = make_pools(prompts, generator=generator, judge=judge, model=policy, tokenizer=tokenizer,
                                 out_dir=out_dir / "shards")
            _atomic_write(done, "".join(json.dumps(r) + "\n" for r in records).encode())
        items = []
        for i, record in enumerate(records):
            pool = read_pool(record, {c: c for c in POOL_COLUMNS}, lambda i=i: f"{done} (record {i})",
                             allow_empty=True)
            if isinstance(pool, str):
                items.append(pool)
                continue
            prompt, candidates, scores = pool
            if not pools:  # best vs worst (the first of equal worst)
                worst = 1 + scores[1:].index(min(scores[1:]))
                candidates, scores = [candidates[0], candidates[worst]], None
            prompt_ids, completion_ids, _ = token_ids(tokenizer, prompt, candidates)
            items.append(Example(prompt_ids, completion_ids, scores=scores))
        examples = self.finish(items, len(records), "data (generated pools)", "train")
        log.info("data: %d %s from %d prompts x %d candidates", len(examples), "pools" if pools else "pairs",
                 len(records), len(records[0]["candidates"]) if records else 0)
        return examples


# -- records -> token ids ----------------------------------------------------------------------


def tokenize_record(record: dict, tokenizer) -> Example:
    """One well-formed record -> token ids, as TRL's DPOTrainer computes them. The prompt and the
    completions (`chosen`, then `rejected` or a list of `negatives`) are all strings or all lists
    of messages."""
    completions = [record["chosen"], *([record["rejected"]] if "rejected" in record else record["negatives"])]
    prompt_ids, completion_ids, _ = token_ids(tokenizer, record["prompt"], completions, tools=record.get("tools"),
                                              template_kwargs=record.get("chat_template_kwargs"))
    return Example(prompt_ids, completion_ids)


def token_ids(tokenizer, prompt: str | list[dict], completions: list, *, tools=None,
              template_kwargs: dict | None = None) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, completion ids, whether the prompt's tail was left out): prompt and
    prompt+completion are tokenized whole, the completion is what follows their common prefix."""
    if isinstance(prompt, list):  # conversational: the chat template closes the turn, no EOS appended
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(template_kwargs or {})}
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        full_ids = [_chat_ids(tokenizer, prompt + completion, **kwargs) for completion in completions]
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(prompt).input_ids
        full_ids = [tokenizer(prompt + c + ("" if c.endswith(eos) else eos)).input_ids for c in completions]
    shared = min(_common_prefix(prompt_ids, ids) for ids in full_ids)
    return prompt_ids[:shared], [ids[shared:] for ids in full_ids], shared < len(prompt_ids)


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


@dataclass(frozen=True)
class _Where:
    """Names a record in messages: `file:line` for a local jsonl, else path, split and row."""

    path: str
    split: str
    jsonl: str | None = None

    def __call__(self, row: int) -> str:
        if self.jsonl:
            number = 0
            with open(self.jsonl, "rb") as lines:
                for line_number, line in enumerate(lines, 1):
                    number += bool(line.strip())  # the json reader skips blank lines
                    if number == row + 1:
                        return f"{self.jsonl}:{line_number}"
        return f"{self.path} (split {self.split!r}, row {row})"


def _tokenize_row(record: dict, index: int, *, tokenizer, where: _Where, rows: list[int] | None,
                  columns: dict, pools: bool = False) -> dict:
    """`datasets.map` function: one record -> its token ids (a pair, or a pool best first), or the reason
    to skip it."""
    row = rows[index] if rows is not None else index
    out = {"prompt_ids": [], "completion_ids": [], "scores": [], "skip": "", "prompt_cut": False}
    if pools:
        pool = read_pool(record, columns, lambda: where(row))
        if isinstance(pool, str):
            return {**out, "skip": pool}
        prompt, completions, scores = pool
    else:
        pair = _pair(record, lambda: where(row), columns)
        if isinstance(pair, str):
            return {**out, "skip": pair}
        prompt, chosen, rejected = pair
        completions, scores = [chosen, rejected], []
    if isinstance(prompt, list) and not tokenizer.chat_template:
        raise InputError(f"{where(row)}: " + _no_template(where.path))
    try:
        prompt_ids, completion_ids, cut = token_ids(tokenizer, prompt, completions, tools=record.get("tools"),
                                                    template_kwargs=record.get("chat_template_kwargs"))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - a template or tokenizer failure on one record: name it
        raise InputError(f"{where(row)}: the tokenizer failed on this record ({_reason(err)}); fix the record "
                         "or the chat template") from None
    return {**out, "prompt_ids": prompt_ids, "completion_ids": completion_ids, "scores": scores, "prompt_cut": cut}


def _pair(record: dict, where: Callable[[], str], columns: dict) -> tuple[Any, Any, Any] | str:
    """Check one record and return (prompt, chosen, rejected), the prompt extracted when it is
    implicit; or the reason to skip it. A wrong type raises one line naming record and column."""
    kinds = {}
    for key in COLUMNS:
        if key in record:
            if record[key] is None:
                return f"missing {key} (null)"
            kinds[key] = _kind(record[key], key, where, columns)
    chosen, rejected = record["chosen"], record["rejected"]
    if kinds["chosen"] != kinds["rejected"]:
        raise InputError(f"{where()}: chosen is {kinds['chosen']} but rejected is {kinds['rejected']}; give both as "
                         "strings or both as lists of messages")
    if "prompt" not in kinds or (kinds["prompt"] == "a string" and kinds["chosen"] == "a list of messages"):
        prompt, chosen, rejected = _shared_prompt(chosen, rejected)
    elif kinds["prompt"] != kinds["chosen"]:
        raise InputError(f"{where()}: prompt is {kinds['prompt']} but chosen and rejected are {kinds['chosen']}s; "
                         "give all three as strings or all as lists of messages")
    else:
        prompt = record["prompt"]
    if _is_empty(chosen) or _is_empty(rejected):
        return "empty completion"
    if chosen == rejected:
        return "chosen identical to rejected"
    return prompt, chosen, rejected


def _kind(value: Any, key: str, where: Callable[[], str], columns: dict) -> str:
    column = columns.get(key) or key
    name = f"{key!r}" if column == key else f"{key!r} (column {column!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for i, message in enumerate(value):
            if not isinstance(message.get("role"), str):
                raise InputError(f"{where()}: {name} message {i} has no 'role'; every message needs a 'role' (user, "
                                 "assistant, ...) and a 'content'")
            if message.get("content") is None and not message.get("tool_calls"):
                raise InputError(f"{where()}: {name} message {i} has no 'content'; every message needs a 'role' and "
                                 "a 'content'")
        return "a list of messages"
    raise InputError(f"{where()}: {name} is {type(value).__name__} {reprlib.repr(value)}; expected a string or a list "
                     "of {role, content} messages")


def _shared_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """TRL's `extract_prompt`: the prompt is the longest common start of chosen and rejected
    (characters or messages), a space before the split point going with the completions. Like
    TRL, when one is a prefix of the other the split falls one place before the shorter's end.
    Unlike TRL, a split at 0 stays at 0 (TRL would look at the string's last character)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_empty(completion: str | list[dict]) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    for message in completion:
        content = message.get("content")
        if message.get("tool_calls") or (content.strip() if isinstance(content, str) else content):
            return False
    return True


# -- diagnostics -------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (a suffix, `./`, `~`, deeper paths) is a path."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).suffix.lower() in DATA_FILES)


def _diagnose_text_file(path: Path, columns: dict) -> None:
    """Find why `datasets` could not read a text data file and raise one line naming its line:
    bytes that are not UTF-8, invalid JSON, a record that is not an object, a column of the wrong type."""
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); re-save the file as "
                         "UTF-8") from None
    if path.suffix.lower() == ".csv":
        return
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        numbered = [(f"{path} (record {i})", r) for i, r in enumerate(records)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); fix or delete "
                                 "the line (one JSON object per line)") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise InputError(f"{where}: {type(record).__name__} {reprlib.repr(record)} is not a JSON object; each "
                             "record is an object with prompt, chosen and rejected")
        for key in COLUMNS:
            value = record.get(columns.get(key) or key)
            if value is not None:
                _kind(value, key, lambda w=where: w, columns)


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _no_template(path: str) -> str:
    return (f"data.path={path!r} holds conversations (lists of {{role, content}} messages) but the tokenizer has no "
            "chat template: use a chat/instruct model, set data.chat_template=<Jinja template or file>, or give "
            "the records as strings")


def _reason(err: BaseException) -> str:
    """An exception in one line: its type and first line, and its cause's when it has one."""
    parts = []
    while err is not None and len(parts) < 2:
        text = str(err).strip().splitlines()
        parts.append(f"{type(err).__name__}: {text[0]}" if text else type(err).__name__)
        err = err.__cause__
    return "; ".join(parts)


def _tokenizer_key(tokenizer) -> str:
    """What the token ids depend on: vocabulary and pre/post-processing, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _hash(type(tokenizer).__name__, vocab, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """(prompt ids, completion ids) rows -> left-padded input_ids, attention_mask, completion_mask [R, width]:
    every completion ends at the right edge (what `sequence_logps` relies on)."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, k = len(prompt) + len(completion), len(completion)
        input_ids[i, width - n :] = torch.tensor(prompt + completion)
        attention_mask[i, width - n :] = 1
        completion_mask[i, width - k :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate(examples: list[Example], pad_id: int, columns: list[int] | list[list[int]] | None = None) -> dict[str, Tensor]:
    """The candidates `columns` of each example (one list for all, or one list per example; default: all of
    them) as a batch [B, C]. A candidate drawn twice for an example is padded once: `row_index` [B, C] maps
    each (example, column) to its row of `input_ids`, so that logps = row_logps[row_index]."""
    if columns is None:
        columns = list(range(len(examples[0].completion_ids)))
    per_example = columns if columns and isinstance(columns[0], list) else [columns] * len(examples)
    rows, row_index = [], []
    for example, cols in zip(examples, per_example):
        first_row: dict[int, int] = {}
        for c in cols:
            if c not in first_row:
                first_row[c] = len(rows)
                rows.append((example.prompt_ids, example.completion_ids[c]))
        row_index.append([first_row[c] for c in cols])
    batch = pad_rows(rows, pad_id)
    batch["row_index"] = torch.tensor(row_index)
    batch["completion_lengths"] = batch["completion_mask"].sum(1)[batch["row_index"]]
    if examples[0].reference_logps is not None:
        batch["reference_logps"] = torch.tensor([[ex.reference_logps[c] for c in cols]
                                                 for ex, cols in zip(examples, per_example)])
    return batch


@torch.no_grad()
def candidate_logps(model, examples: list[Example], pad_id: int, *, batch_size: int) -> tuple[Tensor, Tensor]:
    """log π(y|x) of every candidate of every example, by no-grad forwards of `batch_size` rows sorted by
    length (little padding). Returns (logps, lengths), both [N, K_max]: pools of fewer candidates are padded
    with logp 0 and length 0."""
    from prefrun.logprobs import sequence_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.completion_ids))]
    rows.sort(key=lambda r: len(examples[r[0]].prompt_ids) + len(examples[r[0]].completion_ids[r[1]]))
    width = max(len(ex.completion_ids) for ex in examples)
    logps = torch.zeros(len(examples), width)
    lengths = torch.zeros(len(examples), width, dtype=torch.long)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = pad_rows([(examples[i].prompt_ids, examples[i].completion_ids[c]) for i, c in chunk], pad_id)
            values = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["completion_mask"].to(device)).float().cpu()
            index = torch.tensor(chunk)
            logps[index[:, 0], index[:, 1]] = values
            lengths[index[:, 0], index[:, 1]] = batch["completion_mask"].sum(1)
    finally:
        model.train(was_training)
    return logps, lengths


def attach_reference_logps(examples: list[Example], reference, tokenizer, *, cache_dir: Path,
                           batch_size: int, weights_key: str) -> str:
    """Fill `example.reference_logps` (every candidate), from the disk cache when this (weights, token ids)
    pair was seen. `batch_size` counts prompts; each carries its candidates."""
    key = _hash(weights_key, [(ex.prompt_ids, ex.completion_ids) for ex in examples])
    path = Path(cache_dir).expanduser() / "reference_logps" / f"{key}.pt"
    if path.exists():
        logps = torch.load(path)
        log.info("reference log-probs: cache hit %s -> 0 reference forwards", path)
    else:
        # Any id pads: padded positions are masked. A tokenizer without a pad token pads with eos.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows_per_forward = batch_size * max(1, round(statistics.fmean(len(ex.completion_ids) for ex in examples)))
        logps, _ = candidate_logps(reference, examples, pad_id, batch_size=rows_per_forward)
        buffer = io.BytesIO()
        torch.save(logps, buffer)
        _atomic_write(path, buffer.getvalue())
        log.info("reference log-probs: computed %d reference forwards (%d sequences), cached at %s",
                 -(-sum(len(ex.completion_ids) for ex in examples) // rows_per_forward),
                 sum(len(ex.completion_ids) for ex in examples), path)
    for example, row in zip(examples, logps.tolist()):
        example.reference_logps = row[: len(example.completion_ids)]
    return key


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
