"""`eval.chat` over the inference core (`llamavid_jax/inference.py`): one answer and
its ids, streaming, the interactive loop's prompts, seeded sampling, arguments and
files named before any model is loaded; and train to inference: a tiny model trained
by `train.train` on synthetic clips answers held-out clips through `eval.chat`, as
the run's held-out evaluator (the demo's accuracy) does."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from eval import chat, score
from llamavid_jax import generate as gen
from llamavid_jax import inference
from llamavid_jax.data import IMAGE_TOKEN_INDEX
from tests.conftest import COMPILE_EVENTS
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Words of the data fixtures' tokenizers. Q1's prompt is 33 ids, the follow-ups' longer:
# all in one text bucket (64), and every Q-Former instruction in one (8), so that the
# module compiles generate / stream once per sampling setting.
Q1, Q2, Q3 = "Hello What is this?", "Describe it.", "What is this?"
NEW = ["--max-new-tokens", "8"]
GREEDY = ["--temperature", "0"]
SAMPLED = ["--temperature", "0.2", "--top-p", "0.7", "--seed", "1"]   # the release's chat sampling


def run(argv, stdin=""):
  """eval.chat's stdout for argv (stdin: the interactive loop's input)."""
  out = io.StringIO()
  chat.main(argv, stdin=io.StringIO(stdin), stdout=out)
  return out.getvalue()


@pytest.fixture(scope="module")
def video(clip28):
  return clip28


@pytest.fixture(scope="module")
def model(tiny_ckpt):
  return inference.load(tiny_ckpt)


@pytest.fixture
def args(tiny_ckpt, video, model, monkeypatch):
  """eval.chat's arguments on the toy checkpoint, whose loads return the module's model
  (the first test loads it through eval.chat)."""
  def load(ckpt, dtype="float32", **kw):
    assert (ckpt, dtype, kw) == (tiny_ckpt, "float32", {})
    return model

  monkeypatch.setattr(inference, "load", load)
  return ["--ckpt", tiny_ckpt, "--video", video, *NEW]


def test_the_json_answer_holds_generates_greedy_ids_up_to_eos(tiny_ckpt, model, video):
  got = json.loads(run(["--ckpt", tiny_ckpt, "--video", video, *NEW, "--question", Q1, "--json", *GREEDY]))
  req = model.request(Q1, model.media(video=video))
  assert list(req["input_ids"]).count(IMAGE_TOKEN_INDEX) == 1
  batch = gen.batch_requests([req], pad_id=model.tokenizer.pad_token_id)
  toks = np.asarray(gen.generate(model.model, model.params, batch, jax.random.key(0), max_new_tokens=8,
                                 eos_id=model.eos_id, temperature=0.0, top_k=0, top_p=1.0, prefill_chunk=0,
                                 dtype=model.dtype))[0]
  toks = toks.tolist()
  want = toks[:toks.index(model.eos_id)] if model.eos_id in toks else toks
  assert got["token_ids"] == want and want
  assert got["text"] == model.tokenizer.decode(want, skip_special_tokens=True).strip()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_streamed_text_is_the_json_text(args, sampling):
  answer = json.loads(run(args + ["--question", Q1, "--json", *sampling]))["text"]
  assert answer and run(args + ["--question", Q1, *sampling]) == answer + "\n"


def test_seeded_sampling_repeats_and_a_tiny_top_p_is_greedy(args):
  ask = lambda *flags: json.loads(run(args + ["--question", Q1, "--json", *flags]))["token_ids"]
  sampled, greedy = ask(*SAMPLED), ask(*GREEDY)
  assert ask(*SAMPLED) == sampled
  # the toy model's next-token distribution is nearly flat: top_p 0.7 keeps most of it
  assert sampled != greedy and ask(*SAMPLED[:-1], "2") not in (sampled, greedy)
  assert ask("--temperature", "0.2", "--top-p", "1e-6", "--seed", "3") == greedy


def test_the_loop_moves_the_media_to_the_latest_turn_and_keeps_the_answers(args, model, monkeypatch):
  made = []
  request = inference.Model.request

  def spy(self, turns, media):
    made.append((list(turns), request(self, turns, media)))
    return made[-1][1]

  monkeypatch.setattr(inference.Model, "request", spy)
  out = run(args + GREEDY, stdin=f"{Q1}\n{Q2}\n\n{Q1}\n")   # the empty line ends the chat
  assert len(made) == 2
  a1 = made[1][0][1]
  assert [t for t, _ in made] == [[Q1], [Q1, a1, Q2]]
  assert a1 == json.loads(run(args + ["--question", Q1, "--json", *GREEDY]))["text"]
  lines = out.split("\n")
  assert lines[0] == f"USER: ASSISTANT: {a1}" and lines[1].startswith("USER: ASSISTANT: ")
  assert lines[2:] == ["USER: exit...", ""]

  assert inference.prompt_turns(made[1][0]) == [Q1, a1, f"<image>\n{Q2}"]
  second = made[1][1]
  ids, tok = second["input_ids"].tolist(), model.tokenizer
  user = tok.convert_tokens_to_ids("▁USER:")
  assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(user) == 2
  image, last_user = ids.index(IMAGE_TOKEN_INDEX), len(ids) - 1 - ids[::-1].index(user)
  decode = lambda part: tok.decode(part, skip_special_tokens=True).strip()
  assert last_user < image and decode(ids[last_user + 1:image]) == ""   # "USER: <image>\n" + Q2
  assert decode(ids[image + 1:]) == f"{Q2} ASSISTANT:"
  assert decode(ids[:last_user]).endswith(f"USER: {Q1} ASSISTANT: {a1}")   # the first answer, then </s>
  assert ids[last_user - 1] == model.eos_id
  q = model.qtokenizer(Q2)   # the latest question is the Q-Former instruction
  assert second["qformer_ids"].tolist() == q.input_ids and second["qformer_mask"].tolist() == [True] * len(q.input_ids)


def test_the_json_loop_prints_only_json_lines_and_compiles_once(args, model):
  out = run(args + GREEDY + ["--json"], stdin=f"{Q1}\n{Q2}\n")   # end of input ends it too
  first, second = [json.loads(line) for line in out.splitlines()]
  assert first == json.loads(run(args + ["--question", Q1, "--json", *GREEDY]))
  assert set(second) == {"text", "token_ids"}
  # Q3: a Q-Former instruction of a third length, in the same bucket
  assert len({len(model.qtokenizer(q).input_ids) for q in (Q1, Q2, Q3)}) == 3
  compiles = []
  listen = lambda name, secs, **kw: compiles.append(name) if name in COMPILE_EVENTS else None
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    run(args + GREEDY + ["--json"], stdin=f"{Q1}\n{Q3}\n")
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiles, compiles


@pytest.mark.slow   # a subprocess
def test_the_command_reads_a_runs_inference_directory_on_other_devices(tiny_ckpt, args):
  """`python -m eval.chat` (one device) on WORKDIR/inference that the run saved from 8."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "eval.chat", *args, "--question", Q1, "--json", *GREEDY]
  cmd[cmd.index("--ckpt") + 1] = os.path.join(tiny_ckpt, "inference")
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr
  assert json.loads(p.stdout) == json.loads(run(args + ["--question", Q1, "--json", *GREEDY]))


