"""Code reward: run the completion's Python code against the row's tests in a sandboxed subprocess.

Score = the fraction of tests passed (open-r1's `code` reward, DiffuCoder arXiv:2506.20639), or 1/0 for
all-pass with `binary=True` (open-r1's `binary_code`). Where they differ from those: tests run here, in a
local subprocess, not in E2B; one process runs all of a completion's tests (each under its own alarm) instead
of one process per test; and the code is scored whatever the completion's format (DiffuCoder scores 0 when its
format reward is below 1; add `code_format` as a second reward for that).

Test columns (the first one present and not None in a row is used; a row with none scores None):

- `verification_info` (open-r1, PRIME): a dict with `test_cases` (and `language`: rows in another language
  score None), optionally `fn_name`;
- `test_cases` (AceCode, DiffuCoder), `test_list` (MBPP), `tests`: a list of assert statements (each string
  one test), a list of `{"input", "output"}` stdin/stdout pairs, or an APPS dict `{"inputs", "outputs"}` with
  an optional `fn_name` (call-based tests: `fn(*args) == expected`);
- `input_output` (APPS, TACO): that dict as a JSON string;
- `test` (KodCode, HumanEval): test code, run with `__name__ == "dllm_rl_tests"`. Its tests are its top-level
  asserts; its top-level `test*` functions (called with no arguments: pytest fixtures and parametrize are not
  supported); the `test*` methods defined in the body of its top-level test classes: pytest's (named `Test*`,
  no `__init__`: a fresh instance per test, with `setup_method`/`teardown_method` around it) and unittest's
  (a class whose base is named `TestCase`, or such a class of the same file: unittest runs each method, with
  `setUp`/`tearDown` and the class fixtures; a skipped test fails, since the solution can raise `SkipTest`);
  and, with an `entry_point` column, HumanEval's `check(candidate)`. A file with a `check` function but no
  other test and no `entry_point` cannot be run: the row scores None (with a warning, once). A file with no
  test at all is one test: it runs as `__main__` (so its `if __name__ == "__main__":` block runs) and passes
  when it finishes, or exits with status 0. The solution is importable as `solution` (`from solution import
  f`) and its names are also visible directly.

Any of these may also be a JSON string. Stdin/stdout outputs match when their stripped lines are equal or
their whitespace-separated tokens are. A call-based result must be plain data (what `json.dumps` writes:
numbers, strings, bools, None, lists, tuples, dicts; numpy arrays and scalars are converted), compared as
JSON (tuples as lists, dict keys as strings, floats within 1e-6); anything else fails the test. A test
passes when it returns; an `exit()` inside a test (the solution's function calling it) fails it, while a whole
program (a stdin/stdout case, a test file run as `__main__`, the solution's own top level) may exit with
status 0.

What the sandbox guarantees (each run):

- a fresh temporary directory as working directory, `HOME` and `TMPDIR`, removed afterwards (whatever the
  program did to its permissions);
- `python -I` (no PYTHON* variables, no user site, no script dir on `sys.path`) with a clean environment:
  only PATH, HOME, TMPDIR, locale, one-thread BLAS settings, and proxy variables pointing at 127.0.0.1:9;
- resource limits the child sets on itself before running any of the program: RLIMIT_AS (`memory_mb`,
  default 1024), RLIMIT_CPU (the wall budget), RLIMIT_FSIZE (`fsize_mb`, default 16), RLIMIT_CORE 0, each
  capped at the hard limit already in force (one that still cannot be set is left as it is, noted on the
  child's stderr). A run whose harness fails before reporting any result warns once (with its stderr);
- a per-test alarm (`timeout` seconds, default 3) and a wall-clock budget for the whole run
  (`timeout * n_tests + 2` s, at most `max_total`, default 60 s) after which the parent kills the child's
  whole process group with SIGKILL; tests without a result count as failed;
- no network, when `unshare` can create namespaces here (root, or unprivileged user namespaces): the child
  runs in new network and PID namespaces, so it has only a downed loopback interface, and every process it
  started dies with it. `sandbox_info()` says which. Without namespaces, network is refused only by the
  Python-level audit hook below and the dead proxy variables;
- a Python audit hook (PEP 578) that refuses sockets other than AF_UNIX, DNS lookups, subprocesses,
  `fork`/`exec`/`system` and `os.kill`; `_posixsubprocess.fork_exec`, which raises no audit event, is
  replaced by a refusing function before the program runs, and importing a fresh copy of that module is
  refused (`import subprocess` still works);
- verdicts the program cannot rewrite by name: the harness is not `sys.modules["__main__"]`, resolves its
  builtins through a private copy, compiles the tests before the solution runs, and writes results with an
  `os.write` bound before the program loads, to an unlinked file inherited as a write-only descriptor, one
  line per test carrying a nonce the program is not given (only the first line per test counts). The
  expected outputs of stdin/stdout and call-based tests never reach the child: it reports digests of each
  stdout, or each call's result as JSON, and the parent compares them. The spec file holding the tests is
  deleted before the program starts.

What it does NOT guarantee: it is not a security boundary against a determined attacker. The program runs as
your user, with your filesystem (no mount namespace or chroot: it can read and write whatever you can; as
root, everything), and audit hooks are documented as bypassable (ctypes, C extensions, introspection of the
harness's frames or of `gc`'s objects, which reach the harness's functions and the nonce; as root,
reopening the results file through `/proc/self/fd`). Tests that the child judges itself (assert strings,
`test` files, unittest classes, HumanEval's `check`) run the program's own code when they compare: an object
whose `__eq__` always returns True passes `assert f(x) == y`, and a solution that patches what the tests
call (`unittest.TestCase.assertEqual`, the functions `check` uses) passes them; only call-based and
stdin/stdout tests are compared outside the program's reach. Run as root, the program can raise its own
limits back (the parent's wall-clock kill still holds). Without namespaces, raw
syscalls reach the network, and a process the program manages to start outlives the run if it leaves the
process group (`setsid`). RLIMIT_AS caps address space, so resident memory too, but libraries that reserve
large ranges (torch, JAX) may fail to import under the default: raise `memory_mb` for those. For code from
a hostile source use a real isolation layer (a container, gVisor, Firecracker, E2B).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ._text import completion_text

HARNESS = str(Path(__file__).with_name("_code_harness.py"))
TEST_COLUMNS = ("verification_info", "test_cases", "input_output", "test_list", "tests", "test")
_PY_TAGS = ("python", "python3", "py")
# a fence opens a line (after spaces or tabs: a block inside a list item) and closes at a line holding the same
# fence (or at the end of a truncated completion); a backtick fence's info string has no backtick (CommonMark),
# so an inline ```x``` is no fence
_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[\w+#.-]*)[^\n`]*\n(?P<body>.*?)"
    r"(?:^[ \t]*(?P=fence)[`~]*[ \t]*$|\Z)",
    re.S | re.M,
)
_PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
)


def extract_code(text: str) -> str:
    """The last fenced block tagged python (`python`, `python3`, `py`), else the last untagged one (so an
    untagged output block after the code does not replace it); an unclosed final fence counts (a truncated
    completion). Fences open a line, possibly indented (the block is dedented), with ``` or ~~~. The whole
    text when it has no fence at all; '' when it only has blocks in other languages.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("print(2)")
    'print(2)'
    >>> extract_code("```python\\nx = 1\\n```\\n```py\\nx = 2")  # truncated completion: the open block counts
    'x = 2'
    >>> extract_code("```cpp\\nint main() {}\\n```")
    ''
    >>> extract_code("```python\\nprint(9)\\n```\\nOutput:\\n```\\n9\\n```")
    'print(9)\\n'
    """
    blocks = [(m["tag"].lower(), m["body"]) for m in _FENCE.finditer(text)]
    if not blocks:
        return "" if "```" in text else text
    python = [body for tag, body in blocks if tag in _PY_TAGS] or [body for tag, body in blocks if not tag]
    return textwrap.dedent(python[-1]) if python else ""


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _io_cases(inputs, outputs, fn_name: str | None) -> dict:
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} test inputs but {len(outputs)} outputs")
    if fn_name:
        return {
            "kind": "call",
            "fn_name": fn_name,
            "cases": [[i if isinstance(i, list) else [i], o] for i, o in zip(inputs, outputs)],
        }
    return {"kind": "stdio", "cases": [[_text(i), _text(o)] for i, o in zip(inputs, outputs)]}


_WARNED: set[str] = set()


def _warn_once(message: str, key: str | None = None) -> None:
    if (key or message) not in _WARNED:
        _WARNED.add(key or message)
        warnings.warn(message, stacklevel=3)


def _is_testcase(cls: ast.ClassDef, testcases: set[str]) -> bool:
    """Whether a base of `cls` is named `TestCase` (`TestCase`, `unittest.TestCase`) or is a TestCase subclass
    defined earlier in the file."""
    return any(
        (isinstance(b, ast.Name) and (b.id == "TestCase" or b.id in testcases))
        or (isinstance(b, ast.Attribute) and b.attr == "TestCase")
        for b in cls.bases
    )


def _test_classes(tree: ast.Module) -> dict[str, list[str]]:
    """The top-level test classes pytest or unittest would collect, each with the `test*` methods defined in
    its body (inherited ones are not seen), in file order; a name defined twice keeps its last definition."""
    classes: dict[str, list[str]] = {}
    testcases: set[str] = set()
    for s in tree.body:
        if not isinstance(s, ast.ClassDef):
            continue
        methods = [m.name for m in s.body if isinstance(m, ast.FunctionDef)]
        if _is_testcase(s, testcases):
            testcases.add(s.name)
        elif not (s.name.startswith("Test") and "__init__" not in methods):  # pytest skips classes with __init__
            classes.pop(s.name, None)
            continue
        classes[s.name] = list(dict.fromkeys(m for m in methods if m.startswith("test")))
    return {name: methods for name, methods in classes.items() if methods}


def _module_tests(test_code: str, entry_point: str | None) -> dict:
    tree = ast.parse(test_code)  # the parent counts the tests, so a child that stops reporting fails them
    funcs = list(
        dict.fromkeys(s.name for s in tree.body if isinstance(s, ast.FunctionDef) and s.name.startswith("test"))
    )
    classes = _test_classes(tree)
    has_check = any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body)
    check = bool(entry_point) and has_check
    n = sum(isinstance(s, ast.Assert) for s in tree.body) + len(funcs) + sum(map(len, classes.values())) + check
    if n == 0 and has_check:  # HumanEval's check(candidate) without the name of the candidate: nothing to run
        _warn_once(
            "code reward: a `test` file whose only test is HumanEval's check(candidate) needs an `entry_point` "
            "column naming the function to check; such rows score None"
        )
    return {
        "kind": "module",
        "test_code": test_code,
        "entry_point": entry_point,
        "test_functions": funcs,
        "test_classes": [[name, methods] for name, methods in classes.items()],
        "check": check,
        "as_main": n == 0 and not has_check,  # no test in it: the file, run as a script, is the one test
        "n": 1 if n == 0 and not has_check else n,
    }


def normalize_tests(tests, entry_point: str | None = None, fn_name: str | None = None) -> dict | None:
    """A dataset's test value as the harness's spec (`kind`, cases, number `n` of tests); None when there is
    nothing to run (no tests, or another language). Raises ValueError on an unrecognised structure.

    >>> normalize_tests(["assert f(1) == 2", "assert f(2) == 3"])["n"]
    2
    >>> spec = normalize_tests({"language": "python", "test_cases": [{"input": "1 2", "output": "3"}]})
    >>> spec["kind"], spec["cases"]
    ('stdio', [['1 2', '3']])
    >>> normalize_tests('{"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}')["kind"]
    'call'
    >>> normalize_tests("from solution import f\\ndef test_a():\\n    assert f(1)\\nassert f(2)\\n")["n"]
    2
    >>> normalize_tests({"language": "cpp", "test_cases": []}) is None
    True
    """
    if tests is None:
        return None
    if isinstance(tests, str):
        stripped = tests.strip()
        if not stripped:
            return None
        if stripped[0] in "[{":
            try:
                return normalize_tests(json.loads(stripped), entry_point, fn_name)
            except json.JSONDecodeError:
                pass  # Python code that starts with a bracket
        spec = _module_tests(tests, entry_point)
    elif isinstance(tests, dict):
        if str(tests.get("language", "python")).lower() not in ("python", "python3", "py"):
            return None
        entry_point, fn_name = tests.get("entry_point") or entry_point, tests.get("fn_name") or fn_name
        if "inputs" in tests and "outputs" in tests:
            spec = _io_cases(tests["inputs"], tests["outputs"], fn_name)
        else:
            key = next((k for k in ("test_cases", "tests", "input_output", "test") if k in tests), None)
            if key is None:
                raise ValueError(
                    f"unrecognised test dict with keys {sorted(tests)}; expected test_cases, "
                    f"tests, input_output, test, or inputs + outputs"
                )
            return normalize_tests(tests[key], entry_point, fn_name)
    elif isinstance(tests, (list, tuple)):
        if not tests:
            return None
        if all(isinstance(t, str) for t in tests):
            spec = {"kind": "asserts", "cases": list(tests)}
        elif all(isinstance(t, dict) for t in tests):

            def pick(case, keys):
                found = next((case[k] for k in keys if k in case), None)
                if found is None:
                    raise ValueError(f"test case with keys {sorted(case)} has none of {keys}")
                return found

            inputs = [pick(t, ("input", "stdin")) for t in tests]
            outputs = [pick(t, ("output", "expected_output", "stdout", "expected")) for t in tests]
            spec = _io_cases(inputs, outputs, fn_name)
        else:
            raise ValueError("a test list must hold assert strings or {'input', 'output'} dicts")
    else:
        raise ValueError(f"cannot read tests of type {type(tests).__name__}")
    spec.setdefault("n", len(spec.get("cases", ())))
    return spec if spec["n"] else None


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command that gives the child new network and PID namespaces here; () if none can."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    base = ("--net", "--pid", "--fork", "--kill-child")
    for prefix in ((exe, *base), (exe, "--user", "--map-root-user", *base)):
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL, capture_output=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def sandbox_info() -> dict:
    """How the child is isolated on this machine: `network` is "namespace" or "audit-hook-only".

    >>> sandbox_info()["network"] in ("namespace", "audit-hook-only")
    True
    """
    prefix = _namespace_prefix()
    return {"network": "namespace" if prefix else "audit-hook-only", "command": list(prefix), "python": sys.executable}


@dataclass
class SandboxResult:
    passed: list[bool]  # one per test
    timed_out: bool = False  # the wall-clock budget ran out and the process group was killed
    returncode: int | None = None  # negative: killed by that signal
    stderr: str = ""  # the last 2000 characters the child wrote to stderr
    workdir: str = ""  # the program's working directory (already removed)
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def _child_env(workdir: str) -> dict:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update({k: "http://127.0.0.1:9" for k in _PROXY_VARS})  # port 9 (discard): refused at once
    return env


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):  # the program may have removed permissions from its own files
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def run_tests(
    code: str,
    tests,
    *,
    timeout: float = 3.0,
    max_total: float = 60.0,
    memory_mb: int = 1024,
    fsize_mb: int = 16,
    namespaces: bool = True,
) -> SandboxResult:
    """Run `code` against `tests` (any form `normalize_tests` reads, or its output) in the sandbox.

    >>> add = "def add(a, b):\\n    return a + b"
    >>> run_tests(add, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"]).passed
    [True, False]
    >>> run_tests("print(sum(map(int, input().split())))", [{"input": "1 2", "output": "3"}]).passed
    [True]
    """
    spec = tests if isinstance(tests, dict) and "kind" in tests else normalize_tests(tests)
    if spec is None:
        raise ValueError("no tests to run")
    n = spec["n"]
    wall = min(timeout * n + 2.0, max_total)
    root = tempfile.mkdtemp(prefix="dllm_rl_code_")
    work, meta = os.path.join(root, "work"), os.path.join(root, "harness")
    os.mkdir(work, 0o700)
    os.mkdir(meta, 0o700)
    nonce = secrets.token_hex(16)
    prefix = _namespace_prefix() if namespaces else ()
    timed_out = False
    # results go to an unlinked file: the child inherits a write-only descriptor (it cannot read back the lines,
    # nonce included, already written), the parent reads through its own
    results_path = os.path.join(meta, "results")
    write_fd = os.open(results_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    read_fd = os.open(results_path, os.O_RDONLY)
    os.fchmod(write_fd, 0o200)  # no reopening it for reading through /proc/self/fd (unless root)
    os.unlink(results_path)
    with open(read_fd, "rb") as results:
        full = {
            **_child_spec(spec),
            "code": code,
            "nonce": nonce,
            "results_fd": write_fd,
            "timeout": timeout,
            "cpu_seconds": wall,
            "memory_mb": memory_mb,
            "fsize_mb": fsize_mb,
        }
        spec_path = os.path.join(meta, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(full, f)
        try:
            with open(os.path.join(meta, "stderr.txt"), "wb") as err:
                # no preexec_fn (unsafe with threads, and it would disable vfork): the child limits itself
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-I", HARNESS, spec_path],
                    cwd=work,
                    env=_child_env(work),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=(write_fd,),
                )
                os.close(write_fd)
                write_fd = -1
                timed_out, returncode = _wait_and_kill(proc, wall)
            verdicts = _read_results(results.read().decode("utf-8", "replace"), nonce, n)
            passed = _judge(spec, verdicts)
            stderr = Path(meta, "stderr.txt").read_text(encoding="utf-8", errors="replace")[-2000:]
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            _remove_tree(root)
    if not timed_out and returncode and all(v is None for v in verdicts) and "_code_harness" in stderr:
        _warn_once(
            f"code reward: the sandbox harness failed before reporting any result (exit status {returncode}), "
            f"so every completion may score 0; its stderr ends with:\n{stderr[-1000:]}",
            key="harness-failure",
        )
    return SandboxResult(passed, timed_out, returncode, stderr, work)


def _child_spec(spec: dict) -> dict:
    """The spec without the expected outputs, which the parent keeps and compares (`_judge`): the program
    cannot read them, nor change the comparison. `report_cap`: the longest result text the child sends (at
    least 1 MiB, so that it says nothing about the expected outputs of ordinary tests)."""
    if spec["kind"] == "call":
        longest = max((len(json.dumps(expected)) for _, expected in spec["cases"]), default=0)
        cap = 1 << max(20, (4 * longest).bit_length())
        return {**spec, "cases": [args for args, _ in spec["cases"]], "report_cap": cap}
    if spec["kind"] == "stdio":
        return {**spec, "cases": [stdin for stdin, _ in spec["cases"]]}
    return spec


def _same(a, b) -> bool:
    """Equality of JSON data that treats tuples as lists and compares floats with a small tolerance."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _stdout_digests(text: str) -> list[str]:
    """What the harness reports for a stdout (`_code_harness._digests`): the sha256 of its stripped lines
    (blank ones around it dropped) and of its whitespace-separated tokens. Outputs match when either agrees."""

    def digest(parts):
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    return [digest([ln.strip() for ln in text.strip().splitlines()]), digest(text.split())]


def _judge(spec: dict, verdicts: list) -> list[bool]:
    """Per test, whether it passed: the child's verdict for tests it judges (asserts, test files), the parent's
    comparison of what the child reports (a call's result as plain data, digests of a stdout) otherwise."""
    kind, passed = spec["kind"], []
    for verdict, case in zip(verdicts, spec.get("cases") or [None] * len(verdicts)):
        try:
            if kind == "call":
                ok = isinstance(verdict, list) and len(verdict) == 1
                ok = ok and (_same(verdict[0], case[1]) or _same(verdict, case[1]))
            elif kind == "stdio":
                expected = _stdout_digests(case[1])
                ok = isinstance(verdict, list) and len(verdict) == 2
                ok = ok and (verdict[0] == expected[0] or verdict[1] == expected[1])
            else:
                ok = verdict is True
        except RecursionError:  # a result nested too deeply
            ok = False
        passed.append(bool(ok))
    return passed


def _wait_and_kill(proc: subprocess.Popen, wall: float) -> tuple[bool, int]:
    """Wait up to `wall` seconds, then SIGKILL the child's whole process group (whatever it started too)."""
    timed_out = False
    try:
        proc.wait(timeout=wall)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
    return timed_out, returncode


def _read_results(text: str, nonce: str, n: int) -> list:
    """Per test, the verdict of the first result line carrying the nonce (None: no line, the test failed; a
    line whose verdict is null counts as a failure too)."""
    verdicts: list = [None] * n
    for line in text.splitlines():
        try:
            tag, index, verdict = json.loads(line)
        except (ValueError, TypeError, RecursionError):
            continue
        if tag == nonce and type(index) is int and 0 <= index < n and verdicts[index] is None:
            verdicts[index] = verdict
    return verdicts


def default_workers() -> int:
    """A small pool: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _row_tests(columns: dict, i: int, entry_point):
    for name in TEST_COLUMNS:
        values = columns.get(name)
        if values is not None and values[i] is not None:
            return normalize_tests(values[i], entry_point[i] if entry_point is not None else None)
    return None


def code_reward(
    prompts,
    completions,
    verification_info=None,
    test_cases=None,
    input_output=None,
    test_list=None,
    tests=None,
    test=None,
    entry_point=None,
    *,
    binary: bool = False,
    timeout: float = 3.0,
    max_total: float = 60.0,
    memory_mb: int = 1024,
    max_workers: int | None = None,
    log_metric=None,
    **kwargs,
) -> list[float | None]:
    """TRL-signature reward: the fraction of the row's tests the completion's code passes (1/0 with `binary`);
    None for a row without tests. Completions run in parallel (`max_workers`, default `default_workers()`),
    identical (code, tests) pairs once. Logs `code/timed_out` (fraction of runs killed) via `log_metric`.

    >>> tests = ["assert sq(3) == 9", "assert sq(2) == 4"]
    >>> fenced = "```python\\ndef sq(x):\\n    return x * x\\n```"
    >>> code_reward(["p"] * 3, [fenced, "def sq(x): return x + x", "x"], test_cases=[tests] * 3)
    [1.0, 0.5, 0.0]
    >>> code_reward(["p"], ["def sq(x): return x + x"], test_cases=[tests], binary=True)
    [0.0]
    """
    columns = {
        "verification_info": verification_info,
        "test_cases": test_cases,
        "input_output": input_output,
        "test_list": test_list,
        "tests": tests,
        "test": test,
    }
    if all(v is None for v in columns.values()):
        raise ValueError(f"the code reward needs a test column in the dataset: one of {', '.join(TEST_COLUMNS)}")
    jobs: dict[tuple[str, str], dict] = {}
    rows: list[tuple[str, str] | None] = []
    for i, completion in enumerate(completions):
        try:
            spec = _row_tests(columns, i, entry_point)
        except SyntaxError as e:  # one malformed test file should not stop a training run
            warnings.warn(
                f"code reward: row {i} has test code that does not parse ({e}); scoring it None", stacklevel=2
            )
            spec = None
        if spec is None:
            rows.append(None)
            continue
        key = (extract_code(completion_text(completion)), json.dumps(spec, sort_keys=True))
        jobs.setdefault(key, spec)
        rows.append(key)
    runnable = [k for k in jobs if k[0].strip()]
    options = dict(timeout=timeout, max_total=max_total, memory_mb=memory_mb)
    with ThreadPoolExecutor(max_workers=max_workers or default_workers()) as pool:
        done = dict(zip(runnable, pool.map(lambda k: run_tests(k[0], jobs[k], **options), runnable)))
    if callable(log_metric) and done:
        log_metric("code/timed_out", sum(r.timed_out for r in done.values()) / len(done))
    out: list[float | None] = []
    for key in rows:
        if key is None:
            out.append(None)
        elif key not in done:  # no code extracted
            out.append(0.0)
        else:
            result = done[key]
            out.append(float(all(result.passed)) if binary else result.fraction)
    return out
