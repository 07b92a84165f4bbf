"""Drafts for teaching edit heads: a target completion corrupted into a canvas that needs remasks, deletes and
inserts, with the operations that fix it as labels (the supervised regime of AP-MDM, arXiv 2510.06190, built
from a target instead of solver traces).

A draft is built with a known alignment to its target, so every label follows by construction (no sequence
alignment afterwards). The target's tokens are split into *anchors*, shown as tokens, and *hidden* stretches
between anchors, shown as runs of masks:
- an anchor is shown as itself (label KEEP) or, when it is a token of the draft vocabulary (Sudoku: the
  digits, not the newlines), as a wrong one (label REMASK: it is taken back, and filled again later);
- between anchors, spurious wrong tokens may appear (label DELETE);
- a hidden stretch of m target tokens is shown as a run of r masks, r = m - missing + spurious. The labels
  are canonical, so that the run's masks, which look alike, get one answer: if r >= m the first m masks are
  KEEP (and learn the stretch's tokens in order) and the last r - m DELETE; if r < m every mask is KEEP and
  the gap after the run's last item opens m - r masks (at most K per step: the rest in later steps).
Wrong-length drafts (all masks, a random length) teach the head to set the length before anything is written.
Each corruption rate is drawn per draft, and is 0 for half of the drafts, so clean drafts (the answer: keep
everything) are common: a head must also learn when to stop editing, which AP-MDM's traces never show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..policy.edits import DELETE_OP, KEEP, REMASK_OP

IGNORE = -100  # no token target


@dataclass
class DraftRates:
    """Upper bounds of the per-draft corruption rates (each drawn uniformly below, or 0 half of the time)."""

    substitute: float = 0.2  # anchors shown as a wrong token (REMASK)
    missing: float = 0.3  # hidden target tokens without a mask (insert)
    spurious: float = 0.3  # extra masks and wrong tokens (DELETE)
    wrong_length: float = 0.3  # share of drafts that are all masks of a random length
    remask_only: bool = False  # fixed-length tasks: substitutions only, no inserts or deletes


@dataclass
class Draft:
    tokens: list[int]  # the draft completion (length <= capacity)
    ops: list[int]  # per position: KEEP / REMASK / DELETE
    counts: list[int]  # per gap (len + 1; gap 0 is before position 0): masks to open
    targets: list[int]  # per position: the token a kept mask stands for (IGNORE elsewhere)


def corrupt(
    target: list[int], rng: random.Random, rates: DraftRates, mask_id: int, vocab: list[int], K: int, capacity: int
) -> Draft:
    """One draft of `target` (token ids, EOS included) with its labels; `vocab`: the ids wrong tokens are drawn from."""
    rate = lambda hi: 0.0 if hi <= 0 or rng.random() < 0.5 else rng.uniform(0, hi)
    if rates.remask_only:
        p_sub, p_miss, p_spur = rate(rates.substitute), 0.0, 0.0
    else:
        p_sub, p_miss, p_spur = rate(rates.substitute), rate(rates.missing), rate(rates.spurious)
    p_mask = rng.random()  # MDLM's t: the share of target tokens hidden
    if not rates.remask_only and rng.random() < rates.wrong_length:
        p_mask, p_sub = 1.0, 0.0
    hidden = [rng.random() < p_mask for _ in target]
    wrong = lambda tok: rng.choice([v for v in vocab if v != tok])
    geometric = lambda p: 0 if p <= 0 else next(k for k in range(capacity + 1) if rng.random() >= p or k == capacity)

    tokens, ops, targets = [], [], []
    opens = [0]  # masks to open after the last item emitted so far (index 0: gap 0)

    def emit(tok, op, tgt=IGNORE):
        tokens.append(tok)
        ops.append(op)
        targets.append(tgt)
        opens.append(0)

    j = 0
    while j < len(target):
        if not hidden[j]:  # an anchor, then spurious wrong tokens after it
            sub = target[j] in vocab and rng.random() < p_sub  # only tokens of the vocabulary go wrong
            emit(wrong(target[j]) if sub else target[j], REMASK_OP if sub else KEEP)
            for _ in range(geometric(p_spur)):
                emit(wrong(-1), DELETE_OP)
            j += 1
            continue
        stretch = []
        while j < len(target) and hidden[j]:
            stretch.append(target[j])
            j += 1
        m = len(stretch)
        r = m - sum(rng.random() < p_miss for _ in stretch) + geometric(p_spur)
        if p_mask == 1.0 and not rates.remask_only:  # a wrong-length draft: a random length, all masks
            r = rng.randint(1, capacity)
        for i in range(r):
            emit(mask_id, KEEP if i < m else DELETE_OP, stretch[i] if i < m else IGNORE)
        opens[-1] += max(0, m - r)  # after the run's last item (gap 0 when nothing came before)
    if len(tokens) > capacity or not tokens:  # too long (or empty): show the target fully masked instead
        return Draft([mask_id] * len(target), [KEEP] * len(target), [0] * (len(target) + 1), list(target))
    # a deleted item owns no gap: its masks move to the nearest item before it that stays
    counts = [0] * (len(tokens) + 1)
    owner = 0
    for g, n in enumerate(opens):
        if g > 0 and ops[g - 1] != DELETE_OP:
            owner = g
        counts[owner] += n
    room = capacity - len(tokens) + sum(op == DELETE_OP for op in ops)
    for g in range(len(counts)):  # at most K per gap and step, never past the capacity
        counts[g] = min(counts[g], K, room)
        room -= counts[g]
    return Draft(tokens, ops, counts, targets)
