"""A web demo of a checkpoint: upload a video or an image, chat about it, and see where
the context token looked in each frame.

  python -m eval.web --ckpt DIR [--host 127.0.0.1] [--port 7860] [--max-frames 600]
      [--temperature 0.2] [--top-p 0.7] [--max-new-tokens 512] [--dtype float32|bfloat16]
      [--seed 0] [--prefill-chunk 0] [--slots 4] [--max-positions N] [--max-queue 16]

DIR as for `eval.chat` (a converted / inference directory or a train WORKDIR). The page
(the release's `serve/gradio_web_server.py` without its controller and workers) has an
upload for one video (frames at 1 fps, at most `--max-frames` of them), image or feature
file (a movie `.safetensors` with subtitles is the release's long-video mode: its movie
prompt; the status line gives the release's movie sampling, 0.6 / 0.9); a chat whose answers stream in; sliders for the temperature (0: greedy), top_p and
the answer's token budget, starting at the flags' values; and a gallery of up to 16
evenly spaced frames with the context token's attention over their patches as a heat map
(`eval/overlay.py`; feature files have no frames to show). The conversation is the
chat's: every question is asked with the turns before it, the media in the latest turn
and the latest question as the Q-Former instruction (`llamavid_jax/inference.py`); a new
upload or Clear starts a new one. Bad uploads and questions without media get a message
on the page, and the server goes on serving.

Answers come from the continuous-batching engine (`llamavid_jax/engine.py`): several
browser users chat at once, up to `--slots` answers decode together and up to
`--max-queue` more wait (beyond that a question is told to try again); a user who leaves
mid-answer frees the slot. `--max-positions` (KV cache positions per slot; default twice
the model's position budget, room for any prompt's bucket padding) and `--slots` set
the cache's memory, printed before compiling. It listens on
localhost unless `--host` says otherwise; needs `pip install 'llamavid-jax[web]'`.
Arguments and the checkpoint directory are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from eval import args as eval_args, chat, overlay
from llamavid_jax import cli, inference, validation
from llamavid_jax import engine as engine_lib

SHOWN_FRAMES = 16
UPLOAD_TYPES = list(inference.VIDEO_SUFFIXES + inference.IMAGE_SUFFIXES + (".npy", ".safetensors"))
NO_MEDIA = "Upload a video or an image first."
NO_QUESTION = "Type a question."
BUSY = "The server is busy (every slot and the queue are taken): try again in a moment."


def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  eval_args.add_model_flags(p)   # --ckpt --dtype --mesh --quant
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--max-frames", type=int, default=600, help="uploads with more frames at 1 fps are refused")
  p.add_argument("--slots", type=int, default=4, help="answers decoded at once (the engine's decode slots)")
  p.add_argument("--max-positions", type=int, help="KV cache positions per slot (default: twice the model's "
                 "position budget)")
  p.add_argument("--max-queue", type=int, default=16, help="questions waiting for a slot; more are told to retry")
  eval_args.add_sampling_flags(p, new_tokens=f"{chat.DEFAULT_NEW_TOKENS}, or as many as the model's positions "
                              "leave after the prompt")
  return p


def make_engine(model: inference.Model, slots: int = 4, max_positions: int | None = None, max_queue: int = 16,
                prefill_chunk: int = 0) -> engine_lib.Engine:
  """The demo's engine: `max_positions` defaults to twice the model's position budget,
  so that any prompt the model takes fits with its text and frame buckets' padding."""
  return engine_lib.Engine(model, slots=slots, max_positions=max_positions or 2 * model.position_budget,
                           max_queue=max_queue, prefill_chunk=prefill_chunk)


def _text(content: Any) -> str:
  """A chatbot message's content (a string, or Gradio's list of parts) -> its text."""
  if isinstance(content, str):
    return content
  if isinstance(content, dict):
    return str(content.get("text", content.get("content", "")))
  if isinstance(content, (list, tuple)):
    return "".join(_text(c) for c in content)
  return "" if content is None else str(content)


