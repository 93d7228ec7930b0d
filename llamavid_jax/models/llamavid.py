"""LLaMA-VID: frames (or precomputed ViT features) + instructions + text -> logits.

Every frame becomes `[context, content...]` tokens (token_gen.py). How they meet the
text is `LlamaVidConfig.video_mode`:

- clip (images, short video): a sample has P instruction slots (the release's
  `imgsp_v1` puts an `<image>` placeholder in every human turn and uses that turn's
  question as the Q-Former instruction): the r-th placeholder (id -200) of a sample is
  replaced by all its frame tokens made with its r-th instruction, in time order. The
  Q-Former sees LayerNorm of the N+1 ViT tokens (CLS included), the context attention
  and the content pooling the N patches.
- movie (the release's long video, stage 3): the text holds one placeholder per frame,
  subtitles between them, and the t-th placeholder is replaced by frame t's tokens
  (splice.py). Features come without CLS, float[B, T, N, C], and the Q-Former sees
  LayerNorm of those N patches too; the one instruction (the question) serves every frame.

Splicing is a gather with static shapes: no Python loop over the batch or the frames;
padding frames (frame_mask False, always after the valid ones) drop out.

Steps: `embed_inputs` (frames + text -> spliced embeddings), `decode` (the LLM over
embeddings in any order: positions and slots say where each one is), `logits`. The train
step composes them with a context layout (`llamavid_jax.parallel`); `hidden_states` and
`__call__` run them in the natural order. Multi-device parts come in as arguments: `place`
(frame tokens to positions; default a gather) and `fetch` (frames a chunk at a time;
default a slice). This file names no mesh.

Decoding follows big_vision: `prefill_cache` then `extend_cache` one token at a time.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import linen as nn

from llamavid_jax.models.config import LlamaVidConfig
from llamavid_jax.models.eva_vit import EvaViT
from llamavid_jax.models.layers import length_shards
from llamavid_jax.models.llama import Llama, put_slots
from llamavid_jax.models.qformer import QFormer
from llamavid_jax.models.splice import splice_layout
from llamavid_jax.models.token_gen import TokenGenerator


def _prompts(qformer_ids, qformer_mask):
  """[B, L] (one instruction) or [B, P, L] -> [B, P, L]."""
  if qformer_ids.ndim == 2:
    return qformer_ids[:, None], qformer_mask[:, None]
  return qformer_ids, qformer_mask


def gather(flat, src, *, text_len: int = 0, monotone: bool = False):
  """The default placement: flat float[B, K, D], src int32[B, S'] -> float[B, S', D],
  position p takes flat[src[p]]. `parallel.ring_placement` is the one for a split length."""
  return jnp.take_along_axis(flat, src[..., None], 1)


def slice_frames(features, chunk: int):
  """The default frame fetcher: features float[B, T, ...] -> (get(i) -> frames
  i * chunk .. (i + 1) * chunk - 1, 1). `parallel.frame_fetcher` is the one for frames
  split over devices or kept in host memory."""
  return (lambda i: jax.lax.dynamic_slice_in_dim(features, i * chunk, chunk, axis=1)), 1


def natural_positions(valid):
  """valid bool[B, S'] -> (positions int32[B, S']: RoPE positions, padding skipped;
  slots int32[B, S']: each position's index)."""
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  return positions, jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), positions.shape)


class LlamaVid(nn.Module):
  cfg: LlamaVidConfig

  def setup(self):
    c = self.cfg
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    self.vit = EvaViT(c.vision, attention_impl=c.vision_attention_impl, remat_policy=c.remat_policy, **kw)
    if c.use_context_token:
      self.qformer = QFormer(c.qformer, attention_impl=c.vision_attention_impl, remat_policy=c.remat_policy, **kw)
    self.token_gen = TokenGenerator(c.llm.d_model, c.compress_type, c.mm_projector_type,
                                    use_context=c.use_context_token, **kw)
    self.llm = Llama(c.llm, attention_impl=c.attention_impl, remat_policy=c.remat_policy, mlp_chunk=c.mlp_chunk,
                     kv_cache=c.kv_cache, **kw)

  def encode_visual(self, frame_mask, qformer_ids, qformer_mask, frames=None, features=None, fetch=None):
    """frames: float[B, T, H, W, 3] or features: ViT output, float[B, T, N+1, C] with CLS
    (clip) or float[B, T, N, C] without (movie; any float dtype, cast inside);
    qformer_ids/mask: [B, P, L] (or [B, L] for one instruction; movie: one); fetch:
    fetch(features, chunk) -> (get(i), G) (default `slice_frames`) ->
    (float[B, P, T*tokens_per_frame, D] frame tokens per instruction,
    float32[B, P, T, M, N] context-attention weights or None)."""
    if (frames is None) == (features is None):
      raise ValueError("pass exactly one of frames or features")
    c = self.cfg
    qformer_ids, qformer_mask = _prompts(qformer_ids, qformer_mask)
    if c.movie and qformer_ids.shape[1] != 1:
      raise ValueError(f"video_mode 'movie' takes one instruction for every frame, got qformer_ids of shape "
                       f"{qformer_ids.shape} ({qformer_ids.shape[1]} instructions)")
    if features is None:
      b, t = frames.shape[:2]
      features = self.vit(frames.reshape((b * t,) + frames.shape[2:]))
      features = features.reshape((b, t) + features.shape[1:])             # [B, T, N+1, C]
      if c.freeze_vision:
        features = jax.lax.stop_gradient(features)                        # the release's frozen ViT
      if c.movie:
        features = features[:, :, 1:]                                     # [B, T, N, C]
    elif tuple(features.shape[2:]) != c.feature_shape:
      n, w = c.feature_shape
      raise ValueError(f"features of shape {tuple(features.shape)}: video_mode {c.video_mode!r} takes "
                       f"[B, T, {n}, {w}] (ViT output {'without' if c.movie else 'with'} CLS, width {w})")
    b, t = features.shape[:2]
    chunk = self.cfg.frame_chunk
    fetch = fetch or slice_frames
    if not chunk or chunk >= t:
      tokens, weights = self._frame_tokens(fetch(features, t)[0](0), qformer_ids, qformer_mask)
    else:  # long video: scan over chunks of frames, one compiled step, bounded memory
      if t % chunk:
        raise ValueError(f"{t} frames are not a multiple of frame_chunk={chunk}")
      # With T split over G devices (`frames`) in contiguous blocks, step i takes the i-th
      # chunk / G frames of every block: each chunk is spread over all of them (each
      # encodes its own frames, none idles or gathers), and each device slices its part
      # out of its own block where it lives: features kept in host memory reach the
      # device one chunk at a time, never as a whole (and never reshaped on the host).
      n = t // chunk
      get, g = fetch(features, chunk)

      def step(mdl, carry, i):
        x = nn.with_logical_constraint(get(i), ("batch", "frames", None, None))   # [B, chunk, N+1, C]
        return carry, mdl._frame_tokens(x, qformer_ids, qformer_mask)

      _, (tokens, weights) = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                                     length=n)(self, None, jnp.arange(n))
      # [n, B, P, G * c, ...] -> [B, P, G, n, c, ...] -> [B, P, T, ...]: frame d * (T / G) + i * c + j
      # of step i is at [i, :, :, d * c + j] (c = chunk / G)
      def merge(a):
        if a is None:
          return None
        a = a.reshape(a.shape[:3] + (g, chunk // g) + a.shape[4:])
        return jnp.moveaxis(a, 0, 3).reshape(a.shape[1:3] + (t,) + a.shape[5:])
      tokens, weights = merge(tokens), merge(weights)
    tokens = nn.with_logical_constraint(tokens, ("batch", None, "frames", None, None))   # [B, P, T, tpf, D]
    tokens = tokens.reshape(tokens.shape[:2] + (-1, tokens.shape[-1]))      # [B, P, T*tpf, D]
    return nn.with_logical_constraint(tokens, ("batch", None, "length", "embed")), weights

  def _frame_tokens(self, features, qformer_ids, qformer_mask):
    """features: float[B, T, N+1, C] (clip) or float[B, T, N, C] (movie); qformer_ids/mask
    [B, P, L] -> (float[B, P, T, tpf, D], float32[B, P, T, M, N] | None)."""
    if self.cfg.movie:
      features = features.astype(jnp.dtype(self.cfg.dtype))     # stored bf16 / f16, a chunk at a time
    b, t, n1, c = features.shape
    p, l = qformer_ids.shape[1:]
    queries = None
    if self.cfg.use_context_token:
      # every (sample, instruction, frame) is one Q-Former input; it sees the features as
      # given: N+1 tokens with CLS (clip), the N patches (movie)
      image = jnp.broadcast_to(features[:, None], (b, p, t, n1, c)).reshape(b * p * t, n1, c)
      rep = lambda a: jnp.broadcast_to(a[:, :, None], (b, p, t, l)).reshape(b * p * t, l)
      queries = self.qformer(rep(qformer_ids), rep(qformer_mask), image)   # [B*P*T, M, Dq]
      queries = queries.reshape((b, p, t) + queries.shape[1:])
    patches = features if self.cfg.movie else features[:, :, 1:]          # [B, T, N, C]: no CLS
    tokens, weights = self.token_gen(queries, patches)
    # content only: one set of tokens [B, 1, T, tpf, D], the same for every placeholder
    return jnp.broadcast_to(tokens, (b, p) + tokens.shape[2:]), weights

  def embed_inputs(self, input_ids, text_mask, frame_mask, qformer_ids, qformer_mask,
                   frames=None, features=None, place=None, fetch=None):
    """-> (float[B, S', D] spliced embeddings in the natural order, Layout, out dict).
    place(flat, src, text_len=, monotone=) puts the frame tokens at their positions
    (default `gather`); fetch: see `encode_visual`."""
    c = self.cfg
    qformer_ids, qformer_mask = _prompts(qformer_ids, qformer_mask)
    layout = splice_layout(input_ids, text_mask, frame_mask, c.tokens_per_frame, c.image_token_id,
                           qformer_ids.shape[1], movie=c.movie)
    x = self.llm.embed(jnp.take_along_axis(input_ids, layout.text_idx, 1))   # ids gathered: no [B, S, D] gather
    out = {"layout": layout}
    if frame_mask.shape[1]:
      vis, weights = self.encode_visual(frame_mask, qformer_ids, qformer_mask, frames, features, fetch)
      # K visual tokens per placeholder: all frames' (clip: [B, P, T*tpf, D]), one
      # frame's (movie: [B, 1, T*tpf, D] read as T placeholders of tpf)
      k = c.tokens_per_frame if c.movie else vis.shape[2]
      flat = vis.reshape(vis.shape[0], -1, vis.shape[-1])                   # [B, P*T*tpf, D]
      src = layout.prompt_idx * k + layout.vis_idx                          # [B, S'] into flat
      v = (place or gather)(flat, src, text_len=input_ids.shape[1], monotone=c.movie or vis.shape[1] == 1)
      x = jnp.where(layout.is_vis[..., None], v.astype(x.dtype), x)
      out["context_attention"] = weights
    x = jnp.where(layout.valid[..., None], x, 0)
    return x, layout, out

  def __call__(self, input_ids, text_mask, frame_mask, qformer_ids, qformer_mask,
               frames=None, features=None):
    """input_ids: int32[B, S] with up to P -200 placeholders per sample (movie: one per
    valid frame); text_mask: bool[B, S]; frame_mask: bool[B, T]; qformer_ids,
    qformer_mask: [B, P, L] (the r-th instruction serves the r-th placeholder) or [B, L]
    for one (movie: one for every frame); frames: float[B, T, H, W, 3] or features:
    float[B, T, N+1, C] (clip) / float[B, T, N, C] (movie).
    -> (float32[B, S', V] logits with S' = `splice.spliced_length` (clip:
    S + P*(T*tokens_per_frame - 1), movie: S + T*(tokens_per_frame - 1)), out dict with
    `layout` (use `splice_labels`), `context_attention`, `hidden`)."""
    h, out = self.hidden_states(input_ids, text_mask, frame_mask, qformer_ids, qformer_mask, frames, features)
    return self.logits(h), out

  def hidden_states(self, input_ids, text_mask, frame_mask, qformer_ids, qformer_mask,
                    frames=None, features=None, place=None, fetch=None):
    """`__call__` without the LM head, in the natural order -> (float[B, S', D]
    final-normed hidden states, out dict as `__call__`'s)."""
    x, layout, out = self.embed_inputs(input_ids, text_mask, frame_mask, qformer_ids, qformer_mask, frames, features,
                                       place, fetch)
    positions, slots = natural_positions(layout.valid)
    h = self.decode(x, positions, slots, layout.valid)
    out["hidden"] = h
    return h, out

  def decode(self, x, positions, slots, valid, kv_slots=None):
    """The LLM over embeddings x float[B, S', D] in any order: positions int32[B, S']
    (RoPE), slots int32[B, S'] (causal order), valid bool[B, S']; kv_slots: the keys'
    slots where they are not their indices (a ring's zig-zag layout) -> float[B, S', D]
    final-normed hidden states, in x's order."""
    return self.llm(x, positions, slots, valid, kv_slots=kv_slots)[0]

  def logits(self, h):
    """float[B, S, D] hidden states -> float32[B, S, V]."""
    return self.llm.logits(h)

  # --- decoding (big_vision style) ------------------------------------------------
  def prefill_cache(self, input_ids, text_mask, frame_mask, qformer_ids, qformer_mask,
                    frames=None, features=None, *, max_len: int, chunk: int = 0, place=None, fetch=None):
    """Runs the prompt into a fresh cache of `max_len` slots -> (float32[B, V] logits of
    each sample's last real token, cache dict(k, v (+ k_scale, v_scale of an int8 cache:
    `llama.cache_spec`), valid bool[B, max_len], index int32[] next free slot, pos
    int32[B] next position)).

    Padding may sit anywhere (left padding included): positions are cumsum(valid) and
    padded slots are masked by `valid`. `chunk` = C > 0 runs the LLM over the S'
    spliced positions C at a time (an nn.scan writing the cache chunk by chunk), so
    activation memory grows with C, not with S'. place, fetch: as `embed_inputs`'s.
    Where the logical rules and mesh split the cache's length (`length_shards`), the
    queries are padded to `max_len` (invalid, unused) so that they and the cache split
    alike and each device writes its own slots; chunks are then refused."""
    x, layout, _ = self.embed_inputs(input_ids, text_mask, frame_mask, qformer_ids, qformer_mask, frames, features,
                                     place, fetch)
    b, s = layout.valid.shape
    if s > max_len:
      raise ValueError(f"prompt of {s} positions does not fit a cache of {max_len}")
    valid = jnp.zeros((b, max_len), bool).at[:, :s].set(layout.valid)
    positions = jnp.maximum(jnp.cumsum(layout.valid, axis=1) - 1, 0)
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    last = jnp.max(jnp.where(layout.valid, slots, 0), axis=1)              # [B] last real slot
    kv = self.llm.init_cache(b, max_len, x.dtype)
    split = length_shards(max_len)
    if split > 1 and 0 < chunk < s:
      raise ValueError(f"a prefill in chunks of {chunk} with the cache's length split over {split} devices: "
                       f"prefill at once (chunk 0)")
    if split > 1 and s < max_len:   # queries and the cache split alike: each device writes its own slots
      pad = ((0, 0), (0, max_len - s))   # the padded queries' outputs and keys are never used (not valid)
      x, positions = jnp.pad(x, pad + ((0, 0),)), jnp.pad(positions, pad)
      slots = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
    if split > 1 or chunk <= 0 or chunk >= s:
      h, kv = self.llm(x, positions, slots, valid, kv, 0)
      h_last = jnp.take_along_axis(h, last[:, None, None], 1)[:, 0]
    else:
      h_last, kv = self._prefill_chunks(x, positions, valid, last, kv, chunk)
    n = layout.valid.sum(axis=1)
    cache = dict(kv, valid=valid, index=jnp.int32(s), pos=n.astype(jnp.int32))
    return self.llm.logits(h_last[:, None])[:, 0], cache   # [B, 1, D]: the logits' logical axes are 3

  def _prefill_chunks(self, x, positions, valid, last, kv, chunk):
    """x: float[B, S', D]; positions int32[B, S']; valid bool[B, max_len]; last int32[B]
    -> (float[B, D] hidden at `last`, cache): an nn.scan over S' // C chunks of C
    positions, then the remainder."""
    b, s, d = x.shape
    n = s // chunk

    def run(mdl, carry, xs):
      kv, h_last = carry
      xc, pc, start = xs
      sc = start + jnp.broadcast_to(jnp.arange(xc.shape[1]), pc.shape)
      h, kv = mdl.llm(xc, pc, sc, valid, kv, start)
      mine = (last >= start) & (last < start + xc.shape[1])
      pick = jnp.take_along_axis(h, jnp.clip(last - start, 0, xc.shape[1] - 1)[:, None, None], 1)[:, 0]
      return (kv, jnp.where(mine[:, None], pick, h_last)), None

    split = lambda a: jnp.moveaxis(a[:, :n * chunk].reshape((b, n, chunk) + a.shape[2:]), 1, 0)
    scan = nn.scan(run, variable_broadcast="params", split_rngs={"params": False}, length=n)
    carry = (kv, jnp.zeros((b, d), x.dtype))
    carry, _ = scan(self, carry, (split(x), split(positions), jnp.arange(n, dtype=jnp.int32) * chunk))
    if s % chunk:
      carry, _ = run(self, carry, (x[:, n * chunk:], positions[:, n * chunk:], jnp.int32(n * chunk)))
    kv, h_last = carry
    return h_last, kv

  def prefill_step(self, x, positions, valid, cache: dict, start, last):
    """One chunk of a prefill that runs over several calls (the serving engine puts
    decode steps between them): x float[B, C, D] embeddings of cache slots start ..
    start + C - 1 (`embed_inputs`' order), positions int32[B, C] (RoPE), valid bool[B, T]
    every real prompt slot of the cache (later ones too: the causal mask hides them),
    cache dict(k, v) float[layers, B, T, K, Dh], start int32[], last int32[B] each
    sample's last real slot -> (float32[B, V] logits at `last`, meaningful where `last`
    lies in this chunk; the cache with the chunk's keys and values written)."""
    b, c = positions.shape
    slots = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    h, kv = self.llm(x, positions, slots, valid, cache, start)
    h = jnp.take_along_axis(h, jnp.clip(last - start, 0, c - 1)[:, None, None], 1)   # [B, 1, D]
    return self.llm.logits(h)[:, 0], kv

  def extend_cache(self, token: jax.Array, cache: dict, span: int | None = None):
    """token: int32[B] -> (float32[B, V] next-token logits, cache with it appended at
    cache["index"]: int32[] the slot of every row, or int32[B] each row's own, as the
    serving engine's rows of different lengths and ages have them). span: attend over
    the cache's first `span` slots only (every row's slots in use lie below it; None: all)."""
    b = token.shape[0]
    idx = cache["index"]
    valid = put_slots(cache["valid"], jnp.ones((b, 1), bool), idx)
    x = self.llm.embed(token[:, None])
    slots = jnp.broadcast_to(jnp.reshape(idx, (-1, 1)), (b, 1))
    h, kv = self.llm(x, cache["pos"][:, None], slots, valid[:, :span], cache, idx)
    cache = dict(cache, **kv, valid=valid, index=idx + 1, pos=cache["pos"] + 1)
    return self.llm.logits(h)[:, 0], cache
