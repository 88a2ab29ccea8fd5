"""Key/value caches for incremental decoding, behind one small protocol.

A causal LM in this package never inspects its cache: its attention hands the new keys and
values of each layer to the cache, and the cache decides where they are stored and how the
queries attend over everything stored so far. The decoder (`collapse_jax.lm.search`) picks the
cache, so any model written against this protocol decodes through the same search code, with
the same beam-search tricks, and its forward pass exists once.

The protocol, as a model's forward uses it on `input_ids [B, T]`:

    cache, position_ids, view = cache.prepare((B, T), attention_mask)
    for i, layer in enumerate(layers):
        ...
        q, k, v = ...                        # [B, T, N, H] each; q already scaled
        out, cache = cache.attend(i, q, k, v, view, attention)   # out [B, T, N, H]
        ...
    return logits, cache

- `prepare` validates the call, returns the cache with its write position advanced by T, the
  0-based position of each new token (HF's `cumsum(mask) * mask - 1`: the number of valid tokens
  before it; a model adds its own offset, e.g. OPT's 2) and a `view`, whatever `attend` needs
  during this forward pass (the old write position, a mask).
- `attend` stores layer i's keys/values of the T new tokens and returns the attention of the new
  queries over every valid earlier token and themselves. `attention(q, k, v, mask)` is the
  model's own kernel (`mask` bool [B, 1, T, S], True = may attend): caches that store a sequence's
  keys contiguously call it, so cached and uncached forwards share their numerics exactly.
- `reorder(rows)` (beam search): row r of the result continues row `rows[r]`.

Grouped-query attention (the Llama family): k and v may have K heads where q has N = K * G;
caches store the K heads as given (N / K times less memory than repeating them), the model's
`attention` kernel must accept [B, S, K, H] keys, and query head n reads key/value head n // G
(HF's `repeat_kv` order) in both caches.

Two implementations:

- `KVCache`, one slot per position per row: `key`/`value` [L, B, S, N, H] stacked over layers
  (batch on axis 1, so a reorder is one gather for every layer). The caller passes the validity
  mask over all S slots with each call (1 = token, 0 = padding or not yet written). Each layer
  writes its new keys with one `dynamic_update_slice`, in place when the cache is donated.
- `PromptSharingCache`, built for decoding n rows (beams or samples) per prompt: the prompt's
  keys/values are stored once per prompt ([L, B, P, N, H], from a prefilled `KVCache`), generated
  ones go to a separate [L, B * n, L_new, N, H] buffer where row r's token i is written at (r, i)
  and never moved, and an ancestry table `src [B * n, L_new]` says which buffer row holds token j
  of row r. Reordering beams gathers only that table. Per step the cache traffic drops from
  3 (B n)(P + L_new) key/value rows (reorder gather, write, read) to B P + B n L_new. Its
  attention reads generated keys through the table, so it spells attention out itself in HF's
  numerics (fp32 scores and softmax, masked scores at the fp32 minimum); parity with
  transformers is tested through `generate` (tests/parity/lm/test_decode_hf.py).

Shape legend: L layers, B batch (prompts), n rows per prompt, R = B * n rows, S slots, P prompt
length, T new tokens in one call, N heads (K key/value heads where they differ), H head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
# The model's attention kernel: (q [B, T, N, H], k [B, S, N, H], v, mask bool [B, 1, T, S] or None
# for plain causal attention with T == S) -> [B, T, N, H].
AttentionFn = Callable[[Array, Array, Array, Array | None], Array]


class Cache(Protocol):
    """What a causal LM's forward asks of a cache (see the module docstring)."""

    def prepare(
        self, shape: tuple[int, int], attention_mask: Array | None
    ) -> tuple[Cache, Array, Any]:
        """-> (cache advanced by T, position_ids [B, T] int32, view for `attend`)."""
        ...

    def attend(
        self, layer: int, q: Array, k: Array, v: Array, view: Any, attention: AttentionFn
    ) -> tuple[Array, Cache]:
        """Stores layer `layer`'s k, v [B, T, N, H]; -> (attention output [B, T, N, H], cache)."""
        ...

    def reorder(self, rows: Array) -> Cache:
        """Row r of the result continues row rows[r]."""
        ...


