"""The two checkpoint directories on disk, named once (core: no JAX, no Orbax).

An inference directory: what `python -m llamavid_jax.convert` writes, what `train.train`
leaves in WORKDIR/inference and what `llamavid_jax.export --from-train` writes.

    DIR/params/              Orbax (StandardCheckpointer) tree of the parameters
    DIR/model_config.json    the LlamaVidConfig (`models.config.to_dict`)
    DIR/conversion.json      provenance: a release's config.json and source dtypes, or a run's
    DIR/tokenizer/           the LLaMA tokenizer files
    DIR/qformer_tokenizer/   the BERT tokenizer with `[DEC]`

A train WORKDIR: what `train.train` writes while it runs.

    WORKDIR/config.json                  the run's ConfigDict as JSON (written at its start)
    WORKDIR/checkpoints/STEP/state/      step, params, optimizer state (Orbax)
    WORKDIR/checkpoints/STEP/data_position/  where the data is (global: any process count)
    WORKDIR/checkpoints/STEP/schedule/   what the learning-rate schedule depends on
    WORKDIR/inference/                   an inference directory of the last step

`checkpoint.orbax_io` reads and writes both; `train.checkpointing` writes the steps;
`inference.check_ckpt` names a directory that is neither.
"""

from __future__ import annotations

import os
from typing import Literal

# an inference directory
PARAMS = "params"
MODEL_CONFIG = "model_config.json"
CONVERSION = "conversion.json"
TOKENIZER = "tokenizer"
QFORMER_TOKENIZER = "qformer_tokenizer"

# a train WORKDIR
TRAIN_CONFIG = "config.json"
TRAIN_CHECKPOINTS = "checkpoints"
INFERENCE_DIR = "inference"
STATE = "state"   # the item of a step that holds the parameters (`train.checkpointing` saves it)

Kind = Literal["inference", "train"]


def is_inference_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_CONFIG))


def is_train_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, TRAIN_CONFIG)) and os.path.isdir(os.path.join(path, TRAIN_CHECKPOINTS))


def kind(path: str) -> Kind | None:
  """"inference" or "train" (an inference directory wins: a WORKDIR never holds
  model_config.json), None for any other path."""
  if is_inference_dir(path):
    return "inference"
  if is_train_workdir(path):
    return "train"
  return None


def neither(path: str) -> str:
  """Why `path` is no checkpoint, in one line."""
  return (f"{path}: neither a converted / inference directory (no {MODEL_CONFIG}) nor a train WORKDIR "
          f"(no {TRAIN_CONFIG} + {TRAIN_CHECKPOINTS}/)")


def step_dir(workdir: str, step: int) -> str:
  """WORKDIR/checkpoints/STEP."""
  return os.path.join(workdir, TRAIN_CHECKPOINTS, str(step))


def saved_steps(workdir: str) -> list[int]:
  """The steps saved in WORKDIR/checkpoints, ascending ([] when there is none)."""
  ckdir = os.path.join(workdir, TRAIN_CHECKPOINTS)
  return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
