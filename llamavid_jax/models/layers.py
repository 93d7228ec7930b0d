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


def dense(features, names: Sequence[str | None], *, axis=-1, use_bias=True, dtype=jnp.float32,
          param_dtype=jnp.float32, std=0.02, name=None) -> nn.DenseGeneral:
  """DenseGeneral whose kernel carries logical axis `names` (inputs then outputs)."""
  n_out = len(features) if isinstance(features, (tuple, list)) else 1
  return nn.DenseGeneral(
      features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=partitioned(nn.initializers.normal(std), names),
      bias_init=partitioned(nn.initializers.zeros_init(), names[-n_out:]), name=name)


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