def mask_positions(mask: Array, start: Array | int, length: int) -> Array:
    """HF position ids `cumsum(mask) * mask - 1` of slots [start, start + length): [B, S] -> [B, T].

    A token's position is the number of valid tokens before it, so left padding does not shift
    positions; padding slots get -1.
    """
    positions = jnp.cumsum(mask, axis=1) * mask - 1  # [B, S]
    return jax.lax.dynamic_slice_in_dim(positions, start, length, axis=1)


def causal_mask(mask: Array, start: Array | int, length: int) -> Array:
    """Which slots each of `length` queries written at slots [start, ...) may attend to.

    Args:
      mask: [B, S] validity of every slot (1 = token, 0 = padding or not yet written).
      start: slot of the first query.
      length: T, number of queries.

    Returns:
      bool [B, 1, T, S]: slot j <= the query's slot and valid.
    """
    s = mask.shape[1]
    q_slots = start + jnp.arange(length, dtype=jnp.int32)  # [T]
    causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slots[:, None]  # [T, S]
    return jnp.logical_and(causal[None, None], mask.astype(bool)[:, None, None, :])


def _check_layer(layer: int, num_layers: int) -> None:
    # dynamic_update_slice clamps out-of-range starts: a bad layer index would silently overwrite
    # the last layer's keys.
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the cache's {num_layers} layers")


class KVCache(NamedTuple):
    """Key/value cache with one slot per position per row (a pytree).

    Attributes:
      key: [L, B, S, N, H] keys of all layers.
      value: [L, B, S, N, H] values of all layers.
      index: int32 scalar, number of slots already written.
    """

    key: Array
    value: Array
    index: Array

    @classmethod
    def zeros(
        cls, num_layers: int, batch_size: int, max_length: int, heads: int, head_dim: int, dtype
    ) -> KVCache:
        """An empty cache with `max_length` slots per row."""
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(
                f"a cache needs positive batch_size and max_length, got {batch_size}, {max_length}"
            )
        shape = (num_layers, batch_size, max_length, heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def prepare(
        self, shape: tuple[int, int], attention_mask: Array | None
    ) -> tuple[KVCache, Array, tuple[Array, Array]]:
        """The T new tokens go to slots [index, index + T); `attention_mask` [B, S] covers every
        slot (default: all valid). Query slot i attends to slots j <= i whose mask is 1."""
        b, t = shape
        s = self.key.shape[2]
        if self.key.shape[1] != b or t > s:
            raise ValueError(
                f"cache of shape {self.key.shape} does not fit input_ids of shape {tuple(shape)}"
            )
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, s):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected {(b, s)} "
                "([batch, cache slots])"
            )
        attention_mask = attention_mask.astype(jnp.int32)
        index = self.index.astype(jnp.int32)
        positions = mask_positions(attention_mask, index, t)  # [B, T]
        view = (index, causal_mask(attention_mask, index, t))  # mask [B, 1, T, S]
        return self._replace(index=index + t), positions, view

    def attend(
        self, layer: int, q: Array, k: Array, v: Array, view: Any, attention: AttentionFn
    ) -> tuple[Array, KVCache]:
        """Writes k, v [B, T, N, H] at the view's slots of `layer` and attends over all S slots."""
        _check_layer(layer, self.key.shape[0])
        index, mask = view
        start = (layer, 0, index, 0, 0)
        key = jax.lax.dynamic_update_slice(self.key, k[None].astype(self.key.dtype), start)
        value = jax.lax.dynamic_update_slice(self.value, v[None].astype(self.value.dtype), start)
        out = attention(q, key[layer].astype(q.dtype), value[layer].astype(q.dtype), mask)
        return out, self._replace(key=key, value=value)

    def reorder(self, rows: Array) -> KVCache:
        """Gathers the batch axis: row b of the result is row `rows[b]` of this cache.

        Args:
          rows: [B'] int indices into the batch axis.

        Returns:
          The reordered cache (same index).
        """
        return self._replace(
            key=jnp.take(self.key, rows, axis=1), value=jnp.take(self.value, rows, axis=1)
        )


