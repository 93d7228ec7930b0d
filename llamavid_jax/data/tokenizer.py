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

import os

QFORMER_MAX_LENGTH = 256


def _check_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} tokenizer directory not found: {path}")


def load_llm_tokenizer(path: str, *, model_max_length: int | None = None):
  """Loads the LLM tokenizer from the local directory `path`."""
  from transformers import AutoTokenizer

  _check_dir(path, "LLM")
  kwargs = {"legacy": True, "padding_side": "right", "local_files_only": True}
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
      path, truncation_side="left", model_max_length=max_length, local_files_only=True)
  tok.add_special_tokens({"bos_token": "[DEC]"})
  return tok
