"""Preference data -> tokenized examples -> padded batches, plus the cached reference log-probs.

What lives where (every public name is importable from `prefrun.data`, and the Hydra configs'
`_target_: prefrun.data.HFPreferenceData` / `GeneratedPreferences` / `HFPrompts` point here):

- `formats`: the record formats (TRL's pair formats, implicit prompts) and their truncation rule,
  records -> token ids (`tokenize_record`, `token_ids`), and one clear line for a broken text data file;
- `load`: the data sources, the `data=` choices: `PreferenceData`, `HFPreferenceData`, `HFPrompts`,
  `GeneratedPreferences`, with the tokenized cache; which prompts fit a model's context (`fitting_prompts`);
- `batches`: `Example` and the batches, left-padded or packed (`pad_rows`, `collate`, `to_device`);
- `reference`: reference log-probs of every candidate (`candidate_logps`) and their disk cache
  (`attach_reference_logps`).

Imports run one way: batches <- formats <- load, batches <- reference <- load.
"""

from prefrun.data.batches import Example, collate, pad_rows, to_device
from prefrun.data.formats import COLUMNS, DATA_FILES, token_ids, tokenize_record
from prefrun.data.load import (
    ROWS_PER_PROCESS,
    TEMPLATE_COLUMNS,
    TOKENIZE_VERSION,
    GeneratedPreferences,
    HFPreferenceData,
    HFPrompts,
    PreferenceData,
    context_length,
    fitting_prompts,
    prompt_limit,
)
from prefrun.data.reference import attach_reference_logps, candidate_logps, split_candidate_logps

__all__ = [
    "COLUMNS",
    "DATA_FILES",
    "ROWS_PER_PROCESS",
    "TEMPLATE_COLUMNS",
    "TOKENIZE_VERSION",
    "Example",
    "GeneratedPreferences",
    "HFPreferenceData",
    "HFPrompts",
    "PreferenceData",
    "attach_reference_logps",
    "candidate_logps",
    "split_candidate_logps",
    "collate",
    "context_length",
    "fitting_prompts",
    "prompt_limit",
    "pad_rows",
    "token_ids",
    "tokenize_record",
    "to_device",
]
