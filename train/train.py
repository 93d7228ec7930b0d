"""Training entry point.

  python -m train.train --config configs/demo.py [--config.total_steps=100 ...]
  python -m train.train --config configs/stage2_instruct_7b.py:size=13b --config.workdir=/ckpt/s2

WORKDIR gets config.json (the run's config), checkpoints/, metrics and, when a run
ends (config.export_inference), inference/: the trained model with its tokenizers,
loadable as a converted checkpoint (`eval.score --ckpt WORKDIR/inference`).
`python -m llamavid_jax.export --from-train WORKDIR [--step N] --out DIR` writes the
same for any saved step.

Overrides are ml_collections `config_flags` (`--config.KEY=VALUE`, nested keys dotted);
the config is checked (`check_config`) before anything is built or compiled.

Several processes (one per host, or 2 x 4 CPU devices on localhost for tests):
  --config.distributed.num_processes=2 --config.distributed.process_id=I
  --config.distributed.coordinator=localhost:12345   (auto=True: let JAX detect the cluster)

One host's failure stops every host (docs: DISTRIBUTED_DEFAULTS below):
  - a process that dies: a thread of every process (`PeerWatch`) passes a barrier of the
    distributed runtime with the others every `heartbeat_timeout_s` / 10; one missed for
    `heartbeat_timeout_s` / 3 prints one line naming the lost process and the
    checkpoint to resume from, and exits 1 (before the runtime's own heartbeat check
    would abort with its dump); `shutdown_timeout_s` bounds the exit barrier;
  - at every `agree_every`-th step boundary the processes exchange a status
    (`multihost_utils.process_allgather`): a failed checkpoint save on any process
    stops every process naming that process and the errno (`HostFailure`), and a
    SIGTERM on any process makes every process save the same step and exit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import types

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llamavid_jax.cli import ConfigError, parse_flags, run as run_cli
from train.evaluators import Evaluators, check as check_evals



# config.distributed's failure settings (seconds; `agree_every` in steps): a process
# missing heartbeats this long is declared dead and the others stop (JAX's default 100 s
# leaves a pod idle for minutes); the exit barrier waits this long for the others; the
# start waits this long for every process to join; the step-boundary status exchange
# (save failures, SIGTERM) runs every `agree_every` steps (it syncs host and device).
DISTRIBUTED_DEFAULTS = dict(heartbeat_timeout_s=20, shutdown_timeout_s=30, initialization_timeout_s=300,
                            agree_every=1)


class HostFailure(RuntimeError):
  """Another process failed (its save failed, or it was lost); every process stops."""


def _dist(d, key):
  return d.get(key, DISTRIBUTED_DEFAULTS[key]) if d is not None else DISTRIBUTED_DEFAULTS[key]


def init_distributed(d) -> None:
  if not (d.get("auto") or d.get("num_processes", 1) > 1):
    return
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(heartbeat_timeout_seconds=int(_dist(d, "heartbeat_timeout_s")),
                  shutdown_timeout_seconds=int(_dist(d, "shutdown_timeout_s")),
                  initialization_timeout=int(_dist(d, "initialization_timeout_s")))
  if d.get("auto"):
    jax.distributed.initialize(**timeouts)
  else:
    jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id, **timeouts)


def line_up(c, name: str) -> None:
  """Returns once every process called it with `name` (one process: at once): the
  distributed runtime's barrier, no device collective, waiting up to
  `initialization_timeout_s`. Called before the run's first collective and before
  the first run of each new step program: the processes then create their CPU
  collectives' communicators together (gloo gives up after 30 s), however uneven
  the work before (process 0's plan report, a compilation) was."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  timeout_s = int(_dist(c.get("distributed"), "initialization_timeout_s"))
  multihost.get_barrier_sync_fn()(key=f"llamavid_jax.train.line_up:{name}", timeout_ms=timeout_s * 1000)


def unanswered_processes(c) -> list[int]:
  """After a collective failed: the processes that do not reach a short barrier of the
  distributed runtime (`heartbeat_timeout_s` / 4, so that this answers before the
  runtime's own heartbeat check stops this process), named by the runtime's timeout
  message ([] when every process answered, or the message names none)."""
  from orbax.checkpoint import multihost
  timeout_s = max(1.0, int(_dist(c.get("distributed"), "heartbeat_timeout_s")) / 4)
  try:
    multihost.get_barrier_sync_fn()(key="llamavid_jax.train.lost", timeout_ms=int(timeout_s * 1000))
  except Exception as e:   # the runtime's error: its text names the tasks (/job:.../task:N)
    return _tasks_named(str(e))
  return []


class PeerWatch:
  """A lost process named before the distributed runtime's heartbeat check stops this
  one: a thread passes barriers of the runtime (orbax's public barrier function) with
  the other processes' threads, one every `heartbeat_timeout_s` / 10, each allowed
  `heartbeat_timeout_s` / 3. One that times out names the processes that did not come;
  the thread prints the line (`lost_process_message`) and exits the process with
  status 1. (A collective with a dead peer may wait on it for 30 s, and the runtime
  aborts with its own dump at the heartbeat timeout.) `stop()` at an agreed end (the
  last step, an agreed stop): a barrier missed after it is a peer that finished."""

  def __init__(self, c, last_saved):
    import threading
    self._c, self._last_saved, self.stopping = c, last_saved, False
    hb = int(_dist(c.get("distributed"), "heartbeat_timeout_s"))
    self._period_s, self._timeout_ms = hb / 10, int(hb / 3 * 1000)
    self._thread = threading.Thread(target=self._run, name="PeerWatch", daemon=True)
    self._thread.start()

  def _run(self):
    import time
    from orbax.checkpoint import multihost
    barrier = multihost.get_barrier_sync_fn()
    n = 0
    while not self.stopping:
      try:
        barrier(key=f"llamavid_jax.train.alive:{n}", timeout_ms=self._timeout_ms)
      except Exception as e:   # the runtime's error names the tasks that did not come
        if self.stopping:
          return
        what = f"it missed a barrier of the distributed runtime for {self._timeout_ms / 1000:g} s"
        print(f"error: {lost_process_message(e, self._last_saved(), _tasks_named(str(e)), what)}",
              file=sys.stderr, flush=True)
        os._exit(1)
      n += 1
      time.sleep(self._period_s)

  def stop(self):
    self.stopping = True


def _tasks_named(text: str) -> list[int]:
  """The task ids a runtime error lists as missing ("... timed out task names:\n1\n",
  "... stopped sending heartbeats):\n1\n", or "/job:.../task:1"), without this process."""
  import re
  ids = re.findall(r"task:(\d+)", text)
  for head in ("timed out task names:", "stopped sending heartbeats):"):
    if head in text:
      block = text.split(head, 1)[1].strip().split("\n\n")[0]
      ids += re.findall(r"(\d+)\s*$", block, re.M)
  return sorted({int(t) for t in ids} - {jax.process_index()})


def lost_process_message(e: BaseException, last_saved: int | None, lost: list[int] | None = None,
                         what: str | None = None) -> str:
  """The one line for a collective that failed under this process (`e`), or a peer
  that missed a barrier (`what` says so, instead of `e`'s first line): `lost` names
  the processes (`unanswered_processes`, `PeerWatch`), else the error's text does."""
  import re
  text = str(e)
  m = re.search(r"[Tt]ask[ :/_]*(\d+)|process[ _]?(?:id)?[ :=]*(\d+)", text)
  if lost:
    who = f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
  else:
    who = f"process {m.group(1) or m.group(2)}" if m else "another process"
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  resume = f"step {last_saved}" if last_saved is not None else "the start (no checkpoint yet)"
  what = what or f"a collective failed: {first[:300]}"
  return (f"lost {who} ({what}); every process stops: restart all of them to "
          f"resume from the last checkpoint, {resume}")


def agree(step: int, failure: BaseException | None, stop: bool) -> bool:
  """The step-boundary status exchange of several processes: -> whether any process
  asked to stop (SIGTERM). Raises on every process when any process's save failed: its
  own `CheckpointSaveError` on that process, `HostFailure` naming it and the errno on
  the others."""
  from jax.experimental import multihost_utils
  code = (getattr(failure, "errno", None) or -1) if failure is not None else 0
  saving = getattr(failure, "step", None) or 0
  mine = np.asarray([code, saving, int(stop)], np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), 3)
  bad = [p for p in range(len(every)) if every[p, 0]]
  if failure is not None:
    raise HostFailure(f"process {jax.process_index()}: {failure}; every process stops at step {step} "
                      f"(resume from the last checkpoint)") from failure
  if bad:
    p, e = bad[0], int(every[bad[0], 0])
    what = f"[Errno {e}] {os.strerror(e)} ({errno.errorcode.get(e, '?')})" if e > 0 else "no errno"
    raise HostFailure(f"process {p} failed to save checkpoint step {int(every[p, 1])}: {what}; every process "
                      f"stops at step {step} (resume from the last checkpoint)")
  return bool(every[:, 2].any())