@pytest.mark.parametrize("flag, value", [("--ckpt", "no_such_dir"), ("--video", "no_such.mp4"),
                                         ("--temperature", "-1"), ("--top-p", "0"), ("--max-new-tokens", "0")])
def test_a_bad_argument_is_named_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, flag, value):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("a model was loaded"))
  open(tmp_path / "clip.mp4", "w").close()
  open(tmp_path / "model_config.json", "w").close()   # a checkpoint directory, as far as flags are checked
  argv = {"--ckpt": str(tmp_path), "--video": str(tmp_path / "clip.mp4"), "--question": Q1}
  argv[flag] = str(tmp_path / value) if flag in ("--ckpt", "--video") else value
  with pytest.raises(SystemExit) as e:
    chat.main([x for kv in argv.items() for x in kv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f"{flag} " in err.splitlines()[-1] and value in err, err


def test_a_directory_without_a_checkpoint_is_named(tmp_path, video, monkeypatch, capsys):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("a model was loaded"))
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", str(tmp_path), "--video", video, "--question", Q1])
  assert e.value.code == 2
  assert f"error: --ckpt {tmp_path}: neither a converted" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("name, flag", [("clip.mp4", "--video"), ("photo.png", "--image"),
                                        ("feats.npy", "--features")])
def test_a_file_that_is_no_media_is_named_not_a_traceback(tiny_ckpt, tmp_path, monkeypatch, model, name, flag):
  monkeypatch.setattr(inference, "load", lambda *a, **k: model)   # loaded once for the three
  path = tmp_path / name
  path.write_text("just some text\n")
  with pytest.raises(SystemExit) as e:
    chat.main(["--ckpt", tiny_ckpt, flag, str(path), "--question", Q1])
  msg = str(e.value.code)
  assert msg.startswith(f"error: {path}: unreadable_"), msg


@pytest.mark.parametrize("main", [chat.main, score.main], ids=["chat", "score"])
def test_help(main, capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "--ckpt" in capsys.readouterr().out


# --- train to inference ---------------------------------------------------------------
# The cheapest recipe measured that learns (2 shared cores): count questions ("two" /
# "three"), 512 clips of 28 px with one object per cell of the tiny ViT's 2 x 2 patch
# grid, 2 frames (of the clips' 4 at 2 fps: the demo config keeps every frame up to
# data.max_frames); 200 steps of 16 at lr 8e-3 and the demo's init std 0.07:
# held-out exact match 0.92 (n=60; 9 of these 10). At std 0.02 (the tiny default) 0.60;
# 150 steps at 5e-3 0.75; colour questions, 300 steps: 0.70. ~50 s of CPU, most of it
# compiling (the train step and init ~11 s, evaluate's and the chat's generate ~5 s).
SYNTHETIC_ARGS = "--num-train 512 --num-eval 10 --size 28 --grid 2 --frames 2 --questions count --seed 0"
TRAIN_OVERRIDES = ("total_steps=200 batch_size=16 accum_steps=1 optim.lr=8e-3 model.llm.initializer_range=0.07 "
                   "model.qformer.initializer_range=0.07 data.text_len=40 data.qformer_len=12 "
                   "data.buckets=((40,2,1),) data.max_frames=2 ckpt.every=200 log.every=50 log.progress=False")


@pytest.mark.slow
def test_a_model_trained_on_synthetic_clips_answers_held_out_clips_through_eval_chat(tmp_path, monkeypatch):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  data, wd = tmp_path / "data", tmp_path / "wd"
  subprocess.run([sys.executable, "-m", "llamavid_jax.data.synthetic", "--out", str(data), "--workers", "2",
                  *SYNTHETIC_ARGS.split()], env=env, check=True, capture_output=True, timeout=120)
  p = subprocess.run([sys.executable, "-m", "train.train", f"--config={REPO}/configs/demo.py:tiny",
                      f"--config.data.root={data}", f"--config.workdir={wd}",
                      *[f"--config.{kv}" for kv in TRAIN_OVERRIDES.split()]],
                     env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and "finished at step 200" in p.stdout, p.stdout + p.stderr

  heldout = json.load(open(data / "heldout.json"))
  # the run's held-out evaluator (config.evals.heldout, the demo's accuracy) answered them at step 200
  examples = [json.loads(line) for line in open(wd / "evals/heldout/step_200.jsonl")]
  acc = json.load(open(wd / "evals/heldout/step_200.summary.json"))["metric"]["exact"] / 100
  assert len(examples) == len(heldout) == 10
  m = inference.load(str(wd))
  monkeypatch.setattr(inference, "load", lambda *a, **k: m)   # one load for the ten questions
  right = []
  for sample, ex in zip(heldout, examples):
    question, truth = (t["value"] for t in sample["conversations"])
    question = question.replace("<image>", "").strip()
    got = json.loads(run(["--ckpt", str(wd), "--video", str(data / sample["video"]), "--question", question,
                          "--json", *GREEDY, *NEW]))
    assert ex["id"] == sample["id"] and got["text"] == ex["pred"], (sample["id"], got, ex)   # one path, two callers
    if got["text"] == truth:
      right.append(truth)
      assert got["token_ids"] == m.tokenizer.convert_tokens_to_ids(["▁" + truth])   # one word, then </s>
  print(f"TRAINED held-out exact match through eval.chat: {len(right)}/{len(heldout)} (evaluate: {acc:.2f})")
  assert len(right) >= 8 and set(right) == {"two", "three"}, right


def test_the_release_sampling_is_the_default_per_media():
  """Chat 0.2 / 0.7 (serve/cli.py), a movie 0.6 / 0.9 (run_llamavid_movie.py); flags win."""
  clip = inference.Media("features", np.zeros((1, 5, 8), np.float32))
  movie = inference.Media("features", np.zeros((1, 4, 8), np.float32), inputs="<image>")
  unset = dict(temperature=None, top_p=None, max_new_tokens=4)
  assert chat.release_sampling(unset, clip) == dict(temperature=0.2, top_p=0.7, max_new_tokens=4)
  assert chat.release_sampling(unset, None) == dict(temperature=0.2, top_p=0.7, max_new_tokens=4)
  assert chat.release_sampling(unset, movie) == dict(temperature=0.6, top_p=0.9, max_new_tokens=4)
  assert chat.release_sampling(dict(unset, temperature=0.0), movie)["temperature"] == 0.0
