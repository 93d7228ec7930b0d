"""The layers hold (pyproject.toml's import-linter contracts, `make lint-imports`), and the
contracts catch what they are for: an upward import, a lazy one included; a mesh import
in the models; a cycle. Plus the serving layer's one checkpoint check and Model.replace."""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from llamavid_jax import inference
from llamavid_jax.checkpoint import layout, orbax_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("llamavid_jax", "train", "eval", "configs")


def contracts() -> dict[str, str]:
  """{id: name} of pyproject.toml's import-linter contracts."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return {c["id"]: c["name"] for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]}


def status(out: str) -> dict[str, str]:
  """{contract name: KEPT | BROKEN} from lint-imports' report."""
  return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in out.splitlines()
          if line.endswith((" KEPT", " BROKEN"))}


def lint_imports(root: str) -> subprocess.CompletedProcess:
  """`lint-imports` over the packages under `root` with `root`/pyproject.toml."""
  code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
  env = dict(os.environ, PYTHONPATH=root)
  return subprocess.run([sys.executable, "-c", code, "--no-logo", "--no-cache"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
  r = lint_imports(ROOT)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  names = contracts()
  assert {"layers", "core", "models", "acyclic"} <= set(names)
  assert all(status(r.stdout).get(n) == "KEPT" for n in names.values()), r.stdout


def _inject(path: str, line: str) -> None:
  with open(path, "a") as f:
    f.write("\n\n" + line + "\n")


def test_an_upward_import_a_mesh_import_in_a_model_and_a_cycle_break_them(tmp_path):
  """A copy of the packages with three bad imports: a model that imports the serving layer
  (inside a function: lazy imports count), a model that imports jax.sharding, and data
  importing the extractor (the cycle data.features -> extract -> data.features)."""
  for pkg in PACKAGES:
    shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
  _inject(tmp_path / "llamavid_jax/models/splice.py", "def _upward():\n  from llamavid_jax import inference")
  _inject(tmp_path / "llamavid_jax/models/token_gen.py", "from jax.sharding import PartitionSpec")
  _inject(tmp_path / "llamavid_jax/data/features.py", "def _cycle():\n  from llamavid_jax import extract")
  r = lint_imports(str(tmp_path))
  assert r.returncode == 1, r.stdout[-4000:] + r.stderr[-2000:]
  got, names = status(r.stdout), contracts()
  assert [got.get(names[c]) for c in ("layers", "core", "models", "acyclic")] == ["BROKEN"] * 4, r.stdout
  assert "llamavid_jax.models.splice -> llamavid_jax.inference" in r.stdout
  assert "llamavid_jax.models.token_gen -> jax.sharding" in r.stdout
  assert "llamavid_jax.data.features -> llamavid_jax.extract" in r.stdout
  assert "- .data -> .extract" in r.stdout   # the cycle's breaker


def test_check_ckpt_names_the_flag_and_the_layouts(tmp_path):
  with pytest.raises(inference.CheckpointError, match=r"^--ckpt \S+/nope: no such directory$"):
    inference.check_ckpt(str(tmp_path / "nope"))
  with pytest.raises(inference.CheckpointError) as e:
    inference.check_ckpt(str(tmp_path))
  assert str(e.value) == (f"--ckpt {tmp_path}: neither a converted / inference directory (no model_config.json) "
                          "nor a train WORKDIR (no config.json + checkpoints/)")
  os.makedirs(tmp_path / "wd" / layout.TRAIN_CHECKPOINTS / "7")
  open(tmp_path / "wd" / layout.TRAIN_CONFIG, "w").close()
  assert inference.check_ckpt(str(tmp_path / "wd")) == str(tmp_path / "wd")
  assert layout.kind(str(tmp_path / "wd")) == "train" and layout.saved_steps(str(tmp_path / "wd")) == [7]
  open(tmp_path / layout.MODEL_CONFIG, "w").close()
  assert layout.kind(str(tmp_path)) == "inference"
  # the CLIs' form: a usage error (exit 2) of their parser
  from eval import chat
  with pytest.raises(SystemExit) as e:
    chat.check_ckpt(argparse.ArgumentParser(prog="x"), str(tmp_path / "wd" / "checkpoints"))
  assert e.value.code == 2


class _Tok:
  eos_token_id = 2


def test_model_replace_returns_a_new_model_sharing_the_parameters(tiny_cfg):
  params = {"w": np.ones((2, 3), np.float32)}
  m = inference.Model(orbax_io.Inference(tiny_cfg, params, _Tok(), _Tok(), {"max_frames": 4}))
  cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, rope_scaling=4.0))
  r = m.replace(cfg=cfg, sample_cap=None)
  assert r is not m and r.params is m.params and r.tokenizer is m.tokenizer
  assert (r.cfg, r.model.cfg, r.sample_cap) == (cfg, cfg, None)
  assert (m.cfg, m.model.cfg, m.sample_cap) == (tiny_cfg, tiny_cfg, 4)   # unchanged
  assert m.replace(dtype="bfloat16").model is m.model   # the module is rebuilt only for a new cfg
  with pytest.raises(TypeError, match=r"\['params'\] cannot be replaced"):
    m.replace(params={})
