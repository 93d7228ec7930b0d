"""lmms-eval (0.7.3) model `llamavid_jax`: our inference core behind lmms-eval's `lmms` API.

  pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3   # see pyproject's `lmms` extra
  lmms-eval --model llamavid_jax --model_args ckpt=DIR[,dtype=bfloat16,max_frames=N] \\
      --tasks T [--include_path TASKS_DIR] --batch_size 8 --log_samples --output_path OUT

The model registers through the entry point `lmms_eval.models` (pyproject.toml: `llamavid_jax =
"eval.lmms_adapter:manifest"`); lmms-eval's own `llama_vid` is the PyTorch release and needs
its code and CUDA. `ckpt` is what `inference.load` takes: a converted / inference directory
or a train WORKDIR (its latest step).

model_args: ckpt, dtype (float32 | bfloat16), batch_size (the serving engine's decode
slots: requests answered at once; wins over the CLI's --batch_size), max_frames (videos
with more frames at 1 fps are sampled uniformly down to this many; default all),
max_new_tokens (default 1024, when the task's generation_kwargs name none), seed
(sampling; the k-th generate_until request uses seed + k), quant (int8 |
int4 LLM weights), kv_cache (int8), and the mesh one axis a model_arg: mesh_data,
mesh_fsdp, mesh_tensor, mesh_sequence (`mesh_tensor=8` splits the model, `mesh_data=8`
replicates it; generate_until's engine does not split its slots over `data` yet;
`eval.run --mesh` says more).

Requests. The task's context is the question: any `<image>` in it is removed and the
release's prompt (`inference.inference_prompt`: vicuna_v1, `<image>\\n` before the
question) is built around it; the question alone is the Q-Former instruction.
`doc_to_visual(doc)` gives the media: one video / image / feature path (by suffix,
`inference.media_kind`), or PIL images, `visual_media`: one image is padded to a square of
the mean colour when the checkpoint's image_aspect_ratio is `pad` and CLIP-preprocessed at
the vision tower's size (`Model.image_media`); several images (or image paths) are the
frames of one clip, preprocessed as a video's frames, resized and centre-cropped without
padding (`Model.frames_media`), as `eval.serve` takes several image_url parts, which is
how lmms-eval's own `openai` backend sends a clip. Text-only requests are refused (the
model always sees media).

generate_until: the requests go through `eval.predict.Answerer`, the serving engine
(`llamavid_jax/engine.py`, continuous batching: `batch_size` decode slots, a slot taking
the next request as soon as its answer ends) that eval.run's predictor, eval.chat,
eval.web and eval.serve answer through; each request has its own generation kwargs, and
its answer is `Model.generate([request])`'s with them. Honoured: max_new_tokens,
temperature (0, or do_sample false: greedy), top_p, until (stop strings; the answer is cut
before the first). top_k is not (the engine samples with top_p alone; a warning says so
when a sampled task sets it), nor num_beams > 1 (greedy, with a warning). Answers are
`Completion.text`: decoded up to `</s>`, cut at the stop strings, stripped. Media that
cannot be read, or a prompt and budget over the model's positions, raise as before.

loglikelihood: `eval.score.Scorer.score(question, continuation)` per request (batch of
one), i.e. the sum of the continuation tokens' log-probabilities after
"... ASSISTANT:" + " " + continuation (the continuation's leading whitespace, lmms-eval's
target_delimiter, is the template's space); is_greedy is whether every continuation token
is the argmax at its position. The media of a doc is loaded once for all its options.

lmms-eval 0.7.3 quirks handled here:
- `multiple_choice` picks `argmin` of the returned values (its built-in models return
  losses; EvolvingLMMs-Lab/lmms-eval#370), while output_type `loglikelihood`'s perplexity
  metric takes exp(-mean(values)), i.e. log-probabilities. Requests whose continuation is a
  string (multiple_choice: one request per option) get the negative log-likelihood, so the
  chosen option is the most likely one; requests carrying the task's doc_to_target
  (output_type loglikelihood) get the log-likelihood.
- The evaluator passes every result through `unwrap_generation_output`, which turns a
  `(float, bool)` tuple into its string; loglikelihood results are therefore returned
  wrapped in `GenerationResult(text=(value, is_greedy))`, which it unwraps unchanged.
- acc_mutual_info's unconditional requests `("", choice)` have no media: refused
  (NotImplementedError), as is `generate_until_multi_round`.
- The CLI always passes `batch_size` (default 1) besides model_args; model_args' batch_size
  wins (`create_from_arg_string`). `device` is ignored: JAX places the model on its default
  backend (JAX_PLATFORMS). One process: no accelerate / torchrun data parallelism.
- lmms-eval 0.7.3 must be installed with --no-deps (its declared dependencies pull
  torchvision, and with it a CUDA torch, wandb, sentence_transformers, ...); the `lmms`
  extra lists what its evaluator, CLI and simple local tasks import, without lmms-eval
  itself (pip would resolve its dependencies again), and filelock<4 (the evaluator patches
  `filelock._api`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

try:
  from lmms_eval.api.instance import Instance
  from lmms_eval.api.model import lmms
except ImportError as e:   # lmms-eval is an optional extra
  raise ImportError(f"eval.lmms_adapter needs lmms-eval ({e}): pip install -e '.[lmms]' && "
                    "pip install --no-deps lmms-eval==0.7.3 (see pyproject.toml's lmms extra)") from e

try:
  from lmms_eval.api.instance import GenerationResult
except ImportError:   # lmms-eval before 0.7 returns tuples as they are
  GenerationResult = None


log = logging.getLogger("eval.lmms_adapter")

MODEL_ID = "llamavid_jax"
_GEN_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "until", "do_sample", "num_beams"}
_IGNORED_KEYS = {"use_cache", "image_aspect_ratio", "max_length"}   # no effect here


def manifest():
  """The `lmms_eval.models` entry point's payload."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id=MODEL_ID, simple_class_path="eval.lmms_adapter.LlamaVidJax")