def make_data(c, model_cfg):
  """The process-local batch iterator (each process yields its rows of the global batch)."""
  pi, pc = jax.process_index(), jax.process_count()
  d = c.data
  if d.kind == "toy":
    from train.toy_data import ToyBatches
    return ToyBatches(model_cfg, c.batch_size, d.text_len, d.num_frames, d.qformer_len, d.use_features,
                      seed=c.seed, process_index=pi, process_count=pc, nan_batch=d.get("nan_batch", -1))
  if d.kind == "pipeline":
    import dataclasses
    from llamavid_jax.data import pipeline
    known = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    kw.setdefault("buckets", ((d.text_len, d.num_frames),))
    kw["buckets"] = tuple(tuple(b) for b in kw["buckets"])
    kw.update(batch_size=c.batch_size // pc, seed=c.seed, qformer_max_len=d.qformer_len)
    spec, processor = model_cfg.input_spec, None
    if not kw.get("num_epochs"):   # 0 = as many epochs as total_steps needs (one plan of
      one = pipeline.make_pipeline(  # one epoch counts them; the real plan reuses its verdicts)
          pipeline.PipelineConfig(**{**kw, "num_epochs": 1}), spec, shard_index=pi, shard_count=pc)
      kw["num_epochs"], processor = -(-c.total_steps // max(len(one), 1)), one.processor
    return iter(pipeline.make_pipeline(pipeline.PipelineConfig(**kw), spec, shard_index=pi, shard_count=pc,
                                       processor=processor))
  raise ValueError(f"config.data.kind={d.kind!r}: expected 'toy' or 'pipeline'")


# The keys a training config may have, block by block (`check_config` refuses others:
# a misspelt key must not be dropped silently). `data` also takes PipelineConfig's fields.
TOP_KEYS = frozenset({"model", "data", "optim", "mesh", "batch_size", "total_steps", "accum_steps", "seed",
                      "init_from", "init_from_partial", "ckpt", "log", "distributed", "debug", "export_inference",
                      "workdir", "evals"})
BLOCK_KEYS = {
    "ckpt": frozenset({"every", "keep", "async_save"}),
    "log": frozenset({"every", "progress", "peak_tflops"}),
    "distributed": frozenset({"auto", "num_processes", "process_id", "coordinator", *DISTRIBUTED_DEFAULTS}),
    "debug": frozenset({"kill_after_save_step", "fail_save_process"}),
    "optim": frozenset({"lr", "warmup_ratio", "warmup_steps", "end_lr_ratio", "b1", "b2", "eps", "weight_decay",
                        "clip_norm", "trainable", "lr_mults", "host_state"}),
}
# data keys every kind reads (train.make_data, build, the planner); `root`: a recipe's
# data folder its paths derive from; `nan_batch`: the toy data's fault injection
DATA_KEYS = frozenset({"kind", "text_len", "num_frames", "qformer_len", "use_features", "host_inputs",
                       "input_dtypes", "max_len", "buckets", "root", "nan_batch"})
# PipelineConfig fields that come from elsewhere in the config, never from `data`
DATA_FROM_ELSEWHERE = {"batch_size": "config.batch_size", "seed": "config.seed",
                       "qformer_max_len": "config.data.qformer_len"}


def _keys(block) -> set[str]:
  return set(block.keys()) if hasattr(block, "keys") else set()


def unknown_key_errors(c) -> list[str]:
  """One message per unknown key of the config and of each of its blocks."""
  import dataclasses
  from llamavid_jax.data import pipeline
  errors = []
  unknown = sorted(_keys(c) - TOP_KEYS)
  if unknown:
    errors.append(f"config: unknown keys {unknown}; expected some of {sorted(TOP_KEYS)}")
  for name, known in BLOCK_KEYS.items():
    unknown = sorted(_keys(c.get(name, None)) - known)
    if unknown:
      errors.append(f"config.{name}: unknown keys {unknown}; expected some of {sorted(known)}")
  fields = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)}
  data = _keys(c.get("data", None))
  for k in sorted(data & set(DATA_FROM_ELSEWHERE)):
    errors.append(f"config.data.{k}: not a data key (set {DATA_FROM_ELSEWHERE[k]})")
  unknown = sorted(data - DATA_KEYS - fields - set(DATA_FROM_ELSEWHERE))
  if unknown:
    errors.append(f"config.data: unknown keys {unknown}; expected some of "
                  f"{sorted(DATA_KEYS | fields - set(DATA_FROM_ELSEWHERE))}")
  return errors


