"""Tiny generated fixtures for the data tests: tokenizers, media, LLaVA JSON.

The LLM tokenizer is a word-level tokenizer with sentencepiece-like spacing
(Metaspace, `▁` word prefix, legacy "always" prepending, newline its own piece), so
the expected ids of the templates can be written by hand:

  0 <unk>  1 <s>  2 </s>
  3..24    the words of the vicuna system text (SYSTEM_IDS, "and" twice -> 9)
  25 ▁USER:  26 ▁ASSISTANT:  27 ▁ (a trailing space)  28 ▁\\n
  29 ▁What  30 ▁is  31 ▁this?  32 ▁cat.  33 ▁color?  34 ▁Red.  35 ▁Hello
  36 ▁Hi.  37 ▁Describe  38 ▁it.  39 ▁dog  40 ▁runs.   (▁A is 3)

The BERT vocab: 0 [PAD] 1 [UNK] 2 [CLS] 3 [SEP] 4 [MASK] 5 what 6 is 7 this 8 ?
9 describe 10 it 11 . 12 color 13 hello; `[DEC]` is added as 14.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from llamavid_jax.models.config import InputSpec

# The model side of the data tests: 2 tokens per frame, 16 px images, (5, 8) features.
SPEC = InputSpec(tokens_per_frame=2, image_size=16, feature_shape=(5, 8))

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_IDS = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 9, 19, 20, 21, 22, 23, 24]
WORDS = ["USER:", "ASSISTANT:", "", "\n", "What", "is", "this?", "cat.", "color?", "Red.", "Hello",
         "Hi.", "Describe", "it.", "dog", "runs."]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "this", "?", "describe",
              "it", ".", "color", "hello"]


def make_llm_tokenizer(path: str, *, prepend_scheme: str = "always") -> str:
  """Saves the tiny LLM tokenizer (a transformers `PreTrainedTokenizerFast` dir)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  pieces = ["<unk>", "<s>", "</s>"]
  for w in SYSTEM.split() + WORDS:
    if "▁" + w not in pieces:
      pieces.append("▁" + w)
  vocab = {p: i for i, p in enumerate(pieces)}
  assert vocab["▁questions."] == 24 and vocab["▁runs."] == 40, vocab
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\n", "isolated"),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)])
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")
  fast.save_pretrained(path)
  return path


def make_bert_tokenizer(path: str) -> str:
  """Saves a tiny bert-base-uncased-style directory (vocab.txt + config)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(BERT_VOCAB) + "\n")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
  return path


def make_root(root: str) -> str:
  """A data root with the tiny tokenizers (`llm/`, `bert/`) and an empty `videos/`."""
  make_llm_tokenizer(os.path.join(root, "llm"))
  make_bert_tokenizer(os.path.join(root, "bert"))
  os.makedirs(os.path.join(root, "videos"))
  return root


def random_image(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
  """A random PIL image of size (w, h) in `mode` (RGB, RGBA, P, L, LA)."""
  rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  if mode == "RGBA":
    alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    return Image.merge("RGBA", (*rgb.split(), alpha))
  if mode == "P":
    return rgb.quantize(colors=17)
  return rgb.convert(mode)


def write_video(path: str, *, frames: int, fps: int = 4, size: tuple[int, int] = (32, 24)) -> str:
  """Writes a tiny mpeg4 clip of `frames` frames (0 frames: a header-only file)."""
  import av

  with av.open(path, "w") as out:
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    if not frames:  # a container without any video frame (nor track)
      out.start_encoding()
    rng = np.random.default_rng(frames)
    for _ in range(frames):
      arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


def qa(question: str, answer: str, *more: str) -> list[dict[str, str]]:
  """A conversations list: human, gpt, human, gpt, ..."""
  texts = (question, answer, *more)
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def write_dataset(root: str, samples: list[dict]) -> str:
  """Writes `root/data.json`; returns its path."""
  path = os.path.join(root, "data.json")
  with open(path, "w") as f:
    json.dump(samples, f)
  return path


def image_samples(root: str, n: int, *, seed: int = 0) -> list[dict]:
  """`n` image samples with odd-size RGB/RGBA/P/L images under `root/images`."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  modes = ["RGB", "RGBA", "P", "L"]
  out = []
  for i in range(n):
    name = f"img{i}.png"
    random_image(rng, 9 + i % 5, 7 + (3 * i) % 4, modes[i % 4]).save(os.path.join(root, "images", name))
    out.append({"id": f"img{i}", "image": name, "conversations": qa("<image>\nWhat is this?", "A cat.")})
  return out
