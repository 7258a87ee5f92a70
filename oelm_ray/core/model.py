"""A GPT with one attention implementation and a Q/K init/freeze policy.

The three methods of the research are the same model; they differ only in how the query/key
projections are initialised and whether they train (`ModelConfig.method`):

- baseline:    N(0, 0.02) like every other weight, trained.
- oelm_freeze: head-wise orthogonal (each head's slice from its own QR of a Gaussian), frozen.
- oelm_random: N(0, qk_std^2), frozen (qk_random_std, or 1/sqrt(d_model) where that is 0).

Everything else is the research's model: pre-LayerNorm blocks, Q/K/V/output
projections without bias, a GELU MLP whose Linears have biases, learned positions, dropout after
the embeddings, the attention output, the GELU and the MLP output, all weights N(0, 0.02), and the
token embedding tied to the LM head. At Medium-512 that is 44,896,768 parameters, of which the
frozen methods freeze 3,145,728 (Q/K) and train 41,751,040: the counts the research reports.

Q and K live in one `c_qk` projection per block, separate from V, so that freezing them is a
`requires_grad=False` on one tensor: autograd then computes only the input gradient of that matmul
and spends no work on a weight gradient. Frozen tensors stay parameters (not buffers) so they sit in
the state dict, the checkpoint and the parameter count like everything else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_model = cfg.d_model
        self.c_qk = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)  # [W_q; W_k]
        self.c_v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k = self.c_qk(x).split(C, dim=2)
        v = self.c_v(x)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    # the research's MLP: both Linears carry biases (zero-initialised, trained) and dropout follows
    # the GELU as well as the output projection
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=True)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=True)
        self.act_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_drop(F.gelu(self.c_fc(x)))  # (B, T, d_ff)
        return self.resid_drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.block_size, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.d_model),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in the research's code
        self.apply(_init_weights)
        for i in cfg.frozen_qk_layers:
            init_qk(self.transformer.h[i].attn.c_qk.weight, cfg)
        self.set_qk_trainable(False)

    # -- the Q/K policy ---------------------------------------------------------------------------

    def qk_params(self) -> dict[str, nn.Parameter]:
        """Name -> the c_qk weight of every block."""
        return {f"transformer.h.{i}.attn.c_qk.weight": b.attn.c_qk.weight for i, b in enumerate(self.transformer.h)}

    def set_qk_trainable(self, unfrozen: bool) -> None:
        """Freeze the policy's Q/K (unfrozen=False) or let them train from now on (unfrozen=True)."""
        for i, block in enumerate(self.transformer.h):
            block.attn.c_qk.weight.requires_grad_(unfrozen or i not in self.cfg.frozen_qk_layers)

    def frozen_param_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if not p.requires_grad]

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def param_counts(self) -> dict[str, int]:
        """{"total", "trainable", "frozen"} parameter counts (tied weights once), as the research reports them."""
        total, trainable = self.num_params(), self.num_params(trainable_only=True)
        return {"total": total, "trainable": trainable, "frozen": total - trainable}

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """(logits (B, T, vocab), the mean cross-entropy loss or None without targets).

        reduction="sum" (evaluation): (None, the summed cross-entropy over every target): the
        logits are not returned, so a compiled or CUDA-graphed forward keeps only a scalar.
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return (None, loss) if reduction == "sum" else (logits, loss)


def _init_weights(m: nn.Module) -> None:
    # the research's code: every weight N(0, 0.02), biases zero, LayerNorm at its default
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


@torch.no_grad()
def init_qk(weight: torch.Tensor, cfg: ModelConfig) -> None:
    """Initialise one block's [W_q; W_k] (2*d_model, d_model) by the method's policy."""
    if cfg.method == "oelm_random":
        weight.normal_(0.0, cfg.qk_std)
        return
    assert cfg.method == "oelm_freeze", cfg.method
    d, hs = cfg.d_model, cfg.d_model // cfg.n_head
    # rows h*hs:(h+1)*hs of W_q (and of W_k) are head h's projection: one QR per head and matrix
    for start in range(0, 2 * d, hs):
        a = torch.randn(d, hs, dtype=torch.float64)
        q, r = torch.linalg.qr(a, mode="reduced")  # q: (d, hs), orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # fix the sign: deterministic given the RNG
        weight[start : start + hs].copy_(q.T.to(weight.dtype))
