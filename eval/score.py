"""Log-probability of an answer given media and a question, with the release's prompt.

  python -m eval.score --ckpt OUT|WORKDIR (--video FILE | --image FILE | --features FILE) \
      --question Q --answer A [--with-eos] [--dtype float32|bfloat16]

prints one JSON object {"logprob": sum over answer tokens, "token_logprobs": [...],
"num_tokens": n, "is_greedy": whether every answer token is the argmax at its position}. The prompt is the release's inference prompt (`llamavid/eval/
model_*_qa.py`): `vicuna_v1` with `<image>\\n` before the question,

  "{system} USER: <image>\\n{question} ASSISTANT:" + " {answer}"

video frames at 1 fps (CLIP resize + center crop, no padding), images padded to a
square of the mean colour first (`image_aspect_ratio: pad`), features as stored
(float[T, N+1, C] ViT outputs); the question alone is the Q-Former instruction. The
answer tokens are the tokens of prompt + " " + answer after the prompt's (the prompt's
ids are checked to be a prefix).

Multiple choice by answer log-likelihood, for any question + options file:

  python -m eval.score --ckpt DIR --choices FILE.json [--media-folder DIR] [--out PRED.jsonl]

scores every option as the answer and picks the most likely (summed log-probability;
`choice_mean` is the per-token mean), printing {count, with_answer, accuracy,
accuracy_mean}. The file format is `read_choices`'.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from eval import args as eval_args
from llamavid_jax import cli, inference, validation
from llamavid_jax.data import IMAGE_TOKEN_INDEX
from llamavid_jax.inference import inference_prompt  # noqa: F401  (the prompt, re-exported)
from llamavid_jax.data.conversation import tokenize_with_image

log = logging.getLogger("eval.score")


class Scorer:
  """A model loaded once (`inference.load`: a converted or inference directory, or a
  train WORKDIR's latest step); `score` per (media, question, answer)."""

  def __init__(self, ckpt: str | inference.Model, dtype: str = "float32"):
    self.m = ckpt if isinstance(ckpt, inference.Model) else inference.load(ckpt, dtype=dtype)
    self.cfg, self.params, self.tokenizer, self.qtokenizer = self.m.cfg, self.m.params, self.m.tokenizer, self.m.qtokenizer
    self._apply = {}   # video_mode -> jitted apply

  def token_ids(self, question: str, answer: str, with_eos: bool = False,
                media: inference.Media | None = None) -> tuple[list[int], int]:
    """-> (LLM ids of prompt + answer with the -200 placeholder(s), number of prompt
    ids). The prompt is `inference.Model.prompt`: the movie prompt for a movie."""
    prompt = self.m.prompt(question, media) if media is not None else inference_prompt(question)
    head = tokenize_with_image(prompt, self.tokenizer)
    full = tokenize_with_image(f"{prompt} {answer}", self.tokenizer)
    if full[:len(head)] != head or len(full) == len(head):
      log.warning("prompt ids are not a prefix of prompt + answer ids; tokenizing the answer alone")
      full = head + self.tokenizer(f" {answer}", add_special_tokens=False).input_ids
    if with_eos:
      full = full + [self.tokenizer.eos_token_id]
    return full, len(head)

  def score(self, question: str, answer: str, *, frames: np.ndarray | None = None,
            features: np.ndarray | None = None, media: inference.Media | None = None,
            with_eos: bool = False) -> dict:
    """frames: float32[T, S, S, 3], features: float32[T, N+1, C] or media (`Model.media`:
    a movie is scored with the movie prompt, in movie mode) -> the JSON dict."""
    if media is None:
      media = inference.Media("frames", frames) if frames is not None else inference.Media("features", features)
    ids, n_prompt = self.token_ids(question, answer, with_eos, media)
    validation.check_positions(self.cfg, prompt_ids=len(ids), num_frames=media.num_frames, max_new_tokens=0,
                               movie=media.is_movie, placeholders=ids.count(IMAGE_TOKEN_INDEX))
    q = self.qtokenizer(question, truncation=True, max_length=self.cfg.qformer.max_text_len)
    batch = dict(input_ids=jnp.asarray([ids], jnp.int32), text_mask=jnp.ones((1, len(ids)), bool),
                 frame_mask=jnp.ones((1, media.num_frames), bool),
                 qformer_ids=jnp.asarray([q.input_ids], jnp.int32),
                 qformer_mask=jnp.asarray([q.attention_mask], bool))
    batch[media.kind] = jnp.asarray(media.array, jnp.float32)[None]
    mode = "movie" if media.is_movie else "clip"
    if mode not in self._apply:
      self._apply[mode] = jax.jit(self.m.model_for([{"video_mode": mode}]).apply)
    logits, out = self._apply[mode]({"params": self.params}, **batch)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    lay = out["layout"]
    text_pos = np.asarray(lay.valid[0] & ~lay.is_vis[0])
    pos_of = {int(i): p for p, i in enumerate(np.asarray(lay.text_idx[0])) if text_pos[p]}
    positions = [pos_of[i] for i in range(n_prompt, len(ids))]     # spliced positions of the answer
    token_lp = [float(logp[p - 1, ids[i]]) for p, i in zip(positions, range(n_prompt, len(ids)))]
    best = np.asarray(jnp.argmax(logp, -1))
    greedy = all(int(best[p - 1]) == ids[i] for p, i in zip(positions, range(n_prompt, len(ids))))
    return {"logprob": float(sum(token_lp)), "token_logprobs": token_lp, "num_tokens": len(token_lp),
            "is_greedy": greedy}


# --- multiple choice by answer log-likelihood ------------------------------------------------
MEDIA_KEYS = ("video", "image", "features")


def read_choices(path: str, media_folder: str = "") -> list[dict]:
  """A question + options file: a JSON list (or JSON lines) of {id, question, options:
  [str, ...], answer: the right option's index or text (optional), and one of video /
  image / features: a path under `media_folder`}. Bad entries raise ValueError naming
  the file, the entry and the field."""
  from eval.benchmarks.common import check_ids, media_path, read_json_or_jsonl
  rows = read_json_or_jsonl(path)
  check_ids(path, [r.get("id", n) for n, r in enumerate(rows)])
  out = []
  for n, r in enumerate(rows):
    where = f"{path}: entry {n} (id {r.get('id', n)!r})"
    opts = r.get("options")
    if not isinstance(r.get("question"), str):
      raise ValueError(f"{where}: no 'question' string")
    if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
      raise ValueError(f"{where}: 'options' must be a list of at least 2 strings")
    media = [k for k in MEDIA_KEYS if r.get(k)]
    if len(media) != 1:
      raise ValueError(f"{where}: needs exactly one of {', '.join(MEDIA_KEYS)}")
    ans = r.get("answer")
    if isinstance(ans, str):
      if ans not in opts:
        raise ValueError(f"{where}: 'answer' {ans!r} is not one of its options")
      ans = opts.index(ans)
    elif ans is not None and not (isinstance(ans, int) and 0 <= ans < len(opts)):
      raise ValueError(f"{where}: 'answer' must be an option index in [0, {len(opts)}) or an option's text")
    out.append(dict(id=r.get("id", n), question=r["question"], options=opts, answer=ans,
                    kind=media[0], path=media_path(media_folder, r[media[0]], where)))
  return out


def choose(scorer: Scorer, rows: list[dict], with_eos: bool = False) -> list[dict]:
  """Scores every option of every row (`Scorer.score`) -> one record per row: {id,
  question, options, logprobs, choice (argmax of the summed log-probability),
  choice_mean (argmax of the mean per token: length-normalised), answer, correct}."""
  out = []
  for r in rows:
    media = scorer.m.media(**{r["kind"]: r["path"]})
    scores = [scorer.score(r["question"], o, with_eos=with_eos, media=media) for o in r["options"]]
    lp = [s["logprob"] for s in scores]
    mean = [s["logprob"] / max(s["num_tokens"], 1) for s in scores]
    choice, choice_mean = int(np.argmax(lp)), int(np.argmax(mean))
    out.append(dict(id=r["id"], question=r["question"], options=r["options"], logprobs=lp, choice=choice,
                    choice_mean=choice_mean, answer=r["answer"],
                    correct=None if r["answer"] is None else choice == r["answer"]))
  return out


def choice_accuracy(records: list[dict]) -> dict:
  """Accuracy of `choice` (and of `choice_mean`) over the records with an answer."""
  scored = [r for r in records if r["answer"] is not None]
  n = len(scored)
  return dict(count=len(records), with_answer=n,
              accuracy=sum(r["choice"] == r["answer"] for r in scored) / n if n else None,
              accuracy_mean=sum(r["choice_mean"] == r["answer"] for r in scored) / n if n else None)


def main(argv=None) -> dict:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  media = p.add_mutually_exclusive_group()
  media.add_argument("--video")
  media.add_argument("--image")
  media.add_argument("--features", help=".npy / .safetensors float[T, N+1, C] ViT features")
  p.add_argument("--question")
  p.add_argument("--answer")
  p.add_argument("--choices", help="multiple choice: a question + options JSON (see read_choices); "
                 "instead of --question/--answer and a media flag")
  p.add_argument("--media-folder", default="", help="--choices: the folder its media paths are under")
  p.add_argument("--out", help="--choices: write one JSON line per question here")
  p.add_argument("--with-eos", action="store_true", help="also score the closing </s>")
  a = p.parse_args(argv)
  eval_args.check_model_flags(p, a)
  if not os.path.isdir(a.ckpt):
    p.error(f"--ckpt {a.ckpt}: no such directory")
  if a.choices:
    if a.video or a.image or a.features or a.question or a.answer:
      p.error("--choices takes its questions, options and media from the file: drop --question/--answer/--video...")
    if not os.path.isfile(a.choices):
      p.error(f"--choices {a.choices}: no such file")
    errs = validation.check_out(a.out, {"--choices": a.choices})
    if errs:
      p.error("; ".join(errs))
    try:
      rows = read_choices(a.choices, a.media_folder)
    except ValueError as e:
      p.error(str(e))
    missing = [f"{r['id']}: {r['path']}" for r in rows if not os.path.isfile(r["path"])]
    if missing:
      p.error(f"{len(missing)} media file(s) not found: " + "; ".join(missing[:5]))
    records = choose(Scorer(eval_args.load(a)), rows, a.with_eos)
    if a.out:
      validation.write_atomic(a.out, "".join(json.dumps(r) + "\n" for r in records))
    summary = choice_accuracy(records)
    print(json.dumps(summary))
    return summary
  flags = [k for k in MEDIA_KEYS if getattr(a, k)]
  if not flags or a.question is None or a.answer is None:
    p.error("give --question, --answer and one of --video/--image/--features (or --choices FILE)")
  path, flag = getattr(a, flags[0]), flags[0]
  if not os.path.isfile(path):
    p.error(f"--{flag} {path}: no such file")
  scorer = Scorer(eval_args.load(a))
  try:
    media = scorer.m.media(**{flag: path})
  except inference.MediaError as e:
    p.exit(1, f"error: {e}\n")
  result = scorer.score(a.question, a.answer, with_eos=a.with_eos, media=media)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  cli.run(main)
