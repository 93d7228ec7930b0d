"""LLaMA-VID stage 3 (long video), as the release's
scripts/video/train/stage_3_full_v7b_224_longvid.sh.

Data: ~9K long-video (movie) QA pairs on precomputed EVA-ViT-g features (the ViT is
not run: `features` input, float[B, T, 257, 1408]), 2 tokens per frame at 1 fps.
Trains the LLM and mm_projector; every vlm_att part (Q-Former, query tokens, vision
LayerNorm, vlm_att_{projector,key,val}_projector) is frozen (`qformer_pretrain_freeze_all`).
RoPE linear scaling 16 (= ceil(65536 / 4096)), max len 65536, lr 2e-5, global batch 8,
AdamW (no decay), 3% warmup, cosine, bf16. Ring attention over the `sequence` axis and
frame chunks keep memory bounded. Starts from stage 2 (`init_from`).

  python -m train.train --config configs/stage3_long_video_7b.py[:size=13b]
"""

import math

import ml_collections

LLM = {
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
    "13b": dict(vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
}
MAX_LEN = 65536
NUM_SAMPLES = 9_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = dict(kv.split("=") for kv in (arg or "size=7b").split(","))
  size = args.get("size", "7b")
  c = ml_collections.ConfigDict()
  c.model = dict(vision=dict(), qformer=dict(),
                 llm=dict(LLM[size], max_positions=MAX_LEN, rope_scaling=float(math.ceil(MAX_LEN / 4096))),
                 compress_type="mean", mm_projector_type="mlp2x_gelu",
                 dtype="bfloat16", param_dtype="float32", attention_impl="ring",
                 remat_policy="nothing_saveable", frame_chunk=1024)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=8)
  c.batch_size = 8
  c.accum_steps = 1
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.seed = 0
  c.workdir = f"workdir/stage3_long_video_{size}"
  c.init_from = f"workdir/stage2_instruct_{size}/checkpoints"
  # The LLM sees text_len - 1 + 2 * num_frames = MAX_LEN positions (the <image> gives way to the
  # frame tokens): 4097 text tokens + 30720 frames (8.5 h at 1 fps). Ring attention needs the
  # length to split into sequence x 512-blocks, so it must be exactly 65536, not 65535.
  c.data = dict(kind="pipeline", data_path="data/LLaMA-VID-Finetune/long_videoqa.json",
                image_folder="data/LLaMA-VID-Finetune", video_folder="data/LLaMA-VID-Finetune",
                template="imgsp_v1", llm_tokenizer="model_zoo/LLM/vicuna/7B-V1.5",
                qformer_tokenizer="model_zoo/bert-base-uncased", video_fps=1.0, image_aspect="pad",
                text_len=4097, num_frames=30720, qformer_len=256, use_features=True, worker_count=1, max_len=MAX_LEN,
                max_frames=30720)
  c.optim = dict(lr=2e-5, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=[r"llm/", r"token_gen/mm_projector/"])
  c.ckpt = dict(every=200, keep=1, async_save=True)
  c.log = dict(every=1, progress=True, peak_tflops=None)
  c.distributed = dict(auto=False, num_processes=1, process_id=0, coordinator="")
  c.debug = dict(kill_after_save_step=-1)
  return c
