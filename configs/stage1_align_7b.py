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

from configs import common

MAX_LEN = 2048
NUM_SAMPLES = 558_128 + 232_000   # one epoch


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="7b")
  c = common.defaults()
  c.model = common.release_model(a.size)
  c.batch_size = 256
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.workdir = f"workdir/stage1_align_{a.size}"
  c.data = common.release_data(
      data_path="data/LLaMA-VID-Pretrain/llava_558k_with_webvid.json", image_folder="data/LLaMA-VID-Pretrain/images",
      video_folder="data/LLaMA-VID-Pretrain/videos", template="plain_guided", image_aspect="crop",
      text_len=512, num_frames=64, max_len=MAX_LEN,
      max_frames=64,   # WebVid clips average 18 s; longer ones are resampled to 64 frames
      # short captions: images (1 frame) and videos (<= 64 frames) by text length
      buckets=((128, 1), (512, 1), (128, 64), (512, 64), (MAX_LEN - 127, 64)))
  c.optim = common.optim(1e-3, trainable=[r"token_gen/"])   # converted release/Vicuna weights: init_from
  c.init_from_partial = True   # Vicuna + EVA-ViT-g + Q-Former converted; the projectors (token_gen/) start fresh
  return c
