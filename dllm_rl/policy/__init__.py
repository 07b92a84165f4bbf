"""Unmasking orders: the fixed rules (orders.py), the learned order head (order_head.py, DCoLT arXiv
2505.10446) and the Plackett-Luce machinery both sample with (plackett_luce.py); the edit head of any-process
decoding (edit_head.py, AP-MDM arXiv 2510.06190) and its decisions' legal sets and log-probs (edits.py)."""

from .edit_head import EditHead, EditHeadConfig, edit_head_for
from .order_head import OrderHead, OrderHeadConfig, order_head_for
from .orders import ORDERS, Order, OrderInputs, model_order_scores
from .plackett_luce import gumbel_topk, plackett_luce_logprob, topk_positions

__all__ = [
    "ORDERS",
    "EditHead",
    "EditHeadConfig",
    "Order",
    "OrderHead",
    "OrderHeadConfig",
    "OrderInputs",
    "edit_head_for",
    "gumbel_topk",
    "model_order_scores",
    "order_head_for",
    "plackett_luce_logprob",
    "topk_positions",
]
