"""Shared test setup: CPU with 8 fake devices, full-precision matmuls, tiny configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are tiny and compiled hundreds of times, run a few steps each (compiling
# is about 70% of the suite's time): XLA:CPU compiles them without LLVM's optimisation passes
# and with its older elementwise-fusion emitters instead of the MLIR ones (the tiny train step
# of tests/test_train_step.py, built and run 2 steps on fsdp 8: 19.6 s by default, 13.0 s at
# opt level 0, 9.2 s with the old emitters too, whose losses are bitwise opt level 0's).
# Numerics differ from the default in the last bits only; no test compares against a figure
# computed under other flags (subprocesses inherit these; those that set their own device
# count take `xla_flags`).
# LLAMAVID_TEST_XLA_OPT=1 keeps the default.
FAST_COMPILE = ("" if os.environ.get("LLAMAVID_TEST_XLA_OPT") == "1"
                else "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's subprocess with `devices` CPU devices, compiling as this one does."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}".strip()


# No persistent compilation cache: with one shared by the workers and their subprocesses
# (every compile written), XLA:CPU's executable.serialize() segfaulted a worker in about
# one full run of three, in train steps and engine prefills alike, single-threaded too
# (jax 0.10.2), and pytest-xdist then hung waiting for the dead worker's file.
# (tests/test_multihost_elastic.py keeps a cache of its own, which its 2-process runs need.)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402
import pytest  # noqa: E402

# A compiled executable: a fresh compile, or one read from a persistent cache.
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
  from configs import tiny
  return tiny.model_config()


@pytest.fixture(scope="session")
def clip28(tmp_path_factory):
  """A 28 px mp4 of two shapes, 4 frames at 2 fps (2 frames at the 1-fps rule)."""
  import numpy as np
  from llamavid_jax.data import synthetic
  path = str(tmp_path_factory.mktemp("media") / "clip.mp4")
  objects = synthetic.make_clip(np.random.default_rng(0), 28, 2, grid=2, n=2)
  synthetic.write_mp4(path, [synthetic.draw(28, objects, k / 2) for k in range(4)], fps=2)
  return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
  """WORKDIR of the toy tiny run (configs/demo.py:toy,tiny: 6 steps on random batches,
  the data fixtures' tokenizers, config.export_inference=True, so WORKDIR/inference too):
  an untrained checkpoint for the inference and CLI tests. Under pytest-xdist the
  workers share one: the first builds it (under a file lock) in the run's base folder."""
  import filelock
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):   # .../pytest-N/popen-gwK: the run's folder is the parent
    root = base.parent / "tiny_ckpt"
    with filelock.FileLock(str(root) + ".lock"):
      if not (root / "done").exists():
        _train_tiny(root)
        (root / "done").write_text("")
    return str(root / "wd")
  root = tmp_path_factory.mktemp("tiny_ckpt")
  _train_tiny(root)
  return str(root / "wd")


def _train_tiny(root):
  from configs import demo
  from tests import data_fixtures
  from train.train import train
  c = demo.get_config("toy,tiny")
  c.workdir = str(root / "wd")
  c.export_inference = True
  c.data.llm_tokenizer = data_fixtures.make_llm_tokenizer(str(root / "llm"))
  c.data.qformer_tokenizer = data_fixtures.make_bert_tokenizer(str(root / "bert"))
  out = train(c)
  assert out["step"] == c.total_steps and not out["preempted"]


# Seconds each slow file took on one pytest-xdist worker (a fresh-clone `make test` on the
# 2-core machine, 2026-12-07). The Makefile's two workers take runs of consecutive tests
# (`--dist load`) in collection order: longest files first, so that the end of the run is
# short tests both workers share, not one long file on one worker. Files not named take
# ~10 s or less and follow in their usual order.
FILE_SECONDS = {
    "test_train_step": 119, "test_train_resume": 78, "test_inference_shard": 68,
    "test_eval_chat": 61, "test_multihost_elastic": 59, "test_serve": 51,
    "test_models_llamavid": 45, "test_generate": 37, "test_configs": 37, "test_inference_mesh": 36,
    "test_ops_attention": 33, "test_checkpoint": 32, "test_long_context": 32, "test_quant": 31,
    "test_eval_needle": 29, "test_kv_quant": 27, "test_multihost_plan": 27,
    "test_engine_chunked": 25, "test_train_failures": 25, "test_eval_web": 22,
    "test_inference_dir": 14, "test_data_pipeline": 14, "test_serve_soak": 11,
    "test_models_parity": 11, "test_eval_run": 10,
}


def pytest_collection_modifyitems(config, items):
  """Longest files first (FILE_SECONDS), each file's tests in their own order."""
  seconds = lambda item: FILE_SECONDS.get(item.path.stem, 0)   # noqa: E731
  items[:] = sorted(items, key=lambda item: -seconds(item))   # stable: a file's tests stay in order
