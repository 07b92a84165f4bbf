"""Rewards: the code sandbox (real subprocesses, no mocks) and dllm_rl.rewards.plugins's TRL-compatible contract."""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np
import pytest

from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.rewards import REWARDS, code_reward
from dllm_rl.rewards.code import run_tests, sandbox_info
from dllm_rl.rewards.plugins import Reward, build_rewards, compute_rewards, resolve_reward

NAMESPACES = sandbox_info()["network"] == "namespace"


# ---------------------------------------------------------------- the sandbox


def test_correct_solution_passes_and_wrong_one_fails():
    tests = ["assert fib(1) == 1", "assert fib(10) == 55", "assert fib(20) == 6765"]
    right = (
        "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```"
    )
    wrong = "```python\ndef fib(n):\n    return n\n```"
    assert code_reward(["p"] * 2, [right, wrong], test_cases=[tests] * 2) == [1.0, pytest.approx(1 / 3)]
    assert code_reward(["p"] * 2, [right, wrong], test_cases=[tests] * 2, binary=True) == [1.0, 0.0]


def test_stdin_stdout_tests_in_the_open_r1_and_apps_formats():
    program = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\nexit(0)"
    info = {
        "language": "python",
        "test_cases": [{"input": "1 2\n", "output": "3\n", "type": "stdin_stdout"}, {"input": "5 5", "output": "11"}],
    }
    apps = '{"inputs": ["1 2\\n", "4\\n5\\n"], "outputs": ["3\\n", "9\\n"]}'
    out = code_reward(["p"] * 2, [program] * 2, verification_info=[info, None], input_output=[None, apps])
    assert out == [0.5, 1.0]
    # open(0) and the binary buffer read the same stdin, case after case
    reads_fd = "data = open(0).read().split()\nprint(int(data[0]) * 2)"
    cases = [{"input": "3", "output": "6"}, {"input": "4", "output": "8"}]
    assert run_tests(reads_fd, cases).passed == [True, True]


def test_test_files_kodcode_humaneval_and_call_based():
    solution = "def add(a, b):\n    return a + b\n"
    kodcode = (
        "from solution import add\nimport pytest\n\ndef test_small():\n    assert add(1, 2) == 3\n\n"
        "def test_raises():\n    with pytest.raises(TypeError):\n        add(1, 'x')\n\n"
        "def test_wrong():\n    assert add(2, 2) == 5\n"
    )
    assert run_tests(solution, kodcode).passed == [True, True, False]
    humaneval = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"
    assert code_reward(["p"], [solution], test=[humaneval], entry_point=["add"]) == [1.0]
    leetcode = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    call = {"inputs": [[1, 2], [3, 4]], "outputs": [[3], 7], "fn_name": "add"}
    assert code_reward(["p"] * 2, [solution, leetcode], tests=[call] * 2) == [1.0, 1.0]


def test_an_exit_inside_a_test_fails_it_and_a_whole_program_may_exit_cleanly():
    # a solution that exits with status 0 when called must not pass the tests it stops (reward hacking)
    quitter = "def add(a, b):\n    raise SystemExit(0)\n"
    assert run_tests(quitter, ["assert add(1, 2) == 3"]).passed == [False]
    assert run_tests(quitter, "from solution import add\ndef test_one():\n    assert add(1, 2) == 3\n").passed == [
        False
    ]
    pytest_class = "class TestAdd:\n    def test_one(self):\n        assert add(1, 2) == 3\n"
    assert run_tests(quitter, pytest_class).passed == [False]
    call = {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}
    assert code_reward(["p"], [quitter], tests=[call]) == [0.0]
    # a program run as __main__ (stdin/stdout) that prints its answer and exits 0 passes, as a process would
    program = "import sys\nprint(2 * int(input()))\nsys.exit(0)\nprint('unreached')\n"
    assert code_reward(["p"], [program], test_cases=[[{"input": "3", "output": "6"}]]) == [1.0]


