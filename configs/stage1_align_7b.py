"""LLaMA-VID stage 1 (modality alignment), as the release's
scripts/video/train/stage_1_2_full_v7b_224_fps_1.sh (first command).

Data: LLaVA-558K image captions + WebVid-232K video captions (`plain_guided`).
Trains the projectors only: mm_projector and vlm_att_{projector,key,val}_projector.
The Q-Former (pretrained InstructBLIP, `qformer_pretrain_freeze`), the ViT and the LLM
are frozen. lr 1e-3, global batch 256, max len 2048, AdamW (no decay), 3% warmup,
cosine, bf16, one epoch.

  python -m train.train --config configs/stage1_align_7b.py            (Vicuna-7B)
  python -m train.train --config configs/stage1_align_7b.py:size=13b
"""

import math

import ml_collections

LLM = {
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
    "13b": dict(vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
}
MAX_LEN = 2048
NUM_SAMPLES = 558_128 + 232_000   # one epoch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = dict(kv.split("=") for kv in (arg or "size=7b").split(","))
  size = args.get("size", "7b")
  c = ml_collections.ConfigDict()
  c.model = dict(vision=dict(), qformer=dict(), llm=dict(LLM[size], max_positions=4096),
                 compress_type="mean", mm_projector_type="mlp2x_gelu",
                 dtype="bfloat16", param_dtype="float32", attention_impl="cudnn",
                 remat_policy="nothing_saveable")
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1)     # ZeRO-like: shard params over all chips
  c.batch_size = 256
  c.accum_steps = 1
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.seed = 0
  c.workdir = f"workdir/stage1_align_{size}"
  c.init_from = ""        # converted release/Vicuna weights (orbax params directory)
  c.data = dict(kind="pipeline", data_path="data/LLaMA-VID-Pretrain/llava_558k_with_webvid.json",
                image_folder="data/LLaMA-VID-Pretrain/images", video_folder="data/LLaMA-VID-Pretrain/videos",
                template="plain_guided", llm_tokenizer="model_zoo/LLM/vicuna/7B-V1.5",
                qformer_tokenizer="model_zoo/bert-base-uncased", video_fps=1.0, image_aspect="crop",
                text_len=512, num_frames=64, qformer_len=256, use_features=False, worker_count=4, max_len=MAX_LEN,
                max_frames=64,   # WebVid clips average 18 s; longer ones are resampled to 64 frames
                # short captions: images (1 frame) and videos (<= 64 frames) by text length
                buckets=((128, 1), (512, 1), (128, 64), (512, 64), (MAX_LEN - 127, 64)))
  c.optim = dict(lr=1e-3, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=[r"token_gen/"])
  c.ckpt = dict(every=1000, keep=1, async_save=True)
  c.log = dict(every=1, progress=True, peak_tflops=None)
  c.distributed = dict(auto=False, num_processes=1, process_id=0, coordinator="")
  c.debug = dict(kill_after_save_step=-1)
  return c
