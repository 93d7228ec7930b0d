"""Recipes and their checks: one variant parser, one override mechanism (config_flags),
every shipped recipe valid on the test mesh, bad configs refused before any compile,
and the documented `python -m train.train --config configs/demo.py` run."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import common, demo, image_336_7b, needle, stage1_align_7b, stage2_instruct_7b, stage3_long_video_7b, tiny
from train.train import ConfigError, check_config, train
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_flags_and_unknown_keys():
  a = common.parse_arg("size=13b,stage=1,toy", size="7b", stage=2, toy=False, tiny=False)
  assert (a.size, a.stage, a.toy, a.tiny) == ("13b", 1, True, False)
  assert common.parse_arg(None, size="7b").size == "7b"
  with pytest.raises(ValueError, match=r"'sise=13b': expected one of \['size'\]"):
    common.parse_arg("sise=13b", size="7b")
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("stage", stage=2)


@pytest.mark.parametrize("module,arg", [(stage1_align_7b, "size=13b"), (stage2_instruct_7b, None),
                                        (stage3_long_video_7b, "size=13b"), (image_336_7b, "stage=1"),
                                        (image_336_7b, "stage=2,size=13b"), (demo, None), (demo, "toy,tiny"),
                                        (demo, "content_only"), (needle, None), (needle, "tiny")])
def test_every_recipe_passes_its_checks_on_eight_devices(module, arg):
  c = module.get_config(arg)
  check_config(c)                                       # the 8 fake CPU devices of the suite
  size = (arg or "").partition("size=")[2].split(",")[0] or "7b"
  if module not in (demo, needle):   # the CPU recipes' tiny LLMs
    assert {k: c.model.llm[k] for k in common.LLM[size]} == common.LLM[size]


def test_size_tables_are_the_release_llms():
  assert common.LLM["13b"] == dict(vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                                   mlp_dim=13824)
  assert stage3_long_video_7b.get_config().model.llm.rope_scaling == 16.0
  assert tiny.model_config().llm.d_model == 32 and tiny.model_config("image").compress_type == "none"


def test_content_only_is_one_derivation():
  c = demo.get_config("content_only")
  assert not c.model.use_context_token and "qformer/" not in c.optim.trainable
  assert demo.content_only(demo.get_config()).to_dict() == dict(c.to_dict(), workdir=demo.get_config().workdir)


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, r"config.batch_size=0: must be a positive integer"),
    ("total_steps", -1, r"config.total_steps=-1"),
    ("mesh", dict(data=3, fsdp=1, tensor=1, sequence=1), r"config.mesh=.*3 devices do not fit the 8"),
    ("mesh", dict(data=-1, fsdp=-1), r"config.mesh=.*at most one -1"),
    ("mesh", dict(data=-1, pipeline=2), r"config.mesh=.*: unknown axes \['pipeline'\]"),
    ("batch_size", 12, r"config.batch_size=12: must be a multiple of accum_steps x mesh data x fsdp \(16\)"),
    ("data.buckets", ((12, 2, 1), (40, 8, 2)), r"config.data.buckets\[1\]=\(40, 8, 2\): 40 text \+ 2 slot\(s\) x "
                                              r"\(8 frames x 2 tokens - 1\) = 70 LLM positions > config.data.max_len=64"),
    ("model.compress_type", "grid", r"config.model: .*compress_type"),
])
def test_bad_config_is_refused_naming_the_key_before_any_compile(key, value, match, tmp_path):
  c = demo.get_config("toy,tiny")
  c.workdir = str(tmp_path)
  c.data.max_len = 64
  c.update_from_flattened_dict({key: value})
  _refused_before_any_compile(c, ConfigError, match)


@pytest.mark.slow
def test_documented_train_command_runs_on_generated_demo_data(tmp_path):
  """README: `python -m train.demo --data_only` writes workdir/demo/data, then
  `python -m train.train --config configs/demo.py --config.total_steps=3` trains on it
  (here a small dataset in the same place, made by the same generator arguments)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  data = tmp_path / demo.DATA
  gen = [sys.executable, "-m", "llamavid_jax.data.synthetic", "--out", str(data), *demo.SYNTHETIC_ARGS.split(),
         "--num-train", "32", "--num-eval", "4", "--workers", "1"]
  subprocess.run(gen, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=900)
  cmd = [sys.executable, "-m", "train.train", f"--config={REPO}/configs/demo.py", "--config.total_steps=3",
         "--config.log.progress=False"]
  p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "finished at step 3" in p.stdout
  run = tmp_path / "workdir/demo_train/context"
  assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
  assert (run / "checkpoints/3").is_dir()

  # The held-out evaluator (config.evals.heldout: the demo's accuracy) ran after step 3 on
  # the in-memory parameters; the benchmark runner on the exported model and the same
  # MSVD-QA-format file gives the same predictions and the same accuracy.
  evaluated = [json.loads(line) for line in (run / "evals/heldout/step_3.jsonl").read_text().splitlines()]
  summary = json.loads((run / "evals/heldout/step_3.summary.json").read_text())
  assert len(evaluated) == 4 and summary["metric"]["count"] == 4 and "[eval] step 3 heldout" in p.stdout
  from eval import run as runner
  got = runner.main(["msvd_qa", "--ckpt", str(run / "inference"), "--question-file", str(data / "heldout_qa.json"),
                     "--video-folder", str(data / "videos"), "--out", str(tmp_path / "pred.jsonl"),
                     "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "64", "--no-progress"])
  ran = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
  assert [(r["id"], r["question"], r["answer"], r["pred"]) for r in ran] == \
      [(r["id"], r["question"], r["answer"], r["pred"]) for r in evaluated]
  assert got["metric"]["exact"] == summary["metric"]["exact"]


@pytest.mark.parametrize("evals, error, match", [
    (dict(bench="nope"), ConfigError, r"config.evals.x.bench='nope': not one of"),
    (dict(bench="msvd_qa", args=dict(foo=1)), ConfigError, r"config.evals.x.args.foo: not an argument of msvd_qa"),
    (dict(bench="msvd_qa", every=-1), ConfigError, r"config.evals.x.every=-1: must be a non-negative integer"),
    (dict(bench="msvd_qa", colour=1), ConfigError, r"config.evals.x: unknown keys \['colour'\]"),
    (dict(bench="msvd_qa", args=dict(question_file="/nope/q.json", video_folder="/nope")), FileNotFoundError,
     r"config.evals.x: --question-file /nope/q.json: no such file; --video-folder /nope: no such folder"),
])
def test_bad_evaluators_are_named_before_any_compile(evals, error, match, tmp_path):
  c = demo.get_config("toy,tiny")
  c.workdir = str(tmp_path)
  c.evals = dict(x=evals)
  _refused_before_any_compile(c, error, match)


def _refused_before_any_compile(c, error, match):
  """train(c) raises `error` matching `match`, and JAX compiled nothing before it."""
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(error, match=match):
      train(c)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


@pytest.mark.parametrize("key,value,match", [
    ("data.bucket", ((12, 2),), r"config.data: unknown keys \['bucket'\]"),
    ("data.seed", 3, r"config.data.seed: not a data key \(set config.seed\)"),
    ("ckpt.evry", 3, r"config.ckpt: unknown keys \['evry'\]"),
    ("optim.learning_rate", 1e-3, r"config.optim: unknown keys \['learning_rate'\]"),
    ("totl_steps", 3, r"config: unknown keys \['totl_steps'\]"),
])
def test_unknown_config_keys_are_errors_in_every_block(key, value, match, tmp_path):
  c = demo.get_config("toy,tiny")
  c.workdir = str(tmp_path)
  with c.unlocked():
    *block, last = key.split(".")
    node = c
    for b in block:
      node = node[b]
    node[last] = value
  _refused_before_any_compile(c, ConfigError, match)


def test_every_config_error_is_reported_at_once():
  c = demo.get_config("toy,tiny")
  c.batch_size, c.log.every, c.data.kind = 0, -2, "tfds"
  with c.unlocked():
    c.data.colour = 1
  with pytest.raises(ConfigError) as e:
    check_config(c)
  assert e.value.messages == [
      "config.data: unknown keys ['colour']; expected some of " + e.value.messages[0].split("expected some of ")[1],
      "config.batch_size=0: must be a positive integer", "config.log.every=-2: must be a positive integer",
      "config.data.kind='tfds': expected 'toy' or 'pipeline'"]
  assert str(e.value) == "; ".join(e.value.messages)


@pytest.mark.parametrize("args,lines", [
    ([":toy,tiny", "--config.batch_size=0", "--config.total_steps=-1"],
     ["error: config.batch_size=0: must be a positive integer",
      "error: config.total_steps=-1: must be a positive integer"]),
    ([":toy,tiny,bad"], ["error: flag --config=CONFIG:toy,tiny,bad: config argument 'bad': expected one of "
                         "['content_only', 'tiny', 'toy']"]),
    ([":toy,tiny", "--config.nokey=3"], ["error: --config.nokey=3: no such key in the config"]),
    ([":toy,tiny", "--config.optim.lr=-1", "--config.optim.b2=1.5"],
     ["error: config.optim.b2 must be in (0, 1), got 1.5", "error: config.optim.lr must be > 0, got -1.0"]),
])
def test_cli_prints_config_errors_one_line_each_with_exit_status_2(args, lines):
  """python -m train.train with bad values, a bad recipe variant, a key the config
  lacks: no traceback, one `error:` line each, exit status 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("LLAMAVID_DEBUG", None)
  config = f"{REPO}/configs/demo.py"
  cmd = [sys.executable, "-m", "train.train", "--config", config + args[0], *args[1:]]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 2, p.stderr
  assert p.stderr.replace(config, "CONFIG").splitlines() == lines


def _exits(main, argv=(), env=None):
  """cli.run(main) -> (exit status, stderr lines)."""
  import contextlib
  import io
  from llamavid_jax import cli
  err = io.StringIO()
  old = sys.argv
  sys.argv = ["prog", *argv]
  try:
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
      cli.run(main, debug_env="LLAMAVID_TEST_DEBUG")
  finally:
    sys.argv = old
  return e.value.code, err.getvalue().splitlines()


def test_cli_run_turns_known_errors_into_one_line_and_an_exit_status(monkeypatch):
  from llamavid_jax.data import DataError
  from llamavid_jax.inference import MediaError

  def raise_(e):
    def main():
      raise e
    return main

  assert _exits(lambda: 0) == (0, [])
  assert _exits(raise_(ConfigError("config.a=1: bad", "config.b=2: worse"))) == (
      2, ["error: config.a=1: bad", "error: config.b=2: worse"])
  assert _exits(raise_(FileNotFoundError("/x.json: no such file"))) == (2, ["error: /x.json: no such file"])
  assert _exits(raise_(DataError("too many skips"))) == (1, ["error: too many skips"])
  assert _exits(raise_(MediaError("/v.mp4", "no video stream"))) == (1, ["error: /v.mp4: no video stream"])
  with pytest.raises(KeyError):          # not ours: a bug keeps its traceback
    _exits(raise_(KeyError("x")))
  seen = []
  with pytest.raises(ConfigError):       # --debug: the traceback, and main never sees the flag
    _exits(lambda: seen.append(sys.argv[1:]) or raise_(ConfigError("c"))(), ["--debug", "--x=1"])
  assert seen == [["--x=1"]]
  monkeypatch.setenv("LLAMAVID_TEST_DEBUG", "1")
  with pytest.raises(DataError):
    _exits(raise_(DataError("d")))
