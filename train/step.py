"""Loss, train state and the jitted train step with explicit shardings.

Loss: next-token cross entropy, logits[:, :-1] against the spliced labels[:, 1:],
summed over every non-ignored token of the global batch and divided by their count.
With gradient accumulation the step scans over micro-batches accumulating the *sums*
(loss and gradients) and token counts, and divides once at the end, so the result is
exactly the large-batch mean (not a mean of per-micro-batch means). That is why we do
not use `optax.MultiSteps`: it averages per-micro-step gradients with equal weights,
and it would also make one "step" of ours several optimizer calls, putting the
schedule, logging and checkpoints out of step with the data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from llamavid_jax import decisions, jax_compat, parallel, sharding
from llamavid_jax.models import LlamaVid, splice_labels
from llamavid_jax.models.llamavid import natural_positions
from llamavid_jax.models.splice import IGNORE, batch_spliced_length
from train.optim import TRAINABLE

MODEL_INPUTS = ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", "frames", "features")


LOSS_CHUNK = 4096   # LLM positions per chunk of the loss: [B, chunk, V] fp32 logits at a time


def loss_sums(model: LlamaVid, params, batch: dict, chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
  """-> (float32[] summed cross entropy, int32[] number of target tokens).

  Sequences longer than `chunk` positions get their logits and cross entropy one chunk
  at a time, rematerialised in the backward pass, so the full [B, S', V] fp32 logits
  never exist (MaxText's vocabulary tiling): at 64K positions and V = 32000 they would
  be 8 GiB per sample. Shorter ones take the plain path."""
  variables = {"params": params}
  x, layout, _ = model.apply(variables, **{k: batch[k] for k in MODEL_INPUTS if k in batch},
                             place=parallel.ring_placement(), fetch=parallel.frame_fetcher(),
                             method=LlamaVid.embed_inputs)                 # [B, S', D], natural order
  labels = splice_labels(batch["labels"], layout)                         # [B, S']
  targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE)   # position i predicts i + 1
  positions, slots = natural_positions(layout.valid)
  # The one layout decision: the LLM runs on it and the loss sums over its targets in the
  # same order (the sum is the same; no permutation back).
  ctx = decisions.llm_layout(model.cfg, x.shape[1])
  x, positions, slots, valid, targets = ctx.apply(x, positions, slots, layout.valid, targets)
  h = model.apply(variables, x, positions, slots, valid, kv_slots=ctx.kv_slots(slots), method=LlamaVid.decode)

  logits_of = lambda h: model.apply(variables, h, method=LlamaVid.logits)   # [B, c, D] -> [B, c, V]

  def ce_sums(logits, targets):
    mask = targets != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(jnp.where(mask, ce, 0.0)), mask.sum().astype(jnp.int32)

  if h.shape[1] <= chunk:
    return ce_sums(logits_of(h), targets)
  pad = -h.shape[1] % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
  blocks = lambda a: jnp.moveaxis(a.reshape((a.shape[0], -1, chunk) + a.shape[2:]), 1, 0)   # [C, B, chunk, ...]
  step = jax.checkpoint(lambda acc, x: (jax.tree.map(jnp.add, acc, ce_sums(logits_of(x[0]), x[1])), None))
  (s, count), _ = jax.lax.scan(step, (jnp.float32(0), jnp.int32(0)), (blocks(h), blocks(targets)))
  return s, count


def _split(labels, tree):
  """-> (trainable subtree, frozen subtree) with None in the other's places."""
  t = jax.tree.map(lambda l, p: p if l == TRAINABLE else None, labels, tree)
  f = jax.tree.map(lambda l, p: None if l == TRAINABLE else p, labels, tree)
  return t, f


def _merge(labels, t, f):
  return jax.tree.map(lambda l, a, b: a if l == TRAINABLE else b, labels, t, f, is_leaf=lambda x: x is None)


def make_train_step(model: LlamaVid, tx: optax.GradientTransformation, schedule, labels, accum_steps: int = 1):
  """-> train_step(state, batch) -> (state, metrics). Only trainable leaves are
  differentiated (frozen ones are constants of the loss), and only they are accumulated."""

  def grads_of(trainable, frozen, mb):
    f = lambda t: loss_sums(model, _merge(labels, t, frozen), mb)
    (s, n), g = jax.value_and_grad(f, has_aux=True)(trainable)
    return s, n, g

  def train_step(state, batch):
    params = state["params"]
    trainable, frozen = _split(labels, params)
    if accum_steps == 1:
      s, n, g = grads_of(trainable, frozen, batch)
    else:
      # Global batch G = A * m rows, each device holding a contiguous block: view it as
      # [m, A] and take column i, so every micro-batch is spread over all devices. Each
      # step slices its own rows (no transposed copy of the batch): an input that lives
      # in host memory stays there, a micro-batch at a time reaching the device.
      def column(x, i):   # rows i, i + A, ... of x
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)

      def micro(k, x, i):
        mesh = jax.sharding.get_abstract_mesh()
        if _memory_kind(x) == HOST:   # each batch shard slices its rows of micro-batch i where they live
          spec = sharding.input_spec(k, x.shape, mesh)

          def local(x, i):   # x: this shard's m' x A rows; micro-batch i is its rows i, i + A, ...
            if x.shape[0] == accum_steps:
              # Row i as a slice of the merged (row, next axis) axis, reshapes that are
              # bitcasts: the model's own slice of the next axis (a frame chunk) then
              # merges with this one into a 1-D slice of host memory, the only kind
              # TPU's host offloading does ("Async slice only supports slicing in 1
              # dimension"); a row slice then a frame slice would merge into a 2-D one.
              # XLA's host offloading takes this reshape for the long-video recipe's
              # shapes (train.plan compiles its 64K step for v5p: f16[8, 7680, 256, 1408]
              # a chip), not for every shape: a tiny f16[8, 2, 5, 32] fails ("Only
              # handling bitcasts with majormost dimension of size 1"). The lasting fix
              # is host features laid out (frame block, row, frame) by the loader.
              flat = x.reshape((-1,) + x.shape[2:])
              return jax.lax.dynamic_slice_in_dim(flat, i * x.shape[1], x.shape[1], axis=0).reshape((1,) + x.shape[1:])
            return column(x, i)
          return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)(x, i)
        x = column(x, i)
        return jax.lax.with_sharding_constraint(x, P(*sharding.input_spec(k, x.shape, mesh)))

      def body(acc, i):
        mb = {k: micro(k, v, i) for k, v in batch.items()}
        return jax.tree.map(jnp.add, acc, grads_of(trainable, frozen, mb)), None

      zero = (jnp.float32(0), jnp.int32(0), jax.tree.map(jnp.zeros_like, trainable))
      (s, n, g), _ = jax.lax.scan(body, zero, jnp.arange(accum_steps))
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    g = jax.tree.map(lambda x: x / denom, g)
    grad_norm = optax.tree.norm(g)
    full = _merge(labels, g, jax.tree.map(jnp.zeros_like, frozen))       # set_to_zero ignores these
    # Optimizer state kept in host memory (state_shardings(host_opt_state=True)) visits
    # the device for its update only. XLA schedules the transfers: measured (train.plan,
    # 13B at 64K on 4 v5p chips) most of it is on the chips at once during the update, so
    # the peak drops by less than the moments' size (there: 25 GiB out, 21 back).
    moved = jax.tree.map(lambda x: _memory_kind(x) == HOST, state["opt_state"])
    opt_state = jax.tree.map(lambda x, h: jax.device_put(x, jax.memory.Space.Device) if h else x,
                             state["opt_state"], moved)
    updates, opt_state = tx.update(full, opt_state, params)
    opt_state = jax.tree.map(lambda x, h: jax.device_put(x, jax.memory.Space.Host) if h else x, opt_state, moved)
    new = dict(step=state["step"] + 1, params=optax.apply_updates(params, updates), opt_state=opt_state)
    positions = batch["input_ids"].shape[0] * batch_spliced_length(batch, model.cfg.tokens_per_frame,
                                                                 movie=model.cfg.movie)   # B * S'
    metrics = dict(loss=s / denom, tokens=n, grad_norm=grad_norm, lr=schedule(state["step"]),
                   positions=jnp.int32(positions))
    return new, metrics

  return train_step


