"""Chat with a checkpoint about a video, an image or a feature file.

  python -m eval.chat --ckpt DIR (--video F | --image F | --features F) [--question Q]
      [--temperature 0.2] [--top-p 0.7] [--max-new-tokens N] [--dtype float32|bfloat16]
      [--json] [--seed 0] [--prefill-chunk 0]

DIR: a converted / inference directory (`llamavid_jax.convert`, a run's WORKDIR/inference)
or a `train.train` WORKDIR (its latest step). With `--question` it prints one answer;
without it runs the release's interactive loop (`serve/cli.py`): "USER: " reads a
question as typed, only its line ending dropped, as the release's `input()` (an empty
line or end of input quits; a line that is not UTF-8 is named on stderr and skipped; a
question too long for the model's positions is named and dropped), "ASSISTANT: " streams the answer,
and the conversation goes on with the media in the latest turn and the latest question
as the Q-Former instruction (`llamavid_jax/inference.py` has the prompt). The history
keeps each answer without its `</s>` (the release stores it with, which doubles the
separator in its next prompt).

`--temperature 0` is greedy; the defaults are the release's sampling: its chat's
(temperature 0.2, top_p 0.7), or for a movie feature file its movie script's (0.6, 0.9). `--json`
prints one object per answer, {"text": ..., "token_ids": [...]}, the ids being the
generated LLM ids without the prompt and without `</s>` (in the loop: one line per
answer and nothing else, no "USER: " prompts). Arguments and files are checked before
the model is loaded; a file that is no video / image / feature file, or a directory
that holds no checkpoint, exits with a message naming it.

Answers come from the serving engine (`llamavid_jax/engine.py`: one decode slot, of
the power of two of cache positions that the question's prompt, in its buckets, and
its answer need; made anew, larger, when a later turn needs more), the one generation
loop that the server and the web demo run too; its tokens are
`inference.Model.generate`'s for the same request and sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eval import args as eval_args
from llamavid_jax import cli, inference, validation
from llamavid_jax import engine as engine_lib


DEFAULT_NEW_TOKENS = 512   # the release's chat


def parser(description: str = __doc__) -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  media = p.add_mutually_exclusive_group(required=True)
  media.add_argument("--video", help="a video file (frames at 1 fps)")
  media.add_argument("--image", help="an image file")
  media.add_argument("--features", help=".npy / .safetensors float[T, N+1, C] ViT features")
  p.add_argument("--question", help="ask once and exit (else: an interactive loop)")
  eval_args.add_sampling_flags(p, new_tokens=f"{DEFAULT_NEW_TOKENS}, or as many as the model's positions leave "
                              "after the prompt")
  p.add_argument("--json", action="store_true", help='print {"text", "token_ids"} per answer')
  return p


def release_sampling(kw: dict, media: inference.Media | None) -> dict:
  """kw with the temperature / top_p not given set to the release's: its movie script's
  (0.6 / 0.9, `inference.MOVIE`) for a movie, its chat's (0.2 / 0.7) otherwise."""
  default = inference.MOVIE if media is not None and media.is_movie else inference.CHAT
  return {**kw, **{k: default[k] for k in ("temperature", "top_p") if kw.get(k) is None}}


def check_ckpt(p: argparse.ArgumentParser, path: str) -> None:
  """`inference.check_ckpt` as a usage error of `p`."""
  try:
    inference.check_ckpt(path)
  except inference.CheckpointError as e:
    p.error(str(e))


def make_engine(m: inference.Model, positions: int, prefill_chunk: int = 0) -> engine_lib.Engine:
  """The chat's engine: one slot of `positions` cache positions."""
  return engine_lib.Engine(m, slots=1, max_positions=positions, max_queue=1, prefill_chunk=prefill_chunk)


def _engine_for(engines: list, m: inference.Model, req: dict, max_new_tokens: int, prefill_chunk: int):
  """engines[0], made (again) when it is missing or too small for `req`: sizes are powers
  of two, so a conversation compiles a few sizes at most."""
  need = engine_lib.prompt_positions(m, req) + max_new_tokens
  if engines and engines[0].max_positions >= need:
    return engines[0]
  for eng in engines:
    eng.close()
  engines[:] = [make_engine(m, 1 << (need - 1).bit_length(), prefill_chunk)]
  return engines[0]


