"""The data sources (`data=` choices): `PreferenceData` (the base: truncation, skip-and-count),
`HFPreferenceData` (any data set or file `datasets` reads, pairs or pools, with a tokenized cache),
`HFPrompts` (prompts for `prefrun generate`) and `GeneratedPreferences` (pools sampled from the policy and
judged). The record formats and the truncation rule are described in `prefrun.data.formats`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefrun import distributed, storage
from prefrun.data.batches import Example
from prefrun.data.formats import (
    COLUMNS,
    DATA_FILES,
    _diagnose_text_file,
    _is_blank,
    _kind,
    _looks_local,
    _no_template,
    _pair,
    _reason,
    token_ids,
    tokenize_record,
)
from prefrun.data.reference import _hash
from prefrun.errors import InputError
from prefrun.pools import POOL_COLUMNS, read_pool

log = logging.getLogger(__name__)

# Per-record arguments of the chat template that TRL honours too; kept when a data set has them.
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
TOKENIZE_VERSION = 2  # part of the tokenized-cache key: bump it when tokenisation changes
ROWS_PER_PROCESS = 500  # below this many rows per worker, `num_proc` workers cost more than they save


@dataclass
class PreferenceData:
    """Base of every `data/` choice: subclasses say where records come from."""

    max_length: int = 512
    max_prompt_length: int | None = None
    # Records skipped per part ("train", "eval") and reason, for the run summary.
    skipped: dict = field(default_factory=dict, init=False, repr=False)
    # The policy's context (`fit_to`): no sequence is longer, whatever max_length says.
    context: int | None = field(default=None, init=False, repr=False)

    def fit_to(self, policy) -> None:
        """Cut sequences at the policy's context too (max_position_embeddings) when max_length is beyond it: past
        it, learned positions fail (an index error deep in torch) and rotary ones compute noise."""
        self.context = getattr(policy.config.get_text_config(), "max_position_embeddings", None)
        if self.context and self.context < self.max_length:
            log.warning("data.max_length=%d is beyond the model's context (%d tokens, max_position_embeddings): "
                        "sequences are cut at %d", self.max_length, self.context, self.context)

    @property
    def limit(self) -> int:
        """The most tokens a prompt and its completion hold in training."""
        return min(self.max_length, self.context) if self.context else self.max_length

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

    def load_eval(self, *, policy, tokenizer, task, cache_dir: Path, pools: bool = False) -> list[Example]:
        """Held-out examples for evaluation (whole pools or pairs, as `load`); none unless the data source
        defines them."""
        return []

    # Whether the data comes from the built-in task (then its held-out prompts are judged).
    uses_task = False

    def eval_prompts(self, n: int) -> list:
        """Up to `n` held-out prompts (strings or message lists) for judged evaluation; none by default."""
        return []

    def truncate(self, example: Example) -> Example | None:
        prompt = example.prompt_ids
        longest = max(map(len, example.completion_ids))
        if len(prompt) + longest > self.limit and self.max_prompt_length:
            prompt = prompt[-min(self.max_prompt_length, self.limit - 1) :]
        room = self.limit - len(prompt)
        if room < 1:
            return None
        return Example(prompt, [ids[:room] for ids in example.completion_ids], scores=example.scores)

    def finish(self, items: Iterable[Example | str], total: int, source: str, part: str,
               allow_none: bool = False) -> list[Example]:
        """Truncate the examples, count what is skipped and why (an item that is a string is the
        reason its record was skipped), log the counts, and refuse to go on with nothing (`allow_none`: an
        online round, whose caller says what happens then)."""
        examples, skipped = [], Counter()
        too_long = f"prompt alone fills data.max_length={self.max_length} (raise it or set data.max_prompt_length)" \
            if self.limit == self.max_length else \
            f"prompt alone fills the model's context of {self.limit} tokens (set data.max_prompt_length to cut it)"
        for item in items:
            if isinstance(item, Example):
                item = self.truncate(item) or too_long
            if isinstance(item, str):
                skipped[item] += 1
            else:
                examples.append(item)
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        self.skipped[part] = dict(skipped)
        if not examples and not allow_none:
            raise InputError(f"{source}: no usable {part} records ({total} read{': ' + reasons if reasons else ''}); "
                             "fix those records, or the data.* keys they point to")
        if skipped and examples:
            log.warning("%s: skipped %d of %d %s records: %s", source, total - len(examples), total, part, reasons)
        return examples


@dataclass
class HFPreferenceData(PreferenceData):
    """Preference pairs from any data set `datasets` reads: a hub id, a local .jsonl / .json /
    .parquet / .csv / .arrow file, a directory of such files (splits from the file names, e.g.
    train.jsonl and test.jsonl), or a `save_to_disk` directory. See `prefrun.data.formats` for the
    record formats and conf/data/hf.yaml for the keys.

    Caching: the raw data goes through `datasets`' own cache (HF_DATASETS_CACHE). The tokenized
    records are an Arrow file written by `datasets.map` under `<cache_dir>/tokenized/`, keyed by
    the data's fingerprint (its files and their modification times, the selected rows), the
    tokenizer (vocabulary, special tokens, chat template) and the column mapping: a second run
    reads it instead of tokenizing. `num_proc` > 1 tokenizes in that many processes when the data
    is large enough for it to pay off (ROWS_PER_PROCESS rows per process)."""

    key: str = field(default="data", repr=False, compare=False)  # its config key, for the messages
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
        return self._examples(dataset, rows, split, "train", tokenizer, Path(cache_dir).expanduser(), pools)

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

    def load_eval(self, *, policy=None, tokenizer, task=None, cache_dir: Path, pools: bool = False) -> list[Example]:
        """The held-out examples: all of `eval_split`, or the `eval_size` share carved from the
        train split; an empty list when neither is set."""
        dataset, rows, split = self._part("eval")
        if dataset is None:
            return []
        return self._examples(dataset, rows, split, "eval", tokenizer, Path(cache_dir).expanduser(), pools)

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
        here = f"{self.key}.path={self.path!r}"
        if path.is_file():
            builder = DATA_FILES.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"{here}: unknown file type {path.suffix!r}; give a .jsonl, .json, .parquet, .csv or "
                                 ".arrow file, a directory of them, a save_to_disk directory or a hub id")
            if self.name:
                raise InputError(f"{self.key}.name={self.name!r} names a hub configuration, but {here} is a file: "
                                 "leave data.name null")
            if _is_blank(path):
                raise InputError(f"{here}: the file is empty (0 records)")
            self._files = [path]
            dataset = self._call(lambda: load_dataset(builder, data_files=str(path), split=split), split, key)
            if builder == "json" and self._text_columns_hold_other_types(dataset):
                # a column of strings and numbers comes back with its strings decoded ("04668" as 4668): the line
                # at fault is found in the file itself.
                self._diagnose()
            return dataset
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
                    raise InputError(f"{self.key}.{key}={split!r}: {here} has no such split (its splits: {list(loaded)})")
                return loaded[split]
            self._files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_FILES)
            return self._call(lambda: load_dataset(str(path), self.name, split=split), split, key)
        if _looks_local(self.path):
            raise InputError(f"{here}: no such file or directory; give a .jsonl/.json/.parquet/.csv file, a directory "
                             "of them, a save_to_disk directory or a hub id")
        return self._call(lambda: load_dataset(self.path, self.name, split=split), split, key, hub=True)

    def _call(self, read: Callable, split: str, key: str, hub: bool = False):
        """Run a `datasets` reader and turn its failure into one line naming the file (and, for
        text files, the line at fault) or the hub id. `datasets`' own error log of a file it cannot parse is
        silenced: it names another line than the one at fault, and this line follows."""
        json_log = logging.getLogger("datasets.packaged_modules.json.json")
        level = json_log.level
        json_log.setLevel(logging.CRITICAL)
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - anything `datasets` raises becomes one line
            if isinstance(err, ValueError) and str(err).startswith("Unknown split"):
                splits = str(err).partition("Should be one of ")[2].rstrip(".") or "?"
                hint = "; hold out part of the train split with data.eval_size instead" if key == "eval_split" else ""
                raise InputError(f"{self.key}.{key}={split!r}: {self.key}.path={self.path!r} has no such split "
                                 f"(its splits: {splits}){hint}") from None
            if "corresponds to no data" in str(err):  # `datasets` on a split of 0 rows
                raise InputError(f"{self.key}.path={self.path!r}: split {split!r} has no records") from None
            self._diagnose()
            if hub:
                raise InputError(
                    f"{self.key}.path={self.path!r}: not a local file or directory, and no data set by that id could be "
                    f"loaded from the Hugging Face hub or its cache ({_reason(err)}); check {self.key}.path (and {self.key}.name) "
                    "or the network") from None
            raise InputError(f"{self.key}.path={self.path!r}: `datasets` could not read it ({_reason(err)})") from None
        finally:
            json_log.setLevel(level)

    def _text_columns_hold_other_types(self, dataset) -> bool:
        """True when a prompt, chosen or rejected column was read as numbers or booleans, or as `datasets`' Json
        feature (a column of mixed types, each value decoded as JSON: the string "04668" comes back as 4668)."""
        from datasets import Value

        def odd(feature) -> bool:
            return type(feature).__name__ == "Json" or (isinstance(feature, Value) and "string" not in feature.dtype)

        features = dataset.features
        return any(odd(features.get(self.columns.get(key) or key)) for key in COLUMNS)

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
                    raise InputError(f"{self.key}.path={self.path!r} (split {split!r}): no {key} column {root!r} (its "
                                     f"columns: {present}); name yours with data.columns.{key}=<column or field path>")
            if len(dataset) == 0:
                raise InputError(f"{self.key}.path={self.path!r}: split {split!r} has no records")
            return dataset.select_columns(roots + [c for c in TEMPLATE_COLUMNS if c in present and c not in roots])
        prompt = self.columns["prompt"]
        implicit = not prompt or (prompt == "prompt" and prompt not in present)
        mapping = {key: self.columns[key] for key in COLUMNS if not (key == "prompt" and implicit)}
        for key, column in mapping.items():
            if column not in present:
                raise InputError(f"{self.key}.path={self.path!r} (split {split!r}): no {key} column {column!r} (its "
                                 f"columns: {present}); name yours with data.columns.{key}=<column>")
        if len(dataset) == 0:
            raise InputError(f"{self.key}.path={self.path!r}: split {split!r} has no records")
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
            held = held_out(n, self.eval_size, self.seed, f"records of split {self.split!r}")
            chosen_out = set(held)
            rows = [i for i in rows if i not in chosen_out]
        if part == "eval":
            return (train, held, self.split) if held else (None, None, self.split)
        if self.max_samples:
            rows = rows[: self.max_samples]
        return train, (None if len(rows) == n else rows), self.split

    # -- tokenizing ------------------------------------------------------------------------------

    def _examples(self, dataset, rows: list[int] | None, split: str, part: str, tokenizer,
                  cache_dir: Path, pools: bool) -> list[Example]:
        """`pools` false on a pool file: each pool becomes its best-vs-worst pair (a pair loss, loss=dpo)."""
        self._use_chat_template(tokenizer)
        if rows is not None:
            dataset = dataset.select(rows)
        try:
            with distributed.in_turn():  # the first process writes the tokenized cache, the others read it
                examples = self._tokenize(dataset, rows, split, part, tokenizer, cache_dir)
        except UnicodeDecodeError as err:  # the json reader may pass bad bytes on to the first read of a value
            self._diagnose()
            raise InputError(f"{self.key}.path={self.path!r}: not valid UTF-8 ({_reason(err)}); re-save it as UTF-8") from None
        if self.pools and not pools and examples:
            log.info("data: %d %s pools -> their best-vs-worst pairs for a pair loss (loss=mcpo_cd sampler=cd "
                     "trains on whole pools)", len(examples), part)
            examples = [Example(e.prompt_ids, best_vs_worst(e.completion_ids, e.scores)) for e in examples]
        return examples

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
        return self.finish(items, len(dataset), f"{self.key}.path={self.path!r}", part)

    def _use_chat_template(self, tokenizer) -> None:
        """`data.chat_template` (a Jinja string or a file) replaces the tokenizer's; it is saved with
        the checkpoint so that inference renders prompts the same way."""
        from prefrun.model import read_chat_template

        template = read_chat_template(self.chat_template, "data.chat_template")
        if template and tokenizer.chat_template != template:
            log.info("data: using data.chat_template for the tokenizer")
            tokenizer.chat_template = template


@dataclass
class HFPrompts(HFPreferenceData):
    """Prompts for `prefrun generate`: the `column` (a column name, or a field path such as
    `conversation.content`) of any data set data=hf reads. Records whose prompt is null or empty are skipped
    and counted; a prompt that is neither a string nor a list of {role, content} messages stops with one line."""

    column: str = "prompt"
    key: str = field(default="prompts", repr=False, compare=False)  # `prefrun train` sets data.prompts

    def _check_settings(self) -> None:
        if not self.path:
            raise InputError(f"{self.key}.path is not set: give a hub id, a data file, a directory of them or a "
                             "save_to_disk directory, or null for the built-in task's prompts")
        if not self.column:
            raise InputError(f"{self.key}.column is empty: name the column (or field path) that holds the prompts")
        self._check_common()

    def _select_columns(self, dataset, split: str):
        root = self.column.split(".")[0]
        if root not in dataset.column_names:
            raise InputError(f"{self.key}.path={self.path!r} (split {split!r}): no prompt column {root!r} (its columns: "
                             f"{list(dataset.column_names)}); name yours with {self.key}.column=<column>")
        if len(dataset) == 0:
            raise InputError(f"{self.key}.path={self.path!r}: split {split!r} has no records")
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
            log.warning("%s.path=%r: skipped %d records (%s)", self.key, self.path, sum(skipped.values()), dict(skipped))
        if not prompts:
            raise InputError(f"{self.key}.path={self.path!r}: no usable prompts in column {self.column!r}")
        return prompts


def held_out(n: int, eval_size: float, seed: int, what: str) -> list[int]:
    """The indices (sorted) of the `eval_size` share (a fraction below 1, or a count) of `n` records held out for
    the evaluation, drawn with `seed`; `what` names the records in the error when none would be left to train on."""
    k = math.ceil(eval_size * n) if eval_size < 1 else int(eval_size)
    if k >= n:
        raise InputError(f"data.eval_size={eval_size} holds out {k} of the {n} {what}, leaving none to train on: "
                         "lower it")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


def context_length(generator, policy) -> int | None:
    """The tokens a prompt and its completion share: the engine's context (generator.max_model_len), else the
    model's (max_position_embeddings); None when neither says."""
    return getattr(generator, "max_model_len", None) or \
        getattr(policy.config.get_text_config(), "max_position_embeddings", None)


