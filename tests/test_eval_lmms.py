"""lmms-eval runs our model (`eval.lmms_adapter`, the `llamavid_jax` entry point) on two
local tasks of a tiny trained checkpoint: its generated answers are `Model.generate`'s
greedy answers, and its multiple-choice pick is the argmax of `Scorer.score`.

lmms-eval is an optional extra, so `make test` skips this file. Run it with

  make test-lmms     # creates .venv-lmms (lmms-eval 0.7.3 --no-deps + the `lmms` extra), runs this file

or, in a venv that has them: `python -m pytest -q tests/test_eval_lmms.py`. Nothing is
downloaded: the tasks read a JSONL (`dataset_path: json`) and PNG / MP4 files written here.
"""

import json
import os
import textwrap

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from tests import video_fixtures  # noqa: E402
from tests.test_inference_dir import _config  # noqa: E402

pytestmark = pytest.mark.slow   # a 6-step training run and a few lmms-eval passes

QUESTIONS = ["What is this?", "What color?", "<image>\nDescribe it.", "What is this? Describe it."]
OPTIONS = ["cat.", "dog", "Red.", "runs."]

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
  return [doc["video"]] if doc["video"] else [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
  return doc["question"]


def doc_to_visual_clip(doc):
  """toy_chat: a video path, or PIL images (several: the frames of one clip)."""
  return [doc["video"]] if doc["video"] else [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_choice(doc):
  return doc["options"]


def process_results(doc, results):
  return {"answered": float(bool(results[0]))}
'''

GEN_YAML = """
task: toy_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false, until: ["</s>"]}}
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
"""

CHAT_YAML = """
task: toy_chat
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual_clip
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """
task: toy_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  from train.train import train
  c = _config(tmp_path_factory.mktemp("run"))
  train(c)
  return os.path.join(c.workdir, "inference")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  """A task dir (YAMLs + utils.py) and the docs: 3 PNG images of different shapes and one
  3-second MP4 (3 frames at 1 fps). toy_chat's docs (chat.jsonl): two images, a clip of
  three non-square PNG frames, the MP4."""
  root = tmp_path_factory.mktemp("lmms")
  rng = np.random.default_rng(0)
  docs = []
  for i, q in enumerate(QUESTIONS):
    image, video = "", ""
    if i < 3:
      image = str(root / f"img{i}.png")
      Image.fromarray(rng.integers(0, 256, (20 + 6 * i, 30 - 4 * i, 3), np.uint8)).save(image)
    else:
      video = video_fixtures.write_counter_clip(str(root / "clip.mp4"), 6, 2)
    docs.append({"id": i, "image": image, "video": video, "question": q, "answer": "cat.",
                 "options": OPTIONS[i:] + OPTIONS[:i], "label": i % len(OPTIONS)})
  data = root / "docs.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  frames = []
  for k in range(3):
    frames.append(str(root / f"frame{k}.png"))
    Image.fromarray(rng.integers(0, 256, (16, 28, 3), np.uint8)).save(frames[-1])
  chat = [{"id": 0, "images": [docs[0]["image"]], "video": "", "question": QUESTIONS[0], "answer": "cat."},
          {"id": 1, "images": [docs[1]["image"]], "video": "", "question": QUESTIONS[1], "answer": "cat."},
          {"id": 2, "images": frames, "video": "", "question": QUESTIONS[3], "answer": "cat."},
          {"id": 3, "images": [], "video": docs[3]["video"], "question": QUESTIONS[0], "answer": "cat."}]
  (root / "chat.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chat))
  tdir = root / "tasks"
  tdir.mkdir()
  (tdir / "utils.py").write_text(textwrap.dedent(UTILS))
  for name, y, d in (("toy_gen", GEN_YAML, data), ("toy_mc", MC_YAML, data), ("toy_chat", CHAT_YAML, root / "chat.jsonl")):
    (tdir / f"{name}.yaml").write_text(y.format(data=json.dumps(str(d)), cache=json.dumps(str(root / "hf_cache"))))
  return str(tdir), docs


def _evaluate(tdir, model_args, tasks, model="llamavid_jax"):
  """`model`: a registered name (with model_args) or an lmms instance."""
  from lmms_eval import evaluator
  from lmms_eval.tasks import TaskManager
  tm = TaskManager(include_path=tdir, include_defaults=False)
  return evaluator.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm,
                                   log_samples=True, bootstrap_iters=0)


def _media(m, doc):
  from llamavid_jax import inference
  from llamavid_jax.data.image import load_image, preprocess_image
  if doc["video"]:
    return m.media(video=doc["video"])
  frame = preprocess_image(load_image(doc["image"]), size=m.cfg.vision.image_size, aspect=m.image_aspect)
  return inference.Media("frames", frame[None])


def test_lmms_eval_answers_are_generate_and_score(ckpt, tasks, monkeypatch):
  from lmms_eval.models import get_model

  from eval import lmms_adapter
  from eval.score import Scorer
  from llamavid_jax import inference
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  assert get_model("llamavid_jax") is lmms_adapter.LlamaVidJax, "entry point missing: pip install -e '.[lmms]'"
  tdir, docs = tasks
  out = _evaluate(tdir, f"ckpt={ckpt},batch_size=2", ["toy_gen", "toy_mc"])

  m = inference.load(ckpt)
  media = [_media(m, d) for d in docs]
  assert [x.num_frames for x in media] == [1, 1, 1, 3]
  # one request at a time: the engine's two slots give each request its own tokens
  want = [m.generate([m.request(d["question"], x)], max_new_tokens=8)[0] for d, x in zip(docs, media)]
  got = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["toy_gen"]}
  assert got == {i: a.text for i, a in enumerate(want)}
  assert all(a.token_ids for a in want) and len({a.text for a in want}) > 1, want
  print("LMMS toy_gen answers:", [a.text for a in want])

  scorer = Scorer(m)
  mc = {s["doc_id"]: s for s in out["samples"]["toy_mc"]}
  assert sorted(mc) == list(range(len(docs)))
  picks = []
  for i, (d, x) in enumerate(zip(docs, media)):
    q = d["question"].replace("<image>", "").strip()
    scores = [scorer.score(q, o, frames=x.array) for o in d["options"]]
    nll = [r[0] for r in mc[i]["filtered_resps"]]   # multiple_choice: -logprob (lmms-eval picks argmin)
    np.testing.assert_allclose(nll, [-s["logprob"] for s in scores], rtol=1e-6)
    assert [r[1] for r in mc[i]["filtered_resps"]] == [s["is_greedy"] for s in scores]
    best = int(np.argmax([s["logprob"] for s in scores]))
    assert int(np.argmin(nll)) == best and len(set(nll)) == len(OPTIONS)
    assert mc[i]["acc"] == float(best == d["label"])
    picks.append(best)
  assert out["results"]["toy_mc"]["acc,none"] == np.mean([p == d["label"] for p, d in zip(picks, docs)])
  assert out["results"]["toy_gen"]["answered,none"] == 1.0
  print("LMMS toy_mc picks:", picks)


def test_adapter_model_args_and_refusals(ckpt, tasks):
  """max_frames samples a video down uniformly; model_args' batch_size wins over the
  CLI's; unsupported requests are refused with a message."""
  from eval import lmms_adapter
  tdir, docs = tasks
  lm = lmms_adapter.LlamaVidJax.create_from_arg_string(f"ckpt={ckpt},batch_size=3,max_frames=2",
                                                       {"batch_size": 1, "device": "cuda:0"})
  assert lm.batch_size == 3 and lm.max_frames == 2
  full = lm.m.media(video=docs[3]["video"])
  two = lmms_adapter.visual_media(lm.m, [docs[3]["video"]], max_frames=2)
  assert two.num_frames == 2 and np.array_equal(two.array, full.array[[0, 2]])
  three = lmms_adapter.visual_media(lm.m, [Image.open(docs[i]["image"]) for i in range(3)])
  assert three.num_frames == 3
  with pytest.raises(ValueError, match="text-only requests are not supported"):
    lmms_adapter.visual_media(lm.m, [])
  with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
    lm.generate_until_multi_round([])
  with pytest.raises(TypeError, match="unknown model_args"):
    lmms_adapter.LlamaVidJax(ckpt=ckpt, conv_template="vicuna_v1")
  with pytest.raises(ValueError, match=r"model_args mesh_tensor=3: .*devices"):   # before loading
    lmms_adapter.LlamaVidJax(ckpt="/no/such/ckpt", mesh_tensor=3)
  with pytest.raises(ValueError, match="model_arg quant='int3' is not one of int8, int4"):
    lmms_adapter.LlamaVidJax(ckpt="/no/such/ckpt", quant="int3")
  import jax
  sharded = lmms_adapter.LlamaVidJax.create_from_arg_string(f"ckpt={ckpt},mesh_fsdp=4,mesh_tensor=-1")
  w = sharded.m.params["llm"]["layers"]["gate_proj"]["kernel"]
  assert dict(sharded.m.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
  assert w.addressable_shards[0].data.shape[2] == w.shape[2] // 2 and jax.device_count() == 8
  q = lmms_adapter.visual_media(lm.m, [docs[3]["video"]], max_frames=2)
  req = [lm.m.request("What is in the video?", q)]
  assert sharded.m.generate(req, max_new_tokens=6) == lm.m.generate(req, max_new_tokens=6)
  assert lm._sampling({"do_sample": False, "temperature": 0.2, "until": "\n\n", "top_p": None}) == {
      "max_new_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": ("\n\n",)}


def test_lmms_evals_openai_backend_against_eval_serve_answers_as_the_adapter(ckpt, tasks, monkeypatch):
  """lmms-eval's own `openai` chat backend (lmms_eval/models/chat/openai.py: an image is
  one image_url part, a clip of PIL frames several, a video with pass_video_url=True a
  file:// video_url plus media_io_kwargs.video.num_frames; max_tokens and temperature
  from the task's generation_kwargs) runs toy_chat against `eval.serve` on 127.0.0.1:
  its answers are the adapter's on the same task (greedy, max_frames 2 both), and the
  server's media arrays are exactly the adapter's (the tiny model's answers alone hardly
  tell an image's padding from a crop)."""
  from lmms_eval.models import get_model

  from eval import lmms_adapter, serve
  from llamavid_jax import engine as engine_lib
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  for var in ("OPENAI_API_KEY", "OPENAI_API_BASE"):   # the backend's fallbacks for api_key / base_url
    monkeypatch.delenv(var, raising=False)
  tdir, _ = tasks
  adapter = lmms_adapter.LlamaVidJax(ckpt=ckpt, batch_size=2, max_frames=2)
  want = {s["doc_id"]: s["filtered_resps"][0] for s in _evaluate(tdir, None, ["toy_chat"], adapter)["samples"]["toy_chat"]}
  assert len(want) == 4 and all(want.values()) and len(set(want.values())) > 1, want

  seen, load = [], serve.load_media   # what the server made of each request: (Chat, Media)

  def load_and_keep(m, chat, limits):
    media = load(m, chat, limits)
    seen.append((chat, media))
    return media

  monkeypatch.setattr(serve, "load_media", load_and_keep)
  eng = engine_lib.Engine(adapter.m, slots=4, max_positions=256, max_queue=8)
  limits = serve.Limits(media_root=os.path.dirname(tdir), max_frames=8, max_tokens=16)
  responses = []
  running = serve.Running(serve.make_app(eng, "toy", limits))
  try:
    backend = get_model("openai")
    assert backend.__module__ == "lmms_eval.models.chat.openai"
    lm = backend.create_from_arg_string(f"model=toy,base_url={running.url}/v1,api_key=unused,pass_video_url=True,"
                                        "max_frames_num=2,max_retries=1,num_concurrent=4,httpx_trust_env=False")
    lm.client = lm.client.with_options(timeout=120, max_retries=0)   # bounded: one try of each request
    out = _evaluate(tdir, None, ["toy_chat"], lm)
    metrics = httpx.get(running.url + "/metrics", timeout=30).text
    responses = [line for line in metrics.splitlines() if line.startswith("llamavid_http_responses_total")]
  finally:
    running.stop()
    eng.close()
  got = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["toy_chat"]}
  assert got == want
  assert responses == ['llamavid_http_responses_total{code="200"} 4']   # one request a doc, nothing refused
  # what the backend sent: image_url data URLs (PNG), 3 of them for the clip, the video as a
  # file:// video_url; media_io_kwargs' num_frames with every request (it caps the clips to
  # 2 frames, as the adapter's max_frames); the task's max_new_tokens and temperature
  sent = sorted(([k for k, _, _ in c.media], c.num_frames, c.temperature, c.max_tokens) for c, _ in seen)
  assert sent == [(["image_url"], 2, 0.0, 8)] * 2 + [(["image_url"] * 3, 2, 0.0, 8), (["video_url"], 2, 0.0, 8)]
  assert all(url.startswith("data:image/png;base64,") for c, _ in seen for k, url, _ in c.media if k == "image_url")
  # and the server's pixels are the adapter's: an image padded, the clip's frames cropped, 2 of 3 frames
  docs = [json.loads(line) for line in open(os.path.join(os.path.dirname(tdir), "chat.jsonl"))]
  ref = [lmms_adapter.visual_media(adapter.m, [d["video"]] if d["video"] else
                                   [Image.open(p).convert("RGB") for p in d["images"]], max_frames=2) for d in docs]
  assert sorted(x.num_frames for x in ref) == sorted(m.num_frames for _, m in seen) == [1, 1, 2, 2]
  for _, m in seen:
    assert sum(np.array_equal(m.array, r.array) for r in ref) == 1
  print("LMMS openai backend answers:", [got[i] for i in sorted(got)])
