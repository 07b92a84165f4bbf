"""The learned unmasking-order policy and Plackett-Luce machinery (DCoLT arXiv 2505.10446)."""

from .order_head import OrderHead, OrderHeadConfig
from .plackett_luce import gumbel_topk, plackett_luce_logprob, topk_positions

__all__ = ["OrderHead", "OrderHeadConfig", "gumbel_topk", "plackett_luce_logprob", "topk_positions"]