def config_errors(c, mesh_shape: dict[str, int] | None = None, *, planned: bool = False) -> list[str]:
  """Every problem of config `c` that stops it running, one message each naming the
  key (see `check_config`). planned=True: the mesh and batch are the planner's to
  choose (train.plan), so only the rest is checked."""
  from llamavid_jax.data.buckets import as_bucket, llm_length
  from llamavid_jax.models.config import from_dict
  from train.planning.policy import run_mesh

  from llamavid_jax import validation
  errors = unknown_key_errors(c)
  if "optim" in c:
    errors += [f"config.{e}" for e in validation.check_optimizer(c.optim)]
  positive = {"batch_size": c.get("batch_size", None), "total_steps": c.get("total_steps", None),
              "accum_steps": c.get("accum_steps", None), "ckpt.every": c.ckpt.get("every", None),
              "log.every": c.log.get("every", None)}
  bad_sizes = False
  for key, v in positive.items():
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      errors.append(f"config.{key}={v!r}: must be a positive integer")
      bad_sizes = True
  if not isinstance(c.get("init_from_partial", False), bool):
    errors.append(f"config.init_from_partial={c.init_from_partial!r}: must be True or False")
  spec = None
  try:
    spec = from_dict(c.model).input_spec
  except (TypeError, ValueError) as e:
    errors.append(f"config.model: {e}")
  if not planned:
    sizes = None
    try:
      sizes = dict(mesh_shape) if mesh_shape is not None else run_mesh(c, jax.device_count())[0]
    except (TypeError, ValueError) as e:
      errors.append(f"config.mesh={c.mesh if isinstance(c.mesh, str) else dict(c.mesh)}: {e}")
    if sizes is not None and not bad_sizes:
      rows, n_proc = c.accum_steps * sizes.get("data", 1) * sizes.get("fsdp", 1), jax.process_count()
      if c.batch_size % rows or c.batch_size % n_proc:
        errors.append(f"config.batch_size={c.batch_size}: must be a multiple of accum_steps x mesh data x fsdp "
                      f"({rows}) and of the number of processes ({n_proc})")
  try:
    check_evals(c)
  except ValueError as e:
    errors.append(str(e))
  d = c.data
  from llamavid_jax.sharding import INPUT_AXES
  for key in ("host_inputs", "input_dtypes"):
    unknown = sorted(set(d.get(key, None) or ()) - set(INPUT_AXES))
    if unknown:
      errors.append(f"config.data.{key}: unknown inputs {unknown}; expected some of {sorted(INPUT_AXES)}")
  try:
    input_placement(d)
  except TypeError as e:
    errors.append(f"config.data.input_dtypes={dict(d.get('input_dtypes'))}: {e}")
  if d.get("kind", None) not in ("toy", "pipeline"):
    errors.append(f"config.data.kind={d.get('kind', None)!r}: expected 'toy' or 'pipeline'")
  for i, b in enumerate(d.get("buckets") or ((d.text_len, d.num_frames),)):
    try:
      b = as_bucket(b)
    except ValueError as e:
      errors.append(f"config.data.buckets[{i}]: {e}")
      continue
    if b.text_len <= 0 or b.frames < 0:
      errors.append(f"config.data.buckets[{i}]={tuple(b)}: expected text_len > 0 and frames >= 0")
      continue
    if spec is not None and llm_length(b, spec) > d.max_len:
      visual = (f"{b.frames} frames x ({spec.tokens_per_frame} tokens - 1)" if spec.movie else
                f"{b.prompts} slot(s) x ({b.frames} frames x {spec.tokens_per_frame} tokens - 1)")
      errors.append(f"config.data.buckets[{i}]={tuple(b)}: {b.text_len} text + {visual} = {llm_length(b, spec)} "
                    f"LLM positions > config.data.max_len={d.max_len}")
  return errors


