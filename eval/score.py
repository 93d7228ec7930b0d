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
ids are checked to be a prefix). Multiple-choice benchmarks call `Scorer.score` per
option.
"""

from __future__ import annotations

import argparse
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

from llamavid_jax import inference
from llamavid_jax.inference import inference_prompt  # noqa: F401  (the prompt, re-exported)
from llamavid_jax.data.conversation import tokenize_with_image
from llamavid_jax.models import LlamaVid

log = logging.getLogger("eval.score")


class Scorer:
  """A model loaded once (`inference.load`: a converted or inference directory, or a
  train WORKDIR's latest step); `score` per (media, question, answer)."""

  def __init__(self, ckpt: str | inference.Model, dtype: str = "float32"):
    self.m = ckpt if isinstance(ckpt, inference.Model) else inference.load(ckpt, dtype=dtype)
    self.cfg, self.params, self.tokenizer, self.qtokenizer = self.m.cfg, self.m.params, self.m.tokenizer, self.m.qtokenizer
    self._apply = jax.jit(LlamaVid(self.cfg).apply)

  def token_ids(self, question: str, answer: str, with_eos: bool = False) -> tuple[list[int], int]:
    """-> (LLM ids of prompt + answer with one -200, number of prompt ids)."""
    prompt = inference_prompt(question)
    head = tokenize_with_image(prompt, self.tokenizer)
    full = tokenize_with_image(f"{prompt} {answer}", self.tokenizer)
    if full[:len(head)] != head or len(full) == len(head):
      log.warning("prompt ids are not a prefix of prompt + answer ids; tokenizing the answer alone")
      full = head + self.tokenizer(f" {answer}", add_special_tokens=False).input_ids
    if with_eos:
      full = full + [self.tokenizer.eos_token_id]
    return full, len(head)

  def score(self, question: str, answer: str, *, frames: np.ndarray | None = None,
            features: np.ndarray | None = None, with_eos: bool = False) -> dict:
    """frames: float32[T, S, S, 3] or features: float32[T, N+1, C] -> the JSON dict."""
    ids, n_prompt = self.token_ids(question, answer, with_eos)
    q = self.qtokenizer(question, truncation=True, max_length=self.cfg.qformer.max_text_len)
    media = frames if frames is not None else features
    batch = dict(input_ids=jnp.asarray([ids], jnp.int32), text_mask=jnp.ones((1, len(ids)), bool),
                 frame_mask=jnp.ones((1, media.shape[0]), bool),
                 qformer_ids=jnp.asarray([q.input_ids], jnp.int32),
                 qformer_mask=jnp.asarray([q.attention_mask], bool))
    batch["frames" if frames is not None else "features"] = jnp.asarray(media, jnp.float32)[None]
    logits, out = self._apply({"params": self.params}, **batch)
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


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="converted / inference directory (llamavid_jax.convert, "
                 "WORKDIR/inference) or a train.train WORKDIR (its latest step)")
  media = p.add_mutually_exclusive_group(required=True)
  media.add_argument("--video")
  media.add_argument("--image")
  media.add_argument("--features", help=".npy / .safetensors float[T, N+1, C] ViT features")
  p.add_argument("--question", required=True)
  p.add_argument("--answer", required=True)
  p.add_argument("--with-eos", action="store_true", help="also score the closing </s>")
  p.add_argument("--dtype", default="float32", choices=inference.DTYPES)
  a = p.parse_args(argv)
  path, flag = next((getattr(a, k), k) for k in ("video", "image", "features") if getattr(a, k))
  inference.check_file(path, f"--{flag}")
  scorer = Scorer(a.ckpt, dtype=a.dtype)
  media = scorer.m.media(**{flag: path})
  kw = {media.kind: media.array}
  print(json.dumps(scorer.score(a.question, a.answer, with_eos=a.with_eos, **kw)))


if __name__ == "__main__":
  main()