def prompt_limit(data, generator, policy) -> tuple[int, str]:
    """The longest prompt a round (or an offline job's pools) can use, and why: it must leave a completion token
    in data.max_length (unless data.max_prompt_length cuts it for training) and fit the generator's context."""
    context = context_length(generator, policy)
    limits = [(context - 1, f"the model's context is {context} tokens: generator.max_model_len or the model's "
                            "max_position_embeddings")] if context else []
    if data.max_prompt_length is None:
        limits.append((data.max_length - 1, f"data.max_length={data.max_length} must leave room for a completion: "
                                             "raise it, or set data.max_prompt_length to cut long prompts in training"))
    return min(limits) if limits else (sys.maxsize, "")


def fitting_prompts(prompts: list, tokenizer, *, limit: int, why: str, source: str) -> list:
    """The prompts of at most `limit` tokens (as training and generation tokenize them); the others are skipped
    before anything is generated for them, counted in one line saying `why` the limit is what it is."""
    from prefrun.generate.base import prompt_ids

    kept = [p for p in prompts if len(prompt_ids(tokenizer, p)) <= limit]
    if len(kept) < len(prompts):
        log.warning("skipped %d of %d prompts of %s longer than %d tokens (%s)", len(prompts) - len(kept),
                    len(prompts), source, limit, why)
    return kept


