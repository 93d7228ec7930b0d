"""Typed model configuration.

Every behaviour of the model is a typed field here (no substring flags). The
`configs/*.py` recipe files build these dataclasses; the checkpoint converter builds
them from a release `config.json` plus the weights' shapes.
"""

from __future__ import annotations

import dataclasses

from llamavid_jax.models import layers, token_gen
from llamavid_jax.ops import attention


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """EVA-ViT-g (LAVIS layout). Defaults are the released encoder."""
  image_size: int = 224
  patch_size: int = 14
  width: int = 1408
  depth: int = 39
  num_heads: int = 16            # head size 88
  mlp_dim: int = 6144            # int(1408 * 4.3637)
  ln_eps: float = 1e-6
  # Grid of the stored position embedding; inputs of another size interpolate it
  # (bicubic, torch semantics) on the fly. None = image_size // patch_size.
  pos_embed_grid: int | None = None

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:   # CLS + patches
    return self.grid**2 + 1


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Instruction-aware Q-Former (InstructBLIP text decoder, BERT-base shaped)."""
  vocab_size: int = 30523        # bert-base-uncased + [DEC]
  hidden: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  ln_eps: float = 1e-12
  max_positions: int = 512
  num_query: int = 32
  cross_attention_freq: int = 2  # layers 0, 2, 4, ... cross-attend to the image
  vision_width: int = 1408       # width of the keys/values of cross-attention
  vision_ln_eps: float = 1e-5    # `vlm_att_ln` on the visual input
  max_text_len: int = 256
  initializer_range: float = 0.02   # init std of new weights (HF's name); loaded weights replace them


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """LLaMA / Vicuna decoder. Defaults are Vicuna-7B v1.5."""
  vocab_size: int = 32000
  d_model: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  mlp_dim: int = 11008
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: float = 1.0      # linear: positions / factor (16 for 64K long video)
  max_positions: int = 4096
  tie_embeddings: bool = False
  initializer_range: float = 0.02   # init std of new weights (HF's name); loaded weights replace them

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the data side needs to know of a model: derived from `LlamaVidConfig.input_spec`,
  never restated in a data config."""
  tokens_per_frame: int               # LLM tokens per frame ([context,] content...)
  image_size: int                     # square ViT input side
  feature_shape: tuple[int, int]      # precomputed ViT features per frame: (N+1, C) with CLS
                                      # first ("clip"), (N, C) without CLS ("movie")
  video_mode: str = "clip"            # `LlamaVidConfig.video_mode`

  @property
  def movie(self) -> bool:
    return self.video_mode == "movie"


VIDEO_MODES = ("clip", "movie")
KV_CACHES = ("int8",)   # stored KV-cache formats besides None (the compute dtype): models/llama.py cache_spec


def check_kv_cache(kv_cache: str | None) -> None:
  """Raises a one-line ValueError unless `kv_cache` is None or one of KV_CACHES."""
  if kv_cache is not None and kv_cache not in KV_CACHES:
    raise ValueError(f"kv_cache {kv_cache!r} is not one of {KV_CACHES} (or None: the compute dtype)")


