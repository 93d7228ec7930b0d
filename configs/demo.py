"""The CPU demo: a tiny LLaMA-VID trained from scratch on synthetic video QA.

  python -m train.demo --data_only                               (writes workdir/demo/data once)
  python -m train.train --config configs/demo.py                 (context + content tokens)
  python -m train.train --config configs/demo.py:content_only    (use_context_token=False)
  python -m train.train --config configs/demo.py:toy             (random in-memory batches, no data)
  python -m train.train --config configs/demo.py:toy,tiny        (the tests' smallest run)

`make demo` (train/demo.py) generates the data, trains both variants into workdir/demo/
and evaluates them; `train.train` on this config writes to workdir/demo_train/ so that it
never resumes (or spoils) the demo's runs.

Unlike the release recipe, everything except the ViT trains (there is no pretrained
LLM or Q-Former to start from); the ViT stays frozen at its random init. The Q-Former
and LLM start at std 0.07, not BERT's / LLaMA's 0.02: at widths of 64 and 128, 0.02
leaves every attention nearly uniform, and the instruction barely reaches the context
attention's queries for hundreds of steps. Data and measurements: train/demo.py.
"""

import ml_collections

from configs import common

DATA = "workdir/demo/data"   # where `python -m train.demo` writes the synthetic dataset (config.data.root)
# The synthetic generator's arguments for that dataset (see the measurements in train/demo.py).
SYNTHETIC_ARGS = "--num-train 10000 --num-eval 200 --train-turns 4 --size 56 --grid 4 --image-every-turn"


def content_only(c):
  """The ablation of a demo config `c`, in place: content tokens only, no Q-Former to train."""
  c.model.use_context_token = False
  c.optim.trainable = [p for p in c.optim.trainable if p != r"qformer/"]
  return c


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, content_only=False, toy=False, tiny=False)
  c = common.defaults()
  c.model = dict(
      vision=dict(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128),
      qformer=dict(vocab_size=512, hidden=64, num_layers=2, num_heads=4, mlp_dim=128,
                   max_positions=64, num_query=8, vision_width=64, max_text_len=32, initializer_range=0.07),
      llm=dict(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
               max_positions=512, initializer_range=0.07),
      compress_type="mean", mm_projector_type="mlp2x_gelu", use_context_token=True, remat_policy="none",
  )
  if a.tiny:   # tests: the smallest model and batch that exercise everything
    # the initializer std stated so that `--config.model.*.initializer_range=0.07` (the
    # demo's, which learns faster) can set it: tests/test_eval_chat.py trains this way
    c.model.vision = common.TINY["vision"]
    c.model.qformer = dict(common.TINY["qformer"], initializer_range=0.02)
    c.model.llm = dict(common.TINY["llm"], max_positions=128, initializer_range=0.02)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  c.batch_size = 16   # 16 x 1600 steps: the context attention learns to pick objects earlier than 32 x 800
  c.total_steps = 1600
  c.workdir = "workdir/demo_train/" + ("content_only" if a.content_only else "context")
  # 4-turn training clips (one question of each kind, imgsp_v1: every turn has its own
  # instruction slot) carry at most 75 text tokens; held-out clips are single-turn. The
  # longest question is 10 Q-Former tokens with [CLS] and [SEP] (a test holds it to
  # qformer_len): 12, not 24, trains the demo ~10 % faster (362 s vs 401 s on 2 cores).
  # video_fps=None: every frame up to the uniform cap of 4 (frames 0, 2, 5, 7 of the 8
  # frames of a 2-fps clip; every measurement in train/demo.py was made so). Inference
  # samples the same way: a trained model's inference directory records its data's frame
  # sampling (checkpoint/orbax_io.py: data_provenance), so eval.chat / eval.run / the
  # held-out evaluator see the frames it was trained on.
  root = ml_collections.FieldReference(DATA)   # --config.data.root=DIR moves every path below
  c.data = dict(kind="toy" if a.toy else "pipeline", root=root, data_path=root + "/train.json",
                image_folder=root, video_folder=root, llm_tokenizer=root + "/tokenizers/llm",
                qformer_tokenizer=root + "/tokenizers/qformer",
                text_len=80, num_frames=4, qformer_len=12, use_features=False, template="imgsp_v1",
                buckets=((80, 4, 4),), num_epochs=0, worker_count=0, max_len=512, video_fps=None,
                max_frames=4, nan_batch=-1)
  # The 200 single-question held-out clips, asked the video-QA benchmarks' way after the
  # last step (train/evaluators.py; `python -m eval.run msvd_qa` takes the same files).
  c.evals = dict(heldout=dict(bench="msvd_qa", every=0, batch_size=64, max_new_tokens=8, temperature=0.0,
                              args=dict(question_file=root + "/heldout_qa.json", video_folder=root + "/videos")))
  c.optim = dict(lr=2e-3, warmup_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                 trainable=[r"llm/", r"token_gen/", r"qformer/"])
  c.ckpt = dict(every=400, keep=2, async_save=True)
  c.log = dict(every=100, progress=True, peak_tflops=None)
  if a.toy:   # random batches: no tokenizers to ship with the trained model, no held-out clips
    c.export_inference = False
    c.evals = {}
  if a.tiny:
    c.batch_size, c.total_steps, c.accum_steps = 16, 6, 2
    c.data.update(text_len=12, num_frames=2, qformer_len=6, buckets=((12, 2, 1),))
    c.log.every, c.log.progress, c.ckpt.every = 1, False, 2
  return content_only(c) if a.content_only else c