def check_config(c, mesh_shape: dict[str, int] | None = None, *, planned: bool = False) -> None:
  """Refuses a config that cannot run, before any model is built or compiled: unknown
  keys in any block, sizes, the mesh against the devices (or the given mesh's axis
  sizes; `mesh="auto"`: `planning.policy.run_mesh`'s), the batch against the mesh and
  the processes, every bucket's spliced LLM length against `data.max_len`. Raises
  `ConfigError` holding every problem found, each naming its key."""
  errors = config_errors(c, mesh_shape, planned=planned)
  if errors:
    raise ConfigError(*errors)


def input_placement(d) -> dict:
  """`Trainer`'s host_inputs and input_dtypes from the data block: `data.host_inputs`
  (inputs kept in host memory, e.g. ["features"]: a long video's ViT features reach
  the device a frame chunk at a time) and `data.input_dtypes` ({"features": "float16"}:
  the dtype inputs are cast to on the host, the release's stored feature dtype)."""
  import jax.numpy as jnp
  return dict(host_inputs=tuple(d.get("host_inputs", None) or ()),
              input_dtypes={k: jnp.dtype(v) for k, v in dict(d.get("input_dtypes", None) or {}).items()})


INFERENCE_DIR = "inference"   # WORKDIR/inference: the trained model, as `convert` writes one