# --- shardings and state --------------------------------------------------------------
def batch_sharding(mesh, key: str, shape, memory_kind: str | None = None) -> NamedSharding:
  """Rows over the `batch` mesh axes; for frame inputs also the frame axis over those of
  `frames` when they divide T: each such device then holds, and runs the Q-Former on,
  its share of a long video's frames instead of all of them (sharding.INPUT_AXES).
  memory_kind "pinned_host": the input stays in host memory (`Trainer(host_inputs=)`)."""
  return NamedSharding(mesh, sharding.input_spec(key, shape, mesh), memory_kind=memory_kind)


HOST = "pinned_host"   # the memory kind of `host_inputs`


def _memory_kind(x) -> str | None:
  """HOST for a traced array that lives in host memory, else None (the device's)."""
  return HOST if jax_compat.in_host_memory(x) else None


def dummy_inputs(cfg, batch: int, text_len: int, num_frames: int, qformer_len: int, use_features: bool):
  """Zero model inputs of the given shapes (for init and eval_shape)."""
  d = dict(input_ids=np.zeros((batch, text_len), np.int32), text_mask=np.ones((batch, text_len), bool),
           frame_mask=np.ones((batch, num_frames), bool), qformer_ids=np.zeros((batch, qformer_len), np.int32),
           qformer_mask=np.ones((batch, qformer_len), bool))
  d["input_ids"][:, 0] = cfg.image_token_id
  v = cfg.vision
  if use_features:
    d["features"] = np.zeros((batch, num_frames, *cfg.feature_shape), np.float32)
  else:
    d["frames"] = np.zeros((batch, num_frames, v.image_size, v.image_size, 3), np.float32)
  return d