class PromptSharingCache(NamedTuple):
    """Cache for decoding n rows per prompt, one token per call (a pytree; see module docstring).

    Rows are prompt-major (rows b*n .. b*n+n-1 continue prompt b) and a reorder must keep every
    row within its prompt, as beam search does.

    Attributes:
      prompt_k, prompt_v: [L, B, P, N, H] the prompts' keys/values, stored once per prompt.
      prompt_mask: bool [B, P] valid prompt tokens.
      n_valid: int32 [B] valid prompt tokens per prompt (new token i sits at position n_valid + i).
      gen_k, gen_v: [L, R, L_new, N, H] generated keys/values by buffer row, never moved.
      src: int32 [R, L_new] buffer row holding token j of row r, or None when rows never change
        places (greedy decoding, sampling): then every row's history is its own buffer row.
      step: int32 scalar, tokens generated so far.
    """

    prompt_k: Array
    prompt_v: Array
    prompt_mask: Array
    n_valid: Array
    gen_k: Array
    gen_v: Array
    src: Array | None
    step: Array

    @classmethod
    def from_prompt(
        cls,
        cache: KVCache,
        attention_mask: Array,
        rows_per_prompt: int,
        max_new_tokens: int,
        *,
        reorders: bool = True,
    ) -> PromptSharingCache:
        """Takes over a `KVCache` filled with exactly the prompts (S = P slots).

        Args:
          cache: the prefilled cache, key/value [L, B, P, N, H].
          attention_mask: [B, P] (1 = token, 0 = padding).
          rows_per_prompt: n.
          max_new_tokens: L_new, slots of the generated buffer.
          reorders: False when rows never change places (attention then reads each row's own
            buffer row, skipping the ancestry table).
        """
        layers, b, p, heads, head_dim = cache.key.shape
        if attention_mask.shape != (b, p):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected {(b, p)} (the prompts)"
            )
        r = b * rows_per_prompt
        gen_shape = (layers, r, max_new_tokens, heads, head_dim)
        return cls(
            prompt_k=cache.key,
            prompt_v=cache.value,
            prompt_mask=attention_mask != 0,
            n_valid=jnp.sum(attention_mask.astype(jnp.int32), axis=1),
            gen_k=jnp.zeros(gen_shape, cache.key.dtype),
            gen_v=jnp.zeros(gen_shape, cache.value.dtype),
            src=jnp.zeros((r, max_new_tokens), jnp.int32) if reorders else None,
            step=jnp.zeros((), jnp.int32),
        )

    @property
    def rows_per_prompt(self) -> int:
        return self.gen_k.shape[1] // self.prompt_k.shape[1]

    def prepare(
        self, shape: tuple[int, int], attention_mask: Array | None
    ) -> tuple[PromptSharingCache, Array, Array]:
        """One new token per row; the cache tracks validity itself (`attention_mask` None)."""
        r, t = shape
        if attention_mask is not None:
            raise ValueError(
                "PromptSharingCache tracks which tokens are valid itself: pass attention_mask=None"
            )
        if t != 1 or r != self.gen_k.shape[1]:
            raise ValueError(
                f"PromptSharingCache takes one token for each of its {self.gen_k.shape[1]} rows, "
                f"got input_ids of shape {tuple(shape)}"
            )
        i = self.step
        src = self.src
        if src is not None:  # this step's token lives in the row's own buffer row
            src = jax.lax.dynamic_update_slice_in_dim(
                src, jnp.arange(r, dtype=jnp.int32)[:, None], i, axis=1
            )
        positions = jnp.repeat(self.n_valid, self.rows_per_prompt)[:, None] + i  # [R, 1]
        return self._replace(src=src, step=i + 1), positions, i

    def attend(
        self, layer: int, q: Array, k: Array, v: Array, view: Any, attention: AttentionFn
    ) -> tuple[Array, PromptSharingCache]:
        """Writes k, v [R, 1, N, H] at buffer slot `view` (the step) and attends; `attention` is
        not used (the split layout needs its own arithmetic)."""
        del attention
        _check_layer(layer, self.gen_k.shape[0])
        i = view
        start = (layer, 0, i, 0, 0)
        gen_k = jax.lax.dynamic_update_slice(self.gen_k, k[None].astype(self.gen_k.dtype), start)
        gen_v = jax.lax.dynamic_update_slice(self.gen_v, v[None].astype(self.gen_v.dtype), start)
        out = _split_attention(
            q[:, 0],
            self.prompt_k[layer],
            self.prompt_v[layer],
            gen_k[layer],
            gen_v[layer],
            self.prompt_mask,
            self.src,
            i,
        )[:, None]  # [R, 1, N, H]
        return out, self._replace(gen_k=gen_k, gen_v=gen_v)

    def reorder(self, rows: Array) -> PromptSharingCache:
        """Row r continues row rows[r] (of the same prompt): only the ancestry table moves."""
        if self.src is None:
            raise ValueError("this PromptSharingCache was built with reorders=False")
        return self._replace(src=self.src[rows])


