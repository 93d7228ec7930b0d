"""Conversation templates of the release, tokenized to LLM ids and labels.

A LLaVA sample's `conversations` is a list of `{"from": "human"|"gpt", "value": str}`.
`encode_conversation` turns it into

  input_ids     int32[L]   LLM ids, each `<image>` -> IMAGE_TOKEN_INDEX (-200)
  labels        int32[L]   IGNORE_INDEX (-100) except assistant replies (+ their `</s>`)
  instructions  tuple[str] the Q-Former texts; the r-th `<image>` of `input_ids` is
                           encoded with the r-th instruction

with the release's exact token ids and label masks (`preprocess_v1`,
`preprocess_imgsp_v1`, `preprocess_plain_guided` and LLaVA's `tokenizer_image_token`):

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
- `vicuna_v1`: one `<image>` (moved to the start of its turn, `<image>\\n` + text);
  the instruction is the first human turn (the release's inference prompt).
- `imgsp_v1` (stage 2): once a human turn has had an `<image>`, every later human
  turn gets one too, at its start (`<image>\\n` + text) or end (text + `\\n<image>`)
  by a coin flip; there is one instruction per human turn: its text as written in
  the sample, `<image>` and newlines removed (lines joined without a space). The
  release flips with the global `random` module, differently on every load; here
  the coin is an explicit `rng` (the pipeline seeds it with (seed, sample index),
  so a sample gets the same sides in planning, in workers and after a restore).
  The release's `refine_prompt` option is not offered: it looks for a newline in
  the instruction after removing all of them, so it never changes anything.
- `plain_guided` (stage 1): prompt `<image>` + reply + `\\n`; the first two tokens
  (bos, image) are masked; the instruction is the human turn.

Movies (the release's long-video stage, `preprocess_multimodal_movie`; `movie_inputs`
of `encode_conversation`): a movie's `inputs` is `"<image>" + subtitles of frame 0 +
"<image>" + ...`, one placeholder per frame. The human turn's `<image>` is replaced, in
place (not moved to the turn's start), by `inputs` with every "..." removed
(`movie_text`); the one instruction is that human turn without `<image>`, stripped
(newlines kept), for every frame; `imgsp_v1` adds no placeholders to later turns (the
movie is one, in its turn; the release would crash on the extra placeholders, which
have no frame tokens in its long-video splice). The release repeats each `<image>`
video_token = 2 times; the empty text between two repeats tokenizes to no ids, so the
ids are these with every -200 doubled, and the model writes a frame's tokens_per_frame
tokens at each of our placeholders instead (`models/splice.py`). At inference the user
turn is `movie_prompt(inputs, question)` (`serve/run_llamavid_movie.py`), `inputs` as
stored, "..." included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from llamavid_jax.data import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, SampleError

MOVIE_START = "Below is a movie. Memorize the content and answer my question after watching this movie."
MOVIE_END = "Now the movie end."

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
  """Tokenized conversation: `input_ids`, `labels` int32[L]; the Q-Former
  `instructions`, one per placeholder slot (see the module docstring)."""

  input_ids: np.ndarray
  labels: np.ndarray
  instructions: tuple[str, ...]

  @property
  def instruction(self) -> str:
    """The first instruction (the only one outside `imgsp_v1`)."""
    return self.instructions[0]

  @property
  def num_images(self) -> int:
    return int((self.input_ids == IMAGE_TOKEN_INDEX).sum())

  @property
  def has_image(self) -> bool:
    return self.num_images > 0


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def normalize_turns(conversations: Any, *, has_media: bool, per_turn_images: bool = False,
                    move_images: bool = True) -> list[str]:
  """Validates a LLaVA `conversations` list; returns the turn texts, human first.

  Like the release: a leading gpt turn is dropped, and for a sample with media
  each `<image>` is moved to the start of its turn (`<image>\\n` + text) unless not
  `move_images` (movies: the release replaces it in place).
  Unlike the release (which asserts, crashes and retries a random other sample),
  every violation raises `SampleError` with field `conversations`:
  `bad_conversations`, `bad_roles`, `no_gpt_turn`, `empty_message`,
  `missing_image_token`, `multiple_image_tokens` (more than one per sample, or with
  `per_turn_images` more than one in a turn), `image_token_in_reply`,
  `unexpected_image_token`.
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
  counts = [v.count(IMAGE_TOKEN) for v in values]
  if not has_media:
    if any(counts):
      raise SampleError("unexpected_image_token", "conversations",
                        f"{IMAGE_TOKEN} in a sample without image or video")
    return values
  if not any(counts):
    raise SampleError("missing_image_token", "conversations",
                      f"sample has media but no {IMAGE_TOKEN} in its turns")
  if any(counts[1::2]):
    raise SampleError("image_token_in_reply", "conversations",
                      f"{IMAGE_TOKEN} in gpt turn {counts[1::2].index(max(counts[1::2])) + 1}")
  if max(counts) > 1 or (not per_turn_images and sum(counts) > 1):
    raise SampleError("multiple_image_tokens", "conversations",
                      f"{sum(counts)} {IMAGE_TOKEN} placeholders (per human turn: {counts[0::2]}); "
                      + ("one per human turn is supported" if per_turn_images else "one per sample is supported"))
  if not move_images:
    return values
  return [(IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip() if IMAGE_TOKEN in v else v
          for v in values]


def add_turn_images(turns: Sequence[str], rng: np.random.Generator | None) -> list[str]:
  """`imgsp_v1`: every human turn after the first with an `<image>` gets one, at its
  start or end by a fair coin from `rng` (None: always at the start)."""
  out, seen = [], False
  for i, text in enumerate(turns):
    seen = seen or IMAGE_TOKEN in text
    if i % 2 == 0 and seen and IMAGE_TOKEN not in text:
      end = rng is not None and int(rng.integers(2)) == 1
      text = text + "\n" + IMAGE_TOKEN if end else IMAGE_TOKEN + "\n" + text
    out.append(text)
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
  return tokenize_many([text], tokenizer)[0]


def tokenize_many(texts: Sequence[str], tokenizer) -> list[list[int]]:
  """`tokenize_with_image` of each text, all chunks in one batched tokenizer call (a
  call per chunk costs ~60 us of Python in transformers, more than the tokenizing)."""
  splits = [t.split(IMAGE_TOKEN) for t in texts]
  flat = tokenizer([c for s in splits for c in s]).input_ids if texts else []
  out, k = [], 0
  for s in splits:
    chunks, k = flat[k: k + len(s)], k + len(s)
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
      offset = 1
      ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
      if i:
        ids.append(IMAGE_TOKEN_INDEX)
      ids.extend(chunk[offset:])
    out.append(ids)
  return out


def qformer_instruction(turn: str) -> str:
  """The release's guided prompt of a human turn: `<image>` and newlines removed."""
  return turn.replace(IMAGE_TOKEN, "").replace("\n", "")


def movie_instruction(turn: str) -> str:
  """The release's Q-Former instruction of a movie sample: its human turn without
  `<image>`, stripped (`preprocess_multimodal_movie`; newlines kept)."""
  return turn.replace(IMAGE_TOKEN, "").strip()


def movie_text(inputs: str) -> str:
  """A movie's `inputs` as training puts it into the human turn: every "..." removed."""
  return inputs.replace("...", "")


def movie_prompt(inputs: str, question: str) -> str:
  """The release's inference user turn for a movie (`serve/run_llamavid_movie.py`):
  the start prompt, `inputs` as stored (one `<image>` per frame, subtitles between, "..."
  kept), the end prompt, a newline, the question."""
  return MOVIE_START + inputs + MOVIE_END + "\n" + question


def encode_conversation(conversations: Any, tokenizer, template: Template | str, *,
                        has_media: bool, rng: np.random.Generator | None = None,
                        movie_inputs: str | None = None) -> EncodedText:
  """Tokenizes one sample's conversations with `template` (see module docstring).

  Args:
    conversations: the sample's LLaVA `conversations` list.
    tokenizer: a transformers tokenizer that adds bos (`tokenizer(s).input_ids`).
    template: a `Template` or its name.
    has_media: whether the sample has an image, video or features.
    rng: `imgsp_v1`'s coin for the side of each added `<image>` (None: start).
    movie_inputs: a movie's `inputs` (one `<image>` per frame): the sample's `<image>`
      becomes them (see "Movies" in the module docstring); one instruction.

  Returns:
    `EncodedText` with int32[L] `input_ids` and `labels`, and the instructions.

  Raises:
    SampleError: invalid conversations or a tokenization mismatch.
  """
  template = get_template(template) if isinstance(template, str) else template
  if movie_inputs is not None:
    if template.style == "plain":
      raise ValueError(f"template {template.name} has no turn to hold a movie's inputs")
    turns = normalize_turns(conversations, has_media=True, move_images=False)
    i = next(i for i, t in enumerate(turns) if IMAGE_TOKEN in t)
    instructions = (movie_instruction(turns[i]),)
    turns[i] = turns[i].replace(IMAGE_TOKEN, movie_text(movie_inputs))
  else:
    per_turn = template.name == "imgsp_v1"
    turns = normalize_turns(conversations, has_media=has_media, per_turn_images=per_turn)
    if template.style == "plain" and not has_media:
      raise SampleError("missing_media", "conversations",
                        f"template {template.name} needs an image or video")
    # Instructions come from the turns before imgsp_v1 adds its placeholders.
    instructions = tuple(qformer_instruction(t) for t in (turns[0::2] if per_turn else turns[:1]))
    if per_turn:
      turns = add_turn_images(turns, rng)
  prompt = build_prompt(template, turns)
  ids = np.asarray(tokenize_with_image(prompt, tokenizer), np.int32)
  labels = ids.copy()
  if template.style == "plain":
    labels[: len(tokenize_with_image(IMAGE_TOKEN, tokenizer))] = IGNORE_INDEX
  else:
    _mask_rounds_v1(prompt, template, tokenizer, labels)
  return EncodedText(ids, labels, instructions)


def _mask_rounds_v1(prompt: str, template: Template, tokenizer, labels: np.ndarray) -> None:
  """The release's `preprocess_v1` masking, in place; raises on a length mismatch."""
  sep = template.sep + template.roles[1] + ": "
  texts = []   # per round: the round, and its instruction up to "ASSISTANT: "
  for rnd in prompt.split(template.sep2):
    if not rnd:
      break
    parts = rnd.split(sep)
    if len(parts) != 2:
      break
    texts += [rnd, parts[0] + sep]
  lengths = [len(ids) for ids in tokenize_many(texts, tokenizer)]
  cur = 1  # bos
  labels[:cur] = IGNORE_INDEX
  for round_len, instruction_len in zip(lengths[0::2], lengths[1::2]):
    instruction_len -= 2
    labels[cur: cur + instruction_len] = IGNORE_INDEX
    cur += round_len
  labels[cur:] = IGNORE_INDEX
  if cur != len(labels):
    raise SampleError(
        "tokenization_mismatch", "conversations",
        f"rounds tokenize to {cur} tokens but the whole prompt to {len(labels)} (the release "
        "would train on none of it); check the tokenizer (legacy sentencepiece spacing) "
        "and separators inside the text")
