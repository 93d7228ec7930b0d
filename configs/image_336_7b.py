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

import ml_collections

LLM = {
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
    "13b": dict(vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
}
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = dict(kv.split("=") for kv in (arg or "stage=2").split(","))
  size, stage = args.get("size", "7b"), int(args.get("stage", 2))
  s = STAGES[stage]
  c = ml_collections.ConfigDict()
  c.model = dict(vision=dict(image_size=336, pos_embed_grid=16), qformer=dict(),
                 llm=dict(LLM[size], max_positions=4096),
                 compress_type="none", mm_projector_type="mlp2x_gelu",
                 dtype="bfloat16", param_dtype="float32", attention_impl="cudnn",
                 remat_policy="nothing_saveable")
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1)
  c.batch_size = s["batch"]
  c.accum_steps = s["accum"]
  c.total_steps = math.ceil(s["samples"] / c.batch_size)
  c.seed = 0
  c.workdir = f"workdir/image_336_stage{stage}_{size}"
  c.init_from = f"workdir/image_336_stage1_{size}/checkpoints" if stage == 2 else ""
  # 576 content + 1 context token per image: text_len - 1 + 577 <= max_len.
  c.data = dict(kind="pipeline", data_path=s["data_path"], image_folder=s["image_folder"], video_folder="",
                template=s["template"], llm_tokenizer="model_zoo/LLM/vicuna/7B-V1.5",
                qformer_tokenizer="model_zoo/bert-base-uncased", image_aspect=s["aspect"],
                text_len=s["max_len"] - 577, num_frames=1, qformer_len=256, use_features=False,
                worker_count=4, max_len=s["max_len"], max_frames=1)
  if "buckets" in s:
    c.data.buckets = s["buckets"]
  c.optim = dict(lr=s["lr"], warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=s["trainable"])
  c.ckpt = dict(every=1000, keep=1, async_save=True)
  c.log = dict(every=1, progress=True, peak_tflops=None)
  c.distributed = dict(auto=False, num_processes=1, process_id=0, coordinator="")
  c.debug = dict(kill_after_save_step=-1)
  return c
