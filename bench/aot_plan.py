"""Plans TPU memory and FLOPs of a training step by AOT compilation against libtpu's
topology description: no TPU needed, only the `libtpu` package (the `tpu` extra).

  python bench/aot_plan.py --config configs/stage2_instruct_7b.py --topology v5p:2x2x2 \
      --config.batch_size=16 --config.data.text_len=2048 --config.data.num_frames=64 [--config.mesh.fsdp=-1 ...]

Prints per-device memory (arguments, temporaries, outputs) against the chip's HBM,
the step's FLOPs from XLA's cost analysis, and the step time this implies at 100%
and at 50% MFU. FLOPs are the model's analytic count (train/metrics.py): XLA's cost
analysis counts a scanned layer's loop body once, not once per layer.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the host compiles; TPUs are only described
# Without a TPU VM around it, libtpu waits forever for the metadata server unless told not to.
for k, v in dict(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0").items():
  os.environ.setdefault(k, v)

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags
from jax.experimental import topologies
from jax.sharding import NamedSharding

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamavid_jax import sharding  # noqa: E402
from llamavid_jax.models import spliced_length  # noqa: E402
from train import metrics, optim, step as S  # noqa: E402
from train.train import build  # noqa: E402

# HBM per chip (GiB) and bf16 peak TFLOP/s, from Google Cloud's TPU pages.
CHIPS = {"TPU v4": (32, 275), "TPU v5 lite": (16, 197), "TPU v5": (95, 459), "TPU v6 lite": (32, 918)}


_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:arg] (--config.KEY=V overrides)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "libtpu topology name, e.g. v4:2x2x1, v5p:4x4x4")


def main(argv):
  del argv
  c = _CONFIG.value
  batch = c.batch_size
  topo = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu")
  devices = topo.devices
  kind = devices[0].device_kind
  mesh = sharding.make_mesh(dict(c.mesh), devices)
  d = c.data
  text_len, num_frames = d.text_len, d.num_frames
  with c.unlocked():   # parameter shapes do not depend on the sequence: build on a short one
    d.text_len, d.num_frames = 8, 1
    b = build(c, mesh)
    d.text_len, d.num_frames = text_len, num_frames
  small = S.dummy_inputs(b.model_cfg, 1, 8, 1, d.qformer_len, d.use_features)
  small["labels"] = small["input_ids"]
  shapes = {k: (batch,) + v.shape[1:] for k, v in small.items()}
  for k in ("input_ids", "text_mask", "labels"):
    shapes[k] = (batch, text_len)
  shapes["frame_mask"] = (batch, num_frames)
  for k in ("frames", "features"):
    if k in shapes:
      shapes[k] = (batch, num_frames) + small[k].shape[2:]
  abstract_batch = {k: jax.ShapeDtypeStruct(shapes[k], v.dtype, sharding=S.batch_sharding(mesh, k, shapes[k]))
                    for k, v in small.items()}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       nn.unbox(b.abstract), b.shardings)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    compiled = b.trainer.jitted(abstract_batch).lower(state, abstract_batch).compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  trains = {tower: any(l == optim.TRAINABLE for l in jax.tree.leaves(b.labels[tower]))
            for tower in b.labels}
  flops = metrics.flops_per_step(b.model_cfg, batch, d.text_len, d.num_frames, d.qformer_len,
                                 d.use_features, trains) / len(devices)
  hbm, peak = CHIPS.get(kind, (None, None))
  gib = 1 << 30
  total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes) / gib
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(b.abstract)["params"]))
  tokens = batch * spliced_length(d.text_len, d.num_frames, b.model_cfg.tokens_per_frame)
  print(f"config {flags.FLAGS['config'].config_filename} on {_TOPOLOGY.value} ({len(devices)} x {kind}), mesh {dict(mesh.shape)}")
  print(f"params {n_params / 1e9:.2f} B; global batch {batch} x text {d.text_len} + {d.num_frames} frames "
        f"(~{tokens} LLM tokens/step), accum {c.accum_steps}; compile {secs:.0f} s on the host")
  print(f"per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, temporaries "
        f"{mem.temp_size_in_bytes / gib:.2f} GiB, outputs {mem.output_size_in_bytes / gib:.2f} GiB, "
        f"aliased {mem.alias_size_in_bytes / gib:.2f} GiB -> peak ~{total:.2f} GiB"
        + (f" of {hbm} GiB HBM ({'fits' if total < hbm else 'DOES NOT FIT'})" if hbm else ""))
  print(f"model FLOPs per device per step: {flops / 1e12:.1f} TFLOP (trains: "
        f"{', '.join(t for t, on in trains.items() if on)})")
  if peak:
    print(f"step time at 100% / 50% MFU of {peak} TFLOP/s: {flops / (peak * 1e12):.2f} s / "
          f"{2 * flops / (peak * 1e12):.2f} s")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