@dataclass
class GeneratedPreferences(PreferenceData):
    """Preferences sampled from the starting policy: `generator.num_candidates` completions for each prompt
    (the task's train prompts, or `prompts`, a data set's prompt column), scored by the configured judge.
    With a pool sampler (MC-PO) every prompt keeps its whole pool; otherwise best vs worst becomes a pair.
    Prompts whose candidates all tie are skipped. Cached per (policy weights, prompts, generator, judge), in
    the pool format of `prefrun generate`, in shards (a killed run continues where it stopped). Held-out
    prompts for the judged evaluation: the task's, or `eval_split` of the prompts' data set."""

    num_prompts: int = 2048
    prompts: Any = None  # an HFPrompts (conf/data/task_pairs.yaml's `prompts` keys), or None / path null: the task's
    eval_split: str | None = None
    eval_size: float = 0  # with `prompts`: this share (< 1) or count (>= 1) of them held out for the evaluation
    seed: int = 0  # draws the eval_size share

    def __post_init__(self) -> None:
        if isinstance(self.prompts, HFPrompts):
            self.prompts.key = "data.prompts"  # what its messages name
            if not self.prompts.path:  # data.prompts.path=null: the task's prompts
                self.prompts = None

    @property
    def uses_task(self) -> bool:
        return self.prompts is None

    def eval_prompts(self, n: int) -> list:
        if self.prompts is None:
            return []
        if self.eval_size:
            return self._split_prompts()[1][:n]
        if not self.eval_split:
            return []
        return dataclasses.replace(self.prompts, split=self.eval_split, max_samples=n).prompts()

    def _split_prompts(self) -> tuple[list, list]:
        """The prompts to train on and those held out (`eval_size` of them, drawn with `seed`)."""
        prompts = self.prompts.prompts()
        if not self.eval_size:
            return prompts, []
        if self.eval_split:
            raise InputError(f"data.eval_split={self.eval_split!r} and data.eval_size={self.eval_size} are both set: "
                             "hold out a split of data.prompts.path or a share of its prompts, not both")
        if self.eval_size < 0 or (self.eval_size >= 1 and self.eval_size != int(self.eval_size)):
            raise InputError(f"data.eval_size={self.eval_size}: give a fraction below 1 or a whole count of prompts")
        held = held_out(len(prompts), self.eval_size, self.seed, f"prompts of data.prompts.path={self.prompts.path!r}")
        chosen_out = set(held)
        return [p for i, p in enumerate(prompts) if i not in chosen_out], [prompts[i] for i in held]

    def train_prompts(self, task, tokenizer, generator) -> list:
        """The prompts candidates are generated for, in their final form (chat-wrapped when the tokenizer has a
        template): the task's train prompts, or the `prompts` data set's."""
        from prefrun.generate import as_chat

        if self.prompts is None and task is None:
            raise InputError("data=task_pairs samples preferences for a built-in task, but the task is removed (~task): "
                             "keep task=sort, set data.prompts.path=<prompts> or choose data=hf data.path=<your data>")
        prompts = task.prompts("train", self.num_prompts) if self.prompts is None else self._split_prompts()[0]
        return as_chat(prompts, tokenizer, generator.chat_template)

    @property
    def prompt_source(self) -> str:
        return f"data.prompts.path={self.prompts.path}" if self.prompts is not None else \
            f"the task's train prompts (data.num_prompts={self.num_prompts})"

    def load(self, *, policy, tokenizer, task, cache_dir: Path, generator=None, judge=None,
             pools: bool = False) -> list[Example]:
        from prefrun.generate.hf import HFGenerator
        from prefrun.model import fingerprint, sharded_compute_dtype
        from prefrun.pools import make_pools

        # Prompts too long to leave a completion token are skipped before the shards are cut, counted in one line, as
        # online rounds skip them (HF generation failed deep inside torch on a model with position embeddings).
        limit, why = prompt_limit(self, generator, policy)
        prompts = fitting_prompts(self.train_prompts(task, tokenizer, generator), tokenizer, limit=limit, why=why,
                                  source=self.prompt_source)
        # Shards sample with their own seeds: their size is part of what the pools are. A policy sharded with
        # FSDP's mixed precision samples other candidates than the same weights unsharded (HF generation).
        numerics = sharded_compute_dtype(policy) if isinstance(generator, HFGenerator) else None
        key = _hash(fingerprint(policy), prompts, repr(generator), judge.identity(), generator.prompts_per_shard,
                    *([f"fsdp/{numerics}"] if numerics else []))
        out_dir = Path(cache_dir).expanduser() / "pools" / key
        done = out_dir / "pools.jsonl"
        cached = storage.read_checked(done)
        if distributed.everywhere(cached is not None):
            log.info("data: %s (cached pools)", done)
            records = [json.loads(line) for line in cached.decode().splitlines()]
        else:  # split over the processes, shard by shard; one writer for the cached file
            records = make_pools(prompts, generator=generator, judge=judge, model=policy, tokenizer=tokenizer,
                                 out_dir=out_dir / "shards")
            text = "".join(json.dumps(r) + "\n" for r in records).encode()
            distributed.write_once(done, lambda path: storage.write_atomic(path, text, checked=True))
        return self.examples(records, tokenizer, pools=pools, where=str(done))

    def examples(self, records: list[dict], tokenizer, *, pools: bool, where: str,
                 allow_none: bool = False) -> list[Example]:
        """Generated pools -> examples: whole pools (best first), or best vs worst pairs. Pools whose candidates
        all tie, or with fewer than two, are skipped and counted; none left is an error unless `allow_none`."""
        items = []
        for i, record in enumerate(records):
            pool = read_pool(record, {c: c for c in POOL_COLUMNS}, lambda i=i: f"{where} (record {i})",
                             allow_empty=True)
            if isinstance(pool, str):
                items.append(pool)
                continue
            prompt, candidates, scores = pool
            if not pools:
                candidates, scores = best_vs_worst(candidates, scores), None
            prompt_ids, completion_ids, _ = token_ids(tokenizer, prompt, candidates)
            items.append(Example(prompt_ids, completion_ids, scores=scores))
        examples = self.finish(items, len(records), "data (generated pools)", "train", allow_none)
        if not examples:
            return examples
        log.info("data: %d %s from %d prompts x %d candidates", len(examples), "pools" if pools else "pairs",
                 len(records), len(records[0]["candidates"]) if records else 0)
        return examples


def best_vs_worst(candidates: list, scores: list[float]) -> list:
    """A pool, best first -> [best, worst] (the first of equal worst): the pair a pair loss trains on."""
    return [candidates[0], candidates[1 + scores[1:].index(min(scores[1:]))]]


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


def _tokenizer_key(tokenizer) -> str:
    """What the token ids depend on: vocabulary and pre/post-processing, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _hash(type(tokenizer).__name__, vocab, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
