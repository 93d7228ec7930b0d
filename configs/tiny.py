"""A tiny LLaMA-VID model (every tower two layers, widths 32-64) for tests and the
README's example; not a training recipe (configs/demo.py:toy,tiny is the tiny one).

  from configs import tiny
  cfg = tiny.model_config()          # video: one mean content token per frame
  cfg = tiny.model_config("image")   # image: every patch a content token
"""

import ml_collections

from configs import common
from llamavid_jax.models.config import from_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, image=False)
  c = ml_collections.ConfigDict()
  c.model = dict(common.TINY, compress_type="none" if a.image else "mean", mm_projector_type="mlp2x_gelu",
                 remat_policy="nothing_saveable")
  return c


def model_config(arg: str | None = None):
  return from_dict(get_config(arg).model)
