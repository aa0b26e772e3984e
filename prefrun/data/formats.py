"""Record formats -> token ids, and one clear line for a broken text data file.

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

import json
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefrun.data.batches import Example
from prefrun.errors import InputError

COLUMNS = ("prompt", "chosen", "rejected")
# Local data files by suffix -> the `datasets` builder that reads them.
DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({_json_error(err)})") from None
        numbered = [(f"{path} (record {i})", r) for i, r in enumerate(records)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({_json_error(err)}); fix or delete the line (one "
                                 "JSON object per line)") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise InputError(f"{where}: {type(record).__name__} {reprlib.repr(record)} is not a JSON object; each "
                             "record is an object with prompt, chosen and rejected")
        for key in COLUMNS:
            value = record.get(columns.get(key) or key)
            if value is not None:
                _kind(value, key, lambda w=where: w, columns)


def _json_error(err: json.JSONDecodeError) -> str:
    """"Unterminated string starting at column 58", "Expecting ',' delimiter at column 12"."""
    return f"{err.msg}{'' if err.msg.endswith(' at') else ' at'} column {err.colno}"


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _no_template(path: str) -> str:
    return (f"data.path={path!r} holds conversations (lists of {{role, content}} messages) but the tokenizer has no "
            "chat template: use a chat/instruct model, set model.chat_template=<Jinja template or file>, or give "
            "the records as strings")


def _reason(err: BaseException) -> str:
    """An exception in one line: its type and first line, and its cause's when it has one."""
    parts = []
    while err is not None and len(parts) < 2:
        text = str(err).strip().splitlines()
        parts.append(f"{type(err).__name__}: {text[0]}" if text else type(err).__name__)
        err = err.__cause__
    return "; ".join(parts)