def _turn(engines: list, m: inference.Model, turns: list[str], media: inference.Media, kw: dict,
          as_json: bool, out) -> str:
  """Streams one answer to `out` (or prints its JSON) -> the answer's text. Without
  --max-new-tokens, answers stop at 512 tokens or where the model's positions end."""
  req = m.request(turns, media)
  if kw.get("max_new_tokens") is None:
    kw = {**kw, "max_new_tokens": min(DEFAULT_NEW_TOKENS, m.room(req))}
  m.check_generation([req], **{k: kw[k] for k in ("max_new_tokens", "temperature", "top_p", "prefill_chunk")})
  eng = _engine_for(engines, m, req, kw["max_new_tokens"], kw["prefill_chunk"])   # nothing compiles before
  h = eng.submit(req, engine_lib.Sampling(max_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                                          top_p=kw["top_p"], seed=kw["seed"]))
  try:
    if as_json:
      ans = h.result()
      print(json.dumps({"text": ans.text, "token_ids": ans.token_ids}), file=out, flush=True)
      return ans.text
    for piece in h:
      print(piece, end="", file=out, flush=True)
    print(file=out, flush=True)
    return h.result().text
  finally:
    h.cancel()


def main(argv=None, stdin=None, stdout=None) -> None:
  p = parser()
  a = p.parse_args(argv)
  eval_args.check_model_flags(p, a)
  kw = eval_args.check_sampling_flags(p, a)
  check_ckpt(p, a.ckpt)
  flag = next(k for k in ("video", "image", "features") if getattr(a, k))
  path = getattr(a, flag)
  if not os.path.isfile(path):
    p.error(f"--{flag} {path}: no such file")
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  try:
    m = eval_args.load(a)
  except FileNotFoundError as e:   # a directory that holds no checkpoint
    sys.exit(f"error: --ckpt {e}")
  try:
    media = m.media(**{flag: path})
  except inference.MediaError as e:
    sys.exit(f"error: {e}")
  kw = release_sampling(kw, media)
  engines: list[engine_lib.Engine] = []
  try:
    _chat(a, m, engines, media, kw, stdin, stdout)
  finally:
    for eng in engines:
      eng.close()


def _chat(a: argparse.Namespace, m: inference.Model, engines: list, media: inference.Media, kw: dict,
          stdin, stdout) -> None:
  """One question (--question) or the interactive loop."""
  if a.question is not None:
    try:
      _turn(engines, m, [a.question], media, kw, a.json, stdout)
    except validation.BudgetError as e:
      sys.exit(f"error: {e}")
    return
  turns: list[str] = []
  user, bot = "USER", "ASSISTANT"

  def say(text: str, end: str = "") -> None:   # the loop's prompts: not with --json (JSON lines only)
    if not a.json:
      print(text, end=end, file=stdout, flush=True)

  lines = read_lines(stdin)
  while True:
    say(f"{user}: ")
    line = next(lines, None)
    if isinstance(line, UnicodeDecodeError):   # the loop goes on: the line is named and dropped
      print(f"eval.chat: that line is not UTF-8 text (byte {line.start}: {line.object[line.start:line.start + 1]!r}); "
            "it was ignored", file=sys.stderr, flush=True)
      continue
    if not line:   # end of input, or an empty line (the release's `if not inp`)
      say("exit...", end="\n")
      return
    say(f"{bot}: ")
    try:
      answer = _turn(engines, m, turns + [line], media, kw, a.json, stdout)
    except validation.BudgetError as e:   # too long for the model: the turn is dropped, the chat goes on
      say("", end="\n")
      print(f"eval.chat: {e}; that question was dropped", file=sys.stderr, flush=True)
      continue
    turns += [line, answer]


def read_lines(stdin):
  """The lines of `stdin` without their line ending (what the release's `input()` gives),
  or a UnicodeDecodeError for a line that is not UTF-8 (from the byte stream when there
  is one, so that one bad line loses only itself); ends at end of input."""
  raw = getattr(stdin, "buffer", None)
  while True:
    if raw is not None:
      data = raw.readline()
      if not data:
        return
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError as e:
        yield e
        continue
    else:
      try:
        line = stdin.readline()
      except UnicodeDecodeError as e:
        yield e
        continue
      if not line:
        return
    yield line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line


if __name__ == "__main__":
  cli.run(main)
