"""Token embedding and LM head (vocab split across ranks when tp_size > 1; whole for now)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swiftlm.kernels.gemv import gemv, use_gemv


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects final hidden states to fp32 logits; may share its weight with the embedding (tied models)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits; with `out`, written into that preallocated buffer (the CUDA-graph path)."""
        if use_gemv(hidden, self.weight):  # decode: fp32 logits straight from the GEMV's epilogue
            return gemv(hidden, self.weight, out_dtype=torch.float32, out=out)
        logits = F.linear(hidden, self.weight)
        if out is None:
            return logits.float()
        return out.copy_(logits)
