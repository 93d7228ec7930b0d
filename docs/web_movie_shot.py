"""How docs/web_movie.png was made: the web demo (`eval.web`) over a checkpoint, a movie
feature file (3 random frames of the tiny config's features, with subtitles) uploaded and
a question answered greedily through the page's own upload / ask handlers before the
page is served; a page load shows that conversation. Then:

  PYTHONPATH=. python docs/web_movie_shot.py CKPT 7961 &
  chromium --headless --no-sandbox --hide-scrollbars --virtual-time-budget=20000 \
      --screenshot=docs/web_movie.png --window-size=1280,900 http://127.0.0.1:7961/

(the screenshot's checkpoint is the tests' untrained tiny one: its answer is noise)."""
import sys, time
import numpy as np
import gradio as gr
from configs import tiny
from eval import web
from llamavid_jax import inference
from llamavid_jax.data.features import Movie, write_safetensors

ckpt, port = sys.argv[1], int(sys.argv[2])
vision = tiny.model_config().vision
feats = np.random.default_rng(3).standard_normal((3, vision.num_tokens, vision.width)).astype(np.float16)
movie = "/tmp/web_movie_shot.safetensors"
write_safetensors(movie, Movie(feats, "<image>Hello...<image><image>A dog runs across the park."))
m = inference.load(ckpt, max_frames=600)
app = web.build_app(m, 600, temperature=0.0, top_p=0.7, max_new_tokens=24)
fn = {f.api_name: f.fn for f in app.fns.values()}
comp = {getattr(b, "elem_id", None): b for b in app.blocks.values()}
state = next(b for b in app.blocks.values() if isinstance(b, gr.State))

st, status, _, _ = fn["upload"](movie)
print(status, flush=True)
out = None
for out in fn["ask"]("What does the dog do in the movie?", [], st, 0.0, 0.7, 24):
  pass
history, box, gallery, status2 = out
print(history, status2, flush=True)

def prefill():
  return st, status2, history, ""

with app:
  app.load(prefill, None, [state, comp["status"], comp["chatbot"], comp["question"]])
app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
print("READY", flush=True)
while True:
  time.sleep(1)
