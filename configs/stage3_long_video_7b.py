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

from configs import common

MAX_LEN = 65536
NUM_SAMPLES = 9_000


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="7b")
  c = common.defaults()
  c.model = common.release_model(a.size, attention_impl="ring", frame_chunk=1024,
                                 llm=dict(max_positions=MAX_LEN, rope_scaling=float(math.ceil(MAX_LEN / 4096))))
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=8)
  c.batch_size = 8
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.workdir = f"workdir/stage3_long_video_{a.size}"
  c.init_from = f"workdir/stage2_instruct_{a.size}/checkpoints"
  # The LLM sees text_len - 1 + 2 * num_frames = MAX_LEN positions (the <image> gives way to the
  # frame tokens): 4097 text tokens + 30720 frames (8.5 h at 1 fps). Ring attention needs the
  # length to split into sequence x 512-blocks, so it must be exactly 65536, not 65535.
  c.data = common.release_data(
      data_path="data/LLaMA-VID-Finetune/long_videoqa.json", image_folder="data/LLaMA-VID-Finetune",
      video_folder="data/LLaMA-VID-Finetune", template="imgsp_v1", text_len=4097, num_frames=30720,
      use_features=True, worker_count=1, max_len=MAX_LEN, max_frames=30720,
      # A step's features (8 x 30720 x 257 x 1408) are 178 GB in float16, the release's
      # stored dtype: they stay in host memory and reach the chips a frame chunk at a time.
      host_inputs=["features"], input_dtypes={"features": "float16"})
  # AdamW's moments (2 x 4 bytes per trained parameter: 54 GB for 7B) wait in host memory
  # between steps: on 4 v5p chips at 64K they would be 13 of the 95 GiB per chip (13B: 25).
  c.optim = common.optim(2e-5, trainable=[r"llm/", r"token_gen/mm_projector/"], host_state=True)
  c.ckpt.every = 200
  return c
