"""A converted JAX checkpoint -> the release's PyTorch layout; a train run -> an inference directory.

  python -m llamavid_jax.export --ckpt OUT --out DIR [--max-shard-gb 5] [--no-pth]
  python -m llamavid_jax.export --from-train WORKDIR [--step N] --out DIR

`--from-train` writes DIR in the layout `convert` writes (`checkpoint/layout.py`:
model_config.json, params/, tokenizer/, qformer_tokenizer/) from the parameters of
step N (default: the latest) of WORKDIR/checkpoints (no optimizer state is read), the
run's WORKDIR/config.json and the tokenizers it names (`data.llm_tokenizer`,
`data.qformer_tokenizer`); `train.train` does the same into WORKDIR/inference at the
end of a run. The rest of this docstring is about `--ckpt`.

DIR gets `config.json` (the release config recorded at conversion), the LLaMA
tokenizer files, `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
with the release's key names (LLM, projectors, Q-Former), and the ViT as
`eva_vit_g.safetensors` (and `eva_vit_g.pth` when torch is installed). Each tensor is
cast back to the dtype it had in the source files, so convert -> export reproduces
every parameter tensor bit for bit when conversion kept the source dtypes (the
default). Non-parameter buffers skipped at conversion (`position_ids`, `inv_freq`)
are not written, nor the ViT keys conversion ignored (`vit_ignored`: the whole
EVA-CLIP tower's last block, `norm` and `head`); the log names them.

Note: the release's own loader (`initialize_attention_modules`) reads
`pytorch_model.bin.index.json` to find the Q-Former weights; to feed this export back
to the release code, re-save the safetensors as `.bin` shards there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import numpy as np

from llamavid_jax import cli
from llamavid_jax.checkpoint import layout, mapping, orbax_io, release, torch_io
from llamavid_jax.checkpoint.stream import _progress

log = logging.getLogger("llamavid_jax.export")


def _dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def torch_tensors(params, rules, source_dtypes: dict):
  """(release key, numpy tensor in its source dtype) for every rule, in rule order."""
  for key, t in _progress(mapping.iter_torch(rules, params), desc="tensors", total=len(rules), unit="tensor"):
    want = source_dtypes.get(key)
    yield key, (t.astype(_dtype(want)) if want and t.dtype != _dtype(want) else t)


def export(ckpt: str, out: str, *, max_shard_bytes: int = 5 << 30, write_pth: bool = True) -> list[str]:
  """Writes the release layout of converted checkpoint `ckpt` into `out`; returns the
  written weight file names."""
  cfg = orbax_io.load_config(ckpt)
  conv = orbax_io.load_conversion(ckpt)
  if "release_config" not in conv:
    raise ValueError(f"{os.path.join(ckpt, layout.CONVERSION)}: no release_config (made by "
                     f"{conv.get('source', 'an unknown tool')}, not converted from a release): there is no "
                     "release config.json to write")
  params = orbax_io.restore(ckpt, cfg=cfg)
  os.makedirs(out, exist_ok=True)
  dtypes = conv.get("source_dtypes", {})
  names = torch_io.write_safetensors_shards(torch_tensors(params, mapping.model_rules(cfg), dtypes), out,
                                            max_shard_bytes)
  if "vit" in params:
    vit = dict(torch_tensors(params, mapping.vit_rules(cfg), dtypes))
    from safetensors.numpy import save_file
    save_file(vit, os.path.join(out, "eva_vit_g.safetensors"))
    names.append("eva_vit_g.safetensors")
    if write_pth:
      try:
        import torch
      except ImportError:
        log.warning("torch not installed: eva_vit_g.pth not written (safetensors only)")
      else:
        torch.save({k: torch_io.numpy_to_torch(v) for k, v in vit.items()}, os.path.join(out, "eva_vit_g.pth"))
        names.append("eva_vit_g.pth")
  if conv.get("vit_ignored"):
    log.info("not written: %s (ignored at conversion: the model does not use them)",
             release.ignored_summary(conv["vit_ignored"]))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(conv["release_config"], f, indent=2)
  tok = os.path.join(ckpt, layout.TOKENIZER)
  for n in os.listdir(tok):
    shutil.copyfile(os.path.join(tok, n), os.path.join(out, n))
  log.info("wrote %s: %s", out, names)
  return names


def from_train(workdir: str, out: str, step: int | None = None) -> int:
  """An inference directory of step `step` (default: the latest) of a train WORKDIR
  into `out` (module docstring) -> the step written."""
  train_cfg = orbax_io.read_train_config(workdir)
  step = orbax_io.train_step(workdir, step)
  orbax_io.save_from_train(out, workdir, train_cfg, step)
  log.info("wrote %s: step %d of %s", out, step, workdir)
  return step


def main(argv=None) -> None:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--ckpt", help="converted checkpoint directory (-> release layout)")
  src.add_argument("--from-train", metavar="WORKDIR", help="train.train WORKDIR (-> inference directory)")
  p.add_argument("--step", type=int, default=None, help="with --from-train: the saved step (default: latest)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--max-shard-gb", type=float, default=5.0)
  p.add_argument("--no-pth", action="store_true", help="do not write eva_vit_g.pth")
  a = p.parse_args(argv)
  if a.step is not None and not a.from_train:
    p.error("--step needs --from-train")
  cli.log_to_console("%(levelname)s %(name)s: %(message)s")
  if a.from_train:
    from_train(a.from_train, a.out, a.step)
  else:
    export(a.ckpt, a.out, max_shard_bytes=int(a.max_shard_gb * (1 << 30)), write_pth=not a.no_pth)


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
