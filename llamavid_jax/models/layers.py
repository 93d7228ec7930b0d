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
    kernel = self.param("kernel", partitioned(nn.initializers.normal(self.std), self.names),
                        in_dims + self.features, self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.names[len(axis):]),
                        self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


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


def scan_stack(block: type[nn.Module], length: int, remat_policy: str, in_axes: tuple,
               name: str | None = None, **block_kwargs) -> nn.Module:
  """`length` copies of `block` as one nn.scan over a leading `layers` parameter axis,
  each rematerialised with the named jax.checkpoint_policies policy ("none": no remat).

  The block is called as block(carry, *args) -> (carry, per_layer_output); `in_axes`
  says for each of `args` whether it is broadcast (nn.broadcast) or scanned (0).
  """
  if remat_policy != "none":
    policy = getattr(jax.checkpoint_policies, remat_policy, None)
    if policy is None:
      raise ValueError(f"remat_policy {remat_policy!r} is not a jax.checkpoint_policies name")
    block = nn.remat(block, policy=policy, prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})(name=name, **block_kwargs)