def _split_attention(q, prompt_k, prompt_v, gen_k, gen_v, prompt_mask, src, i):
    """One query per row over its prompt (shared by the prompt's rows) and its own history.

    Args:
      q: [R, N, H] queries (already scaled), R = B * n rows (n per prompt).
      prompt_k, prompt_v: [B, P, N, H].
      gen_k, gen_v: [R, L_new, N, H] generated keys/values by buffer row.
      prompt_mask: [B, P] bool.
      src: [R, L_new] buffer row holding each row's token j (rows of the same prompt), or None
        when every row's history is its own buffer row.
      i: the current step (slots j <= i are valid).

    Returns:
      [R, N, H].
    """
    b, p = prompt_k.shape[:2]
    r, heads, head_dim = q.shape
    if prompt_k.shape[2] != heads:
        return _grouped_split_attention(q, prompt_k, prompt_v, gen_k, gen_v, prompt_mask, src, i)
    n, big_l = r // b, gen_k.shape[1]
    qb = q.reshape(b, n, heads, head_dim)  # [B, n, N, H]
    s_prompt = jnp.einsum("bknh,bpnh->bknp", qb, prompt_k, preferred_element_type=jnp.float32)
    # Row k's token j lives in buffer row src[k, j] of its prompt's n rows: score against all n
    # candidates (n times the few FLOPs) and keep the right one with a one-hot, instead of
    # gathering a [R, L_new, N, H] copy of the keys every layer and step.
    gk = gen_k.reshape(b, n, big_l, heads, head_dim)  # [B, m, L_new, N, H]
    gv = gen_v.reshape(b, n, big_l, heads, head_dim)
    if src is None:
        s_gen = jnp.einsum("bknh,bkjnh->bknj", qb, gk, preferred_element_type=jnp.float32)
    else:
        s_all = jnp.einsum("bknh,bmjnh->bknmj", qb, gk, preferred_element_type=jnp.float32)
        local = (src - (jnp.arange(r) // n * n)[:, None]).reshape(b, n, big_l)  # [B, n, L]
        onehot = local[:, :, None, :] == jnp.arange(n)[None, None, :, None]  # [B, n, m, L]
        s_gen = jnp.sum(jnp.where(onehot[:, :, None], s_all, 0.0), axis=3)  # [B, n, N, L]
    # HF masks with the dtype's minimum (not -inf), so fully masked rows stay finite.
    low = jnp.finfo(jnp.float32).min
    valid = (jnp.arange(big_l) <= i)[None, None, None, :]
    scores = jnp.concatenate(
        [
            jnp.where(prompt_mask[:, None, None, :], s_prompt, low),
            jnp.where(valid, s_gen, low),
        ],
        axis=-1,
    )  # [B, n, N, P + L_new]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out_prompt = jnp.einsum("bknp,bpnh->bknh", probs[..., :p], prompt_v)
    if src is None:
        out_gen = jnp.einsum("bknj,bkjnh->bknh", probs[..., p:], gv)
    else:
        weights = jnp.where(onehot[:, :, None], probs[..., None, p:], 0.0)  # [B, n, N, m, L]
        out_gen = jnp.einsum("bknmj,bmjnh->bknh", weights, gv)
    return (out_prompt + out_gen).reshape(r, heads, head_dim)


def _grouped_split_attention(q, prompt_k, prompt_v, gen_k, gen_v, prompt_mask, src, i):
    """`_split_attention` for grouped-query attention: K key/value heads, N = K * G queries.

    Query head c * G + g reads key/value head c (HF's `repeat_kv` order); the keys are read
    grouped, never repeated. Shapes as `_split_attention` with K heads in prompt_k, gen_k, ...
    """
    b, p, kv_heads, head_dim = prompt_k.shape
    r, heads = q.shape[:2]
    n, big_l, g = r // b, gen_k.shape[1], heads // kv_heads
    qb = q.reshape(b, n, kv_heads, g, head_dim)  # [B, n, K, G, H]
    s_prompt = jnp.einsum("brcgh,bpch->brcgp", qb, prompt_k, preferred_element_type=jnp.float32)
    gk = gen_k.reshape(b, n, big_l, kv_heads, head_dim)  # [B, m, L_new, K, H]
    gv = gen_v.reshape(b, n, big_l, kv_heads, head_dim)
    if src is None:
        s_gen = jnp.einsum("brcgh,brjch->brcgj", qb, gk, preferred_element_type=jnp.float32)
    else:
        s_all = jnp.einsum("brcgh,bmjch->brcgmj", qb, gk, preferred_element_type=jnp.float32)
        local = (src - (jnp.arange(r) // n * n)[:, None]).reshape(b, n, big_l)  # [B, n, L]
        onehot = local[:, :, None, :] == jnp.arange(n)[None, None, :, None]  # [B, n, m, L]
        s_gen = jnp.sum(jnp.where(onehot[:, :, None, None], s_all, 0.0), axis=4)  # [B,n,K,G,L]
    low = jnp.finfo(jnp.float32).min
    valid = (jnp.arange(big_l) <= i)[None, None, None, None, :]
    scores = jnp.concatenate(
        [
            jnp.where(prompt_mask[:, None, None, None, :], s_prompt, low),
            jnp.where(valid, s_gen, low),
        ],
        axis=-1,
    )  # [B, n, K, G, P + L_new]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out_prompt = jnp.einsum("brcgp,bpch->brcgh", probs[..., :p], prompt_v)
    if src is None:
        out_gen = jnp.einsum("brcgj,brjch->brcgh", probs[..., p:], gv)
    else:
        weights = jnp.where(onehot[:, :, None, None], probs[..., None, p:], 0.0)  # [B,n,K,G,m,L]
        out_gen = jnp.einsum("brcgmj,bmjch->brcgh", weights, gv)
    return (out_prompt + out_gen).reshape(r, heads, head_dim)


__all__ = [
    "AttentionFn",
    "Cache",
    "KVCache",
    "PromptSharingCache",
    "causal_mask",
    "mask_positions",
]
