"""Building blocks shared by the towers: partitioned dense / norm layers and the
scanned, rematerialised layer stack."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def partitioned(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


def kernel_param(module: nn.Module, shape: tuple[int, ...], names, std: float, dtype):
  """A module's "kernel": normal(std) init, logical axis `names` (DenseGeneral's, Kernel's)."""
  return module.param("kernel", partitioned(nn.initializers.normal(std), names), shape, dtype)


class DenseGeneral(nn.Module):
  """x @ W over `axis` -> `features`, W of shape in_dims + features created at its full
  shape with logical axis `names` (Flax's own DenseGeneral initialises a flattened
  2-D kernel, which breaks logical sharding constraints of multi-dim kernels)."""
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = True
  std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    in_dims = tuple(x.shape[a] for a in axis)
    kernel = kernel_param(self, in_dims + self.features, self.names, self.std, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)   # (not astype: Qwix's PTQ intercepts this)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.names[len(axis):]),
                        self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Kernel(nn.Module):
  """DenseGeneral's kernel alone: the same parameter ("kernel": name, shape, init,
  logical axes), for code that applies it in a loop of its own (`over_sequence_chunks`)."""
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return kernel_param(self, self.shape, self.names, self.std, self.param_dtype)


def length_shards(length: int) -> int:
  """Devices the active logical rules and mesh split the `length` axis over (1: none)."""
  from llamavid_jax import sharding   # leaf module: the rules table answers, no mesh is named here
  return sharding.logical_shards("length", length)


def over_sequence_chunks(f, x, chunk: int):
  """f(x) for a position-wise f, `chunk` positions of every sequence shard at a time:
  x float[B, S, D] -> f(x) float[B, S, D']. A rematerialised `lax.map`, so that f's
  intermediates (the SwiGLU's [S, mlp] activations: 5.4 GiB each at 256K positions a
  chip for 7B) exist for one chunk only, in the forward and in the backward. Each step
  takes one chunk from every shard ([B, shards, chunk, D]), so the sequence sharding
  stays as it is; S is zero-padded to whole chunks (padded rows are dropped)."""
  b, s, d = x.shape
  parts = length_shards(s)
  per = -(-s // parts)
  n = -(-per // chunk)
  pad = parts * n * chunk - s
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  xs = jnp.moveaxis(x.reshape(b, parts, n, chunk, d), 2, 0)                 # [n, B, shards, chunk, D]
  xs = nn.with_logical_constraint(xs, (None, "batch", "length", None, "embed"))
  ys = jax.lax.map(jax.checkpoint(f), xs)                                  # [n, B, shards, chunk, D']
  ys = jnp.moveaxis(ys, 0, 2).reshape(b, parts * n * chunk, -1)
  return ys[:, :s]


def dense(features, names: Sequence[str | None], *, axis=-1, use_bias=True, dtype=jnp.float32,
          param_dtype=jnp.float32, std=0.02, name=None) -> DenseGeneral:
  """A DenseGeneral whose kernel carries logical axis `names` (inputs then outputs)."""
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  return DenseGeneral(features, tuple(names), axis, use_bias, std, dtype, param_dtype, name=name)


def layer_norm(eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, name=None) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it (parity at 1e-5 and beyond).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
                      bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)), name=name)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # exact erf GELU, as torch.nn.GELU()


LAYER_INPUT = "layer_input"   # checkpoint_name of a scanned layer's input (a block tags its carry)

# Remat policies of our own, beside jax.checkpoint_policies' names:
#   offload_layer_inputs  each layer's input is saved in host memory (pinned_host) and
#                         streamed back for its backward; everything else is recomputed,
#                         so HBM holds no per-layer residuals at all (MaxText's offloaded
#                         decoder-layer inputs). Needs a backend with host offloading
#                         (TPU, GPU; on CPU host memory is the device's).
REMAT_POLICIES = {
    "offload_layer_inputs": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device", offload_dst="pinned_host"),
}


def remat_policy(name: str):
  """The checkpoint policy called `name`: one of REMAT_POLICIES or of jax.checkpoint_policies."""
  policy = REMAT_POLICIES.get(name) or getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"remat_policy {name!r} is neither a jax.checkpoint_policies name nor one of "
                     f"{sorted(REMAT_POLICIES)}")
  return policy


def scan_stack(block: type[nn.Module], length: int, remat_policy_name: str, in_axes: tuple,
               name: str | None = None, **block_kwargs) -> nn.Module:
  """`length` copies of `block` as one nn.scan over a leading `layers` parameter axis,
  each rematerialised with the named policy (`remat_policy`; "none": no remat).

  The block is called as block(carry, *args) -> (carry, per_layer_output); `in_axes`
  says for each of `args` whether it is broadcast (nn.broadcast) or scanned (0).
  """
  if remat_policy_name != "none":
    block = nn.remat(block, policy=remat_policy(remat_policy_name), prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})(name=name, **block_kwargs)
