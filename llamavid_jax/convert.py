"""Release PyTorch checkpoint -> a self-contained JAX checkpoint directory.

  # a released LLaMA-VID model (sharded .bin + index, or safetensors)
  python -m llamavid_jax.convert --model DIR --vision-tower eva_vit_g.pth \
      --bert-tokenizer BERT_DIR --out OUT [--dtype float32|bfloat16|float16]

  # the stage-1 starting point: plain HF LLaMA/Vicuna + InstructBLIP Q-Former,
  # fresh projectors
  python -m llamavid_jax.convert --llm VICUNA_DIR \
      --instructblip instruct_blip_vicuna7b_trimmed.pth --vision-tower eva_vit_g.pth \
      --bert-tokenizer BERT_DIR --out OUT [--mm-projector-type mlp2x_gelu] \
      [--compress-type mean] [--image-size 224]

eva_vit_g.pth as released is the whole EVA-CLIP-g tower (40 blocks, `norm`, `head`):
as LAVIS, the converter builds 39 blocks and ignores block 39, `norm` and `head`
(logged, and listed as `vit_ignored` in OUT/conversion.json); `--vit-depth N` builds
N blocks instead. Any other key the model does not take is an error.

OUT holds the Orbax parameters, the model config and both tokenizers
(`checkpoint/layout.py`), so OUT alone runs the model. Weights are streamed one
file at a time (`checkpoint/stream.py`); `--dtype` defaults to the source dtypes,
which keeps `llamavid_jax.export` bit-exact.
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
import numpy as np
from flax import linen as nn

from llamavid_jax import cli
from llamavid_jax.checkpoint import mapping, orbax_io, release, torch_io
from llamavid_jax.checkpoint.stream import StreamingConverter, _progress
from llamavid_jax.models import config as C
from llamavid_jax.models import token_gen

log = logging.getLogger("llamavid_jax.convert")


def _file_shapes(files, select=None, rename=None) -> dict[str, tuple[int, ...]]:
  out = {}
  for f in files:
    for k, s in torch_io.shapes_of_file(f, select).items():
      k = rename(k) if rename else k
      if k is not None:
        out[k] = s
  return out


def _stream(conv: StreamingConverter, files, select=None, rename=None) -> None:
  for f in _progress(files, desc="shards", unit="file"):
    conv.add_file(f, torch_io.iter_tensors(f, select), rename=rename)


def _stream_vit(conv: StreamingConverter, vision_tower: str, cfg: C.LlamaVidConfig, shapes) -> list[str]:
  """eva_vit_g.pth into `conv`, less the keys the built depth does not take (the
  whole tower's last block, `norm`, `head`: see `release.vit_layout`), which are
  logged and returned; any other unknown key is still an error."""
  _, ignored = release.vit_layout(shapes, cfg.vision.depth, vision_tower)
  if ignored:
    log.info("%s: ViT depth %d; ignored (as LAVIS's non-strict load): %s", vision_tower, cfg.vision.depth,
             release.ignored_summary(ignored))
  skip = set(ignored)
  conv.add_file(vision_tower, ((k, t) for k, t in torch_io.iter_tensors(vision_tower) if k not in skip))
  return ignored


def _write(out, params, cfg, conv, release_cfg, llm_tok_dir, bert_dir, **extra) -> None:
  conversion = dict(release_config=release_cfg, source_dtypes=conv.source_dtypes,
                    skipped=dict(conv.skipped), **extra)
  orbax_io.save_inference(out, params, cfg, conversion, llm_tok_dir, bert_dir)
  log.info("wrote %s (%d tensors, skipped %s)", out, len(conv.seen), dict(conv.skipped))


def convert_release(model_dir: str, vision_tower: str, bert_tokenizer: str, out: str, *,
                    dtype=None, image_size: int | None = None, vit_depth: int | None = None) -> C.LlamaVidConfig:
  """A release model directory + eva_vit_g.pth -> OUT (see module docstring)."""
  hf = release.read_json(os.path.join(model_dir, "config.json"))
  files = torch_io.shard_files(model_dir)
  vit = torch_io.shapes_of_file(vision_tower)
  cfg = release.model_config(hf, _file_shapes(files), vit, image_size=image_size, model_file=model_dir,
                             vit_file=vision_tower, vit_depth=vit_depth)
  conv = StreamingConverter(mapping.model_rules(cfg) | mapping.vit_rules(cfg), orbax_io.shape_tree(cfg), dtype)
  ignored = _stream_vit(conv, vision_tower, cfg, vit)
  _stream(conv, files)
  params = conv.finish()
  _write(out, params, cfg, conv, hf, model_dir, bert_tokenizer, vision_tower=os.path.basename(vision_tower),
         vit_ignored=ignored)
  return cfg


def fresh_projectors(cfg: C.LlamaVidConfig, seed: int = 0) -> dict:
  """Randomly initialised `token_gen` params (our initialisers), as numpy."""
  gen = token_gen.TokenGenerator(cfg.llm.d_model, cfg.compress_type, cfg.mm_projector_type, use_context=True)
  q = np.zeros((1, 1, 1, 1, cfg.qformer.hidden), np.float32)
  x = np.zeros((1, 1, cfg.vision.grid ** 2, cfg.vision.width), np.float32)
  return jax.tree.map(np.asarray, nn.unbox(gen.init(jax.random.key(seed), q, x)["params"]))


def convert_stage1(llm_dir: str, instructblip: str, vision_tower: str, bert_tokenizer: str, out: str, *,
                   mm_projector_type: str = "mlp2x_gelu", compress_type: str = "mean",
                   image_size: int = 224, dtype=None, seed: int = 0,
                   vit_depth: int | None = None) -> C.LlamaVidConfig:
  """Plain HF LLaMA dir + InstructBLIP `.pth` (Q-Former, query tokens, ln_vision) +
  eva_vit_g.pth -> OUT with freshly initialised projectors (the stage-1 start)."""
  hf = release.read_json(os.path.join(llm_dir, "config.json"))
  files = torch_io.shard_files(llm_dir)
  qshapes = _file_shapes([instructblip], "model", mapping.instructblip_key)
  vit = torch_io.shapes_of_file(vision_tower)
  vision = release.vision_config(vit, image_size, file=vision_tower, depth=vit_depth)
  cfg = C.LlamaVidConfig(vision=vision, qformer=release.qformer_config(qshapes, file=instructblip),
                         llm=release.llm_config(hf), compress_type=compress_type,
                         mm_projector_type=mm_projector_type)
  rules = mapping.llm_rules(cfg) | mapping.qformer_rules(cfg) | mapping.vit_rules(cfg)
  conv = StreamingConverter(rules, orbax_io.shape_tree(cfg), dtype)
  ignored = _stream_vit(conv, vision_tower, cfg, vit)
  conv.add_file(instructblip, torch_io.iter_tensors(instructblip, "model"), rename=mapping.instructblip_key)
  _stream(conv, files)
  params = conv.finish()
  tg = fresh_projectors(cfg, seed)
  params["token_gen"] = jax.tree.map(lambda a: a.astype(dtype or a.dtype), tg)
  for key in mapping.projector_rules(cfg):
    conv.source_dtypes[key] = np.dtype(dtype or np.float32).name
  release_cfg = dict(hf, mm_hidden_size=vision.width, mm_projector_type=mm_projector_type,
                     compress_type=token_gen.compress_to_release(compress_type),
                     num_query=cfg.qformer.num_query, bert_type="qformer_pretrain",
                     mm_vision_tower=vision_tower, image_processor=f"./llamavid/processor/clip-patch14-{image_size}",
                     mm_vision_select_feature="patch", mm_vision_select_layer=-1)
  _write(out, params, cfg, conv, release_cfg, llm_dir, bert_tokenizer,
         vision_tower=os.path.basename(vision_tower), instructblip=os.path.basename(instructblip),
         vit_ignored=ignored)
  return cfg


DTYPES = {"source": None, "float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def main(argv=None) -> None:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="release model directory (config.json, weights, tokenizer)")
  src.add_argument("--llm", help="plain HF LLaMA/Vicuna directory (stage-1 start; needs --instructblip)")
  p.add_argument("--instructblip", help="instruct_blip_vicuna7b_trimmed.pth (with --llm)")
  p.add_argument("--vision-tower", required=True, help="eva_vit_g.pth")
  p.add_argument("--bert-tokenizer", required=True, help="bert-base-uncased directory (vocab.txt)")
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", choices=sorted(DTYPES), default="source",
                 help="stored dtype; 'source' keeps the checkpoint's (bit-exact export)")
  p.add_argument("--image-size", type=int, default=None,
                 help="override the size read from config.json's image_processor (default 224 for --llm)")
  p.add_argument("--mm-projector-type", default="mlp2x_gelu", choices=sorted(token_gen.PROJECTORS))
  p.add_argument("--compress-type", default="mean", help="with --llm: mean | grid:N | none")
  p.add_argument("--seed", type=int, default=0, help="with --llm: projector initialisation")
  p.add_argument("--vit-depth", type=int, default=None,
                 help="ViT blocks to build (default: the file's blocks, one less when it holds the whole "
                      "EVA-CLIP tower with norm/head, as LAVIS); later blocks are ignored and reported")
  a = p.parse_args(argv)
  if a.vit_depth is not None and a.vit_depth < 1:
    p.error(f"--vit-depth {a.vit_depth}: must be at least 1")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  dtype = DTYPES[a.dtype]
  if dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
  if a.model:
    convert_release(a.model, a.vision_tower, a.bert_tokenizer, a.out, dtype=dtype, image_size=a.image_size,
                    vit_depth=a.vit_depth)
  else:
    if not a.instructblip:
      p.error("--llm needs --instructblip")
    convert_stage1(a.llm, a.instructblip, a.vision_tower, a.bert_tokenizer, a.out,
                   mm_projector_type=a.mm_projector_type, compress_type=a.compress_type,
                   image_size=a.image_size or 224, dtype=dtype, seed=a.seed, vit_depth=a.vit_depth)


if __name__ == "__main__":
  cli.run(main)   # a known error: `error: <one line>`, exit 2 / 1 (--debug: the traceback)