def test_a_program_that_runs_main_in_a_thread_passes_every_stdin_case():
    # the competitive-programming idiom: the interpreter joins the thread at exit, and so does each case
    threaded = (
        "import threading, sys\ndef main():\n    n = int(input()); print(n * 2)\n"
        "threading.Thread(target=main).start()\n"
    )
    cases = [{"input": str(n), "output": str(2 * n)} for n in (3, 4, 5)]
    completions = [f"{threaded}# variant {k}\n" for k in range(3)]  # distinct, so none is deduplicated
    assert code_reward(["p"] * 3, completions, test_cases=[cases] * 3) == [1.0, 1.0, 1.0]
    # threads started by threads are joined too; a thread still running at the per-test timeout fails its case
    nested = "import threading\ndef main():\n    threading.Thread(target=lambda: print(2 * int(input()))).start()\n"
    stuck = "import threading\ndef main():\n    n = int(input())\n    while n == 4:\n        pass\n    print(2 * n)\n"
    start = time.monotonic()
    assert run_tests(nested + "threading.Thread(target=main).start()", cases).passed == [True] * 3
    assert run_tests(stuck + "threading.Thread(target=main).start()", cases, timeout=0.5).passed == [True, False, True]
    assert time.monotonic() - start < 4.0


@pytest.mark.parametrize(
    "tests",
    [
        "class TestAdd:\n    def test_one(self):\n        assert add(1, 2) == 3\n",
        "import unittest\nclass T(unittest.TestCase):\n    def test_one(self):\n        self.assertEqual(add(1, 2), 3)",
        "if __name__ == '__main__':\n    assert add(1, 2) == 3\n",
    ],
    ids=["pytest-class", "unittest-class", "main-block"],
)
def test_test_classes_and_main_blocks_in_a_test_file_are_run(tests):
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    assert code_reward(["p"] * 2, [right, wrong], test=[tests] * 2) == [1.0, 0.0]


def test_test_class_methods_run_with_their_fixtures_each_one_test():
    solution = "def add(a, b):\n    return a + b\n"
    pytest_style = (
        "class TestAdd:\n"
        "    def setup_method(self, method):\n        self.name = method.__name__\n"
        "    def teardown_method(self):\n        assert self.name\n"
        "    def test_one(self):\n        assert self.name == 'test_one' and add(1, 2) == 3\n"
        "    def test_wrong(self):\n        assert add(2, 2) == 5\n"
        "class TestSkipped:\n    def __init__(self):\n        pass\n    def test_never(self):\n        assert False\n"
        "def test_function():\n    assert add(0, 0) == 0\n"
    )
    # functions first, then the classes' methods in file order; pytest does not collect a class with __init__
    assert run_tests(solution, pytest_style).passed == [True, True, False]
    unittest_style = (
        "import unittest\nclass Base(unittest.TestCase):\n"
        "    @classmethod\n    def setUpClass(cls):\n        cls.expected = 3\n"
        "    def setUp(self):\n        self.got = add(1, 2)\n"
        "    def test_ok(self):\n        self.assertEqual(self.got, self.expected)\n"
        "    @unittest.skip('a skip counts as a failure')\n    def test_skipped(self):\n        pass\n"
        "    def test_wrong(self):\n        self.assertEqual(self.got, 4)\n"
        "class Derived(Base):\n    def test_derived(self):\n        self.assertEqual(self.got, 3)\n"
        "if __name__ == '__main__':\n    unittest.main()\n"
    )
    assert run_tests(solution, unittest_style).passed == [True, False, False, True]
    # the solution cannot turn a failing unittest test into a pass by skipping it
    skips = "import unittest\ndef add(a, b):\n    raise unittest.SkipTest('no')\n"
    assert run_tests(skips, unittest_style).passed == [False] * 4


def test_a_test_file_without_tests_runs_as_a_script_and_passes_on_a_clean_exit():
    solution = "def add(a, b):\n    return a + b\n"
    exits = [f"import sys\nif __name__ == '__main__':\n    sys.exit({status})\n" for status in (0, 1)]
    assert [run_tests(solution, tests).passed for tests in exits] == [[True], [False]]
    assert run_tests(solution, "x = add(1, 2)\nif x != 3:\n    raise SystemExit('wrong')\n").passed == [True]