def history_turns(history: list[dict]) -> list[str]:
  """The chatbot's messages -> alternating user / assistant texts (an unanswered
  question's empty answer kept, consecutive messages of one role joined)."""
  turns: list[str] = []
  for msg in history or []:
    role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
    content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", None)
    want = "user" if len(turns) % 2 == 0 else "assistant"
    if role != want and turns:
      turns[-1] = (turns[-1] + "\n" + _text(content)).strip()
    elif role == want:
      turns.append(_text(content))
  return turns if len(turns) % 2 == 0 else turns + [""]


def _media_state(model: inference.Model, path: str) -> dict:
  """An uploaded file -> {name, media, index, frames}: the model's media and up to
  SHOWN_FRAMES display frames (uint8, the model's crop and sampling) with their indices
among the model's frames and their times.
  Raises inference.MediaError."""
  kind = inference.media_kind(path)
  name = os.path.basename(path)
  media = model.media(**{kind: path})
  index, frames, times = np.zeros((0,), np.int64), None, []
  if kind != "features":
    from llamavid_jax.data import SampleError
    from llamavid_jax.data.video import VideoError
    try:
      index, frames, times = overlay.display_frames(
          image_size=model.cfg.vision.image_size, aspect=model.image_aspect, limit=SHOWN_FRAMES,
          fps=model.video_fps, max_frames=model.sample_cap, **{kind: path})
    except (VideoError, SampleError, OSError) as e:
      raise inference.MediaError(path, str(e)) from None
  return dict(name=name, kind=kind, media=media, index=index, frames=frames, times=times)


def attention_gallery(model: inference.Model, request: dict, state: dict) -> list[tuple[np.ndarray, str]]:
  """The shown frames with the context attention of `request` drawn over them, each
  captioned with its second and how peaked its attention is (`overlay.peak_ratio`:
  1x is uniform); [] for a content-only
  model or a feature file."""
  if state["frames"] is None or not len(state["frames"]):
    return []
  attn = model.context_attention(request)
  if attn is None:
    return []
  attn = attn[state["index"]]
  pictures = overlay.overlay(state["frames"], attn)
  peaks = overlay.peak_ratio(attn)
  where = lambda t: "image" if t is None else f"{t:g} s"   # noqa: E731
  return [(pic, f"{where(t)} · peak {r:.1f}×") for pic, t, r in zip(pictures, state["times"], peaks)]


def write_gallery(gallery: list[tuple[np.ndarray, str]], folder: str) -> list[tuple[str, str]]:
  """-> the gallery as (PNG path, caption), each picture written once into `folder`.

  The page is given files, not arrays: gradio writes an array's picture to its cache
  afresh at every streamed output, truncating the file a browser or client may still be
  reading (seen as `Too little data for declared Content-Length`); a file is copied into
  its cache once, atomically."""
  from PIL import Image
  out = []
  for i, (pic, caption) in enumerate(gallery):
    path = os.path.join(folder, f"frame{i:02d}.png")
    Image.fromarray(pic).save(path)
    out.append((path, caption))
  return out


