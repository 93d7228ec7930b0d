"""Subtitles of a movie (`.srt` / `.vtt`) and the release's rule placing them on frames.

Parsing (`parse_subtitles`, `read_subtitles`): cues are blocks separated by blank lines,
each with one timing line `START --> END` (`HH:MM:SS,mmm` or `HH:MM:SS.mmm`; the hours
may be left out, as WebVTT allows; a fraction of fewer digits reads as a decimal fraction,
as the release's `strptime("%f")` does; VTT cue settings after END are ignored). Lines
before the timing line are the cue's number (SRT) or identifier (VTT); the lines after it
are its text, joined with one space. The `WEBVTT` header block and `NOTE`, `STYLE` and
`REGION` blocks are skipped; text after a blank line that is not followed by a timing line
(or that precedes a cue's number) continues the cue before it, as the release's reader
joins every line up to the next cue number. Text is cleaned
as the release's SRT reader (`scripts/extra_tool/extract_movienet_features.py`) cleans it
-- NUL characters dropped, every "..." removed, ends stripped -- after HTML entities are
decoded and markup is dropped (`<i>`, `</b>`, `<c.yellow>`, `<v Name>`, VTT timestamps
`<00:01.500>`, ASS overrides `{\\an8}`, and any literal `<image>`). Cues left without
text are dropped (the release's `check`). Errors name the file and line
(`SubtitleError`): a timing line that does not parse, END before START, text before the
first cue, a file that does not decode, or no cue at all. Encoding: a byte order mark
decides (UTF-8, UTF-16, UTF-32), else the one given (`--subtitle-encoding`), else UTF-8;
a confident guess is only offered in the error message.

Placement (`frame_texts`, `movie_inputs`): the release's `load_video_input` (both
extraction scripts). Cues are taken in file order with a pointer over the frames that
never moves back: for each cue it advances past every frame shown before the cue ends
(`frame_time < end`, strictly), and the cue's text goes after the last frame passed, i.e.
after the last frame shown before the line ends. A cue ending before a later-listed
frame than an earlier cue (overlapping or out-of-order cues) therefore stays where the
pointer already is, as in the release. The texts of one frame are joined with a space,
and `inputs` = "<image>" + texts of frame 0 + "<image>" + texts of frame 1 + ...

One deliberate difference: a cue that ends at or before the first frame's time (0 s at
1 fps) passes no frame; the release then indexes `text_list[-1]` and appends it to the
LAST frame of the movie. Here it goes on frame 0, where it was shown.
"""

from __future__ import annotations

import codecs
import dataclasses
import html
import re
from typing import Sequence

from llamavid_jax.data.features import IMAGE_TOKEN, MovieError

SUFFIXES = (".srt", ".vtt")

_TIME = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2})[,.](\d{1,9})$")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<\d[\d:.]*>|\{\\[^{}]*\}")
_SKIPPED_BLOCKS = ("NOTE", "STYLE", "REGION")


class SubtitleError(MovieError):
  """A subtitle file that cannot be read: `reason` is `bad_subtitles` (or `missing_file`)."""

  def __init__(self, detail: str, path: str, line: int | None = None, reason: str = "bad_subtitles"):
    super().__init__(reason, f"line {line}: {detail}" if line else detail, path)


@dataclasses.dataclass(frozen=True)
class Cue:
  """One subtitle line: shown from `start` to `end` (seconds), `text` cleaned."""
  start: float
  end: float
  text: str


def parse_time(s: str) -> float | None:
  """`HH:MM:SS,mmm`, `HH:MM:SS.mmm` or `MM:SS.mmm` -> seconds; None if it does not parse."""
  m = _TIME.match(s.strip())
  if not m:
    return None
  h, mi, sec, frac = m.groups()
  if int(mi) > 59 or int(sec) > 59:
    return None
  return int(h or 0) * 3600 + int(mi) * 60 + int(sec) + int(frac) / 10 ** len(frac)


def clean_text(line: str) -> str:
  """One text line: entities decoded, markup dropped, NUL and "..." removed (the release's
  reader), ends stripped."""
  line = _TAG.sub("", html.unescape(line.replace("\x00", "")))
  return line.replace(IMAGE_TOKEN, "").strip().replace("...", "").strip()


def _timing(line: str, path: str, num: int) -> tuple[float, float]:
  left, _, right = line.partition("-->")
  fields = right.split()
  start, end = parse_time(left), parse_time(fields[0]) if fields else None
  if start is None or end is None:
    raise SubtitleError(f"cannot read the timing line {line.strip()[:80]!r} (expected HH:MM:SS,mmm --> "
                        "HH:MM:SS,mmm)", path, num)
  if end < start:
    raise SubtitleError(f"the cue ends ({fields[0]}) before it starts ({left.strip()})", path, num)
  return start, end