def test_a_check_function_without_an_entry_point_scores_none_with_one_warning(monkeypatch):
    import warnings

    from dllm_rl.rewards import code

    monkeypatch.setattr(code, "_WARNED", set())
    check = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert code_reward(["p"] * 2, [right, wrong], test=[check] * 2) == [None, None]
        assert code_reward(["p"], [wrong], test=[check]) == [None]
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "entry_point" in messages[0]  # one warning, however many rows
    assert code_reward(["p"] * 2, [right, wrong], test=[check] * 2, entry_point=["add"] * 2) == [1.0, 0.0]


def test_rows_without_tests_or_in_another_language_score_none():
    cpp = {"language": "cpp", "test_cases": [{"input": "", "output": ""}]}
    out = code_reward(["p"] * 3, ["x = 1"] * 3, test_cases=[None, [], None], verification_info=[None, None, cpp])
    assert out == [None, None, None]
    with pytest.raises(ValueError, match="test column"):
        code_reward(["p"], ["x = 1"])


def test_an_infinite_loop_is_killed_within_the_limit_and_scores_zero():
    start = time.monotonic()
    loop = "def f():\n    while True:\n        pass"
    assert code_reward(["p"], [loop], test_cases=[["assert f()"]], timeout=0.5) == [0.0]
    assert time.monotonic() - start < 2.0  # the per-test alarm
    # a program that ignores the alarm is killed by the parent at the wall budget (0.25 * 1 test + 2 s)
    stubborn = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" + loop
    start = time.monotonic()
    result = run_tests(stubborn, ["assert f()"], timeout=0.25)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.passed == [False] and result.returncode == -9  # SIGKILL
    assert 2.2 < elapsed < 4.0


def test_a_memory_bomb_is_stopped_and_the_process_survives_it():
    bomb = "def f():\n    hoard = []\n    while True:\n        hoard.append(bytearray(1 << 20))\n"
    start = time.monotonic()
    result = run_tests(bomb, ["assert f()", "assert 1 + 1 == 2"], memory_mb=160, timeout=10)
    assert result.passed == [False, True] and not result.timed_out  # MemoryError, then the next test ran
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace", "audit-hook"])
def test_opening_a_network_socket_fails(namespaces):
    connect = (
        "import socket\ndef f():\n    socket.create_connection(('1.1.1.1', 53), timeout=2).close()\n    return True"
    )
    lookup = "import socket\ndef f():\n    return socket.getaddrinfo('localhost', 80)"
    result = run_tests(
        connect + "\n" + lookup.replace("def f", "def g"), ["assert f()", "assert g()"], namespaces=namespaces
    )
    assert result.passed == [False, False]


@pytest.mark.skipif(not NAMESPACES, reason="unshare cannot create namespaces on this machine")
def test_the_namespace_has_no_interface_but_a_downed_loopback():
    # if_nameindex reads the namespace's interfaces through netlink, below the audit hook
    program = "import socket\ndef f():\n    return socket.if_nameindex()"
    assert run_tests(program, ["assert f() == [(1, 'lo')]"]).passed == [True]


def test_processes_and_signals_are_refused_and_exit_does_not_fake_a_pass():
    spawn = (
        "import subprocess, os\ndef f():\n    return subprocess.run(['true']).returncode == 0\n"
        "def g():\n    return os.fork() >= 0\ndef h():\n    os.kill(os.getppid(), 9)\n    return True"
    )
    assert run_tests(spawn, ["assert f()", "assert g()", "assert h()"]).passed == [False, False, False]
    assert run_tests("import sys\nsys.exit(0)\ndef f():\n    return 1", ["assert f() == 1"]).passed == [False]
    quits = "import os\ndef f():\n    os._exit(0)"
    assert run_tests(quits, ["assert f()", "assert True"]).passed == [False, False]


def test_files_land_in_a_temp_dir_that_is_removed_and_the_environment_is_clean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLLM_RL_TEST_SECRET", "do-not-leak")
    program = (
        "import os, tempfile\n"
        "def write():\n"
        "    open('out.txt', 'w').write('x')\n"
        "    os.makedirs('locked/inner')\n"
        "    os.chmod('locked', 0)\n"
        "    return os.path.exists('out.txt')\n"
    )
    tests = [
        "assert write()",
        f"assert os.getcwd() != {str(tmp_path)!r}",
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']",
        "assert 'DLLM_RL_TEST_SECRET' not in os.environ",
    ]
    result = run_tests(program, tests)
    assert result.passed == [True] * 4
    assert not os.path.exists(result.workdir) and not os.path.exists(os.path.dirname(result.workdir))
    assert list(tmp_path.iterdir()) == []


