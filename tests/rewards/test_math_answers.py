"""The math reward's final answer: whole <answer> contents (fractions, roots, tuples) reach math-verify; prose and
untagged text fall back to the last number, with the sign read only where it is a sign."""

import pytest

from dllm_rl.rewards.math import final_answer, math_reward
from dllm_rl.tasks.answers import answer_key


@pytest.mark.parametrize(
    "completion, reference, reward",
    [
        (r"<answer>\frac{3}{4}</answer>", "0.75", 1.0),
        (r"<answer>-\frac{1}{2}</answer>", "-0.5", 1.0),
        (r"<answer>\frac{1}{2}</answer>", "2", 0.0),  # the last number of a fraction is not its value
        (r"<answer>\sqrt{2}</answer>", "2", 0.0),
        ("<answer>x^2+1</answer>", "1", 0.0),
        ("<answer>(1, 2)</answer>", "(1, 2)", 1.0),
        ("<answer>(1, 2)</answer>", "2", 0.0),
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>so 72 clips</answer>", "72", 1.0),
        (r"<answer>\text{72 dollars}</answer>", "72", 1.0),
        ("<answer>3</answer> then 7", "3", 1.0),
        ("The answer is \u22125.", "-5", 1.0),  # the Unicode minus sign
        ("so 10-5", "-5", 0.0),  # a minus between operands is not a sign
        ("#### 1,000", "1000", 1.0),
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    ],
)
def test_math_reward_reads_the_answer_a_completion_commits_to(completion, reference, reward):
    assert math_reward(["q"], [completion], answer=[reference]) == [reward]


def test_majority_keys_tell_fractions_apart():
    key = answer_key("math")
    assert key(r"<answer>\frac{1}{2}</answer>") != key(r"<answer>\frac{3}{2}</answer>")
    assert key("<answer> 72 </answer>") == key("so it is 72") == "72"
    assert final_answer("<answer></answer>") == ""


def test_reasoning_gym_majority_keys_are_the_answers_not_the_whole_text():
    key = answer_key("reasoning_gym/chain_sum")
    assert key("first try <answer>7</answer>") == key("so <answer> 7 </answer>") == "7"
    assert key("no tags at all") == "no tags at all"  # as the reward reads it: the whole stripped text


def test_answers_match_off_the_main_thread():
    # math-verify's timeouts use signal.alarm, main thread only: elsewhere the comparison must still be symbolic
    import threading

    from dllm_rl.rewards.math import answers_match

    out = {}
    worker = threading.Thread(target=lambda: out.update(ok=answers_match("0.5", "\\frac{1}{2}")))
    worker.start()
    worker.join()
    assert out == {"ok": True}


@pytest.mark.parametrize(
    "a, b, reference",
    [
        ("0.5", r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        ("1000", r"\boxed{1,000}", "1000"),
        ("72", "72.0", "72"),
        ("<answer>$72</answer>", "72", "72"),
        (r"\boxed{x = 3}", "3", "3"),
        ("<answer>50%</answer>", "50", "50"),
    ],
)
def test_majority_keys_merge_answers_the_verifier_takes_for_one(a, b, reference):
    assert math_reward(["q", "q"], [a, b], answer=[reference] * 2) == [1.0, 1.0]
    key = answer_key("math")
    assert key(a) == key(b)


def test_majority_keys_part_answers_the_verifier_scores_differently():
    from dllm_rl.evalstats import vote

    key = answer_key("math")
    spaced, plain = "<answer>1 000</answer>", "<answer>1000</answer>"
    assert math_reward(["q", "q"], [spaced, plain], answer=["1000"] * 2) == [0.0, 1.0]
    assert key(spaced) != key(plain)
    # a vote of 0.5, 1/2, 3, 3 against 1/2 is a tie between two answers, not a win for 3
    texts = ["0.5", r"\boxed{\frac{1}{2}}", "3", "3"]
    scores = math_reward(["q"] * 4, texts, answer=[r"\frac{1}{2}"] * 4)
    assert scores == [1.0, 1.0, 0.0, 0.0] and vote([key(t) for t in texts], scores) == 0.5
    # wherever two of these completions share a key, the verifier scores them alike against each reference
    texts = ["0.5", "1/2", "0.50", "2", "2.0", "\\sqrt{4}", "<answer>x = 2</answer>", "<answer>(1, 2)</answer>", "x+1"]
    for reference in ["0.5", "2", "(1, 2)", "x+1"]:
        scores = math_reward(["q"] * len(texts), texts, answer=[reference] * len(texts))
        by_key = {}
        for t, s in zip(texts, scores):
            by_key.setdefault(key(t), set()).add(s)
        assert all(len(s) == 1 for s in by_key.values()), (reference, by_key)
