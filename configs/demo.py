"""The CPU demo: a tiny LLaMA-VID trained from scratch on synthetic video QA.

  python -m train.train --config configs/demo.py                 (context + content tokens)
  python -m train.train --config configs/demo.py:content_only    (use_context_token=False)
  python -m train.train --config configs/demo.py:toy             (random in-memory batches)

Unlike the release recipe, everything except the ViT trains (there is no pretrained
LLM or Q-Former to start from); the ViT stays frozen at its random init. The Q-Former
and LLM start at std 0.07, not BERT's / LLaMA's 0.02: at widths of 64 and 128, 0.02
leaves every attention nearly uniform, and the instruction barely reaches the context
attention's queries for hundreds of steps. Data and measurements: train/demo.py.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = set((arg or "").split(","))
  c = ml_collections.ConfigDict()
  model = dict(
      vision=dict(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128),
      qformer=dict(vocab_size=512, hidden=64, num_layers=2, num_heads=4, mlp_dim=128,
                   max_positions=64, num_query=8, vision_width=64, max_text_len=32, initializer_range=0.07),
      llm=dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
               max_positions=512, initializer_range=0.07),
      compress_type="mean", mm_projector_type="mlp2x_gelu",
      use_context_token="content_only" not in args,
      remat_policy="none",
  )
  if "tiny" in args:   # tests: the smallest model and batch that exercise everything
    model.update(
        vision=dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64),
        qformer=dict(vocab_size=100, hidden=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_positions=64, num_query=4, vision_width=32, max_text_len=32),
        llm=dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_positions=128))
  c.model = model
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.batch_size = 16   # 16 x 1600 steps: the context attention learns to pick objects earlier than 32 x 800
  c.accum_steps = 1
  c.total_steps = 1600
  c.seed = 0
  c.workdir = "workdir/demo" + ("_content_only" if "content_only" in args else "")
  c.init_from = ""
  # 4-turn training clips (one question of each kind, imgsp_v1: every turn has its own
  # instruction slot) carry at most 75 text tokens; held-out clips are single-turn. The
  # longest question is 10 Q-Former tokens with [CLS] and [SEP] (a test holds it to
  # qformer_len): 12, not 24, trains the demo ~10 % faster (362 s vs 401 s on 2 cores).
  c.data = dict(kind="toy" if "toy" in args else "pipeline", root="workdir/demo_data",
                text_len=80, num_frames=4, qformer_len=12, use_features=False, template="imgsp_v1",
                buckets=((80, 4, 4),), num_epochs=0, worker_count=0, max_len=512, video_fps=None,
                max_frames=4, nan_batch=-1)
  c.optim = dict(lr=2e-3, warmup_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=[r"llm/", r"token_gen/"] + ([r"qformer/"] if "content_only" not in args else []))
  c.ckpt = dict(every=400, keep=2, async_save=True)
  c.log = dict(every=100, progress=True, peak_tflops=None)
  c.distributed = dict(auto=False, num_processes=1, process_id=0, coordinator="")
  c.debug = dict(kill_after_save_step=-1)
  if "tiny" in args:
    c.batch_size, c.total_steps, c.accum_steps = 16, 6, 2
    c.data.update(text_len=12, num_frames=2, qformer_len=6, buckets=((12, 2, 1),))
    c.log.every, c.log.progress, c.ckpt.every = 1, False, 2
  return c