def visual_media(m, visuals: Sequence[Any], max_frames: int | None = None):
  """`doc_to_visual(doc)` (a list) -> inference.Media: PIL images (one, or several as the
  frames of one clip) or one video / image / feature path. Videos with more than
  `max_frames` frames at 1 fps are sampled uniformly down to `max_frames`."""
  from PIL import Image

  from llamavid_jax import inference
  visuals = [v for v in (visuals or []) if v is not None]
  if not visuals:
    raise ValueError("no visual for this doc: llamavid_jax answers about a video, image or features, "
                     "text-only requests are not supported")
  if all(isinstance(v, Image.Image) for v in visuals):
    media = m.image_media(visuals[0], "<PIL image>") if len(visuals) == 1 else m.frames_media(visuals, "<PIL frames>")
  elif len(visuals) == 1 and isinstance(visuals[0], str):
    path = visuals[0]
    media = m.media(**{inference.media_kind(path): inference.check_file(path, "doc_to_visual")})
  elif all(isinstance(v, str) and inference.media_kind(v) == "image" for v in visuals):
    from llamavid_jax.data.image import load_image
    media = m.frames_media([load_image(v) for v in visuals], visuals[0])
  else:
    kinds = sorted({type(v).__name__ for v in visuals})
    raise ValueError(f"unsupported visuals {kinds} x {len(visuals)}: expected PIL images or one video / "
                     "image / feature path")
  if max_frames and media.num_frames > max_frames:
    from llamavid_jax.data.frames import uniform_cap
    media = inference.Media(media.kind, media.array[uniform_cap(media.num_frames, max_frames)], media.path)
  return media


def _strip(context) -> str:
  from llamavid_jax.data import IMAGE_TOKEN
  context = context[0] if isinstance(context, (list, tuple)) else context
  return str(context).replace(IMAGE_TOKEN, "").strip()


def model_flags(kwargs: dict) -> dict:
  """Pops the model_args that say how the model is held -> the checked model flags as
  `eval.args.load` takes them (quant, kv_cache, mesh_sizes): quant (int8 | int4),
  kv_cache (int8) and the mesh as one model_arg an axis (`mesh_tensor=4,mesh_sequence=2`:
  lmms-eval splits model_args at ',' and '=', so the CLIs' `--mesh tensor=4,sequence=2`
  cannot travel whole); a bad value is a ValueError naming it, before anything loads."""
  from eval import args as eval_args
  from llamavid_jax.models.config import KV_CACHES
  out = {}
  for key, choices in (("quant", eval_args.QUANT), ("kv_cache", KV_CACHES)):
    value = kwargs.pop(key, None)
    if value not in (None, "", "None"):
      if value not in choices:
        raise ValueError(f"llamavid_jax: model_arg {key}={value!r} is not one of {', '.join(choices)}")
      out[key] = value
  axes = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("mesh_")]}
  if axes:
    axes = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in axes.items()}   # lmms-eval: "-1" -> -1.0
    text = ",".join(f"{k[len('mesh_'):]}={v}" for k, v in axes.items())
    try:
      out["mesh_sizes"] = eval_args.parse_mesh(text)
    except ValueError as e:
      raise ValueError(f"llamavid_jax: model_args {', '.join(f'{k}={v}' for k, v in axes.items())}: {e}") from None
  return out