@dataclasses.dataclass(frozen=True)
class LlamaVidConfig:
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
  llm: LlmConfig = dataclasses.field(default_factory=LlmConfig)
  # Content token(s), a `token_gen.COMPRESSIONS` entry: "mean" (1 per frame: video
  # models), "grid:N" (N*N avg pool) or "none" (all patches: image models without
  # compression). The projector is a `token_gen.PROJECTORS` entry.
  compress_type: str = "mean"
  mm_projector_type: str = "mlp2x_gelu"
  image_token_id: int = -200
  # Disable the context token (ablation: content tokens only).
  use_context_token: bool = True
  # The release never trains the ViT: its output goes through stop_gradient, so no
  # activation memory or backward is spent on it. False lets it train (the CPU demo
  # learns from scratch, with no pretrained EVA to start from).
  freeze_vision: bool = True
  # Numerics and memory.
  dtype: str = "float32"          # compute dtype ("bfloat16" on accelerators)
  param_dtype: str = "float32"
  attention_impl: str = "xla"          # the LLM's, an ops.attention.IMPLS name ("auto": per backend)
  vision_attention_impl: str = "xla"   # the ViT's and the Q-Former's (short sequences)
  # The decoding KV cache's stored format: None, the compute dtype; "int8", int8 keys and
  # values with a float32 scale per (row, slot, key/value head) (models/llama.py).
  kv_cache: str | None = None
  # Layer stacks are always nn.scan'ned; each layer is rematerialised with this
  # jax.checkpoint_policies name ("nothing_saveable", "dots_saveable", ...), one of
  # layers.REMAT_POLICIES ("offload_layer_inputs": the LLM layers' inputs wait in host
  # memory for the backward) or "none".
  remat_policy: str = "nothing_saveable"
  # Frames per step through the Q-Former and token generator (nn.scan over chunks),
  # bounding activation memory on long videos; 0 = all frames at once.
  frame_chunk: int = 0
  # LLM positions per step of each layer's MLP, per sequence shard (a rematerialised
  # lax.map over chunks: one chunk's activations at a time); 0 = all at once.
  mlp_chunk: int = 0
  # How frames meet the text (stated here, never inferred from the input's width as the
  # release does):
  #   "clip"   a placeholder takes all T frames of its sample, in time order (images,
  #            short video); features are the ViT output with CLS, float[B, T, N+1, C],
  #            the Q-Former sees all N+1 tokens.
  #   "movie"  the release's long-video mode (stage 3, run_llamavid_movie.py): the text
  #            has one placeholder per frame, between subtitles, and placeholder t takes
  #            frame t's tokens; features come without CLS, float[B, T, N, C], for the
  #            Q-Former too; one instruction (the question) serves every frame.
  video_mode: str = "clip"

  def __post_init__(self):   # a bad name fails here, listing the registered ones
    token_gen.projector(self.mm_projector_type)
    token_gen.content_tokens(self.compress_type, self.vision.grid)
    for impl in (self.attention_impl, self.vision_attention_impl):
      if impl not in attention.IMPLS:
        raise ValueError(f"attention_impl {impl!r}: expected one of {sorted(attention.IMPLS)}")
    check_kv_cache(self.kv_cache)
    if self.video_mode not in VIDEO_MODES:
      raise ValueError(f"video_mode {self.video_mode!r}: expected one of {list(VIDEO_MODES)}")
    if self.remat_policy != "none":
      layers.remat_policy(self.remat_policy)

  @property
  def movie(self) -> bool:
    return self.video_mode == "movie"

  @property
  def mm_hidden(self) -> int:
    return self.vision.width

  @property
  def content_tokens_per_frame(self) -> int:
    return token_gen.content_tokens(self.compress_type, self.vision.grid)

  @property
  def tokens_per_frame(self) -> int:
    return int(self.use_context_token) + self.content_tokens_per_frame

  @property
  def feature_shape(self) -> tuple[int, int]:
    """(N+1, C) ViT features per frame with CLS ("clip"), (N, C) without ("movie")."""
    v = self.vision
    return (v.num_tokens - int(self.movie), v.width)

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec(self.tokens_per_frame, self.vision.image_size, self.feature_shape, self.video_mode)


def to_dict(cfg) -> dict:
  """Nested plain dict (JSON-able) of a config dataclass."""
  return dataclasses.asdict(cfg)


def from_dict(d) -> LlamaVidConfig:
  """LlamaVidConfig from a nested mapping (a dict, or an ml_collections ConfigDict)."""
  d = dict(d)
  sub = {"vision": VisionConfig, "qformer": QFormerConfig, "llm": LlmConfig}
  kw = {}
  for k, v in d.items():
    if k in sub:
      kw[k] = sub[k](**dict(v))
    else:
      kw[k] = v
  names = {f.name for f in dataclasses.fields(LlamaVidConfig)}
  unknown = set(kw) - names
  if unknown:
    raise ValueError(f"unknown model config fields {sorted(unknown)}")
  return LlamaVidConfig(**kw)
