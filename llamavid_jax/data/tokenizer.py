"""Tokenizers from local directories only (no hub access).

LLM: a Vicuna/LLaMA directory (`tokenizer.model` sentencepiece and/or
`tokenizer.json`) or any transformers tokenizer directory. Like the release, the
pad token is the unk token, padding is on the right, and bos is added. It is loaded
with `legacy=True`: every text segment after a special token (e.g. `</s>USER:`)
gets the sentencepiece word prefix, as the release's slow tokenizer did; without
it multi-turn `vicuna_v1` samples mismatch (see `conversation.py`).

Q-Former: a bert-base-uncased directory (`vocab.txt`); `[DEC]` is added as bos
token like the release (vocab 30522 -> 30523), truncation on the left, max 256.
"""

from __future__ import annotations

import json
import os

QFORMER_MAX_LENGTH = 256
# files of a tokenizer directory that may name Python code to import (`auto_map`)
CODE_FILES = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


class RemoteCodeError(ValueError):
  """A checkpoint's tokenizer that asks to run its own Python code (refused)."""


def _check_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} tokenizer directory not found: {path}")
  check_no_code(path)


def check_no_code(path: str) -> None:
  """Raises RemoteCodeError naming the file if a JSON file of the directory `path` has
  an `auto_map` (custom classes that transformers would import from the checkpoint's
  own .py files). Read before any transformers call, so nothing asks on stdin."""
  for name in CODE_FILES:
    f = os.path.join(path, name)
    if not os.path.isfile(f):
      continue
    try:
      with open(f, encoding="utf-8") as fh:
        data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
      raise RemoteCodeError(f"{f}: not a JSON file ({e})") from None
    if isinstance(data, dict) and "auto_map" in data:
      raise RemoteCodeError(f"{f}: has an 'auto_map' ({', '.join(map(str, data['auto_map']))}): the checkpoint "
                            "asks to run its own Python code, which is refused; remove 'auto_map' to use the "
                            "built-in tokenizer classes")


def load_llm_tokenizer(path: str, *, model_max_length: int | None = None):
  """Loads the LLM tokenizer from the local directory `path`."""
  from transformers import AutoTokenizer

  _check_dir(path, "LLM")
  kwargs = {"legacy": True, "padding_side": "right", "local_files_only": True, "trust_remote_code": False}
  if model_max_length is not None:
    kwargs["model_max_length"] = model_max_length
  tok = AutoTokenizer.from_pretrained(path, **kwargs)
  if tok.unk_token is None:
    raise ValueError(f"LLM tokenizer at {path} has no unk token (used as pad, like the release)")
  tok.pad_token = tok.unk_token
  if tok.bos_token_id is None or tok("a").input_ids[:1] != [tok.bos_token_id]:
    raise ValueError(f"LLM tokenizer at {path} does not add a bos token; the templates need it")
  return tok


def load_qformer_tokenizer(path: str, *, max_length: int = QFORMER_MAX_LENGTH):
  """Loads the Q-Former BERT tokenizer (vocab.txt) with `[DEC]` bos, left truncation."""
  from transformers import BertTokenizerFast

  _check_dir(path, "Q-Former")
  tok = BertTokenizerFast.from_pretrained(
      path, truncation_side="left", model_max_length=max_length, local_files_only=True,
      trust_remote_code=False)
  tok.add_special_tokens({"bos_token": "[DEC]"})
  return tok
