"""Conversation templates of the release, tokenized to LLM ids and labels.

A LLaVA sample's `conversations` is a list of `{"from": "human"|"gpt", "value": str}`.
`encode_conversation` turns it into

  input_ids  int32[L]   LLM ids, `<image>` -> IMAGE_TOKEN_INDEX (-200), at most one
  labels     int32[L]   IGNORE_INDEX (-100) except assistant replies (+ their `</s>`)
  instruction str       the Q-Former text: the first human turn without `<image>`
                        and without newlines

with the release's exact token ids and label masks (`preprocess_v1`,
`preprocess_plain_guided` and LLaVA's `tokenizer_image_token`):

- The prompt is tokenized in chunks split at `<image>`; each chunk is tokenized on
  its own (so the text after `<image>` starts a fresh sentencepiece word), the
  bos of every chunk is dropped and one bos starts the sequence.
- `vicuna_v1` / `imgsp_v1` labels come from per-round lengths, as in the release:
  the prompt is split into rounds at `</s>`; round r covers `len(tok(round_r))`
  tokens (its own bos stands for the `</s>` that ends it), and its first
  `len(tok(round_r up to "ASSISTANT: ")) - 2` tokens are masked (the `- 2` drops
  that bos and the token of the trailing space). Where these lengths do not add up
  to the sequence length, the release silently trains on nothing (all labels
  -100); here it is a `SampleError("tokenization_mismatch")`, counted and logged.
- `plain_guided` (stage 1): prompt `<image>` + reply + `\\n`; the first two tokens
  (bos, image) are masked.

Deviation: the release's `imgsp_v1` inserts a second, third, ... `<image>` into
every later human turn (at a random side) and gives each its own Q-Former prompt.
The batch contract here has one placeholder per sample, so `imgsp_v1` encodes like
`vicuna_v1` (same system text and separators; identical ids and labels for
samples with one `<image>`), with the first human turn as the instruction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from llamavid_jax.data import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, SampleError

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class Template:
  """A conversation template (the release's `Conversation`, reduced to what we use).

  Attributes:
    name: template name.
    style: `two` (system, `ROLE: msg` with alternating separators) or `plain`
      (`<image>` + reply + sep, one exchange).
    system: system text (`two` only).
    roles: (user role, assistant role).
    sep: separator after user turns (`two`) or after the reply (`plain`).
    sep2: separator after assistant turns (`two`).
  """

  name: str
  style: Literal["two", "plain"]
  system: str = ""
  roles: tuple[str, str] = ("USER", "ASSISTANT")
  sep: str = " "
  sep2: str = "</s>"


TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", "two", _VICUNA_SYSTEM),
    "imgsp_v1": Template("imgsp_v1", "two", _VICUNA_SYSTEM),
    "plain_guided": Template("plain_guided", "plain", sep="\n"),
}


@dataclasses.dataclass(frozen=True)
class EncodedText:
  """Tokenized conversation: `input_ids`, `labels` int32[L]; Q-Former `instruction`."""

  input_ids: np.ndarray
  labels: np.ndarray
  instruction: str

  @property
  def has_image(self) -> bool:
    return bool((self.input_ids == IMAGE_TOKEN_INDEX).any())


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def normalize_turns(conversations: Any, *, has_media: bool) -> list[str]:
  """Validates a LLaVA `conversations` list; returns the turn texts, human first.

  Like the release: a leading gpt turn is dropped, and for a sample with media
  the (single) `<image>` is moved to the start of its turn (`<image>\\n` + text).
  Unlike the release (which asserts, crashes and retries a random other sample),
  every violation raises `SampleError` with field `conversations`:
  `bad_conversations`, `bad_roles`, `no_gpt_turn`, `empty_message`,
  `missing_image_token`, `multiple_image_tokens`, `unexpected_image_token`.
  """
  if not isinstance(conversations, (list, tuple)) or not all(
      isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations):
    raise SampleError("bad_conversations", "conversations",
                      "expected a list of {'from': ..., 'value': str}")
  turns = list(conversations)
  if turns and turns[0].get("from") == "gpt":
    turns = turns[1:]
  roles = [t.get("from") for t in turns]
  if "gpt" not in roles:
    raise SampleError("no_gpt_turn", "conversations", f"no gpt turn (roles {roles})")
  expected = ["human", "gpt"] * (len(turns) // 2 + 1)
  if len(turns) % 2 or roles != expected[: len(turns)]:
    raise SampleError("bad_roles", "conversations",
                      f"roles must alternate human/gpt and end with gpt, got {roles}")
  values = [t["value"] for t in turns]
  if any(not v.strip() for v in values):
    raise SampleError("empty_message", "conversations", "a turn has an empty value")
  n_images = sum(v.count(IMAGE_TOKEN) for v in values)
  if not has_media:
    if n_images:
      raise SampleError("unexpected_image_token", "conversations",
                        f"{IMAGE_TOKEN} in a sample without image or video")
    return values
  if n_images == 0:
    raise SampleError("missing_image_token", "conversations",
                      f"sample has media but no {IMAGE_TOKEN} in its turns")
  if n_images > 1:
    raise SampleError("multiple_image_tokens", "conversations",
                      f"{n_images} {IMAGE_TOKEN} placeholders; one per sample is supported")
  out = []
  for v in values:
    if IMAGE_TOKEN in v:
      v = (IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip()
    out.append(v)
  return out


def build_prompt(template: Template, turns: Sequence[str]) -> str:
  """The prompt string of `turns` (alternating user, assistant texts)."""
  if template.style == "plain":
    if len(turns) != 2 or IMAGE_TOKEN not in turns[0]:
      raise SampleError("bad_roles", "conversations",
                        f"template {template.name} needs one human turn with {IMAGE_TOKEN} "
                        f"and one gpt turn, got {len(turns)} turns")
    return IMAGE_TOKEN + turns[1] + template.sep
  seps = (template.sep, template.sep2)
  prompt = template.system + template.sep
  for i, text in enumerate(turns):
    prompt += f"{template.roles[i % 2]}: {text}{seps[i % 2]}"
  return prompt


def tokenize_with_image(text: str, tokenizer) -> list[int]:
  """LLaVA's `tokenizer_image_token`: chunks split at `<image>`, one bos, -200 between."""
  chunks = [tokenizer(c).input_ids for c in text.split(IMAGE_TOKEN)]
  ids: list[int] = []
  offset = 0
  if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  for i, chunk in enumerate(chunks):
    if i:
      ids.append(IMAGE_TOKEN_INDEX)
    ids.extend(chunk[offset:])
  return ids


def qformer_instruction(turns: Sequence[str]) -> str:
  """The release's guided prompt: first human turn, `<image>` and newlines removed."""
  return turns[0].replace(IMAGE_TOKEN, "").replace("\n", "")


def encode_conversation(conversations: Any, tokenizer, template: Template | str, *,
                        has_media: bool) -> EncodedText:
  """Tokenizes one sample's conversations with `template` (see module docstring).

  Args:
    conversations: the sample's LLaVA `conversations` list.
    tokenizer: a transformers tokenizer that adds bos (`tokenizer(s).input_ids`).
    template: a `Template` or its name.
    has_media: whether the sample has an image, video or features.

  Returns:
    `EncodedText` with int32[L] `input_ids` and `labels`.

  Raises:
    SampleError: invalid conversations or a tokenization mismatch.
  """
  template = get_template(template) if isinstance(template, str) else template
  turns = normalize_turns(conversations, has_media=has_media)
  if template.style == "plain" and not has_media:
    raise SampleError("missing_media", "conversations",
                      f"template {template.name} needs an image or video")
  prompt = build_prompt(template, turns)
  ids = np.asarray(tokenize_with_image(prompt, tokenizer), np.int32)
  labels = ids.copy()
  if template.style == "plain":
    labels[: len(tokenize_with_image(IMAGE_TOKEN, tokenizer))] = IGNORE_INDEX
  else:
    _mask_rounds_v1(prompt, template, tokenizer, labels)
  return EncodedText(ids, labels, qformer_instruction(turns))


def _mask_rounds_v1(prompt: str, template: Template, tokenizer, labels: np.ndarray) -> None:
  """The release's `preprocess_v1` masking, in place; raises on a length mismatch."""
  sep = template.sep + template.roles[1] + ": "
  cur = 1  # bos
  labels[:cur] = IGNORE_INDEX
  for rnd in prompt.split(template.sep2):
    if not rnd:
      break
    parts = rnd.split(sep)
    if len(parts) != 2:
      break
    round_len = len(tokenize_with_image(rnd, tokenizer))
    instruction_len = len(tokenize_with_image(parts[0] + sep, tokenizer)) - 2
    labels[cur: cur + instruction_len] = IGNORE_INDEX
    cur += round_len
  labels[cur:] = IGNORE_INDEX
  if cur != len(labels):
    raise SampleError(
        "tokenization_mismatch", "conversations",
        f"rounds tokenize to {cur} tokens but the whole prompt to {len(labels)} (the release "
        "would train on none of it); check the tokenizer (legacy sentencepiece spacing) "
        "and separators inside the text")