def build_app(model: inference.Model, max_frames: int | None = 600, *, temperature: float = inference.CHAT["temperature"],
              top_p: float = inference.CHAT["top_p"], max_new_tokens: int = 512, seed: int = 0,
              prefill_chunk: int = 0, engine: engine_lib.Engine | None = None):
  """-> the demo's gr.Blocks (not launched) over `model`, answering through `engine`
  (default: `make_engine(model)`); sliders start at the given sampling values. Sets
  `model.max_frames` to `max_frames` (the upload cap)."""
  import gradio as gr

  model.max_frames = max_frames
  eng = make_engine(model, prefill_chunk=prefill_chunk) if engine is None else engine
  cap = f"at most {max_frames} frames, taken at {model.sampling}" if max_frames else "any length"
  attention_note = ("" if model.cfg.use_context_token else
                    " (this checkpoint has no context token: nothing to show)")

  def on_upload(path):
    """-> (state, status, chatbot, gallery): a new upload starts a new conversation."""
    if not path:
      return None, "", [], []
    try:
      state = _media_state(model, path)
    except inference.MediaError as e:
      name = os.path.basename(path)
      why = e.why.replace(path, name)   # the upload's server-side path says nothing to the user
      gr.Warning(f"Cannot use {name}: {why}")
      return None, f"**Cannot use `{name}`**: {why}", [], []
    n = state["media"].num_frames
    what = {"video": f"video, {n} frame{'s' * (n != 1)} at {model.sampling}", "image": "image",
            "features": f"features of {n} frame{'s' * (n != 1)}"}[state["kind"]]
    if state["media"].is_movie:
      what = (f"a movie, features of {n} frame{'s' * (n != 1)} with subtitles (the release's long-video mode; "
              f"it samples at temperature {inference.MOVIE['temperature']}, top_p {inference.MOVIE['top_p']})")
    return state, f"`{state['name']}`: {what}. Ask a question.", [], []

  def on_ask(question, history, state, temp, tp, budget):
    """Streams (chatbot, textbox, gallery, status) as the answer grows."""
    history = list(history or [])
    question = question or ""   # as typed, as the release's demo puts it in the prompt
    number = lambda x: x if x is not None else "nothing"   # noqa: E731  (a cleared slider is refused)
    mnt = int(budget) if isinstance(budget, (int, float)) and math.isfinite(budget) else number(budget)
    errs = validation.check_sampling(temperature=number(temp), top_p=number(tp), max_new_tokens=mnt, prefix="")
    problem = (NO_QUESTION if not question.strip() else NO_MEDIA if state is None else "; ".join(errs) or None)
    request, cut = None, ""
    if not problem:
      turns = history_turns(history) + [question]
      with eng.tokenizer_lock:   # the engine's thread decodes text with the same tokenizer
        request = model.request(turns, state["media"])
      try:   # the same rules as every CLI: the request must fit the model's positions
        room = min(model.room(request), eng.max_positions - eng.positions(request))
        if room < 1:
          raise engine_lib.RequestTooLarge("messages", f"the prompt takes {eng.positions(request)} positions "
                                           f"(bucketed); a slot holds {eng.max_positions}")
      except (validation.BudgetError, engine_lib.RequestTooLarge) as e:
        problem = str(e)
    if problem:
      gr.Warning(problem)
      yield history, question, gr.skip(), problem
      return
    # the slider's value, or as many as the positions leave (said in the status line)
    cut = f" (max new tokens cut to {room}: the model's positions end there)" if mnt > room else ""
    mnt = min(mnt, room)
    folder = tempfile.mkdtemp(prefix="llamavid-web-")   # this answer's pictures, gone when it ends
    try:
      yield from answer(request, history, question, folder, state, mnt, float(temp), float(tp), cut)
    finally:
      shutil.rmtree(folder, ignore_errors=True)

  def answer(request, history, question, folder, state, mnt, temp, tp, cut):
    gallery = write_gallery(attention_gallery(model, request, state), folder)
    asked = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    # Yielded before the engine has the request: gradio can close a generator (a user who
    # leaves or cancels) only once it has yielded, and closing it is what frees the slot.
    yield asked, "", gallery, "Answering…"
    problem = None
    try:
      handle = eng.submit(request, engine_lib.Sampling(max_tokens=mnt, temperature=temp, top_p=tp, seed=seed))
    except engine_lib.QueueFull:
      problem = BUSY
    except engine_lib.EngineStopped as e:
      problem = f"The model stopped serving: {e}"
    if problem:
      gr.Warning(problem)
      yield history, question, gallery, problem
      return
    history = asked
    try:   # a user who leaves mid-answer (the generator is closed) frees the slot
      text = ""
      for piece in handle:   # the gallery is unchanged while the answer streams
        text += piece
        history[-1] = {"role": "assistant", "content": text}
        yield history, "", gr.skip(), "Answering…"
      final = handle.result()
    finally:
      handle.cancel()
    history[-1] = {"role": "assistant", "content": final.text}
    empty = "" if final.text else " (they decode to no text)"
    yield history, "", gallery, f"`{state['name']}`: answered in {len(final.token_ids)} tokens{empty}{cut}."

  def on_clear(state):
    return [], "", [], (f"`{state['name']}`: new conversation." if state else "")

  with gr.Blocks(title="LLaMA-VID (JAX)", analytics_enabled=False) as app:
    gr.Markdown("## LLaMA-VID: an image is worth 2 tokens\n"
                f"Upload a video ({cap}), an image or a feature file, then ask about it.")
    state = gr.State(None)
    with gr.Row():
      with gr.Column(scale=3):
        upload = gr.File(label="Video or image", file_types=UPLOAD_TYPES, type="filepath")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Parameters", open=True):
          temp = gr.Slider(0.0, max(1.0, temperature), value=temperature, step=0.05, label="Temperature (0: greedy)")
          tp = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top P")
          budget = gr.Slider(1, max(1536, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens")
      with gr.Column(scale=6):
        chatbot = gr.Chatbot(label="LLaMA-VID", height=360, elem_id="chatbot")
        with gr.Row():
          box = gr.Textbox(show_label=False, placeholder="Ask about the video and press ENTER", scale=6,
                           container=False, elem_id="question")
          send = gr.Button("Send", variant="primary", scale=1, min_width=60, elem_id="send")
        clear = gr.Button("Clear", elem_id="clear")
        gallery = gr.Gallery(label=("Context attention over the frames (blue: least, red: most; "
                                    f"peak: the largest weight over uniform's){attention_note}"),
                             columns=4, object_fit="contain", format="png", elem_id="attention")
    upload.change(on_upload, [upload], [state, status, chatbot, gallery], api_name="upload")
    # every user's question goes to the engine at once: it batches them (its queue is the bound)
    ask = dict(fn=on_ask, inputs=[box, chatbot, state, temp, tp, budget], outputs=[chatbot, box, gallery, status],
               concurrency_limit=eng.slots + eng.max_queue, concurrency_id="model")
    send.click(**ask, api_name="ask")
    box.submit(**ask, api_name="ask_enter", api_visibility="undocumented")
    clear.click(on_clear, [state], [chatbot, box, gallery, status], api_name="clear")
  return app


def main(argv=None) -> None:
  p = parser()
  a = p.parse_args(argv)
  eval_args.check_model_flags(p, a)
  kw = chat.release_sampling(eval_args.check_sampling_flags(p, a), None)   # the sliders start at the chat's
  kw["max_new_tokens"] = kw["max_new_tokens"] or chat.DEFAULT_NEW_TOKENS
  if not 0 < a.port < 65536:
    p.error(f"--port must be in 1..65535, got {a.port}")
  if a.max_frames < 1:
    p.error(f"--max-frames must be >= 1, got {a.max_frames}")
  if a.slots < 1 or a.max_queue < 0 or (a.max_positions is not None and a.max_positions < 2):
    p.error(f"--slots must be >= 1, --max-queue >= 0 and --max-positions >= 2, got {a.slots}, {a.max_queue}, "
            f"{a.max_positions}")
  chat.check_ckpt(p, a.ckpt)
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # noqa: F401
  except ImportError:
    sys.exit("eval.web needs gradio: pip install 'llamavid-jax[web]'")
  m = eval_args.load(a, max_frames=a.max_frames)
  positions = a.max_positions or 2 * m.position_budget
  kv = engine_lib.cache_bytes(m.cfg, a.slots, positions, a.dtype)
  print(f"eval.web: {a.slots} slots x {positions} positions, KV cache {kv / 2 ** 30:.2f} GiB "
        f"({m.cfg.kv_cache or a.dtype}); compiling the decode step", flush=True)
  eng = make_engine(m, a.slots, positions, a.max_queue, kw["prefill_chunk"])
  app = build_app(m, a.max_frames, engine=eng, **kw)
  try:
    app.queue().launch(server_name=a.host, server_port=a.port)
  finally:
    eng.close()


if __name__ == "__main__":
  cli.run(main)
