"""A small pre-LayerNorm transformer encoder for toy token tasks, written so it can be split.

The model is ``Embed -> num_layers x Block -> Head``; each block is
``h + Attention(LN(h))`` then ``h + MLPBlock(LN(h))`` (Vaswani et al. 2017, with the pre-norm
placement of Xiong et al. 2020). Attention is bidirectional: the toy tasks (copy, reverse, sort)
need every input position.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, §3) needs only two things from the model:

- the sizes it allocates are *local*: ``num_heads / shards`` heads and ``mlp_dim / shards`` hidden
  units, so the same module runs on one shard of the weights; and
- two conjugate operators around each parallel region: ``enter`` (Megatron's *f*: identity in the
  forward pass, all-reduce of the input gradient in the backward pass) and ``exit`` (Megatron's
  *g*: all-reduce of the partial outputs in the forward pass, identity in the backward pass).

Both come in a :class:`TensorSplit`; the default (one shard, identity operators) is the ordinary
single-device model. Parameter names say how they split (see ``jaxsync.parallel.tensor``):
``qkv_kernel (d, 3, H, d/H)`` and ``up_kernel (d, F)`` by columns (heads / hidden units),
``out_kernel (H, d/H, d)`` and ``down_kernel (F, d)`` by rows; the row-parallel biases are added
once, after the all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsync import ConfigError


def _identity(x):
    return x


class TensorSplit(NamedTuple):
    """How a module is split for tensor parallelism: shard count and the f / g operators."""

    shards: int = 1
    enter: Callable = _identity
    exit: Callable = _identity


NO_SPLIT = TensorSplit()


def _normal(fan_in: int):
    return nn.initializers.normal(stddev=fan_in**-0.5)


def _local(size: int, shards: int, what: str) -> int:
    if size % shards:
        raise ConfigError(f"{what}={size} is not divisible by the model-parallel size {shards}")
    return size // shards


class MLPBlock(nn.Module):
    """Megatron MLP: ``y = g(gelu(f(x) W1 + b1) W2) + b2``, W1 split by columns, W2 by rows.

    Each device computes its slice of the hidden units with no communication; the partial products
    with W2's rows are summed by the one all-reduce in ``g`` (Shoeybi et al. 2019, eq. 3).
    """

    hidden: int
    split: TensorSplit = NO_SPLIT

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        f = _local(self.hidden, self.split.shards, "mlp hidden size")
        w1 = self.param("up_kernel", _normal(d), (d, f))
        b1 = self.param("up_bias", nn.initializers.zeros, (f,))
        w2 = self.param("down_kernel", _normal(self.hidden), (f, d))
        b2 = self.param("down_bias", nn.initializers.zeros, (d,))
        h = nn.gelu(self.split.enter(x) @ w1 + b1)
        return self.split.exit(h @ w2) + b2


class Attention(nn.Module):
    """Multi-head self-attention, softmax(QKᵀ/√d_h)V per head, heads split across devices.

    Heads are independent, so each device computes Q, K, V and attention for its own heads and
    multiplies by its rows of the output projection; ``g`` sums the partial outputs.
    """

    num_heads: int
    split: TensorSplit = NO_SPLIT

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        if d % self.num_heads:
            raise ConfigError(f"width {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        heads = _local(self.num_heads, self.split.shards, "num_heads")
        wqkv = self.param("qkv_kernel", _normal(d), (d, 3, heads, hd))
        bqkv = self.param("qkv_bias", nn.initializers.zeros, (3, heads, hd))
        wo = self.param("out_kernel", _normal(d), (heads, hd, d))
        bo = self.param("out_bias", nn.initializers.zeros, (d,))
        q, k, v = jnp.moveaxis(
            jnp.einsum("bld,dthe->blthe", self.split.enter(x), wqkv) + bqkv, 2, 0
        )
        att = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k) * hd**-0.5, axis=-1)
        o = jnp.einsum("bhqk,bkhe->bqhe", att, v)
        return self.split.exit(jnp.einsum("bqhe,hed->bqd", o, wo)) + bo


class Block(nn.Module):
    """Pre-LN transformer block: ``h + Attn(LN(h))`` then ``h + MLP(LN(h))``."""

    num_heads: int
    mlp_dim: int
    split: TensorSplit = NO_SPLIT

    @nn.compact
    def __call__(self, h):
        h = h + Attention(self.num_heads, self.split, name="attn")(nn.LayerNorm(name="ln1")(h))
        return h + MLPBlock(self.mlp_dim, self.split, name="mlp")(nn.LayerNorm(name="ln2")(h))


class Embed(nn.Module):
    """Token embedding plus a learned position embedding sized by the sample at init."""

    vocab: int
    d_model: int

    @nn.compact
    def __call__(self, tokens):
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2:
            raise ConfigError(
                "the transformer needs (batch, length) integer tokens: use "
                "--dataset=copy|reverse|sort"
            )
        tok = self.param("tokens", nn.initializers.normal(1.0), (self.vocab, self.d_model))
        pos = self.param("positions", nn.initializers.normal(0.1), (tokens.shape[1], self.d_model))
        return tok[tokens] + pos


class Head(nn.Module):
    """Final LayerNorm and per-token logits over the vocabulary."""

    vocab: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.vocab, kernel_init=_normal(h.shape[-1]), name="out")(
            nn.LayerNorm(name="ln")(h)
        )


class Transformer(nn.Module):
    """Token encoder: ``(batch, length) int -> (batch, length, vocab)`` logits.

    Parameters: ``embed``, ``block_0 .. block_{num_layers-1}``, ``head`` (the pipeline strategy
    stacks the blocks into stages; tensor parallelism splits inside each block).
    """

    vocab: int
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    num_layers: int = 4
    split: TensorSplit = NO_SPLIT

    @nn.compact
    def __call__(self, tokens):
        h = Embed(self.vocab, self.d_model, name="embed")(tokens)
        for i in range(self.num_layers):
            h = Block(self.num_heads, self.mlp_dim, self.split, name=f"block_{i}")(h)
        return Head(self.vocab, name="head")(h)


def block_of(model: Transformer) -> Block:
    """A stand-alone block with ``model``'s sizes (to apply one ``block_i``'s params alone)."""
    return Block(model.num_heads, model.mlp_dim, model.split)


def make_transformer(vocab: int, width: int, num_heads: int = 4, num_layers: int = 4):
    """The ``--model=transformer`` preset: d_model = width, mlp_dim = 4·width."""
    if width % num_heads:
        raise ConfigError(f"--width={width} is not divisible by num_heads={num_heads}")
    return Transformer(vocab, width, num_heads, 4 * width, num_layers)
