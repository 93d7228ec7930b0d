"""What every benchmark module shares: the Item, chunking, JSON-lines files, media checks.

A benchmark module (see `eval.benchmarks`) turns its own question files into Items,
an Item plus the model's answer into one record in the release's output layout, and
a list of records into a metric summary. Records are JSON objects, one per line of a
prediction file; `record_key` names each one (the release's id field, or `key` where
that is absent or repeated).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import uuid
from typing import Any, Iterable, Literal, Sequence

log = logging.getLogger("eval.benchmarks")

SINGLE_LETTER = "Answer with the option's letter from the given choices directly."
VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")   # the release's video QA tries these, in order


@dataclasses.dataclass(frozen=True)
class Item:
  """One question to ask.

  id: unique within the benchmark's item list (the release's id as a string; a
      repeated id gets `_1`, `_2`, ... on its later occurrences).
  prompt: the LLM user text WITHOUT `<image>`; the predictor puts `<image>\\n` before
      it when kind is not "none" (the release's `DEFAULT_IMAGE_TOKEN + '\\n' + qs`).
  instruction: the Q-Former instruction (the release's `model.update_prompt` text).
  media: path of the video / image (MMBench: the decoded image, see mmbench.py), None
      for a text-only question.
  kind: "video" | "image" | "none".
  meta: what `record` needs to write the release's line (raw ids, answers, ...).
  """

  id: str
  prompt: str
  instruction: str
  media: str | None
  kind: Literal["video", "image", "none"]
  meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


# --- ids and chunks -------------------------------------------------------------------
def unique_ids(raw: Iterable[Any]) -> list[str]:
  """str(id) per entry; the k-th repeat (k >= 1) of an id becomes `{id}_{k}` (the release's
  GPT-judge scripts rename repeats the same way, counting from `_0`), skipping any name taken."""
  out, seen, count = [], set(), {}
  for r in raw:
    s = str(r)
    if s in seen:
      k = count.get(s, 0)
      while True:
        k += 1
        cand = f"{s}_{k}"
        if cand not in seen:
          break
      count[s] = k
      s = cand
    seen.add(s)
    out.append(s)
  return out


def split_list(lst: Sequence, n: int) -> list:
  """The release's `split_list`: contiguous parts of ceil(len / n) entries each, so the
  last part is shorter and there may be fewer than n parts (7 into 3: 3, 3, 1; 4 into 3:
  2, 2). `get_chunk` gives an empty list for a part that does not exist (the release
  raises IndexError)."""
  if n < 1:
    raise ValueError(f"num_chunks must be >= 1, got {n}")
  size = max(1, math.ceil(len(lst) / n))
  return [lst[i:i + size] for i in range(0, len(lst), size)]


def get_chunk(lst: Sequence, n: int, k: int) -> list:
  if not 0 <= k < n:
    raise ValueError(f"chunk_idx {k} is not in [0, {n})")
  chunks = split_list(lst, n)
  return list(chunks[k]) if k < len(chunks) else []


# --- media ----------------------------------------------------------------------------
def check_media(items: Sequence[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
  """(items whose media file exists or that have none, [(id, path)] of the others)."""
  ok, missing = [], []
  for it in items:
    if it.kind != "none" and not (it.media and os.path.isfile(it.media)):
      missing.append((it.id, it.media or ""))
    else:
      ok.append(it)
  return ok, missing


def media_path(folder: str, name, where: str = "") -> str:
  """folder/name for a media name read from a question file; raises ValueError (naming
  `where`: the file and entry) when the name is not a string, is absolute, or leads
  outside `folder` (`../`, a symlink is followed only by the reader)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: the media name {name!r} is not a file name")
  if os.path.isabs(name) or name.startswith("~"):
    raise ValueError(f"{where}: the media name {name!r} is an absolute path; names are read inside the media folder")
  root = os.path.abspath(folder or ".")
  path = os.path.abspath(os.path.join(root, name))
  if os.path.commonpath([root, path]) != root:
    raise ValueError(f"{where}: the media name {name!r} leads outside the media folder {folder or '.'}")
  return os.path.join(folder, name)


def check_ids(path: str, ids: Sequence[Any], field: str = "id") -> None:
  """Raises ValueError unless every id is a string or an integer and no two ids of
  different types read the same (1 and "1": one key in the prediction file)."""
  seen: dict[str, Any] = {}
  for n, i in enumerate(ids):
    if isinstance(i, bool) or not isinstance(i, (str, int)):
      raise ValueError(f"{path}: entry {n}: {field} {i!r} is a {type(i).__name__}, not a string or an integer")
    if str(i) in seen and type(seen[str(i)]) is not type(i):
      raise ValueError(f"{path}: entry {n}: {field} {i!r} and an earlier {seen[str(i)]!r} are one key in the "
                       "predictions; make the ids distinct")
    seen.setdefault(str(i), i)


def find_video(folder: str, name: str, formats: Sequence[str] = VIDEO_FORMATS, where: str = "") -> str:
  """folder/name + the first suffix of `formats` that exists; when none does, the
  pattern `folder/name.{mp4,avi,...}` (which `check_media` then reports). `name` must
  stay inside `folder` (`media_path`)."""
  media_path(folder, name, where or f"video {name!r}")
  for ext in formats:
    path = os.path.join(folder, f"{name}{ext}")
    if os.path.isfile(path):
      return path
  return os.path.join(folder, name + ".{" + ",".join(e.lstrip(".") for e in formats) + "}")


# --- files ----------------------------------------------------------------------------
def read_json(path: str, what: str = "file"):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path}: not JSON ({e})") from None


def read_jsonl(path: str, *, torn_ok: bool = True) -> tuple[list[dict], int | None]:
  """JSON objects, one a line (blank lines skipped) -> (objects, offset). A last line that
  is cut short (no newline and not JSON: a kill mid-write) is dropped with a warning and
  `offset` is the byte length of the good part (else None); a bad line elsewhere raises
  ValueError naming file and line."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  out, pos = [], 0
  for n, raw in enumerate(lines):
    last = n == len(lines) - 1
    if raw.strip():
      try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        if last and torn_ok:
          log.warning("%s: dropping a torn last line (%d bytes, no newline)", path, len(raw))
          return out, pos
        raise ValueError(f"{path}:{n + 1}: not a JSON object ({e})") from None
      out.append(obj)
    pos += len(raw) + 1
  return out, None


def read_json_or_jsonl(path: str) -> list[dict]:
  """A JSON list, or JSON lines (the release reads some files either way)."""
  with open(path) as f:
    head = f.read(1).lstrip()
  if head == "[":
    data = read_json(path)
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list")
    bad = [i for i, r in enumerate(data) if not isinstance(r, dict)]
    if bad:
      raise ValueError(f"{path}: entry {bad[0]} is a {type(data[bad[0]]).__name__}, not a JSON object "
                       f"({len(bad):,} of {len(data):,} entries are not)")
    return data
  return read_jsonl(path)[0]


def default_key(rec: dict, id_field: str) -> str:
  if "key" in rec:
    return str(rec["key"])
  if id_field not in rec:
    raise ValueError(f"record has no {id_field!r}: {json.dumps(rec)[:200]}")
  return str(rec[id_field])


def keyed(rec: dict, item: Item, raw_id) -> dict:
  """rec plus `key: item.id` when the release's id (raw_id) does not name the item alone."""
  if str(raw_id) != item.id:
    rec["key"] = item.id
  return rec


# --- LLaVA-style question files (GQA, POPE, MME, VQAv2) ---------------------------------
def answer_id() -> str:
  """A random answer id (the release draws a 22-character `shortuuid`; nothing reads it)."""
  return uuid.uuid4().hex[:22]


def load_llava_jsonl(question_file: str, image_folder: str) -> list[Item]:
  """`{question_id, image, text, category}` per line (`model_vqa_loader.py`'s input) ->
  Items: prompt and Q-Former instruction are both `text` (the release passes the whole
  line text, instruction suffix included, to `update_prompt`)."""
  qs, torn = read_jsonl(question_file, torn_ok=False)
  for n, q in enumerate(qs):
    for k in ("question_id", "image", "text"):
      if k not in q:
        raise ValueError(f"{question_file}:{n + 1}: question {q.get('question_id', n)!r} has no {k!r}")
    if not isinstance(q["text"], str):
      raise ValueError(f"{question_file}:{n + 1}: 'text' is a {type(q['text']).__name__}, not a string")
  check_ids(question_file, [q["question_id"] for q in qs], "question_id")
  items = []
  for n, (q, iid) in enumerate(zip(qs, unique_ids(q.get("question_id") for q in qs))):
    items.append(Item(iid, q["text"], q["text"], media_path(image_folder, q["image"], f"{question_file}:{n + 1}"),
                      "image",
                      {"question_id": q["question_id"], "category": q.get("category"), "image": q["image"]}))
  return items


def llava_record(item: Item, pred: str, model_id: str = "llamavid-jax") -> dict:
  """`model_vqa_loader.py`'s answer line: {question_id, prompt, text, answer_id, model_id, metadata}."""
  rec = {"question_id": item.meta["question_id"], "prompt": item.instruction, "text": pred,
         "answer_id": answer_id(), "model_id": model_id, "metadata": {}}
  return keyed(rec, item, item.meta["question_id"])


def add_llava_arguments(parser, image_help: str = "image folder") -> None:
  parser.add_argument("--question-file", help="LLaVA-style .jsonl {question_id, image, text, category}")
  parser.add_argument("--image-folder", help=image_help)


def ratio(a: float, b: float) -> float:
  """a / b, 0.0 when b is 0 (where the release would divide by zero)."""
  return a / b if b else 0.0


def check_paths(files: dict[str, tuple[str, str]], args, mode: str) -> list[str]:
  """Problems with a module's FILES for `mode` ("run" | "score"): FILES maps an args
  attribute to (kind "file" | "dir", the space-separated modes that require it). A path
  that is given is checked in every mode."""
  errs = []
  for name, (kind, modes) in files.items():
    val = getattr(args, name, None)
    flag = "--" + name.replace("_", "-")
    if val is None:
      if mode in modes.split():
        errs.append(f"{flag} is required")
      continue
    if not (os.path.isdir(val) if kind == "dir" else os.path.isfile(val)):
      errs.append(f"{flag} {val}: no such {'folder' if kind == 'dir' else 'file'}")
  return errs
