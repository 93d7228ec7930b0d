"""Decoding: prefill the prompt into a KV cache, then extend it one token at a time.

One jitted function per (batch shapes, max_new_tokens): the token loop is a
`lax.scan`, so decoding costs one dispatch, not one per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llamavid_jax.models import LlamaVid, spliced_length


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature"))
def generate(model: LlamaVid, params, batch: dict, rng: jax.Array | None = None, *, max_new_tokens: int,
             eos_id: int, temperature: float = 0.0) -> jax.Array:
  """batch: the model's inputs (input_ids, text_mask, frame_mask, qformer_ids,
  qformer_mask, frames | features) -> int32[B, max_new_tokens] new tokens; after a
  sample's `eos_id` every further token is `eos_id`. temperature 0 = greedy."""
  inputs = {k: v for k, v in batch.items() if k in _INPUTS}
  prompts = inputs["qformer_ids"].shape[1] if inputs["qformer_ids"].ndim == 3 else 1
  s_out = spliced_length(inputs["input_ids"].shape[1], inputs["frame_mask"].shape[1], model.cfg.tokens_per_frame,
                         prompts)
  logits, cache = model.apply({"params": params}, **inputs, max_len=s_out + max_new_tokens,
                              method=LlamaVid.prefill_cache)
  rng = jax.random.key(0) if rng is None else rng
  b = logits.shape[0]

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

  def step(carry, key):
    logits, cache, done = carry
    tok = jnp.where(done, eos_id, pick(logits, key))
    done = done | (tok == eos_id)
    logits, cache = model.apply({"params": params}, tok, cache, method=LlamaVid.extend_cache)
    return (logits, cache, done), tok

  _, tokens = jax.lax.scan(step, (logits, cache, jnp.zeros((b,), bool)), jax.random.split(rng, max_new_tokens))
  return tokens.T


_INPUTS = ("input_ids", "text_mask", "frame_mask", "qformer_ids", "qformer_mask", "frames", "features")