def test_completions_as_chat_messages_run_in_parallel_and_duplicates_once():
    good = [{"role": "assistant", "content": "```python\ndef neg(x):\n    return -x\n```"}]
    bad = [{"role": "assistant", "content": "no code here ```js\nx\n```"}]
    metrics = {}
    out = code_reward(
        ["p"] * 5,
        [good, good, bad, good, good],
        test_cases=[["assert neg(2) == -2"]] * 5,
        max_workers=2,
        log_metric=lambda name, value: metrics.setdefault(name, value),
    )
    assert out == [1.0, 1.0, 0.0, 1.0, 1.0] and metrics == {"code/timed_out": 0.0}


def test_code_and_format_rewards_are_registered():
    for name in ("code", "code_format", "format_strict", "format_soft", "xml_count", "format_think"):
        assert resolve_reward(name) is REWARDS[name]
    think = "<think>\nhmm\n</think>\n<answer>\n4\n</answer>\n"
    rewards = build_rewards([], {n: REWARDS[n] for n in ("format_strict", "format_soft", "xml_count")})
    total, per_fn = compute_rewards(rewards, ["q"], [think.replace("think", "reasoning")], [[1]], {})
    assert per_fn[:, 0].tolist() == [0.5, 0.5, 0.5] and total.item() == 1.5
    assert REWARDS["format_think"](["q"], [think]) == [0.5]
    assert REWARDS["format_strict"](["q"], [think], tag="think") == [0.5]


# ---------------------------------------------------------------- dllm_rl.rewards.plugins: TRL's contract


def test_resolve_by_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
        "@dataclass\nclass Scale:\n    value: float = 2.0\n\n"
        "def length(prompts, completions, **kwargs):\n"
        "    return [Scale().value * len(c) for c in completions]\n"
    )
    fn = resolve_reward(f"{path}:length")
    assert fn(["p"], ["abc"]) == [6.0]
    with pytest.raises(ConfigError, match="no function 'missing'"):
        resolve_reward(f"{path}:missing")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_reward(f"{tmp_path / 'nope.py'}:length")


def test_resolve_by_module_path_and_tell_it_from_a_file_path(tmp_path, monkeypatch):
    """`package.module:function` imports an installed module; `path/to/file.py:function` (a .py name, a path
    separator, or an existing file) loads a file."""
    import trl.rewards

    assert resolve_reward("trl.rewards:accuracy_reward") is trl.rewards.accuracy_reward
    assert resolve_reward("trl.rewards.format_rewards:think_format_reward") is trl.rewards.think_format_reward
    (tmp_path / "local_rewards.py").write_text(
        "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("local_rewards:one")(["p"], ["c"]) == [1.0]  # importable module
    assert resolve_reward("local_rewards.py:one")(["p"], ["c"]) == [1.0]  # the same code, as a file
    with pytest.raises(ConfigError, match="module 'trl.rewards' has no function 'nope'"):
        resolve_reward("trl.rewards:nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.sub'"):
        resolve_reward("no_such_pkg.sub:fn")
    with pytest.raises(ConfigError, match="file 'sub/nope' does not exist"):
        resolve_reward("sub/nope:fn")


def test_unknown_name_lists_the_valid_ones_with_a_did_you_mean():
    with pytest.raises(ConfigError) as err:
        resolve_reward("xml_cont")
    message = str(err.value)
    assert "did you mean 'xml_count'" in message
    assert all(name in message for name in REWARDS) and "file.py:function" in message


def test_a_trl_reward_runs_unchanged_and_receives_exactly_trls_keywords():
    seen, extra, metrics = {}, {}, {}

    def trl_reward(prompts, completions, completion_ids, answer, trainer_state, **kwargs):
        seen.update(
            kwargs,
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            answer=answer,
            trainer_state=trainer_state,
        )
        kwargs["log_extra"]("extracted", [c[-1:] for c in completions])
        kwargs["log_metric"]("mean_len", sum(map(len, completions)) / len(completions))
        return [float(c.endswith(a)) for c, a in zip(completions, answer)]

    state = object()
    prompts = ["2+2=", "3+3="]
    columns = {"prompt": prompts, "answer": ["4", "6"], "level": [1, 2]}
    total, per_fn = compute_rewards(
        [Reward("trl", trl_reward)],
        prompts,
        ["so 4", "so 5"],
        [[7, 8], [9]],
        columns,
        trainer_state=state,
        log_extra=lambda col, vals: extra.update({col: vals}),
        log_metric=lambda name, value: metrics.update({name: value}),
    )
    # TRL 1.16 passes every dataset column but prompt/completion/completion_ids, plus these
    assert set(seen) == {
        "prompts",
        "completions",
        "completion_ids",
        "answer",
        "level",
        "trainer_state",
        "log_extra",
        "log_metric",
    }
    assert seen["completions"] == ["so 4", "so 5"] and seen["completion_ids"] == [[7, 8], [9]]
    assert seen["trainer_state"] is state and seen["level"] == [1, 2]
    assert total.tolist() == [1.0, 0.0] and per_fn.shape == (1, 2)
    assert extra == {"extracted": ["4", "5"]} and metrics == {"mean_len": 4.0}


def test_conversational_prompts_give_message_list_completions():
    got = []

    def reward(prompts, completions, **kwargs):
        got.extend(completions)
        return [1.0] * len(completions)

    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    compute_rewards([Reward("r", reward)], prompts, ["a", "b"], [[1], [2]], {})
    assert got == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]


