"""MiniGPT: a decoder-only transformer in plain PyTorch (no Lightning, no Hydra).

The sizes of the lesson's model are the defaults of `GPTConfig`: 4 pre-LayerNorm blocks of 4-head causal
self-attention and a GELU MLP, 64 wide, over a context of 128 characters.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # key, query and value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        # The fused kernel (flash / memory-efficient / CPU flash) builds the causal mask itself, so no
        # (T, T) mask buffer is stored or re-created per step.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        return self._merge(y)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same output as `forward`, computed step by step so that the attention weights can be returned.

        The fused kernel never materialises the (T, T) weights; this path does, so it is slower and is used
        only when someone asks to see them (attention maps), never in training.
        """
        q, k, v = self._heads(x)
        T, hs = q.size(-2), q.size(-1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T): how well each query matches each key
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
        att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)  # each row sums to 1 over the past
        y = F.dropout(att, self.dropout, self.training) @ v  # (B, nh, T, hs)
        return self._merge(y), att

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # queries, keys, values of every head
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # queries and keys are normalised and rotated together: half the ops
        if self.qk_norm:  # unit RMS per head: the attention logits stay bounded however large the weights grow
            qk = F.rms_norm(qk, (qk.size(-1),))
        if self.rotary is not None:
            qk = self.rotary(qk)
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs) each

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # re-assemble the heads side by side: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al., "RoFormer", 2021): rotates each pair of query and key channels by an
    angle proportional to the position, so that q . k depends on the positions only through their distance."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        frequencies = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)  # rebuilt from the sizes, not checkpointed
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, ..., head_size), positions along dimension 1."""
        T = x.size(1)
        shape = (T,) + (1,) * (x.ndim - 3) + (-1,)
        cos, sin = self.cos[:T].view(shape).to(x.dtype), self.sin[:T].view(shape).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # channel i is paired with channel i + hs/2
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pre-LayerNorm: the residual stream itself is never normalised, which keeps gradients flowing
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, att = self.attn.forward_with_attention(self.ln_1(x))
        x = x + y
        return x + self.mlp(self.ln_2(x)), att  # (B, T, C), (B, nh, T, T)


@dataclass
class GPTConfig:
    vocab_size: int = 65  # TinyShakespeare has 65 distinct characters
    block_size: int = 128  # the longest context, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    rope: bool = False  # rotary position embeddings in attention instead of learned position embeddings
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    # Rows of the embedding and the head, rounded up to a multiple of this: 64 turns GPT-2's 50257 into 50304, whose
    # matmuls tile evenly on a GPU (nanoGPT pads so). The extra ids are never targets, so their logits only fall.
    vocab_multiple: int = 1

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head gets "
                f"n_embd / n_head channels. Pick n_head among {_divisors(self.n_embd)} or change n_embd."
            )
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"rope rotates pairs of channels, so each head needs an even number of them: n_embd / n_head = "
                f"{self.n_embd // self.n_head}. Pick n_head among "
                f"{[d for d in _divisors(self.n_embd) if (self.n_embd // d) % 2 == 0]} or set rope=false."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                **({} if config.rope else {"wpe": nn.Embedding(config.block_size, config.n_embd)}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # N(0, 0.02) as in GPT-2 and the lesson; small logits at init put the loss near ln(vocab_size)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._embed(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def forward_with_attention(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits as `forward` gives them, and every head's attention weights: (n_layer, B, nh, T, T).

        Row t of a head's (T, T) map is how much position t takes from each position up to t.
        """
        x = self._embed(idx)
        maps = []
        for block in self.transformer.h:
            x, att = block.forward_with_attention(x)
            maps.append(att)
        return self.lm_head(self.transformer.ln_f(x)), torch.stack(maps)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {T}: the model's block_size is {self.config.block_size}. "
                "Crop the input to the last block_size tokens (generate() does this)."
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # else positions enter through the rotary embedding of queries and keys
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))  # + (T, C) broadcast
        return self.transformer.drop(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to each row of `idx` (B, T) and return (B, T + new)."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature} (use a small value for near-greedy)")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive (the number of most likely tokens to sample among), got {top_k}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # the model has only block_size positions
            # With compile_mode=reduce-overhead each call replays a CUDA graph that reuses its output memory: a new
            # step for each token (PyTorch's advice for inference loops), and the logits are read before the next.
            new_cuda_graph_step()
            logits, _ = self(idx_cond)
            # (B, vocab_size): only the last position is new, and a padding id is never sampled
            logits = logits[:, -1, : self.config.vocab_size] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def compile_model(model: GPT, how: bool | str = True, mode: str = "default") -> None:
    """torch.compile `model` in place (Module.compile: parameter names, and so checkpoints, stay as they are).

    how=True compiles the whole model as one graph: the fastest steps and the longest compilation.
    how="regional" compiles each transformer block on its own (PyTorch's regional compilation recipe): the
    blocks run the same code, so Dynamo traces one and every other reuses its graph, while the embeddings,
    final norm, head and loss run eagerly. It compiles in about half the time, cold or warm.
    how=False leaves the model as it is.
    """
    check_compile(how)
    if how is True:
        model.compile(mode=mode)
    elif how == "regional":
        for block in model.transformer.h:
            block.compile(mode=mode)


def check_compile(how: object) -> None:
    if not (isinstance(how, bool) or how == "regional"):
        raise ValueError(
            f"compile={how!r} is not one of the choices: false, true (compile the whole model) or "
            "regional (compile each transformer block: about half the compilation time)."
        )


def new_cuda_graph_step() -> None:
    """Tell PyTorch's CUDA graphs (compile_mode=reduce-overhead) that a new step begins: the outputs of the last one
    may be overwritten from now on (torch.compiler.cudagraph_mark_step_begin).

    Only where the graphs' machinery is loaded (Inductor loads it to compile them): its first call would otherwise
    import Inductor, seconds of start-up, into runs that compile nothing.
    """
    if "torch._inductor.cudagraph_trees" in sys.modules:
        torch.compiler.cudagraph_mark_step_begin()


def eager() -> contextlib.AbstractContextManager:
    """A context in which compiled modules run their Python code instead (torch.compiler.set_stance).

    Validation, samples and pictures use other shapes and no gradients: compiling graphs for them would cost
    more start-up than they save.
    """
    return torch.compiler.set_stance("force_eager")
