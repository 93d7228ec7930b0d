"""LLaMA-VID stage 3 (long video), as the release's
scripts/video/train/stage_3_full_v7b_224_longvid.sh.

Data: ~9K long-video (movie) QA pairs on precomputed EVA-ViT-g features (the ViT is
not run), 2 tokens per frame at 1 fps, in the release's movie mode (`video_mode="movie"`):
each movie file (`.safetensors` with `inputs`, converted from the release's `.pkl` by
`python -m llamavid_jax.data.features convert`) puts one `<image>` per frame among its
subtitles into the human turn, the question is every frame's Q-Former instruction, and
the features go in without CLS (float16[B, T, 256, 1408], as stored).
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
  c.model = common.release_model(a.size, attention_impl="auto", frame_chunk=1024, mlp_chunk=16384, video_mode="movie",
                                 llm=dict(max_positions=MAX_LEN, rope_scaling=float(math.ceil(MAX_LEN / 4096))))
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=8)
  c.batch_size = 8
  c.total_steps = math.ceil(NUM_SAMPLES / c.batch_size)
  c.workdir = f"workdir/stage3_long_video_{a.size}"
  c.init_from = f"workdir/stage2_instruct_{a.size}/checkpoints"
  # A movie's text holds its T frame placeholders and its subtitles, so a row of S text
  # positions and T frames takes S + T LLM positions (each placeholder gives way to the
  # frame's 2 tokens). Every bucket fills exactly MAX_LEN = 65536 positions (ring attention
  # splits the length into sequence x 512-blocks); they differ in how much of it is text:
  # 8.5 h of frames (30720) with 4096 text tokens, 4.5 h with 32768, 2.3 h with 49152.
  c.data = common.release_data(
      data_path="data/LLaMA-VID-Finetune/long_videoqa.json", image_folder="data/LLaMA-VID-Finetune",
      video_folder="data/LLaMA-VID-Finetune", template="imgsp_v1", text_len=34816, num_frames=30720,
      buckets=((34816, 30720), (49152, 16384), (57344, 8192)), use_features=True, feature_dtype="float16",
      worker_count=1, max_len=MAX_LEN, max_frames=30720,
      # A step's features (8 x 30720 x 256 x 1408, no CLS) are 177 GB in float16, the release's
      # stored dtype: they stay in host memory and reach the chips a frame chunk at a time.
      host_inputs=["features"], input_dtypes={"features": "float16"})
  # AdamW's moments (2 x 4 bytes per trained parameter: 54 GB for 7B) wait in host memory
  # between steps: on 4 v5p chips at 64K they would be 13 of the 95 GiB per chip (13B: 25).
  c.optim = common.optim(2e-5, trainable=[r"llm/", r"token_gen/mm_projector/"], host_state=True)
  c.ckpt.every = 200
  return c
