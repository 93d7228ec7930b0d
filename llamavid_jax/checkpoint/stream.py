"""Streaming torch -> Flax conversion: tensors arrive shard by shard, leaves fill in place.

Memory: every leaf of our tree is allocated once, as a numpy array in the target
dtype, when its first tensor arrives; a scanned (stacked) leaf gets one slice per
layer as the layers arrive from whichever shard holds them. The source tensors are
memory-mapped and dropped with their shard, so the peak is

    all parameters in the target dtype  +  (at most) one source shard's pages
                                          +  one tensor's transposed copy.

Strictness: a key without a rule (other than the named non-parameter buffers of
`mapping.NON_PARAMETER_SUFFIXES`), a key seen twice, a rule whose key never arrives,
or a tensor of the wrong shape raise `ConversionError` naming the file, the key, and
both shapes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping

import numpy as np

from llamavid_jax.checkpoint import mapping
from llamavid_jax.checkpoint.mapping import Rule

log = logging.getLogger(__name__)


class ConversionError(ValueError):
  """A checkpoint that does not match the model: names the key and both shapes."""


def _progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, mininterval=1.0)


class StreamingConverter:
  """Fills our parameter tree from (file, key, tensor) triples in any order.

  Args:
    rules: torch key -> Rule (`mapping.model_rules(cfg) | mapping.vit_rules(cfg)`).
    shapes: our tree of full leaf shapes (stacked leaves with the leading layers axis).
    dtype: target numpy dtype, or None to keep each leaf's source dtype (the first
      slice's; a later slice of another dtype promotes the leaf losslessly).
  """

  def __init__(self, rules: Mapping[str, Rule], shapes, dtype=None):
    self.rules, self.shapes, self.dtype = rules, shapes, dtype
    self.leaves: dict[tuple[str, ...], np.ndarray] = {}
    self.seen: dict[str, str] = {}                 # key -> file it came from
    self.source_dtypes: dict[str, str] = {}        # key -> numpy dtype name in the file
    self.skipped: collections.Counter[str] = collections.Counter()

  def _want(self, rule: Rule) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(our per-layer leaf shape, the torch shape that fits it)."""
    ours = mapping.leaf_shape(self.shapes, rule)
    return ours, mapping.torch_shape(rule, ours)

  def add(self, file: str, key: str, tensor: np.ndarray) -> None:
    """One source tensor: checked, laid out as our leaf, written into its slot."""
    rule = self.rules.get(key)
    if rule is None:
      if mapping.is_non_parameter(key):
        self.skipped[key.rsplit(".", 1)[-1] if "." in key else key] += 1
        return
      raise ConversionError(f"{file}: unexpected key {key!r} with shape {tuple(tensor.shape)}: "
                            "no parameter of the model takes it (expected shape: none)")
    if key in self.seen:
      raise ConversionError(f"{file}: key {key!r} (shape {tuple(tensor.shape)}) appears again; "
                            f"first seen in {self.seen[key]}")
    ours, want = self._want(rule)
    if tuple(tensor.shape) != want:
      raise ConversionError(f"{file}: shape mismatch for {key!r}: checkpoint has "
                            f"{tuple(tensor.shape)}, the model expects {want} "
                            f"(our {'/'.join(rule.path)} {ours})")
    leaf = mapping._to_flax_leaf(tensor, rule, ours)
    self._store(rule, leaf)
    self.seen[key] = file
    self.source_dtypes[key] = tensor.dtype.name

  def _store(self, rule: Rule, leaf: np.ndarray) -> None:
    buf = self.leaves.get(rule.path)
    dtype = np.dtype(self.dtype) if self.dtype is not None else leaf.dtype
    if buf is None:
      full = tuple(mapping._get(self.shapes, rule.path))
      buf = self.leaves[rule.path] = np.empty(full, dtype)
    elif self.dtype is None and buf.dtype != leaf.dtype:   # mixed source dtypes: promote
      buf = self.leaves[rule.path] = buf.astype(np.promote_types(buf.dtype, leaf.dtype))
    if rule.layer is None:
      buf[...] = leaf
    else:
      buf[rule.layer] = leaf

  def add_file(self, file: str, tensors: Iterable[tuple[str, np.ndarray]], total: int | None = None,
               rename=None) -> None:
    """All tensors of one file; `rename(key) -> key | None` maps foreign names (None:
    the tensor is not used and is counted as skipped)."""
    for key, t in _progress(tensors, desc=file.rsplit("/", 1)[-1], total=total, unit="tensor"):
      if rename is not None:
        new = rename(key)
        if new is None:
          self.skipped[f"unused:{key.split('.', 1)[0]}"] += 1
          continue
        key = new
      self.add(file, key, t)

  def finish(self, covered: Iterable[str] | None = None) -> dict:
    """-> nested params dict. Raises if any rule (in `covered`, default all) never
    got its tensor, naming the key and the shape it should have had."""
    keys = list(self.rules) if covered is None else list(covered)
    missing = [k for k in keys if k not in self.seen]
    if missing:
      shown = "; ".join(f"{k!r} (expected shape {self._want(self.rules[k])[1]}, found: none)"
                        for k in missing[:10])
      more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
      raise ConversionError(f"missing key(s) in the checkpoint: {shown}{more}")
    if self.skipped:
      log.info("skipped %d non-parameter / unused tensors: %s", sum(self.skipped.values()),
               dict(self.skipped))
    params: dict = {}
    for path, leaf in self.leaves.items():
      mapping._set(params, path, leaf)
    self.leaves = {}      # the caller owns the arrays now (and may free them one by one)
    return params