class InferenceExportError(RuntimeError):
  """WORKDIR/inference could not be written; the message names the path."""


def _train_config(c) -> dict:
  """The config as it reads back from WORKDIR/config.json."""
  return json.loads(c.to_json())


def _check_export(c) -> None:
  """With config.export_inference, the tokenizers the inference directory copies exist."""
  if not c.get("export_inference", False):
    return
  from llamavid_jax.checkpoint import orbax_io
  try:
    orbax_io.train_tokenizers(c.workdir, _train_config(c))
  except FileNotFoundError as e:
    raise ConfigError(f"config.export_inference=True needs the tokenizers: {e} (or set "
                      "config.export_inference=False)") from None


def check_resume(c) -> None:
  """A WORKDIR that holds checkpoints resumes only with the model shapes and the
  global batch size it was saved with (any process count): other shapes raise
  ConfigError naming the arrays, another `batch_size` names the saved one, and a
  checkpoint without a data position (an older version's) is named too; all before
  anything is built or compiled (a changed lr, schedule or attention impl is allowed)."""
  from llamavid_jax.checkpoint import layout, orbax_io
  from llamavid_jax.models.config import from_dict
  from train import checkpointing
  steps = layout.saved_steps(c.workdir)
  if not steps:
    return
  errors = []
  old_file = os.path.join(c.workdir, orbax_io.TRAIN_CONFIG)
  if os.path.isfile(old_file):
    with open(old_file) as f:
      old = json.load(f)
    was, now = (jax.tree_util.tree_flatten_with_path(orbax_io.shape_tree(from_dict(m)),
                                                     is_leaf=lambda x: isinstance(x, tuple))[0]
                for m in (old["model"], c.model.to_dict()))
    was, now = ({jax.tree_util.keystr(k): v for k, v in t} for t in (was, now))
    differ = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if differ:
      errors.append(f"config.model: the parameter shapes differ from the checkpoints' in {c.workdir} "
                    f"({len(differ)} arrays, e.g. {'; '.join(differ[:3])}): use another workdir")
  ckdir = os.path.join(c.workdir, layout.TRAIN_CHECKPOINTS)
  error = _global_batch_error(checkpointing.saved_json(ckdir, steps[-1], checkpointing.SCHEDULE), c, steps[-1])
  errors += [error] if error else []
  if checkpointing.saved_json(ckdir, steps[-1], checkpointing.DATA_POSITION) is None:
    errors.append(f"{layout.step_dir(c.workdir, steps[-1])}: no {checkpointing.DATA_POSITION}/ (a checkpoint "
                  "of an older version, whose data position was per process): start a new workdir")
  if errors:
    raise ConfigError(*errors)


def _write_config(c) -> None:
  """WORKDIR/config.json: the run's config (what `export --from-train` reads)."""
  from llamavid_jax.checkpoint import orbax_io
  if jax.process_index() == 0:
    os.makedirs(c.workdir, exist_ok=True)
    with open(os.path.join(c.workdir, orbax_io.TRAIN_CONFIG), "w") as f:
      f.write(c.to_json(indent=2))


