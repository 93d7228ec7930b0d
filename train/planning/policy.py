"""Shape and mesh policy: the LLM row a plan is for (`Shape`: `config_shape`, the
config's longest bucket; `shape_for`, a sequence length turned into text and frames)
and the mesh (`choose_mesh`). `run_mesh` is the mesh `train.train` runs a config on:
the config's axis sizes, or with `mesh="auto"` `choose_mesh`'s, the same function the
planner uses, so a plan describes the mesh a run would use."""

from __future__ import annotations

import dataclasses

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Shape:
  """One LLM row: `text_len` text positions, `frames` frame slots, `prompts` placeholder
  slots -> `seq_len` spliced LLM positions."""
  seq_len: int
  text_len: int
  frames: int
  prompts: int
  rule: str


def config_shape(c, spec) -> Shape:
  """The config's longest bucket (as train.train reports MFU for)."""
  from llamavid_jax.data.buckets import as_buckets, llm_length
  d = c.data
  b = max(as_buckets(d.get("buckets") or ((d.text_len, d.num_frames),)), key=lambda b: llm_length(b, spec))
  return Shape(llm_length(b, spec), b.text_len, b.frames, b.prompts, "the config's longest bucket")


def shape_for(seq_len: int, base: Shape, tokens_per_frame: int, frame_multiple: int = 1,
              movie: bool = False, frames: int | None = None) -> Shape:
  """The row of exactly `seq_len` LLM positions closest to the config's `base` row,
  frames rounded down to a multiple of `frame_multiple` (the model's frame_chunk):
  clip: frames T = ((S - text) / P + 1) / tokens_per_frame and the text takes up the
  rest, text = S - P * (T * tokens_per_frame - 1) >= the config's;
  movie (one placeholder per frame, in the text): the config's text besides its
  placeholders (subtitles, prompt: E = text - T) stays, T = (S - E) / tokens_per_frame,
  text = E + T. A config without frames plans text only (text = S). `frames` fixes T
  instead (--frames): the text fills the rest of the row."""
  from llamavid_jax.models.splice import spliced_length
  if not base.frames:
    return Shape(seq_len, seq_len, 0, base.prompts, f"text = S = {seq_len} (no frames)")
  p, k = base.prompts, tokens_per_frame
  fixed = frames is not None
  if fixed:
    if frames % frame_multiple:
      raise ValueError(f"--frames {frames}: not a multiple of the model's frame_chunk {frame_multiple}")
    if seq_len - (frames * k if movie else p * (frames * k - 1)) < 1:
      raise ValueError(f"--frames {frames}: {frames} x {k} tokens leave no text in {seq_len} positions")
  elif movie:
    extra = base.text_len - base.frames
    frames = (seq_len - extra) // k
  else:
    frames = int(((seq_len - base.text_len) / p + 1) // k)
  frames -= frames % frame_multiple
  if frames <= 0:
    raise ValueError(f"--seq-len {seq_len}: shorter than the config's {base.text_len} text positions + one "
                     f"frame chunk ({frame_multiple} x {k} tokens)")
  if movie:
    text = seq_len - frames * (k - 1)
    assert spliced_length(text, frames, k, movie=True) == seq_len
    rule = ("movie: frames = --frames" if fixed else
            f"movie: frames = (S - {extra} other text) / {k} tokens per frame"
            + (f", a multiple of frame_chunk {frame_multiple}" if frame_multiple > 1 else ""))
    rule += f"; text = S - frames x {k - 1} (a placeholder a frame + the rest)"
    return Shape(seq_len, text, frames, p, rule)
  text = seq_len - p * (frames * k - 1)
  assert spliced_length(text, frames, k, p) == seq_len
  rule = ("frames = --frames" if fixed else f"frames = ((S - text {base.text_len}) / P {p} + 1) / {k} tokens per frame"
          + (f", a multiple of frame_chunk {frame_multiple}" if frame_multiple > 1 else ""))
  rule += f"; text = S - P x (frames x {k} - 1)"
  return Shape(seq_len, text, frames, p, rule)


def is_auto(mesh) -> bool:
  return isinstance(mesh, str) and mesh == AUTO


def choose_mesh(config_mesh: dict | str | None, n: int, shape: Shape, batch: int, sequence_sharded: bool,
                min_local: int = 8192) -> tuple[dict[str, int], str]:
  """-> (axis sizes, why). The config's mesh where it fits `n` devices and `batch` rows,
  else (and always for `mesh="auto"` or None): with a sequence-sharded attention (ring),
  `sequence` = the most devices that still hold >= `min_local` positions each (ring
  steps stay compute-bound) and divide the row, `fsdp` the rest; otherwise fsdp over
  all devices. `tensor` is the config's where it divides `n` (1 for auto)."""
  from llamavid_jax.sharding import mesh_sizes
  if config_mesh is None or is_auto(config_mesh):
    config_mesh, why = {}, 'mesh="auto"'
  else:
    try:
      sizes = mesh_sizes(dict(config_mesh), n)
      if batch % (sizes["data"] * sizes["fsdp"]) == 0:
        return sizes, "the config's"
      why = f"the config's {dict(config_mesh)} needs a batch that splits over data x fsdp"
    except ValueError as e:
      why = f"the config's {dict(config_mesh)} does not fit: {e}"
  tensor = int(config_mesh.get("tensor", 1)) if n % max(int(config_mesh.get("tensor", 1)), 1) == 0 else 1
  rest = n // tensor
  seq = 1
  if sequence_sharded:
    divisors = [d for d in range(1, rest + 1) if rest % d == 0 and shape.seq_len % d == 0
                and (shape.seq_len // d >= min_local or d == 1)]
    fit = [d for d in divisors if batch % (rest // d) == 0]
    seq = max(fit or divisors)
  sizes = dict(data=1, fsdp=rest // seq, tensor=tensor, sequence=seq)
  rule = (f"sequence over the most devices keeping >= {min_local} positions each, fsdp the rest"
          if sequence_sharded else "fsdp over all devices")
  return sizes, f"{why}; chose {rule}"


def sequence_sharded(model_cfg) -> bool:
  """Whether the LLM's attention runs as a ring where the mesh splits the sequence."""
  from llamavid_jax.ops import attention
  return model_cfg.attention_impl in attention.RING_IMPLS


def run_mesh(c, n: int) -> tuple[dict[str, int], str]:
  """The mesh `train.train` runs config `c` on over `n` devices -> (axis sizes, why):
  the config's `mesh` axis sizes ("the config's"; ValueError where they do not fit),
  or for `mesh="auto"` `choose_mesh` for the config's longest bucket and batch."""
  from llamavid_jax.models.config import from_dict
  from llamavid_jax.sharding import mesh_sizes
  if not is_auto(c.mesh):
    if isinstance(c.mesh, str):
      raise ValueError(f"expected axis sizes (dict(data=..., fsdp=..., tensor=..., sequence=...)) or {AUTO!r}")
    return mesh_sizes(dict(c.mesh), n), "the config's"
  model_cfg = from_dict(c.model)
  return choose_mesh(AUTO, n, config_shape(c, model_cfg.input_spec), c.batch_size, sequence_sharded(model_cfg))
