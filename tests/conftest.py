"""Shared test setup: CPU with 8 fake devices, full-precision matmuls, tiny configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
  from configs import tiny
  return tiny.model_config()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
  """The tiny toy run (`demo.get_config("toy,tiny")`, its default total_steps) trained with
  the data fixtures' tokenizers and export_inference=True -> its WORKDIR (inference/ inside)."""
  from configs import demo
  from tests import data_fixtures
  from train.train import train
  root = tmp_path_factory.mktemp("tiny_ckpt")
  c = demo.get_config("toy,tiny")
  c.workdir = str(root / "wd")
  c.export_inference = True
  c.data.llm_tokenizer = data_fixtures.make_llm_tokenizer(str(root / "llm"))
  c.data.qformer_tokenizer = data_fixtures.make_bert_tokenizer(str(root / "bert"))
  train(c)
  return c.workdir