def export_inference(c, params, step: int) -> str:
  """WORKDIR/inference from the run's live `params` at `step` (params only, no
  optimizer state; layout: checkpoint/orbax_io.py) -> its path. Raises
  `InferenceExportError` naming the path."""
  from llamavid_jax.checkpoint import orbax_io
  out = os.path.join(c.workdir, INFERENCE_DIR)
  try:
    orbax_io.save_from_train(out, c.workdir, _train_config(c), step, params)
  except Exception as e:
    raise InferenceExportError(f"writing the inference directory {out} (step {step}) failed: "
                               f"{type(e).__name__}: {e}") from e
  logging.info("wrote the inference directory %s (step %d)", out, step)
  return out


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the end of the current step and exits."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def build(c, mesh=None) -> types.SimpleNamespace:
  """Model, optimizer, shardings and the jitted step for config `c` on `mesh`
  (default: `c.mesh` over all devices; `mesh="auto"`: `planning.policy.run_mesh`'s,
  the mesh `train.plan` plans). Compiles nothing."""
  from llamavid_jax import sharding
  from llamavid_jax.models import LlamaVid
  from llamavid_jax.models.config import from_dict
  from train import optim, step as S
  from train.planning.policy import run_mesh

  check_config(c, None if mesh is None else dict(mesh.shape))
  model_cfg = from_dict(c.model)
  model = LlamaVid(model_cfg)
  mesh_rule = "the caller's"
  if mesh is None:
    sizes, mesh_rule = run_mesh(c, jax.device_count())
    mesh = sharding.make_mesh(sizes)
  d = c.data
  inputs = S.dummy_inputs(model_cfg, 1, d.text_len, d.num_frames, d.qformer_len, d.use_features)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]
  tx, schedule = optim.make_optimizer(c.optim, boxed, c.total_steps)
  labels = optim.param_labels(boxed, c.optim.trainable)
  if model_cfg.freeze_vision and any(
      lab == optim.TRAINABLE for lab in jax.tree.leaves(labels.get("vit", {}))):
    raise ValueError("optim.trainable matches vit/ parameters but model.freeze_vision is True "
                     "(the ViT output is behind stop_gradient): set model.freeze_vision=False")
  abstract = S.abstract_state(model, tx, inputs)
  shardings = S.state_shardings(abstract, mesh, host_opt_state=c.optim.get("host_state", False))
  trainer = S.Trainer(model, tx, schedule, labels, mesh, shardings, c.accum_steps, **input_placement(c.data),
                      line_up=(lambda name: line_up(c, name)) if jax.process_count() > 1 else None)
  init = lambda seed: S.init_state(model, tx, inputs, jax.random.key(seed), shardings)
  return types.SimpleNamespace(model_cfg=model_cfg, model=model, mesh=mesh, mesh_rule=mesh_rule, tx=tx, schedule=schedule,
                               labels=labels, abstract=abstract, shardings=shardings, trainer=trainer, init=init)