@pytest.mark.parametrize(
    "bad, problem",
    [
        (lambda prompts, completions, **kw: 1 / 0, "raised ZeroDivisionError"),
        (lambda prompts, completions, **kw: [1.0], "list of length 1"),
        (lambda prompts, completions, **kw: [1.0, math.inf], "returned inf"),
        (lambda prompts, completions, **kw: [1.0, "1.0"], "returned '1.0'"),
    ],
)
def test_a_broken_reward_raises_an_error_naming_the_reward_and_the_prompt(bad, problem):
    with pytest.raises(DllmRlError) as err:
        compute_rewards([Reward("my_reward", bad)], ["What is 2+2?", "What is 3+3?"], ["4", "5"], [[1], [2]], {})
    message = str(err.value)
    assert "'my_reward'" in message and problem in message and "What is" in message


def test_none_is_skipped_in_the_weighted_sum_and_numpy_scalars_are_accepted():
    rewards = [
        Reward("a", lambda prompts, completions, **kw: [1.0, None, None], weight=2.0),
        Reward("b", lambda prompts, completions, **kw: [np.float32(0.5), 0.25, None], weight=1.0),
    ]
    total, per_fn = compute_rewards(rewards, ["p"] * 3, ["x"] * 3, [[1]] * 3, {})
    assert total[:2].tolist() == [2.5, 0.25]  # TRL's nansum over the functions that scored the row
    assert math.isnan(total[2].item())  # no function scored it: unscorable (TRL), not 0
    assert math.isnan(per_fn[0, 1].item()) and math.isnan(per_fn[1, 2].item())


def test_async_reward_functions_work():
    async def judge(prompts, completions, answer, **kwargs):
        await asyncio.sleep(0)
        return [float(c == a) for c, a in zip(completions, answer)]

    total, _ = compute_rewards([Reward("judge", judge)], ["p", "p"], ["4", "5"], [[1], [2]], {"answer": ["4", "4"]})
    assert total.tolist() == [1.0, 0.0]


def test_reward_weights_weigh_the_recipes_rewards_as_trl_weighs_its_reward_funcs():
    """TRL's reward_weights apply to every reward function; a recipe's rewards are those functions here."""
    from dllm_rl.config import RewardSpec

    specs = [RewardSpec("sudoku"), RewardSpec("format_strict")]
    assert [r.weight for r in build_rewards(specs, None, [0.0, 2.0])] == [0.0, 2.0]
    assert [r.weight for r in build_rewards(specs, None, None)] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="2 weights for 1 rewards"):
        build_rewards(specs[:1], None, [1.0, 2.0])
    with pytest.raises(ConfigError, match="both weight the recipe's rewards"):
        build_rewards([RewardSpec("sudoku", weight=3.0)], None, [1.0])
