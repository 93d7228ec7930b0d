"""Optimizer: AdamW + warmup/cosine + global-norm clipping on the trainable parts only.

Which parameters train is a list of regular expressions over parameter paths
("llm/layers/q_proj/kernel"); `re.match`, so patterns are anchored at the start.
Frozen parameters go through `optax.set_to_zero()` inside `optax.multi_transform`,
which masks every inner transform: AdamW holds `MaskedNode`s (no moments) for the
frozen leaves, so a frozen 7B LLM costs no optimizer memory. The training step also
stops gradients into frozen leaves (`stop_frozen`), so XLA never computes their
weight gradients.

`lr_mults`: optional (pattern, factor) pairs scaling the learning rate (and with it the
decoupled weight decay, as in torch param groups) of the trainable leaves whose path
matches; the first matching pattern wins, unmatched leaves keep factor 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import optax
from flax import linen as nn

TRAINABLE, FROZEN = "trainable", "frozen"


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def param_labels(params, trainable: Sequence[str]):
  """Tree of TRAINABLE/FROZEN labels with the structure of `params` (boxed or not).

  Raises if a pattern matches nothing: a typo must not silently freeze the model."""
  pats = [re.compile(p) for p in trainable]
  hits = [0] * len(pats)

  def one(path, _):
    s = path_str(path)
    ok = False
    for i, p in enumerate(pats):
      if p.match(s):
        hits[i] += 1
        ok = True
    return TRAINABLE if ok else FROZEN

  labels = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_box)
  unused = [p.pattern for p, n in zip(pats, hits) if not n]
  if unused:
    raise ValueError(f"optim.trainable patterns {unused} match no parameter")
  return labels


def stop_frozen(params, labels):
  return jax.tree.map(lambda l, p: p if l == TRAINABLE else jax.lax.stop_gradient(p), labels, params)


def make_schedule(c, total_steps: int) -> optax.Schedule:
  """c: the `optim` ConfigDict (lr, warmup_ratio or warmup_steps, end_lr_ratio). As the
  release (HF Trainer): linear warmup from 0 over ceil(ratio * steps), cosine to 0."""
  warmup = c.get("warmup_steps", None)
  if warmup is None:
    warmup = math.ceil(c.warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.get("end_lr_ratio", 0.0))


def lr_multipliers(params, lr_mults: Sequence[tuple[str, float]]):
  """Tree of floats with the structure of `params`: the factor of the first pattern in
  `lr_mults` that matches each path (1.0 if none). Raises if a pattern matches nothing."""
  pats = [(re.compile(p), float(f)) for p, f in lr_mults]
  hits = [0] * len(pats)

  def one(path, _):
    s = path_str(path)
    for i, (p, f) in enumerate(pats):
      if p.match(s):
        hits[i] += 1
        return f
    return 1.0

  mults = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_box)
  unused = [p.pattern for (p, _), n in zip(pats, hits) if not n]
  if unused:
    raise ValueError(f"optim.lr_mults patterns {unused} match no parameter")
  return mults


def make_optimizer(c, params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """-> (transformation, schedule). `params` may be boxed or abstract: only paths are read."""
  schedule = make_schedule(c, total_steps)
  # As HF Trainer: decay matrices only, not biases, norms, positions or learned tokens.
  decay_mask = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: path_str(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), p)
  trainable = optax.chain(
      optax.clip_by_global_norm(c.clip_norm) if c.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                  mask=decay_mask if c.weight_decay else None),
  )
  if c.get("lr_mults"):
    mults = lr_multipliers(params, c.lr_mults)
    # Inside multi_transform the frozen leaves are MaskedNodes (no leaves), so map over
    # the updates' own paths rather than zipping with `mults`.
    by_path = {path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(mults)}
    trainable = optax.chain(trainable, optax.stateless(
        lambda updates, _: jax.tree_util.tree_map_with_path(lambda p, u: u * by_path[path_str(p)], updates)))
  labels = param_labels(params, c.trainable)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels), schedule