def parse_subtitles(text: str, path: str = "<subtitles>") -> list[Cue]:
  """The cues of an SRT or WebVTT document, in file order (module docstring)."""
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  blocks, cur = [], []   # [(first line number, [lines])]
  for num, line in enumerate(lines, 1):
    if line.replace("\x00", "").strip():
      cur.append((num, line.replace("\x00", "").strip()))
    elif cur:
      blocks.append(cur)
      cur = []
  if cur:
    blocks.append(cur)
  cues: list[list] = []   # [start, end, [texts]]
  for i, block in enumerate(blocks):
    first = block[0][1]
    if (i == 0 and first.startswith("WEBVTT")) or first.split(" ")[0] in _SKIPPED_BLOCKS:
      continue
    timings = [k for k, (_, line) in enumerate(block) if "-->" in line]
    # the lines before the first timing line, but its number / identifier, continue the cue before
    more = block[:max(timings[0] - 1, 0)] if timings else block
    if more:
      if not cues:
        raise SubtitleError(f"text before the first cue: {more[0][1][:80]!r}", path, more[0][0])
      cues[-1][2] += [t for _, line in more if (t := clean_text(line))]
    for j, k in enumerate(timings):
      num, line = block[k]
      stop = timings[j + 1] if j + 1 < len(timings) else len(block)
      if j + 1 < len(timings) and block[stop - 1][1].isdigit() and stop - 1 > k:
        stop -= 1   # the next cue's number, written without a blank line before it
      start, end = _timing(line, path, num)
      cues.append([start, end, [t for _, text in block[k + 1:stop] if (t := clean_text(text))]])
  out = [Cue(s, e, " ".join(t)) for s, e, t in cues if t]
  if not out:
    raise SubtitleError("no subtitle cue found (expected SRT or WebVTT cues: a START --> END line, then "
                        "the text)", path)
  return out


# byte order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one)
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def decode_subtitles(data: bytes, path: str, encoding: str | None = None) -> str:
  """The text of a subtitle file's bytes: a byte order mark decides the encoding (UTF-8,
  UTF-16, UTF-32), else `encoding` (`--subtitle-encoding`), else UTF-8. A file that does not decode raises
  SubtitleError naming the byte; a confident guess (charset-normalizer) is offered in
  the message, never applied (where several encodings read it equally well with other
  letters, they are listed and none is offered)."""
  for bom, enc in BOMS:
    if data.startswith(bom):
      data, encoding, why = data[len(bom):], enc, "its byte order mark"
      break
  else:
    why = "--subtitle-encoding" if encoding else "the default (no byte order mark)"
    encoding = encoding or "utf-8"
  try:
    codecs.lookup(encoding)
  except LookupError:
    raise SubtitleError(f"unknown encoding {encoding!r}", path) from None
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    guesses = [g for g in _guess(data) if g != encoding]
    if len(guesses) == 1:
      hint = f"; it looks like {guesses[0]}: give --subtitle-encoding {guesses[0]}"
    elif guesses:   # several read it equally well, each with other letters: no guess is offered as the one
      hint = (f"; it reads as any of {', '.join(guesses[:6])}{' ...' if len(guesses) > 6 else ''} (each "
              "with other letters): give its encoding with --subtitle-encoding")
    else:
      hint = "; give its encoding with --subtitle-encoding"
    raise SubtitleError(f"not {encoding} text (byte {e.start}: {data[e.start:e.start + 1]!r}; {encoding} is "
                        f"{why}){hint}", path) from None


def _guess(data: bytes) -> list[str]:
  """charset-normalizer's best encoding when it is confident: chaos < 10% and every
  encoding that reads the bytes as well (same chaos and coherence) gives the same text
  -> [it]; when such encodings give different texts (cp1250 and cp1252 on French
  subtitles: "crčme" or "crème") -> all of them; else []."""
  try:
    from charset_normalizer import from_bytes
  except ImportError:
    return []
  results = from_bytes(data[:65536])
  best = results.best()
  if best is None or best.chaos >= 0.1:
    return []
  tied = [m for m in results if abs(m.chaos - best.chaos) < 1e-6 and abs(m.coherence - best.coherence) < 1e-6]
  return [best.encoding] if len({str(m) for m in tied}) <= 1 else [m.encoding for m in tied]


def read_subtitles(path: str, encoding: str | None = None) -> list[Cue]:
  """The cues of a `.srt` / `.vtt` file (`decode_subtitles`: BOM, else `encoding`, else
  UTF-8); raises SubtitleError."""
  if not path.lower().endswith(SUFFIXES):
    raise SubtitleError(f"not a subtitle file (expected one of {SUFFIXES})", path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise SubtitleError("file not found", path, reason="missing_file") from None
  except OSError as e:
    raise SubtitleError(f"{type(e).__name__}: {e}", path) from None
  return parse_subtitles(decode_subtitles(data, path, encoding), path)


def frame_texts(cues: Sequence[Cue], frame_times: Sequence[float]) -> list[list[str]]:
  """The texts after each frame by the release's rule (module docstring): one list per
  frame of `frame_times` (seconds, increasing)."""
  texts: list[list[str]] = [[] for _ in frame_times]
  point = 0
  for cue in cues:
    while point < len(frame_times) and frame_times[point] < cue.end:
      point += 1
    if texts:
      texts[max(point - 1, 0)].append(cue.text)
  return texts


def movie_inputs(cues: Sequence[Cue], frame_times: Sequence[float]) -> str:
  """The release's `inputs`: "<image>" + texts of frame 0 + "<image>" + ... (T placeholders)."""
  return "".join(IMAGE_TOKEN + " ".join(t) for t in frame_texts(cues, frame_times))
