"""Tiny LLaMA-VID for tests and the CPU demo: every tower two layers, widths of 32-64.

  python -m train.train --config configs/tiny.py            (video, mean content token)
  python -m train.train --config configs/tiny.py:image      (image, all patches)
"""

import ml_collections

from llamavid_jax.models.config import from_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      vision=dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64),
      qformer=dict(vocab_size=100, hidden=32, num_layers=2, num_heads=2, mlp_dim=64,
                   max_positions=64, num_query=4, vision_width=32, max_text_len=32),
      llm=dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
               max_positions=512),
      compress_type="none" if arg == "image" else "mean",
      mm_projector_type="mlp2x_gelu",
      remat_policy="nothing_saveable",
  )
  return c


def model_config(arg: str | None = None):
  return from_dict(get_config(arg).model)
