"""What the recipes share: model size tables, the run blocks (mesh, optimizer,
checkpoints, logging, multi-process) and the parser of a recipe's variant argument.

Each recipe is one `get_config(arg)` file (big_vision style) that starts from
`defaults()` and states everything else it needs; no recipe imports another, and a
fact here (Vicuna-13B's width, the release's AdamW betas) is written once.

Overrides come from the command line through ml_collections' `config_flags`, the one
mechanism everywhere: `--config configs/x.py:size=13b --config.optim.lr=1e-4`.
"""

from __future__ import annotations

import ml_collections

# LLaMA-2 / Vicuna v1.5 (the LLM's other fields keep LlmConfig's defaults).
LLM = {
    "7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
    "13b": dict(vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
}

# The released towers are VisionConfig's / QFormerConfig's defaults (EVA-ViT-g, the
# InstructBLIP Q-Former); the tiny ones serve tests (every tower two layers).
TINY = dict(
    vision=dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64),
    qformer=dict(vocab_size=100, hidden=32, num_layers=2, num_heads=2, mlp_dim=64, max_positions=64,
                 num_query=4, vision_width=32, max_text_len=32),
    llm=dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
             max_positions=512),
)

# Local directories of the release's tokenizers (nothing is downloaded at run time).
TOKENIZERS = dict(llm_tokenizer="model_zoo/LLM/vicuna/7B-V1.5", qformer_tokenizer="model_zoo/bert-base-uncased")


def release_model(size: str, **kw) -> dict:
  """The release's video model (EVA-ViT-g 224, Q-Former, mean content token,
  mlp2x_gelu projector) on Vicuna `size`, bf16 compute; `kw` overrides fields."""
  if size not in LLM:
    raise ValueError(f"size={size!r}: expected one of {sorted(LLM)}")
  llm = {**LLM[size], "max_positions": 4096, **kw.pop("llm", {})}
  return dict(dict(vision=dict(), qformer=dict(), llm=llm, compress_type="mean", mm_projector_type="mlp2x_gelu",
                   dtype="bfloat16", param_dtype="float32", attention_impl="auto",
                   remat_policy="nothing_saveable"), **kw)


def release_data(**kw) -> dict:
  """A release stage's data block: LLaVA-format JSON through the grain pipeline, the
  release's tokenizers, videos at 1 fps, 256-token Q-Former instructions; `kw` sets the
  stage's files, template, lengths and buckets."""
  return dict(dict(kind="pipeline", **TOKENIZERS, video_fps=1.0, image_aspect="pad", qformer_len=256,
                   use_features=False, worker_count=4), **kw)


def optim(lr: float, trainable: list[str], **kw) -> dict:
  """The release's optimizer: AdamW without decay, 3 % warmup, cosine, clip 1.0."""
  return dict(dict(lr=lr, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                   trainable=list(trainable)), **kw)


def defaults() -> ml_collections.ConfigDict:
  """A training config's run blocks with their usual values; a recipe sets `model`,
  `data`, `optim`, `batch_size`, `total_steps` and `workdir`, and changes the rest."""
  c = ml_collections.ConfigDict()
  # axis sizes, or "auto" (train/planning/policy.py: choose_mesh, as train.plan plans it)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, sequence=1)   # ZeRO-like: params sharded over all chips
  c.accum_steps = 1
  c.seed = 0
  c.init_from = ""   # a converted checkpoint or an earlier stage's checkpoints/ directory
  # True: parameters init_from lacks keep their fresh init (a stage that adds new layers);
  # False: a missing parameter is an error listing them
  c.init_from_partial = False
  c.ckpt = dict(every=1000, keep=1, async_save=True)
  c.log = dict(every=1, progress=True, peak_tflops=None)
  # failure settings (train/train.py, DISTRIBUTED_DEFAULTS): a process silent for heartbeat_timeout_s
  # is declared dead and every process stops; save failures and SIGTERM are agreed every agree_every steps
  c.distributed = dict(auto=False, num_processes=1, process_id=0, coordinator="", heartbeat_timeout_s=20,
                       shutdown_timeout_s=30, initialization_timeout_s=300, agree_every=1)
  # fault injection for the resume / failure tests (fail_save_process: that process's saves fail, ENOSPC)
  c.debug = dict(kill_after_save_step=-1, fail_save_process=-1)
  # at the end of a run: WORKDIR/inference, the final params + data.llm_tokenizer / qformer_tokenizer
  c.export_inference = True
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A recipe's variant argument (`configs/x.py:size=13b,stage=1` or `:toy,tiny`) ->
  ConfigDict of `defaults` updated from it. `key=value` takes the default's type; a
  bare word is a boolean set to True. Unknown keys are an error naming them."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {item!r}: expected one of {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out
