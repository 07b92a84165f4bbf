"""The code sandbox against a policy's cheap ways to score without solving the task (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from dllm_rl.rewards import code as code_module
from dllm_rl.rewards.code import _child_spec, code_reward, extract_code, normalize_tests, run_tests

FAST = {"timeout": 1.0, "max_total": 8.0}
SQ_TESTS = ["assert sq(3) == 9", "assert sq(2) == 4"]
WRONG = "def sq(x):\n    return -1\n"


def _score(code: str, **columns) -> float:
    columns.setdefault("test_cases", [SQ_TESTS])
    return code_reward(["p"], ["```python\n" + code + "\n```"], **columns, **FAST)[0]


# C1: the program cannot rewrite the verdicts the harness reports
TAMPERING = {
    "os.write": "import os\n_w = os.write\nos.write = lambda fd, b: _w(fd, b.replace(b'false', b'true'))\n",
    "json.dumps": (
        "import json\n_d = json.dumps\n"
        "def d(o, *a, **k):\n"
        "    if isinstance(o, list) and len(o) == 3:\n"
        "        o = [o[0], o[1], True]\n"
        "    return _d(o, *a, **k)\n"
        "json.dumps = d\n"
    ),
    "__main__ runner": (
        "import sys\nm = sys.modules['__main__']\n_o = m._Runner.report\n"
        "m._Runner.report = lambda s, i, p: _o(s, i, True)\n"
    ),
    "builtins": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.bool = lambda x: True\n",
}


@pytest.mark.parametrize("patch", list(TAMPERING.values()), ids=list(TAMPERING))
def test_patching_the_reporting_does_not_change_verdicts(patch):
    patch = "try:\n" + textwrap.indent(patch, "    ") + "except Exception:\n    pass\n"  # `__main__`: no harness
    assert _score(WRONG) == 0.0
    assert _score(WRONG + patch) == 0.0
    assert _score("def sq(x):\n    return x * x\n" + patch) == 1.0  # a right solution still passes


def test_results_written_earlier_cannot_be_read_back_to_forge_later_ones():
    # the test function reads the result lines (and their nonce) through the inherited descriptor
    forger = textwrap.dedent(
        """
        import os, json
        def sq(x):
            for fd in range(3, 64):
                try:
                    data = os.pread(fd, 1 << 16, 0)
                except OSError:
                    continue
                for line in data.decode(errors="replace").splitlines():
                    try:
                        nonce = json.loads(line)[0]
                    except Exception:
                        continue
                    for i in range(5):
                        os.write(fd, (json.dumps([nonce, i, True]) + "\\n").encode())
            return -1
        """
    )
    tests = ["assert True", "assert sq(3) == 9", "assert sq(2) == 4"]
    assert run_tests(forger, tests, **FAST).passed == [True, False, False]


def test_stdio_expected_outputs_stay_in_the_parent():
    cases = [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]
    spec = normalize_tests(cases)
    assert "3" not in json.dumps(_child_spec(spec)["cases"]) and _child_spec(spec)["cases"] == ["1 2", "2 2"]
    patch = TAMPERING["os.write"]
    assert _score(patch + "print(0)", test_cases=[cases]) == 0.0
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert _score(patch + right, test_cases=[cases]) == 1.0
    # the comparison is unchanged: lines with surrounding whitespace, else tokens
    assert run_tests("print(' 3 ')\nprint()", [{"input": "", "output": "3\n"}], **FAST).passed == [True]
    assert run_tests("print(1, 2)", [{"input": "", "output": "1\n2"}], **FAST).passed == [True]
    assert run_tests("print(12)", [{"input": "", "output": "1 2"}], **FAST).passed == [False]


# C2: a result of the program's own class cannot pass a call-based test by its __eq__
def test_call_based_results_are_compared_as_plain_data():
    call = [{"inputs": [[1, 2], [2, 2]], "outputs": [3, 4], "fn_name": "add"}]
    always = {
        "int subclass": "class E(int):\n    def __eq__(s, o):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return E(0)\n",
        "object": "class E:\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return E()\n",
        "list subclass": "class E(list):\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return E()\n",
    }
    for name, program in always.items():
        assert _score(program, test_cases=None, tests=call) == 0.0, name
    assert _score("def add(a, b):\n    return a + b\n", test_cases=None, tests=call) == 1.0
    shapes = [{"inputs": [[1], [2]], "outputs": [[[1, 2]], 0.30000001], "fn_name": "f"}]
    program = "def f(x):\n    return (1, 2) if x == 1 else 0.1 + 0.2\n"  # tuple as list, float tolerance
    assert _score(program, test_cases=None, tests=shapes) == 1.0


# C3: limits above the machine's hard limits are capped, and a harness failure is not silent
@pytest.mark.parametrize("limit", ["RLIMIT_FSIZE, (8_000_000, 8_000_000)", "RLIMIT_CPU, (2, 3)"])
def test_lower_hard_limits_are_respected(limit):
    script = (
        f"import resource; resource.setrlimit(resource.{limit})\n"
        "from dllm_rl.rewards.code import code_reward\n"
        "print(code_reward(['p'], ['def sq(x): return x * x'], test_cases=[['assert sq(3) == 9']],"
        " timeout=1.0, max_total=5.0))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[1.0]", out.stderr[-500:]


def test_a_failing_harness_warns(tmp_path, monkeypatch):
    broken = tmp_path / "_code_harness.py"
    broken.write_text("raise OSError('cannot set the resource limits here')\n")
    monkeypatch.setattr(code_module, "HARNESS", str(broken))
    monkeypatch.setattr(code_module, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert code_reward(["p"], ["def sq(x): return x * x"], test_cases=[SQ_TESTS], **FAST) == [0.0]
        assert code_reward(["p"], ["def sq(x): return x"], test_cases=[SQ_TESTS], **FAST) == [0.0]
    messages = [str(w.message) for w in caught if "harness failed" in str(w.message)]
    assert len(messages) == 1 and "cannot set the resource limits here" in messages[0]


# C4: code extraction
@pytest.mark.parametrize(
    "completion",
    [
        "Use ```print``` to show it.\n```python\ndef sq(x):\n    return x * x\n```\n",
        "```python\ndef sq(x):\n    return x * x\n```\nOutput:\n```\n9\n```\n",
        "1. Define it:\n\n   ```python\n   def sq(x):\n       return x * x\n   ```\n",
        "~~~python\ndef sq(x):\n    return x * x\n~~~\n",
        "```\ndef sq(x):\n    return x\n```\nor better:\n```\ndef sq(x):\n    return x * x\n```",
    ],
    ids=["inline-fence-first", "untagged-output-after", "indented-in-list", "tildes", "untagged-only"],
)
def test_extract_code_shapes(completion):
    assert extract_code(completion) == "def sq(x):\n    return x * x\n"


def test_extract_code_keeps_its_rules():
    assert extract_code("```python\nx = 1\n```\n```py\nx = 2") == "x = 2"  # last tagged block, truncated
    assert extract_code("```cpp\nint main() {}\n```") == ""
    assert extract_code("no code here ```js\nx\n```") == ""
    assert extract_code("print(2)") == "print(2)"


# S1: _posixsubprocess.fork_exec raises no audit event; it is refused, and so is a fresh copy of the module
def test_fork_exec_is_refused(tmp_path):
    marker = tmp_path / "spawned"
    program = textwrap.dedent(
        f"""
        import _posixsubprocess, importlib.util, os, sys

        def spawn(fork_exec):
            r, w = os.pipe()
            argv = [b"/bin/sh", b"-c", b"echo x > {marker}"]
            pid = fork_exec(argv, argv[:1], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, True, True, -1,
                            None, None, None, -1, None, False)
            os.close(r), os.close(w)
            return pid

        def fresh():
            del sys.modules["_posixsubprocess"]
            import _posixsubprocess as again
            return again.fork_exec

        def from_spec():
            spec = importlib.util.find_spec("_posixsubprocess")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.fork_exec
        """
    )
    tests = [
        "import subprocess",  # importing subprocess still works
        "spawn(_posixsubprocess.fork_exec)",
        "spawn(fresh())",
        "spawn(from_spec())",
    ]
    assert run_tests(program, tests, **FAST).passed == [True, False, False, False]
    assert not marker.exists()
    if sys.version_info[:2] == (3, 11):  # the call above is 3.11's fork_exec: outside the sandbox it spawns
        namespace = {}
        exec(program, namespace)
        os.waitpid(namespace["spawn"](namespace["_posixsubprocess"].fork_exec), 0)
        assert marker.exists()
