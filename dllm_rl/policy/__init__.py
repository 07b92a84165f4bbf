"""The learned unmasking-order policy and Plackett-Luce machinery (DCoLT arXiv 2505.10446)."""

from .plackett_luce import gumbel_topk, plackett_luce_logprob, topk_positions

__all__ = ["gumbel_topk", "plackett_luce_logprob", "topk_positions"]
