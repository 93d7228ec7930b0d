"""LLaMA-VID stage 2 (instruction tuning), as the release's
scripts/video/train/stage_1_2_full_v7b_224_fps_1.sh (second command).

Data: LLaVA-665K mix + Video-ChatGPT-98K with `imgsp_v1` (vicuna_v1 prompting, plus an
`<image>` and its own Q-Former instruction in every human turn). Buckets: images by
text length with up to 64 instruction slots (the 665K mix has up to ~40 rounds; each
slot costs one Q-Former pass and one LLM position per image), videos with 1 slot (all
Video-ChatGPT samples are single-turn) by frame count. Videos are sampled at 1 fps as in
the release, capped at 512 frames by uniform resampling (the release keeps every
1-fps frame and truncates the sequence at 2048; 512 frames are 1024 tokens).
Trains the LLM, the projectors and the whole Q-Former (`qformer_pretrain`: its BERT
encoder, query tokens and vision LayerNorm); the ViT stays frozen. lr 2e-5, global
batch 128 (release: 4 per device x 8 GPUs x 4 accumulation), max len 2048, AdamW (no
decay), 3% warmup, cosine, bf16, one epoch. Starts from stage 1 (`init_from`).

  python -m train.train --config configs/stage2_instruct_7b.py[:size=13b]
"""

import math

from configs import common

MAX_LEN = 2048
NUM_SAMPLES = 665_298 + 98_145   # one epoch


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="7b")
  c = common.defaults()
  c.model = common.release_model(a.size)
  c.batch_size = 128
  c.accum_steps = 4       # the release's gradient_accumulation_steps; normalised over all 128 samples
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.workdir = f"workdir/stage2_instruct_{a.size}"
  c.init_from = f"workdir/stage1_align_{a.size}/checkpoints"
  c.data = common.release_data(
      data_path="data/LLaMA-VID-Finetune/llava_v1_5_mix665k_with_video_chatgpt.json",
      image_folder="data/LLaMA-VID-Finetune", video_folder="data/LLaMA-VID-Finetune", template="imgsp_v1",
      text_len=2048, num_frames=64, max_len=MAX_LEN, max_frames=512, buckets=((512, 1, 8), (1984, 1, 64), (1024, 128, 1), (1024, 512, 1)))
  c.optim = common.optim(2e-5, trainable=[r"llm/", r"token_gen/", r"qformer/"])
  return c
