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


def _first_match(params, patterns: Sequence[str]):
  """-> (tree like `params` (boxed or not) of the index of the first pattern that
  `re.match`es each leaf's path, -1 for none; the patterns that match no path at all)."""
  pats = [re.compile(p) for p in patterns]
  hit = [False] * len(pats)

  def one(path, _):
    s = path_str(path)
    found = [i for i, p in enumerate(pats) if p.match(s)]
    for i in found:
      hit[i] = True
    return found[0] if found else -1

  first = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_box)
  return first, [p.pattern for p, h in zip(pats, hit) if not h]


def param_labels(params, trainable: Sequence[str]):
  """Tree of TRAINABLE/FROZEN labels with the structure of `params` (boxed or not).

  Raises if a pattern matches nothing: a typo must not silently freeze the model."""
  first, unused = _first_match(params, trainable)
  if unused:
    raise ValueError(f"optim.trainable patterns {unused} match no parameter")
  return jax.tree.map(lambda i: TRAINABLE if i >= 0 else FROZEN, first)


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


def lr_multipliers(params, lr_mults: Sequence[tuple[str, float]]) -> dict[str, float]:
  """{leaf path: factor of the first pattern in `lr_mults` matching it, 1.0 if none}.
  Raises if a pattern is the first match of no parameter."""
  first, _ = _first_match(params, [p for p, _ in lr_mults])
  leaves = [(path_str(path), i) for path, i in jax.tree_util.tree_leaves_with_path(first)]
  used = {i for _, i in leaves if i >= 0}
  unused = [p for i, (p, _) in enumerate(lr_mults) if i not in used]
  if unused:
    raise ValueError(f"optim.lr_mults patterns {unused} match no parameter")
  return {path: float(lr_mults[i][1]) if i >= 0 else 1.0 for path, i in leaves}


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
    # Inside multi_transform the frozen leaves are MaskedNodes (no leaves), so look the
    # factors up by the updates' own paths rather than zipping trees.
    by_path = lr_multipliers(params, c.lr_mults)
    trainable = optax.chain(trainable, optax.stateless(
        lambda updates, _: jax.tree_util.tree_map_with_path(lambda p, u: u * by_path[path_str(p)], updates)))
  labels = param_labels(params, c.trainable)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels), schedule
