"""The inference CLIs' shared model flags (eval/args.py): --mesh and --quant checked
before anything loads; a model split over the 8 test devices answers as one device."""

import io
import json

import numpy as np
import pytest

from eval import args as eval_args
from eval import chat, score
from llamavid_jax import inference

Q = "What is this?"


@pytest.mark.parametrize("flags,message", [
    (["--mesh", "tensr=8"], "--mesh tensr=8: unknown axes ['tensr']"),
    (["--mesh", "tensor=16"], "--mesh tensor=16: 16 devices do not fit the 8 devices there are"),
    (["--mesh", "tensor=3"], "--mesh tensor=3: 3 devices do not fit the 8 devices there are"),
    (["--mesh", "tensor=x"], "--mesh tensor=x: 'tensor=x': the size is not an integer"),
    (["--mesh", "tensor=4,tensor=2"], "--mesh tensor=4,tensor=2: axis 'tensor' given twice"),
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
    (["--kv-cache", "int4"], "argument --kv-cache: invalid choice: 'int4'"),
])
@pytest.mark.parametrize("main", [chat.main, score.main], ids=["chat", "score"])
def test_bad_mesh_or_quant_is_refused_before_loading(main, flags, message, tiny_ckpt, monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded"))
  feats = tmp_path / "f.npy"
  np.save(feats, np.zeros((1, 5, 32), np.float32))
  argv = ["--ckpt", tiny_ckpt, "--features", str(feats), "--question", Q, *flags]
  with pytest.raises(SystemExit) as e:
    main(argv + (["--answer", "a"] if main is score.main else []))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in err, err


def test_quant_with_mesh_is_passed_to_the_load(monkeypatch):
  """--quant with --mesh: both reach inference.load (quantized kernels placed on the mesh)."""
  import argparse
  p = argparse.ArgumentParser()
  eval_args.add_model_flags(p)
  a = p.parse_args(["--ckpt", "x", "--mesh", "fsdp=4,tensor=2", "--quant", "int4"])
  eval_args.check_model_flags(p, a)
  got = {}
  monkeypatch.setattr(inference, "load", lambda ckpt, **kw: got.update(kw, ckpt=ckpt))
  eval_args.load(a)
  assert got["quant"] == "int4" and got["ckpt"] == "x" and dict(got["mesh"].shape) == dict(
      data=1, fsdp=4, tensor=2, sequence=1)


def test_parse_mesh_fills_a_minus_one_axis():
  assert eval_args.parse_mesh("tensor=2, sequence=-1") == dict(data=1, fsdp=1, tensor=2, sequence=4)


@pytest.mark.parametrize("mesh", ["fsdp=4,tensor=2"])
@pytest.mark.slow
def test_chat_and_score_on_a_mesh_equal_one_device(mesh, tiny_ckpt, tmp_path, capsys):
  """Greedy ids (eval.chat --json) and answer log-probs (eval.score) with the model split
  over the 8 devices by the commands' own --mesh flag: the one-device ids, log-probs within
  1e-5 (the other meshes, and eval.run: tests/test_inference_shard.py)."""
  feats = tmp_path / "f.npy"
  np.save(feats, np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32))
  common = ["--ckpt", tiny_ckpt, "--features", str(feats), "--question", Q]

  def chat_ids(*extra):
    out = io.StringIO()
    chat.main(common + ["--json", "--temperature", "0", "--max-new-tokens", "6", *extra], stdout=out)
    return json.loads(out.getvalue())["token_ids"]

  def logprob(*extra):
    r = score.main(common + ["--answer", "A man is running.", *extra])
    capsys.readouterr()
    return r["logprob"]

  assert chat_ids("--mesh", mesh) == chat_ids()
  np.testing.assert_allclose(logprob("--mesh", mesh), logprob(), atol=1e-5)
