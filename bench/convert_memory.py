"""Peak host memory of `llamavid_jax.convert` on a >= 1 GB two-shard checkpoint.

  python bench/convert_memory.py [--d-model 2048 --layers 8 --dtype float16]

Builds a random release-layout checkpoint (a wide LLaMA without Q-Former, a one-block
ViT) in a temp dir, written shard by shard with torch.save; runs the conversion CLI in
a subprocess and prints its peak RSS next to the shard and total sizes, and the RSS of
a subprocess that only imports the same modules (the interpreter + jax + torch floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import torch_llamavid as tl  # noqa: E402  (tokenizer writers)


def llm_keys(d, f, layers, vocab):
  yield "model.embed_tokens.weight", (vocab, d)
  for i in range(layers):
    k = f"model.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      yield f"{k}self_attn.{n}.weight", (d, d)
    yield f"{k}mlp.gate_proj.weight", (f, d)
    yield f"{k}mlp.up_proj.weight", (f, d)
    yield f"{k}mlp.down_proj.weight", (d, f)
    yield f"{k}input_layernorm.weight", (d,)
    yield f"{k}post_attention_layernorm.weight", (d,)
  yield "model.norm.weight", (d,)
  yield "lm_head.weight", (vocab, d)
  yield "model.mm_projector.0.weight", (d, 88)
  yield "model.mm_projector.0.bias", (d,)
  yield "model.mm_projector.2.weight", (d, d)
  yield "model.mm_projector.2.bias", (d,)


def vit_state(rng):
  sd = {"patch_embed.proj.weight": (88, 3, 14, 14), "patch_embed.proj.bias": (88,), "cls_token": (1, 1, 88),
        "pos_embed": (1, 257, 88), "blocks.0.norm1.weight": (88,), "blocks.0.norm1.bias": (88,),
        "blocks.0.attn.qkv.weight": (264, 88), "blocks.0.attn.q_bias": (88,), "blocks.0.attn.v_bias": (88,),
        "blocks.0.attn.proj.weight": (88, 88), "blocks.0.attn.proj.bias": (88,), "blocks.0.norm2.weight": (88,),
        "blocks.0.norm2.bias": (88,), "blocks.0.mlp.fc1.weight": (64, 88), "blocks.0.mlp.fc1.bias": (64,),
        "blocks.0.mlp.fc2.weight": (88, 64), "blocks.0.mlp.fc2.bias": (88,)}
  return {k: rng.standard_normal(s, np.float32) for k, s in sd.items()}


def build(root, d, f, layers, vocab, dtype):
  import torch
  rng = np.random.default_rng(0)
  model = os.path.join(root, "model")
  os.makedirs(model)
  keys = list(llm_keys(d, f, layers, vocab))
  total = sum(int(np.prod(s)) for _, s in keys) * np.dtype(dtype).itemsize
  names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
  weight_map, acc, shard_bytes = {}, 0, [0, 0]
  for k, s in keys:      # first half of the bytes -> shard 1
    i = int(acc >= total / 2)
    weight_map[k] = names[i]
    n = int(np.prod(s)) * np.dtype(dtype).itemsize
    acc += n
    shard_bytes[i] += n
  for name in names:
    sd = {k: torch.from_numpy(rng.standard_normal(s, np.float32).astype(dtype)) for k, s in keys
          if weight_map[k] == name}
    torch.save(sd, os.path.join(model, name))
    del sd
  with open(os.path.join(model, "pytorch_model.bin.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
  cfg = dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=d // 128,
             num_key_value_heads=d // 128, vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=4096,
             mm_hidden_size=88, mm_projector_type="mlp2x_gelu", compress_type="mean",
             image_processor="./llamavid/processor/clip-patch14-224")
  with open(os.path.join(model, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  tl.write_sp_tokenizer(model)
  tl.write_bert_vocab(os.path.join(root, "bert"))
  torch.save({k: torch.from_numpy(v) for k, v in vit_state(rng).items()}, os.path.join(root, "eva_vit_g.pth"))
  return model, total, shard_bytes


WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(cmd, env) -> tuple[int, float]:
  """(peak RSS in bytes, seconds) of `cmd`, run under a small wrapper process: ru_maxrss
  survives fork+exec, so measuring a child of this (large) process would report ours."""
  t = time.time()
  res = subprocess.run([sys.executable, "-c", WRAPPER] + cmd, check=True, env=env, cwd=ROOT,
                       capture_output=True, text=True)
  return int(res.stdout.strip().splitlines()[-1]) * 1024, time.time() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--d-model", type=int, default=2048)
  p.add_argument("--mlp", type=int, default=5504)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--dtype", default="float16")
  p.add_argument("--out-dtype", default="source", choices=["source", "float32", "bfloat16", "float16"])
  a = p.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
  gb = 1 << 30
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
    model, total, shards = build(root, a.d_model, a.mlp, a.layers, a.vocab, np.dtype(a.dtype))
    print(f"checkpoint: {total / gb:.3f} GiB in 2 shards of {shards[0] / gb:.3f} + {shards[1] / gb:.3f} GiB "
          f"({a.dtype})")
    floor, _ = peak_rss([sys.executable, "-c", "import torch, orbax.checkpoint, llamavid_jax.convert"], env)
    cmd = [sys.executable, "-m", "llamavid_jax.convert", "--model", model, "--vision-tower",
           os.path.join(root, "eva_vit_g.pth"), "--bert-tokenizer", os.path.join(root, "bert"),
           "--out", os.path.join(root, "out"), "--dtype", a.out_dtype]
    peak, secs = peak_rss(cmd, env)
    out_dtype = np.dtype(a.dtype if a.out_dtype == "source" else
                         {"float32": np.float32, "float16": np.float16, "bfloat16": np.float16}[a.out_dtype])
    params = total // np.dtype(a.dtype).itemsize * out_dtype.itemsize
    print(f"import floor (python + torch + jax + orbax): {floor / gb:.3f} GiB")
    print(f"convert peak RSS: {peak / gb:.3f} GiB in {secs:.0f} s "
          f"= floor + {(peak - floor) / gb:.3f} GiB; params in the stored dtype {params / gb:.3f} GiB, "
          f"largest shard {max(shards) / gb:.3f} GiB, total {total / gb:.3f} GiB")


if __name__ == "__main__":
  main()
