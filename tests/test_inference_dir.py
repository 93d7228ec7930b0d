"""Every checkpoint loads for inference: a train run ends with WORKDIR/inference (the
layout `convert` writes), `export --from-train` writes the same for any saved step,
and `load_for_inference` / `eval.score` take either kind of directory or the WORKDIR."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from eval import score
from llamavid_jax import export
from llamavid_jax.checkpoint import orbax_io
from llamavid_jax.models.config import from_dict
from tests import data_fixtures
from train.train import ConfigError, InferenceExportError, export_inference, train
from tests.conftest import xla_flags

pytestmark = pytest.mark.slow   # a 6-step training run


def _config(root, **kw):
  """The tiny toy run with the data fixtures' tokenizers (toy batches have none)."""
  c = demo.get_config("toy,tiny")
  c.workdir = str(root / "wd")
  c.export_inference = True
  c.data.llm_tokenizer = data_fixtures.make_llm_tokenizer(str(root / "llm"))
  c.data.qformer_tokenizer = data_fixtures.make_bert_tokenizer(str(root / "bert"))
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def run(tiny_ckpt):
  """The shared tiny toy run (conftest.tiny_ckpt: 6 steps) -> its resolved config."""
  from ml_collections import ConfigDict
  with open(os.path.join(tiny_ckpt, "config.json")) as f:
    c = ConfigDict(json.load(f))
  assert c.workdir == tiny_ckpt and c.total_steps == 6
  return c


def _checkpoint_params(workdir, step):
  """The params of the full train state saved at `step` (optimizer state and all)."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return jax.tree.map(np.asarray, state["params"])


def _assert_bitwise(got, want):
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert flat_got.keys() == flat_want.keys() and len(flat_got) > 50
  for k, v in flat_want.items():
    g = np.asarray(flat_got[k])
    assert g.dtype == v.dtype and g.tobytes() == v.tobytes(), jax.tree_util.keystr(k)


def test_every_kind_of_directory_holds_the_last_checkpoints_params(run, tmp_path):
  wd = run.workdir
  assert json.load(open(os.path.join(wd, "config.json")))["data"]["llm_tokenizer"] == run.data.llm_tokenizer
  export.main(["--from-train", wd, "--out", str(tmp_path / "exported")])
  last = _checkpoint_params(wd, 6)
  for d in (os.path.join(wd, "inference"), str(tmp_path / "exported"), wd):
    m = orbax_io.load_for_inference(d)
    assert m.cfg == from_dict(run.model), d
    _assert_bitwise(m.params, last)
    assert len(m.tokenizer) == 41 and len(m.qformer_tokenizer) == 15 and m.qformer_tokenizer.bos_token == "[DEC]"
    assert m.meta["step"] == 6 and m.meta["source"] == "train.train"
  assert sorted(os.listdir(os.path.join(wd, "inference"))) == sorted(os.listdir(tmp_path / "exported")) == [
      "conversion.json", "model_config.json", "params", "qformer_tokenizer", "tokenizer"]


def test_export_from_train_of_an_earlier_step(run, tmp_path):
  export.main(["--from-train", run.workdir, "--step", "4", "--out", str(tmp_path / "s4")])
  got = orbax_io.load_for_inference(str(tmp_path / "s4"))
  _assert_bitwise(got.params, _checkpoint_params(run.workdir, 4))
  assert got.meta["step"] == 4
  assert not np.array_equal(got.params["llm"]["lm_head"]["kernel"],
                            _checkpoint_params(run.workdir, 6)["llm"]["lm_head"]["kernel"])


def test_scorer_gives_the_same_logprobs_on_each_kind(run, tmp_path):
  export.main(["--from-train", run.workdir, "--out", str(tmp_path / "exported")])
  frames = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
  got = {}
  for d in (os.path.join(run.workdir, "inference"), str(tmp_path / "exported"), run.workdir):
    got[d] = score.Scorer(d).score("What is this?", "A cat.", frames=frames, with_eos=True)
  first, *rest = got.values()
  assert first["num_tokens"] == 3 and np.isfinite(first["logprob"]) and first["logprob"] < 0
  print(f"SCORE trained toy model: logprob {first['logprob']:.6f} on each of {len(got)} directories")
  assert all(r == first for r in rest), got


def test_a_failed_export_names_the_path(run, tmp_path):
  c = _config(tmp_path)
  os.makedirs(c.workdir)
  open(os.path.join(c.workdir, "inference"), "w").write("a file where the directory should be")
  params = _checkpoint_params(run.workdir, 6)
  with pytest.raises(InferenceExportError, match=f"writing the inference directory {c.workdir}/inference "
                                                 r"\(step 6\) failed: "):
    export_inference(c, params, 6)


def test_missing_tokenizers_are_named_before_any_model_is_built(tmp_path):
  c = _config(tmp_path)
  c.data.qformer_tokenizer = str(tmp_path / "no_bert")
  with pytest.raises(ConfigError, match=r"config.export_inference=True needs the tokenizers: .*"
                                        r"data.qformer_tokenizer='.*no_bert': no such directory"):
    train(c)
  assert not os.path.exists(os.path.join(c.workdir, "config.json"))


def test_export_from_train_names_what_is_missing(run, tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a train.train WORKDIR \\(no config.json"):
    export.from_train(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5; saved steps: \[4, 6\]"):
    export.from_train(run.workdir, str(tmp_path / "out"), step=5)
  with pytest.raises(FileNotFoundError, match="neither a converted / inference directory"):
    orbax_io.load_for_inference(str(tmp_path))
  with pytest.raises(ValueError, match=r"inference/conversion.json: no release_config \(made by train.train"):
    export.export(os.path.join(run.workdir, "inference"), str(tmp_path / "release"))


def test_a_checkpoint_of_8_devices_loads_in_a_1_device_process(run):
  """Trained on the 8 fake devices (tiny_ckpt); every kind of directory loads where there
  is one device (orbax refuses a different topology unless restored as numpy)."""
  import subprocess
  import sys
  code = ("import sys; from llamavid_jax import inference\n"
          "for d in sys.argv[1:]:\n  m = inference.load(d); print(d, len(m.params))\n")
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code, os.path.join(run.workdir, "inference"), run.workdir],
                     env=env, capture_output=True, text=True, timeout=300,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert p.returncode == 0, p.stderr[-3000:]
  assert len(p.stdout.splitlines()) == 2
