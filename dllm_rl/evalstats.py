"""Evaluation statistics over several samples per question: pass@k, majority vote, answer diversity, and
confidence intervals with the question as the unit (plain Python; used by evaluate.py and axes.py).

- pass@k (Chen et al., arXiv 2107.03374, section 2.1): from n samples with c correct, 1 - C(n-c, k) / C(n, k),
  unbiased for k <= n; computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms a large binomial.
- maj@k: the answers of k samples vote (a sample without a readable answer abstains); the question scores
  the verifier's score of the winning answer; a tie scores the mean over the tied answers (the expected
  accuracy under a uniformly random tie-break: deterministic and unbiased); all abstaining scores 0. From
  n > k samples, maj@k is averaged over k-subsets (every subset when there are at most `max_subsets`, else
  that many drawn from a seeded generator).
- distinct answers and answer entropy (-sum p_a log p_a over the readable answers) per question.
- Wilson's score interval for a proportion; a cluster (paired) bootstrap over questions for a mean and for
  the difference of two conditions on the same questions (percentile interval): samples of one question
  are never resampled apart.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import Sequence

Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with c correct out of n samples.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2), round(pass_at_k(4, 2, 2), 4)
    (0.25, 1.0, 0.0, 0.8333)
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote(answers: Sequence, scores: Sequence[float]) -> float:
    """Majority-vote score of one question's samples (None answers abstain; ties: mean over the tied).

    >>> vote(["a", "b", "a", None], [1.0, 0.0, 1.0, 0.0]), vote(["a", "b"], [1.0, 0.0]), vote([None], [1.0])
    (1.0, 0.5, 0.0)
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [a for a, n in counts.items() if n == top]
    score_of = {}
    for a, s in zip(answers, scores):
        score_of.setdefault(a, s)
    return sum(score_of[a] for a in winners) / len(winners)


def maj_at_k(answers: Sequence, scores: Sequence[float], k: int, max_subsets: int = 2000, seed: int = 0) -> float:
    """maj@k of one question from its n >= k samples, averaged over k-subsets.

    >>> maj_at_k(["a", "a", "b"], [1.0, 1.0, 0.0], 1), maj_at_k(["a", "a", "b"], [1.0, 1.0, 0.0], 3)
    (0.6666666666666666, 1.0)
    """
    n = len(answers)
    if k > n:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {n}")
    if math.comb(n, k) <= max_subsets:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(max_subsets)]
    return sum(vote([answers[i] for i in s], [scores[i] for i in s]) for s in subsets) / len(subsets)


def distinct_answers(answers: Sequence) -> int:
    """How many different readable answers.

    >>> distinct_answers(["a", "b", "a", None])
    2
    """
    return len({a for a in answers if a is not None})


def answer_entropy(answers: Sequence) -> float:
    """Entropy (nats) of the readable answers' empirical distribution.

    >>> round(answer_entropy(["a", "b"]), 4), answer_entropy(["a", "a", None])
    (0.6931, 0.0)
    """
    counts = Counter(a for a in answers if a is not None)
    total = sum(counts.values())
    return max(0.0, -sum(n / total * math.log(n / total) for n in counts.values())) if total else 0.0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a proportion successes / n.

    >>> [round(x, 4) for x in wilson(50, 100)]
    [0.4038, 0.5962]
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], draws: int = 10000, seed: int = 0, alpha: float = 0.05):
    """Percentile bootstrap interval (lo, hi) of the mean of per-question values; (nan, nan) for no values."""
    rng = random.Random(seed)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return means[int(alpha / 2 * draws)], means[min(draws - 1, int((1 - alpha / 2) * draws))]


def paired_difference(a: Sequence[float], b: Sequence[float], draws: int = 10000, seed: int = 0, alpha: float = 0.05):
    """(mean of a - b, lo, hi): the difference of two conditions on the same questions, with a paired
    (question-resampling) percentile bootstrap interval."""
    if len(a) != len(b):
        raise ValueError("paired conditions need the same questions")
    d = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_mean(d, draws, seed, alpha)
    return sum(d) / len(d), lo, hi


def per_question(values: Sequence[float], samples: int) -> list[list[float]]:
    """Consecutive groups of `samples` values (evaluate.py's layout: samples of a prompt are adjacent)."""
    return [list(values[i : i + samples]) for i in range(0, len(values), samples)]
