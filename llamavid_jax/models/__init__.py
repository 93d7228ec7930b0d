"""The model. Names load on first use (PEP 562), so that the data side can import the
length contract (`llamavid_jax.models.splice`) without loading Flax modules."""

import importlib

_WHERE = {
    "InputSpec": "config", "LlamaVidConfig": "config", "LlmConfig": "config", "QFormerConfig": "config",
    "VisionConfig": "config", "LlamaVid": "llamavid", "IGNORE": "splice", "Layout": "splice", "batch_spliced_length": "splice",
    "splice_labels": "splice", "splice_layout": "splice", "spliced_length": "splice",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
  if name not in _WHERE:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
