"""Needle in a video haystack on CPU: a tiny LLaMA-VID trained from scratch on short
needle clips, then asked about clips up to 64x longer by `eval.needle`.

  python -m llamavid_jax.data.synthetic --out workdir/needle/data --num-train 0 --num-eval 0 \\
      --long 4000 --long-frames 4-64 --long-depths 0-1 --size 28     (the data, once: 12 s)
  python -m train.train --config configs/needle.py                   (6-10 min on 2 busy cores)
  python -m eval.needle --ckpt workdir/needle/train/inference --out workdir/needle/eval --rope-scaling auto
  python -m train.train --config configs/needle.py:tiny              (the tests' smallest run)

`make needle` runs the three. Data (`SYNTHETIC_ARGS`): 4000 clips at 1 fps, 28 px, of
4-64 frames (log-uniform: as many of 8-16 frames as of 32-64), an empty still scene in
which one coloured shape sits in the centre for 3 frames at a depth drawn from 0-1;
"What color is the shape that appears?" (6 colours: chance 1/6). Frame buckets 8 / 16 /
32 / 64, so short clips cost less; the short ones (the needle a large part of the clip)
get the LLM's attention to the needle going within ~100 steps.

Model: the demo's tiny towers (everything but the ViT trains from scratch) at a 2 x 2
patch grid, two tokens per frame (context + mean content): a 4096-frame clip is 8192
visual tokens, 8227 LLM positions with the prompt. `frame_chunk` runs the Q-Former over
256 frames at a time on long clips (an nn.scan; shorter ones in one go).
Positions: training sequences are at most MAX_LEN = 176 positions, recorded as
`llm.max_positions`; `eval.needle --rope-scaling auto` divides positions by
ceil(S' / max_positions) (the release's factor rule for its 64K stage, here applied at
inference without fine-tuning: position interpolation). Without it, positions
extrapolate and far needles are lost (answered with an empty string or a wrong colour).

Measured on the 2-core dev machine shared with other jobs (load 8-12), one run each;
eval.needle at 5 depths (0-100 %) x 4 clips per cell, accuracy by length:
  this recipe (rope_theta 1e4, 500 steps): training 274-380 s wall (238-252 s user; two runs,
    the same losses), loss < 0.002 from step 100; data 12 s.
    --rope-scaling auto: 1.00 at every length 16-4096 and depth (180 of 180).
    no scaling:          16-64: 1.00, 128: 1.00, 256: 1.00, 512: 0.85, 1024: 0.40,
                         2048: 0.30, 4096: 0.20 (only the needle next to the question, depth 100 %,
                         is found at 4096).
  rope_theta 1e6 (otherwise the same; 572 s wall, 255 s user):
    auto: 1.00 up to 1024 frames, 0.90 at 2048 and 4096 (depth 0: 2 of 4);
    no scaling: 16-64: 1.00, 128: 0.95, 256: 0.90, 512: 0.85, 1024: 0.55, 2048: 0.55,
    4096: 0.50 (depths 75-100 % right, 0-50 % mostly lost). 800 steps (2 clips a cell):
    no scaling 1.00 up to 1024 but 0.60 at 2048 and 0.40 at 4096; a fixed factor 24 or 48:
    1.00 at 64, 2048 and 4096 frames.
  A slower rotary base extrapolates somewhat further unscaled, but interpolation is what
  carries the model to 64x its training length (with it, the release's 1e4 did best here).
  4096 frames: 6-8 s a clip at batch 1 (frame_chunk 256, prefill chunk 1024), peak RSS
  of the evaluation process 1.6-1.7 GB; eval.needle's default table (64-4096 frames, 2
  clips a cell) takes 2-4 min, the 9-length one with 4 clips a cell 6-7 min (210 s user).
"""

import ml_collections

from configs import common

MAX_LEN = 176   # 48 text + 64 frames x 2 tokens - 1: the longest training sequence
DATA = "workdir/needle/data"   # where the command above writes the clips (config.data.root)
SYNTHETIC_ARGS = "--num-train 0 --num-eval 0 --long 4000 --long-frames 4-64 --long-depths 0-1 --size 28"
TINY_SYNTHETIC_ARGS = "--num-train 0 --num-eval 0 --long 32 --long-frames 4-8 --long-depths 0-1 --size 28"


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = common.defaults()
  c.model = dict(
      vision=dict(image_size=28, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128),
      qformer=dict(vocab_size=512, hidden=64, num_layers=2, num_heads=4, mlp_dim=128,
                   max_positions=64, num_query=8, vision_width=64, max_text_len=32, initializer_range=0.07),
      llm=dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
               max_positions=MAX_LEN, rope_theta=10000.0, rope_scaling=1.0, initializer_range=0.07),
      compress_type="mean", mm_projector_type="mlp2x_gelu", use_context_token=True, remat_policy="none",
      frame_chunk=256,
  )
  if a.tiny:   # tests: the smallest towers that exercise everything
    c.model.vision = dict(common.TINY["vision"])
    c.model.qformer = common.TINY["qformer"]
    c.model.llm = dict(common.TINY["llm"], max_positions=64)
    c.model.frame_chunk = 0   # 8 frames: no chunks to train over (the test evaluates with 4)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.batch_size = 16
  c.total_steps = 500
  c.workdir = "workdir/needle/train"
  # "<s> {system} USER: <image>\n{question} ASSISTANT: {colour}</s>" is 38 tokens.
  root = ml_collections.FieldReference(DATA)   # --config.data.root=DIR moves every path below
  c.data = dict(kind="pipeline", root=root, data_path=root + "/long.json", image_folder=root, video_folder=root,
                llm_tokenizer=root + "/tokenizers/llm", qformer_tokenizer=root + "/tokenizers/qformer",
                text_len=48, num_frames=64, qformer_len=12, use_features=False, template="vicuna_v1",
                buckets=((48, 8), (48, 16), (48, 32), (48, 64)), num_epochs=0, worker_count=1, max_len=MAX_LEN,
                video_fps=1.0, max_frames=None, nan_batch=-1)
  # worker_count=1: decoding a 64-frame batch (~0.4 s) overlaps the step; max_frames=None:
  # the inference directory then caps no clip (eval.needle lifts any cap anyway)
  c.evals = {}
  c.optim = dict(lr=2e-3, warmup_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=[r"llm/", r"token_gen/", r"qformer/"])
  c.ckpt = dict(every=500, keep=1, async_save=True)
  c.log = dict(every=50, progress=True, peak_tflops=None)
  if a.tiny:
    c.workdir = "workdir/needle/tiny"
    c.batch_size, c.total_steps = 8, 4
    c.data.update(num_frames=8, buckets=((48, 8),), max_len=64, worker_count=0)
    c.log.every, c.log.progress, c.ckpt.every = 1, False, 4
  return c
