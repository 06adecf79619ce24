"""`gpt`: a decoder-only transformer language model, split at block boundaries.

Layers: 0 the token and position embeddings (input: N x context token ids, int64), 1..blocks one
pre-norm transformer block each (causal self-attention, then an MLP of 4 x width, each with a residual),
and last the final LayerNorm with the vocabulary head. Output: N x context x vocab scores, the next token's
at every position. No dropout, so a split run equals plain PyTorch exactly.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Embedding(nn.Module):
    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions.weight[: ids.shape[1]]


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # no bias on q, k, v (as LLaMA): a key bias cannot change attention, so its gradient is rounding noise,
        # which Adam would turn into full-size steps (and split runs would differ from plain PyTorch by them)
        self.qkv, self.proj = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, w))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def gpt(blocks: int = 4, width: int = 128, heads: int = 4, context: int = 64, vocab: int = 256) -> list:
    """blocks: transformer blocks (the model has blocks + 2 layers); width: the model dimension (a multiple
    of heads); heads: attention heads per block; context: tokens per sequence (the input's length); vocab:
    distinct tokens (256 for byte-level text, `--data text:FILE`). About 12 * blocks * width**2 parameters,
    plus (vocab + context) * width for the embeddings and vocab * width for the head."""
    from pipeline.models import SpecError

    if min(blocks, width, heads, context, vocab) < 1 or width % heads:
        raise SpecError(f"gpt needs blocks, width, heads, context and vocab >= 1 and width a multiple of heads "
                        f"(got blocks={blocks}, width={width}, heads={heads}, context={context}, vocab={vocab})")
    return ([lambda: Embedding(vocab, width, context)] + [lambda: Block(width, heads)] * blocks
            + [lambda: Head(width, vocab)])


def gpt_input(options: dict) -> tuple[int, ...]:
    return (options.get("context", 64),)