def train(c) -> dict:
  """Runs (or resumes) training. -> dict(step, losses {step: loss}, state, preempted).

  Writes WORKDIR/config.json at the start and, with `config.export_inference` (on by
  default), WORKDIR/inference at the end of a run that was not preempted: the final
  parameters with the model config and both tokenizers, in the layout `convert`
  writes, for `eval.score` and `export`."""
  from flax import linen as nn
  from llamavid_jax.data.buckets import as_buckets, llm_length
  from train import checkpointing, metrics, optim

  _check_export(c)
  if c.get("evals") and jax.process_count() > 1:
    raise ConfigError(f"config.evals: evaluators run in single-process runs only (their answers come from the "
                      f"serving engine, one process's loop), this run has {jax.process_count()} processes: set "
                      "config.evals={} and run python -m eval.run on WORKDIR/inference")
  # the evaluators' question files are read (and missing ones named) before anything compiles
  check_config(c)
  check_resume(c)
  evaluators = Evaluators(c) if c.get("evals") else None
  b = build(c)
  if jax.process_index() == 0:   # the plan of the run, before anything compiles
    from train.planning.report import run_plan_report
    print("\n".join(run_plan_report(c, b.mesh, b.mesh_rule)), flush=True)
  _write_config(c)
  model_cfg, d, shardings, abstract = b.model_cfg, c.data, b.shardings, b.abstract
  line_up(c, "data")   # after process 0's plan report; the data's planning may exchange the plan
  data = make_data(c, model_cfg)

  schedule = _schedule_config(c)
  line_up(c, "checkpoints")   # the run's first collective follows (orbax's)
  ckpt = checkpointing.Checkpointer(os.path.join(c.workdir, "checkpoints"), c.ckpt.every, c.ckpt.keep,
                                    c.ckpt.async_save, schedule=schedule)
  if c.debug.get("fail_save_process", -1) == jax.process_index():   # fault injection for the tests
    ckpt.inject_errno = errno.ENOSPC
  if ckpt.latest_step() is not None:
    state = ckpt.restore(checkpointing.abstract_like(shardings, nn.unbox(abstract)), data)
    logging.info("resumed from step %d", int(state["step"]))
    _warn_schedule_changes(ckpt.schedule(), schedule)
  else:
    state = b.init(c.seed)
    if c.init_from:
      params, n = checkpointing.load_init_params(c.init_from, state["params"], b.mesh, model_cfg,
                                                 partial=c.get("init_from_partial", False))
      state = dict(state, params=params)
      logging.warning("init_from %s: %d of %d parameter arrays loaded", c.init_from, n,
                      len(jax.tree.leaves(params)))
  start = int(state["step"])

  trains = {t: any(l == optim.TRAINABLE for l in jax.tree.leaves(b.labels[t])) for t in b.labels}
  # MFU is reported for the bucket of the longest LLM sequence (batches of shorter ones do less)
  longest = max(as_buckets(d.get("buckets") or ((d.text_len, d.num_frames),)),
                key=lambda bk: llm_length(bk, model_cfg.input_spec))
  flops = metrics.flops_per_step(model_cfg, c.batch_size, longest.text_len, longest.frames, d.qformer_len,
                                 d.use_features, trains, num_prompts=longest.prompts)
  log = metrics.MetricLogger(c.workdir, c.total_steps, start, c.log.every, flops,
                             metrics.peak_flops_per_device(c.log.get("peak_tflops")), c.log.progress)
  trainer = b.trainer
  preempt = _Preemption()
  losses, preempted, evals, host_failed = {}, False, {}, False
  line_up(c, "watch")   # the watch's first barrier allows heartbeat_timeout_s / 3 of skew
  watch = PeerWatch(c, ckpt.latest_step) if jax.process_count() > 1 else None
  try:
    state, preempted = _loop(c, trainer, state, data, ckpt, log, preempt, losses, start, evaluators, evals, watch)
  except HostFailure:
    host_failed = True   # a save of this or another process failed: waiting for ours could hang
    raise
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    host_failed = True   # a collective failed: most likely another process died
    raise HostFailure(lost_process_message(e, ckpt.latest_step(), unanswered_processes(c))) from e
  finally:
    if watch is not None:
      watch.stop()
    preempt.restore()
    if not host_failed:
      ckpt.close()
    log.close()
  step = start + len(losses)
  if c.get("export_inference", False) and not preempted:
    export_inference(c, state["params"], step)
  return dict(step=step, losses=losses, state=state, preempted=preempted, evals=evals)