def abstract_batch(cfg, batch: int, text_len: int, num_frames: int, qformer_len: int, use_features: bool,
                   num_prompts: int = 1) -> dict:
  """ShapeDtypeStructs of a global training batch as the data gives it (model inputs and
  labels; qformer_* [B, P, L] for P > 1 prompts); `Trainer.abstract_batch` places them."""
  small = dummy_inputs(cfg, 1, 1, 1, qformer_len, use_features)
  shapes = {k: (batch,) + v.shape[1:] for k, v in small.items()}
  shapes.update(input_ids=(batch, text_len), text_mask=(batch, text_len), frame_mask=(batch, num_frames))
  if num_prompts > 1:
    shapes.update(qformer_ids=(batch, num_prompts, qformer_len), qformer_mask=(batch, num_prompts, qformer_len))
  for k in ("frames", "features"):
    if k in shapes:
      shapes[k] = (batch, num_frames) + small[k].shape[2:]
  dtypes = {k: v.dtype for k, v in small.items()}
  shapes["labels"], dtypes["labels"] = shapes["input_ids"], np.dtype(np.int32)
  return {k: jax.ShapeDtypeStruct(shapes[k], dtypes[k]) for k in shapes}


def abstract_state(model, tx, inputs: dict):
  """-> (boxed abstract state, for shardings) from the model's init on `inputs`."""
  def init(rng):
    boxed = model.init(rng, **inputs)["params"]
    return dict(step=jnp.int32(0), params=boxed, opt_state=tx.init(boxed))
  return jax.eval_shape(init, jax.random.key(0))


def state_shardings(boxed_abstract, mesh, host_opt_state: bool = False):
  """NamedShardings by the logical rules for params and optimizer moments (optax maps
  over `nn.Partitioned` boxes, so AdamW's moments carry the params' axis names).
  host_opt_state: the optimizer state lives in host memory (HOST) between steps, the
  device holding only parameters (config optim.host_state; MaxText's optimizer offload)."""
  out = sharding.param_shardings(boxed_abstract, mesh)
  if host_opt_state:
    out["opt_state"] = jax.tree.map(lambda s: s.with_memory_kind(HOST), out["opt_state"])
  return out


