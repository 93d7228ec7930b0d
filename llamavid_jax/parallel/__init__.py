"""Multi-device machinery the model does not know about.

  layout.py     the context layout of the LLM sequence (zig-zag over the ring: apply,
                invert, slots), decided once per step by `context_layout`
  placement.py  frame tokens to their positions on a split length (`ring_placement`;
                the model's default is a plain gather)
  host.py       frames from host memory, a chunk at a time (`frame_fetcher`, `to_device`)

The train step and inference compose embed -> layout -> decode -> loss / logits with
these (`llamavid_jax.decisions` picks the layout for a config and lists every decision).
This package imports nothing of the model or the attention kernels: the kernels import
its layout.
"""

from __future__ import annotations

from llamavid_jax.parallel.host import fetch_decision, frame_fetcher, to_device
from llamavid_jax.parallel.layout import ContextLayout, Decision, context_layout, ring_order, ring_shift, zigzag
from llamavid_jax.parallel.placement import placement_decision, ring_placement, ring_rounds


__all__ = ["ContextLayout", "Decision", "context_layout", "fetch_decision", "frame_fetcher",
           "placement_decision", "ring_order", "ring_placement", "ring_rounds", "ring_shift", "to_device",
           "zigzag"]
