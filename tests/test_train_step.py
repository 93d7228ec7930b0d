"""Train step: loss normalisation, mesh equivalence, per-stage trainable parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, image_336_7b, stage1_align_7b, stage2_instruct_7b, stage3_long_video_7b
from llamavid_jax import sharding
from train import optim
from train import step as S
from train.toy_data import ToyBatches
from train.train import build
from llamavid_jax.models import splice_labels, spliced_length


def tiny_config(**kw):
  """The tiny test config (configs/demo.py:toy,tiny) with dotted overrides; no warmup,
  so that the first step already moves the parameters. Adam's eps is 1e-5: at 1e-8 it
  turns rounding noise in near-zero gradients (summation order differs across meshes)
  into lr-sized steps, and parameters would differ by more than the noise."""
  c = demo.get_config("toy,tiny")
  kw = {"optim.warmup_steps": 0, "optim.eps": 1e-5, **kw}
  with c.unlocked():
    c.update_from_flattened_dict(kw)
  return c


def run_steps(c, mesh, n=3):
  b = build(c, mesh)
  state = b.init(c.seed)
  data = ToyBatches(b.model_cfg, c.batch_size, c.data.text_len, c.data.num_frames, c.data.qformer_len,
                    c.data.use_features, seed=c.seed)
  losses = []
  for _ in range(n):
    state, m = b.trainer(state, next(data))
    losses.append(float(m["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def one_device():
  c = tiny_config()
  return run_steps(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))


# Pure data parallelism is the data axis of 2x4 (one fewer compile of the same step).
@pytest.mark.parametrize("shape", [{"data": 1, "fsdp": 8}, {"data": 2, "tensor": 4}], ids=["1x8", "2x4"])
@pytest.mark.slow
def test_meshes_give_the_losses_of_one_device(shape, one_device):
  c = tiny_config()
  losses, state = run_steps(c, sharding.make_mesh(shape))
  ref_losses, ref_state = one_device
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  if shape.get("tensor") == 4:
    q = state["params"]["llm"]["layers"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sequence"), "tensor", None)
    mu = state["opt_state"].inner_states["trainable"].inner_state[1][0].mu
    assert mu["llm"]["layers"]["q_proj"]["kernel"].sharding.spec == q.sharding.spec


@pytest.mark.slow
def test_frames_split_over_sequence_give_the_losses_of_one_device():
  """Long-video layout: frames sharded over `sequence` and encoded in strided chunks
  (each chunk spread over the sequence devices), with gradient accumulation, and the
  LLM's ring attention in its zig-zag layout (S' = 13 - 1 + 4 x 2 = 20: 4 chunks of 5;
  one device: the blockwise kernel in the natural order)."""
  c = tiny_config(**{"data.num_frames": 4, "model.frame_chunk": 2, "data.text_len": 13,
                     "model.attention_impl": "ring"})
  ref, _ = run_steps(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), n=2)
  mesh = sharding.make_mesh({"fsdp": 4, "sequence": 2})
  b = build(c, mesh)
  data = ToyBatches(b.model_cfg, c.batch_size, c.data.text_len, 4, c.data.qformer_len, False, seed=c.seed)
  batch = next(data)
  g = b.trainer.global_batch(batch)
  assert g["frames"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "sequence", None, None, None)
  assert g["frames"].addressable_shards[0].data.shape[1] == 2
  losses, _ = run_steps(c, mesh, n=2)
  np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_features_in_host_memory_give_the_losses_of_device_memory():
  """data.host_inputs=["features"] (the long-video recipe): the features stay in host
  memory, each micro-batch sliced there and each frame chunk brought to the device;
  the losses are those of features in device memory. data.input_dtypes casts on the host."""
  kw = {"data.num_frames": 4, "data.use_features": True, "data.buckets": ((12, 4, 1),), "model.frame_chunk": 2}
  mesh = sharding.make_mesh({"fsdp": 4, "sequence": 2})
  ref, _ = run_steps(tiny_config(**kw), mesh, n=2)
  c = tiny_config(**kw, **{"data.host_inputs": ["features"]})
  losses, _ = run_steps(c, mesh, n=2)
  np.testing.assert_allclose(losses, ref, atol=1e-6, rtol=0)
  b = build(tiny_config(**kw, **{"data.host_inputs": ["features"], "data.input_dtypes": {"features": "float16"}}), mesh)
  g = b.trainer.global_batch(next(ToyBatches(b.model_cfg, 16, 12, 4, 6, True)))
  assert g["features"].sharding.memory_kind == "pinned_host" and g["features"].dtype == jnp.float16
  assert g["input_ids"].sharding.memory_kind == "device"


@pytest.mark.slow
def test_optimizer_state_in_host_memory_gives_the_losses_of_device_memory(one_device):
  """optim.host_state=True: AdamW's moments live in host memory between steps and visit
  the device for their update; losses and parameters are those of device memory."""
  c = tiny_config(**{"optim.host_state": True})
  b = build(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  mu = b.init(c.seed)["opt_state"].inner_states["trainable"].inner_state[1][0].mu
  assert jax.tree.leaves(mu)[0].sharding.memory_kind == "pinned_host"
  losses, state = run_steps(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  ref_losses, ref_state = one_device
  np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
  for a, b_ in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6)


@pytest.mark.slow
def test_loss_is_the_token_mean_of_the_global_batch(one_device):
  """Accumulating 2 micro-batches (the tiny config) = one batch of 16: the loss and the
  update are token-weighted over the global batch (not a mean of per-micro-batch means),
  and the loss equals a direct float64 computation."""
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  c1 = tiny_config(accum_steps=1)
  l1, s1 = run_steps(c1, mesh, n=3)
  l2, s2 = one_device
  b = build(c1, mesh)
  params = b.init(c1.seed)["params"]
  batch = next(ToyBatches(b.model_cfg, c1.batch_size, c1.data.text_len, c1.data.num_frames, c1.data.qformer_len))
  inputs = {k: batch[k] for k in S.MODEL_INPUTS if k in batch}
  logits, out = jax.jit(b.model.apply)({"params": params}, **inputs)
  tgt = np.asarray(splice_labels(jnp.asarray(batch["labels"]), out["layout"]))[:, 1:]
  lp = np.asarray(logits[:, :-1], np.float64)
  lp = lp - lp.max(-1, keepdims=True)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  m = tgt != -100
  per_tok = -np.take_along_axis(lp, np.where(m, tgt, 0)[..., None], -1)[..., 0]
  want = per_tok[m].mean()
  # the step's micro-batch a holds rows a, a + 2, ... (see make_train_step)
  mean_of_means = np.mean([per_tok[0::2][m[0::2]].mean(), per_tok[1::2][m[1::2]].mean()])
  # the check below (rtol 1e-6) must tell the two apart: unequal token counts per micro-batch
  assert abs(want - mean_of_means) > 2e-6 * want, "toy batch: micro-batches too alike to tell"
  np.testing.assert_allclose(l1[0], want, rtol=1e-6)
  np.testing.assert_allclose(l2[0], want, rtol=1e-6)
  # and three steps later (same lr, gradients normalised the same way) still the same
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b_ in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5)  # Adam: sign of ~0 grads


# Trainable parts of the release per stage (DESIGN.md §2), as path prefixes of our tree.
STAGES = {
    "stage1": (stage1_align_7b, ("token_gen/",)),
    "stage2": (stage2_instruct_7b, ("llm/", "token_gen/", "qformer/")),
    "stage3": (stage3_long_video_7b, ("llm/", "token_gen/mm_projector/")),
}
# Zero gradient by construction: the Q-Former's last layer's text-position FFN (only
# the query positions of its output are used).
ZERO_GRAD = ("qformer/layers/layer_1/ffn/",)


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.slow
def test_stage_trains_exactly_the_release_parts(stage):
  module, prefixes = STAGES[stage]
  s = module.get_config()
  c = tiny_config(**{"optim.trainable": list(s.optim.trainable), "optim.warmup_steps": 0, "optim.lr": 1e-2,
                     "data.use_features": s.data.use_features, "accum_steps": 1})
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  b = build(c, mesh)
  state = b.init(c.seed)
  before = jax.tree.map(np.asarray, state["params"])
  data = ToyBatches(b.model_cfg, c.batch_size, c.data.text_len, c.data.num_frames, c.data.qformer_len, c.data.use_features)
  batch = next(data)
  # full gradient (nothing stopped except the model's own ViT stop_gradient)
  inputs = {k: v for k, v in batch.items() if k != "sample_index"}
  grads = jax.jit(jax.grad(lambda p: S.loss_sums(b.model, p, inputs)[0]))(state["params"])
  state, _ = b.trainer(state, batch)
  after = jax.tree.map(np.asarray, state["params"])
  flat = lambda t: {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  before, after, grads = flat(before), flat(after), flat(grads)
  n_trainable = 0
  for path in before:
    trainable = path.startswith(prefixes)
    changed = not np.array_equal(before[path], after[path])
    if not trainable:
      assert not changed, f"{stage}: frozen {path} changed"
      continue
    n_trainable += 1
    g_nonzero = bool(np.any(np.asarray(grads[path]) != 0))
    assert changed == g_nonzero, f"{stage}: trainable {path} changed={changed} but grad nonzero={g_nonzero}"
    if path.startswith(ZERO_GRAD):
      assert not g_nonzero
    elif not path.startswith("vit/"):
      assert g_nonzero, f"{stage}: {path} has zero gradient"
  assert n_trainable == sum(p.startswith(prefixes) for p in before) > 0
  # frozen leaves keep no optimizer state: AdamW moments exist for trainable leaves only
  adam = state["opt_state"].inner_states["trainable"].inner_state[1][0]
  n_mu = len(jax.tree.leaves(adam.mu))
  assert n_mu == n_trainable, (n_mu, n_trainable)


@pytest.mark.slow
def test_trainable_vit_needs_freeze_vision_off():
  c = tiny_config(**{"optim.trainable": ["vit/", "llm/"]})
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match="freeze_vision"):
    build(c, mesh)
  c = tiny_config(**{"optim.trainable": ["vit/"], "model.freeze_vision": False, "accum_steps": 1,
                     "optim.lr": 1e-2})
  b = build(c, mesh)
  state = b.init(c.seed)
  before = np.asarray(state["params"]["vit"]["patch_embed"]["kernel"])
  data = ToyBatches(b.model_cfg, c.batch_size, c.data.text_len, c.data.num_frames, c.data.qformer_len,
                    c.data.use_features)
  state, _ = b.trainer(state, next(data))
  assert not np.array_equal(before, np.asarray(state["params"]["vit"]["patch_embed"]["kernel"]))


@pytest.mark.parametrize("module,arg", [(stage1_align_7b, None), (stage2_instruct_7b, None),
                                        (stage3_long_video_7b, None), (image_336_7b, "stage=1"),
                                        (image_336_7b, "stage=2"), (demo, None)],
                         ids=["stage1", "stage2", "stage3", "image1", "image2", "demo"])
def test_stage_buckets_fit_the_model_and_the_ring(module, arg):
  """Every bucket's LLM length (text + slots x (frames x tokens_per_frame - 1); movie
  mode: text + frames x (tokens_per_frame - 1)) stays within max_len, and with ring
  attention it splits into sequence-size chunks of whole blocks (else the step fails to
  trace); the long-video stage fills max_len exactly."""
  from llamavid_jax.data.buckets import as_buckets, llm_length
  from llamavid_jax.models.config import from_dict
  from llamavid_jax.ops.attention import BLOCK
  c = module.get_config(arg)
  d, spec = c.data, from_dict(c.model).input_spec
  lengths = [llm_length(b, spec) for b in as_buckets(d.get("buckets") or ((d.text_len, d.num_frames),))]
  assert max(lengths) <= d.max_len, lengths
  if c.model.get("attention_impl") == "ring" or c.mesh.get("sequence", 1) > 1:
    assert all(n % (c.mesh.sequence * BLOCK) == 0 for n in lengths), lengths
  if module is stage3_long_video_7b:
    assert spec.movie and lengths == [d.max_len] * 3, lengths


def test_lr_mults_scale_each_groups_update():
  """Adam's update is linear in the learning rate: a group at factor f moves f times as
  far as without `lr_mults`; the first matching pattern wins; frozen leaves stay put."""
  import ml_collections
  params = {"llm": {"w": jnp.ones((3, 2))}, "vit": {"pos_embed": jnp.ones((4,)), "blocks": {"k": jnp.ones((2, 2))}},
            "qformer": {"q": jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
  base = dict(lr=1e-2, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
              trainable=["llm/", "vit/"])

  def update(**kw):
    c = ml_collections.ConfigDict({**base, **kw})
    tx, _ = optim.make_optimizer(c, params, total_steps=10)
    u, _ = tx.update(grads, tx.init(params), params)
    return {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(u)}

  plain = update()
  scaled = update(lr_mults=[("vit/pos_embed", 1.0), ("vit/", 0.1), ("llm/", 0.5)])
  want = {"llm/w": 0.5, "vit/pos_embed": 1.0, "vit/blocks/k": 0.1, "qformer/q": 0.0}
  for path, f in want.items():
    np.testing.assert_allclose(scaled[path], f * plain[path], rtol=1e-6, err_msg=path)
    assert f == 0.0 or np.abs(plain[path]).max() > 1e-3, path     # the group really moves
  with pytest.raises(ValueError, match="lr_mults"):
    update(lr_mults=[("vision/", 0.1)])


def test_flops_count_the_spliced_length_of_every_placeholder():
  """flops_per_step sizes the LLM by `spliced_length`: P = 2 placeholders run the LLM
  on S + 2 (T tpf - 1) positions, as one placeholder on a text longer by T tpf - 1; the
  Q-Former and the context token run once per (instruction, frame), the content
  tokens once per frame."""
  import dataclasses
  from llamavid_jax.models.config import from_dict
  from train.metrics import flops_per_step
  cfg = from_dict(stage2_instruct_7b.get_config(None).model)
  kw = dict(batch=2, num_frames=3, qformer_len=5, use_features=True, trains={"llm": True})
  assert flops_per_step(cfg, text_len=10, **kw) == 1278763229184          # P = 1: the count before num_prompts
  assert flops_per_step(cfg, text_len=10, num_prompts=2, **kw) == 1758159224832
  content = dataclasses.replace(cfg, use_context_token=False)                     # no Q-Former: only the LLM grows
  longer = spliced_length(10, 3, content.tokens_per_frame)
  assert flops_per_step(content, text_len=10, num_prompts=2, **kw) == flops_per_step(content, text_len=longer, **kw)
  longer = spliced_length(10, 3, cfg.tokens_per_frame)
  per_instruction = [flops_per_step(cfg, text_len=10, num_prompts=p + 1, **kw)
                     - flops_per_step(cfg, text_len=longer, num_prompts=p, **kw) for p in (1, 2)]
  assert per_instruction[0] == per_instruction[1] > 0


def test_input_shardings_come_from_the_logical_rules():
  """Rows over the mesh axes of `batch`; only frame inputs split T, over those of
  `frames`, and only when they divide it; text is never split along its length."""
  mesh = sharding.make_mesh({"fsdp": 4, "sequence": 2})
  rows = ("data", "fsdp")
  assert sharding.mesh_axes("batch") == rows
  spec = lambda k, shape: S.batch_sharding(mesh, k, shape).spec
  P = jax.sharding.PartitionSpec
  assert spec("input_ids", (8, 16)) == spec("labels", (8, 16)) == P(rows, None)
  assert spec("frames", (8, 4, 2, 2, 3)) == P(rows, "sequence", None, None, None)
  assert spec("features", (8, 3, 5, 4)) == P(rows, None, None, None)
  assert spec("frame_mask", (8, 4)) == P(rows, "sequence")
  assert spec("qformer_ids", (8, 6)) == P(rows, None) and spec("qformer_mask", (8, 2, 6)) == P(rows, None, None)
  with pytest.raises(KeyError, match="'pixels' has no logical axes"):
    spec("pixels", (8, 4))
