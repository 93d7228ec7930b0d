"""LLaMA-VID image model at 336 px, as the release's
scripts/image_only/train/stage_1_2_full_v7b_336.sh (`clip-patch14-224-336` processor).

The EVA-ViT-g position embedding (16 x 16 grid, trained at 224) is interpolated
bicubically to 24 x 24; no `compress_type` is passed by the release's image scripts,
so every one of the 576 patches becomes a content token ("none"), plus one context
token per image. Two recipes (the `arg` picks one):
  stage=1  LLaVA-558K captions (`plain_guided`), projectors only, lr 1e-3, batch 256, len 2048
  stage=2  LLaVA-665K mix split to at most 6 rounds (921K samples; `imgsp_v1`: an image
           and an instruction per turn), LLM + projectors + Q-Former, lr 2e-5, batch 128
           (8 per device x 8 GPUs x 2 accumulation), len 4096 (`model_max_length 4096`)

  python -m train.train --config configs/image_336_7b.py:stage=2[,size=13b]
"""

import math

from configs import common

STAGES = {
    1: dict(samples=558_128, batch=256, accum=1, lr=1e-3, max_len=2048, template="plain_guided",
            aspect="crop", trainable=[r"token_gen/"],
            data_path="data/LLaMA-VID-Pretrain/blip_laion_cc_sbu_558k.json",
            image_folder="data/LLaMA-VID-Pretrain/images"),
    2: dict(samples=921_000, batch=128, accum=2, lr=2e-5, max_len=4096, template="imgsp_v1",
            aspect="pad", trainable=[r"llm/", r"token_gen/", r"qformer/"],
            # imgsp_v1: one image (576 tokens + 1 context token) per human turn, at most 6
            # rounds in this file; every bucket is exactly 4096 LLM positions
            buckets=((640, 1, 6), (1792, 1, 4), (2944, 1, 2), (4096 - 576, 1, 1)),
            data_path="data/LLaMA-VID-Finetune/llava_v1_5_mix665k_maxround_6_total_921k.json",
            image_folder="data/LLaMA-VID-Finetune"),
}


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="7b", stage=2)
  if a.stage not in STAGES:
    raise ValueError(f"stage={a.stage}: expected one of {sorted(STAGES)}")
  s = STAGES[a.stage]
  c = common.defaults()
  c.model = common.release_model(a.size, vision=dict(image_size=336, pos_embed_grid=16), compress_type="none")
  c.batch_size = s["batch"]
  c.accum_steps = s["accum"]
  c.total_steps = math.ceil(s["samples"] / c.batch_size)
  c.workdir = f"workdir/image_336_stage{a.stage}_{a.size}"
  c.init_from = f"workdir/image_336_stage1_{a.size}/checkpoints" if a.stage == 2 else ""
  # 576 content + 1 context token per image: text_len - 1 + 577 <= max_len.
  c.data = common.release_data(data_path=s["data_path"], image_folder=s["image_folder"], video_folder="",
                               template=s["template"], image_aspect=s["aspect"], text_len=s["max_len"] - 577,
                               num_frames=1, max_len=s["max_len"], max_frames=1)
  if "buckets" in s:
    c.data.buckets = s["buckets"]
  c.optim = common.optim(s["lr"], trainable=s["trainable"])
  return c