class LlamaVidJax(lmms):
  """lmms-eval `simple` model over `llamavid_jax.inference.Model` (see the module doc)."""

  is_simple = True

  def __init__(self, ckpt: str, dtype: str = "float32", batch_size: int | str = 1, max_frames: int | str | None = None,
               max_new_tokens: int | str = 1024, seed: int | str = 0, device: str | None = None, **kwargs) -> None:
    super().__init__()
    kwargs.pop("max_batch_size", None)
    flags = model_flags(kwargs)   # mesh_<axis>, quant, kv_cache: checked before anything loads
    if kwargs:
      raise TypeError(f"llamavid_jax: unknown model_args {sorted(kwargs)}; known: ckpt, dtype, batch_size, "
                      "max_frames, max_new_tokens, seed, quant, kv_cache, mesh_<axis>")
    if str(batch_size).startswith("auto"):
      raise ValueError("llamavid_jax: batch_size 'auto' is not supported; give a number")
    from eval import args as eval_args
    self.batch_size_per_device = int(batch_size)
    self.max_frames = int(max_frames) if max_frames not in (None, "", "None") else None
    self.max_new_tokens = int(max_new_tokens)
    self.seed = int(seed)
    if device:
      log.info("llamavid_jax: device %r ignored; JAX uses its default backend (JAX_PLATFORMS)", device)
    self.m = eval_args.load(argparse.Namespace(ckpt=ckpt, dtype=dtype, **flags))   # the CLIs' one load
    self._scorer = None
    self._warned: set[str] = set()
    self._requests = 0   # generate_until requests so far: request k samples with seed + k

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """model_args win over the CLI's additional config (its --batch_size defaults to 1)."""
    from lmms_eval import utils
    args = utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
    return cls(**args, **extra)

  @property
  def batch_size(self) -> int:
    return self.batch_size_per_device

  @property
  def scorer(self):
    if self._scorer is None:
      from eval.score import Scorer
      self._scorer = Scorer(self.m)
    return self._scorer

  def _warn_once(self, msg: str) -> None:
    if msg not in self._warned:
      self._warned.add(msg)
      log.warning(msg)

  def _doc_media(self, doc_to_visual, doc_id, task, split):
    doc = self.task_dict[task][split][doc_id]
    return doc, visual_media(self.m, doc_to_visual(doc), self.max_frames)

  def _sampling(self, gen_kwargs: dict | None) -> dict:
    """lmms-eval generation_kwargs -> Model.generate's keywords."""
    g = dict(gen_kwargs or {})
    unknown = sorted(set(g) - _GEN_KEYS - _IGNORED_KEYS)
    if unknown:
      self._warn_once(f"llamavid_jax: generation_kwargs {unknown} are ignored")
    if int(g.get("num_beams") or 1) > 1:
      self._warn_once("llamavid_jax: num_beams > 1 is not supported; decoding greedily / by sampling")
    until = g.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(g.get("temperature") or 0.0)
    if g.get("do_sample") is False:
      temperature = 0.0
    if int(g.get("top_k") or 0) and temperature > 0:
      self._warn_once("llamavid_jax: top_k is not supported by the serving engine; sampling with top_p alone")
    return {"max_new_tokens": int(g.get("max_new_tokens") or self.max_new_tokens), "temperature": temperature,
            "top_p": float(g["top_p"]) if g.get("top_p") is not None else 1.0, "top_k": int(g.get("top_k") or 0),
            "stop": tuple(s for s in until if s)}

  # --- lmms API -------------------------------------------------------------------
  def generate_until(self, requests: list[Instance]) -> list[str]:
    from tqdm import tqdm

    from eval.predict import Answerer
    from llamavid_jax import engine as engine_lib

    def job(r: Instance):
      def read():
        kw = self._sampling(r.args[1])
        context, _, doc_to_visual, doc_id, task, split = r.args
        req = self.m.request(_strip(context), self._doc_media(doc_to_visual, doc_id, task, split)[1])
        self.m.check_generation([req], **{k: kw[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")})
        seed, self._requests = self.seed + self._requests, self._requests + 1
        return req, engine_lib.Sampling(max_tokens=kw["max_new_tokens"], temperature=kw["temperature"],
                                        top_p=kw["top_p"], seed=seed, stop=kw["stop"])
      return read

    out: list[str] = []
    answerer = Answerer(self.m, slots=self.batch_size)
    try:
      for got in tqdm(answerer.complete(job(r) for r in requests), total=len(requests), disable=self.rank != 0,
                      desc="llamavid_jax generate"):
        if isinstance(got, Exception):   # media that cannot be read, a prompt too long: as generate raised them
          raise got
        out.append(got.text)
    finally:
      answerer.close()
    return out

  def loglikelihood(self, requests: list[Instance]) -> list:
    from tqdm import tqdm
    out = []
    last_key, media = None, None
    for r in tqdm(requests, disable=self.rank != 0, desc="llamavid_jax loglikelihood"):
      if len(r.args) < 6:
        raise NotImplementedError("llamavid_jax: loglikelihood requests without media (acc_mutual_info's "
                                  "unconditional ones) are not supported")
      context, target, doc_to_visual, doc_id, task, split = r.args[:6]
      key = (task, split, doc_id)
      if key != last_key:   # a doc's options come one after another
        doc, media = self._doc_media(doc_to_visual, doc_id, task, split)
        last_key = key
      continuation = target if isinstance(target, str) else target(doc)
      if not isinstance(continuation, str):
        raise TypeError(f"llamavid_jax: doc_to_target gave {type(continuation).__name__}, a string is needed "
                        "for output_type loglikelihood")
      s = self.scorer.score(_strip(context), continuation.lstrip(), **{media.kind: media.array})
      value = -s["logprob"] if isinstance(target, str) else s["logprob"]   # see the module doc
      res = (float(value), bool(s["is_greedy"]))
      out.append(GenerationResult(text=res) if GenerationResult is not None else res)
    return out

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError("llamavid_jax: generate_until_multi_round is not implemented; multi-turn "
                              "questions can go through llamavid_jax.inference.Model.request(turns, media)")