def init_state(model, tx, inputs: dict, rng, shardings) -> dict:
  """Initialises params and optimizer state directly into their shardings."""
  def init(rng):
    params = nn.unbox(model.init(rng, **inputs)["params"])
    return dict(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(rng)


class Trainer:
  """The jitted step bound to a mesh: `trainer(state, local_batch) -> (state, metrics)`.

  Each process passes its own rows of the global batch (numpy); they are assembled
  into global arrays with rows over the mesh axes of `batch`.

  line_up: None, or a function `line_up(name)` that returns once every process called
  it with `name` (several processes: a barrier). A step program new to this trainer is
  then compiled first and run only after `line_up`, so the processes start its first
  collectives together however long each took to compile (CPU collectives over gloo
  give up creating their communicator after 30 s)."""

  def __init__(self, model, tx, schedule, labels, mesh, shardings, accum_steps: int = 1,
               host_inputs=(), input_dtypes=None, line_up=None):
    self.mesh = mesh
    self.shardings = shardings
    self.accum_steps = accum_steps
    self.host_inputs = tuple(host_inputs)           # inputs kept in host memory (HOST)
    self.input_dtypes = dict(input_dtypes or {})    # key -> dtype inputs are cast to on the host
    self._step = make_train_step(model, tx, schedule, labels, accum_steps)
    self._jits = {}   # one per batch signature (frames vs features)
    self.line_up, self._lined_up = line_up, set()   # the jitted steps compiled and lined up

  def check_batch(self, global_batch: int, accum_steps: int):
    rows = sharding.mesh_axes("batch")
    n = math.prod(self.mesh.shape[a] for a in rows)
    if global_batch % (accum_steps * n):
      raise ValueError(f"global batch {global_batch} must be a multiple of accum_steps ({accum_steps}) x "
                       f"{' x '.join(rows)} ({n}): every micro-batch is split over all batch shards")

  def jitted(self, batch: dict):
    key = tuple(sorted((k, v.ndim, sharding.input_spec(k, v.shape, self.mesh)) for k, v in batch.items()))
    if key not in self._jits:
      bs = {k: self.sharding(k, v.shape) for k, v in batch.items()}
      self._jits[key] = jax.jit(self._step, in_shardings=(self.shardings, bs),
                                out_shardings=(self.shardings, NamedSharding(self.mesh, P())), donate_argnums=0)
    return self._jits[key]

  def sharding(self, key: str, shape) -> NamedSharding:
    return batch_sharding(self.mesh, key, shape, HOST if key in self.host_inputs else None)

  def abstract_batch(self, cfg, batch: int, text_len: int, num_frames: int, qformer_len: int,
                     use_features: bool, num_prompts: int = 1) -> dict:
    """ShapeDtypeStructs of a global batch as `global_batch` makes them (dtypes, shardings,
    memory kinds): what the step compiles for, without data (train.plan)."""
    shapes = abstract_batch(cfg, batch, text_len, num_frames, qformer_len, use_features, num_prompts)
    return {k: jax.ShapeDtypeStruct(v.shape, self.input_dtypes.get(k, v.dtype), sharding=self.sharding(k, v.shape))
            for k, v in shapes.items()}

  def global_batch(self, local: dict) -> dict:
    """Process-local rows (every column: full T, full length) -> global arrays. The
    global shape is explicit because a split frame axis may span processes; jax then
    takes each device's slice of T from the local rows."""
    rows = sharding.mesh_axes("batch")
    shards = math.prod(self.mesh.shape[a] for a in rows)
    row_sharding = NamedSharding(self.mesh, P(rows))
    local_shards = len({idx[0].start for idx in row_sharding.addressable_devices_indices_map((shards,)).values()})
    out = {}
    for k, v in local.items():
      if k == "sample_index":
        continue
      v = np.asarray(v, self.input_dtypes.get(k))
      shape = (v.shape[0] * shards // local_shards,) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(self.sharding(k, shape), v, shape)
    return out

  def __call__(self, state, local_batch: dict):
    batch = self.global_batch(local_batch)
    self.check_batch(batch["input_ids"].shape[0], self.accum_steps)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      step = self.jitted(batch)
      if self.line_up is not None and id(step) not in self._lined_up:
        step.lower(state, batch).compile()   # the call below runs this compilation
        self.line_up(f"train step program {len(self._lined_up)}")
        self._lined_up.add(id(step))
      return step(state, batch)