def _loop(c, trainer, state, data, ckpt, log, preempt, losses, start, evaluators=None, evals=None, watch=None):
  """Steps `start` .. total_steps - 1; fills `losses` and `evals` ({step: {name:
  summary}} of the config's evaluators). -> (state, preempted).

  A step's metrics reach the host while the next step runs (no host sync between
  steps), except before a save: the loss of the saved state is checked first."""
  from train import checkpointing
  pending = None   # (1-based step, device metrics, batch sample ids) not yet checked
  several, failure = jax.process_count() > 1, None
  agree_every = int(_dist(c.get("distributed"), "agree_every"))
  for i in range(start, c.total_steps):
    try:
      batch = next(data)
    except StopIteration:
      raise RuntimeError(f"the data ran out after {i} steps of {c.total_steps}: "
                         f"raise config.data.num_epochs (0 = as many as needed)") from None
    state, m = trainer(state, batch)
    try:
      ckpt.poll()   # a failed background save stops the run here, not at the next save
    except checkpointing.CheckpointSaveError as e:
      if not several:
        raise
      failure = failure or e   # told to the others at the next exchange
    agreed_stop = False
    if several and ((i + 1) % agree_every == 0 or i + 1 == c.total_steps):
      agreed_stop = agree(i + 1, failure, preempt.requested)   # every process, the same answer
      if watch is not None and (agreed_stop or i + 1 == c.total_steps):
        watch.stop()   # every process ends here: a peer that exits first is no loss
    if pending is not None:
      _check_and_log(*pending, losses, log)
    pending = (i + 1, m, batch.get("sample_index"))
    last = i + 1 == c.total_steps
    if evaluators and evaluators.due(i + 1, last):
      _check_and_log(*pending, losses, log)
      pending = None
      evals[i + 1] = evaluators.maybe_run(i + 1, state["params"], last, log.scalars)
    kill = i + 1 == c.debug.get("kill_after_save_step", -1)   # fault injection for the resume test
    stop = (agreed_stop if several else preempt.requested) or ckpt.reached_preemption(i + 1)
    if watch is not None and stop:
      watch.stop()
    if not (ckpt.due(i + 1) or kill or stop or i + 1 == c.total_steps):
      continue
    if pending is not None:
      _check_and_log(*pending, losses, log)
    pending = None
    if several:   # the previous save's failure, anywhere, stops every process before this one starts
      try:
        ckpt.wait()
      except checkpointing.CheckpointSaveError as e:
        failure = failure or e
      agree(i + 1, failure, False)
    ckpt.save(i + 1, state, data, force=stop or i + 1 == c.total_steps)
    if kill:
      ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if stop:
      logging.warning("preempted: saved step %d, exiting", i + 1)
      return state, True
  return state, False


def _schedule_config(c) -> dict:
  """The config the learning-rate schedule, optimizer and data order depend on (saved
  with checkpoints): the global batch size is the data's (any process count sees the
  same global batches for it)."""
  return dict(total_steps=c.total_steps, optim=c.optim.to_dict(), batch_size=c.batch_size)


def _global_batch_error(saved: dict | None, c, step: int) -> str | None:
  """A resume with another global batch size would train on other batches: its message."""
  if saved is not None and "batch_size" in saved and saved["batch_size"] != c.batch_size:
    return (f"config.batch_size={c.batch_size}: the checkpoint of step {step} in {c.workdir} was trained with "
            f"a global batch size of {saved['batch_size']}; a resume keeps it (the number of processes may "
            f"change, the global batch may not): set config.batch_size={saved['batch_size']} or start a new workdir")
  return None


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _warn_schedule_changes(saved: dict | None, now: dict):
  """Warns which schedule keys a resume changes ("total_steps 6 -> 8, optim.lr 0.002 -> 0.001")."""
  if saved is None:
    return
  # JSON has no tuples: compare the config as it reads back from JSON.
  a, b = _flat(saved), _flat(json.loads(json.dumps(now)))
  keys = list(b) + [k for k in a if k not in b]
  changed = [f"{k} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in keys if a.get(k) != b.get(k)]
  if changed:
    logging.warning("resumed with a changed schedule: %s", ", ".join(changed))


def _check_and_log(step, m, sample_index, losses, log):
  """Host-syncs one step's metrics; a non-finite loss stops the run naming the batch."""
  m = {k: float(v) for k, v in jax.device_get(m).items()}
  if not np.isfinite(m["loss"]):
    ids = np.asarray(sample_index if sample_index is not None else [])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      ids = multihost_utils.process_allgather(ids, tiled=True)
    rows = sorted(int(x) for x in ids if x >= 0)
    raise FloatingPointError(f"non-finite loss {m['loss']} at step {step} (0-based batch {step - 1}); "
                             f"sample indices (rows of the data file) in the batch: {rows}")
  losses[step] = m["loss"]
  log.step(step, m)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  c = _CONFIG.value
  init_distributed(c.distributed)
  logging.info("devices: %s x %d processes", jax.device_count(), jax.process_count())
  try:
    out = train(c)
  except HostFailure as e:   # every process got here; skip the exit barrier and background saves
    from llamavid_jax.cli import messages
    sys.stdout.flush()
    print("\n".join(f"error: {m}" for m in messages(e)), file=sys.stderr, flush=True)
    os._exit(1)
  print(f"finished at step {out['step']}" + (" (preempted)" if out["preempted"] else ""), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: tests, the demo and bench/ import this module.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file[:arg]", lock_config=True)
  run_cli(lambda: app.run(main, flags_parser=parse_flags))
