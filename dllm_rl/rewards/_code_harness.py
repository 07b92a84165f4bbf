"""The test runner that executes inside the sandboxed child process of `dllm_rl.rewards.code`.

Run as a script (`python -I _code_harness.py SPEC.json`), never imported by the reward: it uses the standard
library only, because `-I` puts neither this directory nor the current one on `sys.path`. In order it

1. reads the JSON spec the parent wrote, then deletes it (the program under test cannot read the expected
   outputs or the result nonce from disk);
2. lowers its own resource limits (address space, CPU seconds, file size, no core dumps) so that everything it
   runs afterwards inherits them;
3. installs an audit hook that refuses sockets (other than AF_UNIX pairs), name resolution, process
   creation and sending signals;
4. loads the solution as the module `solution` (or runs it as `__main__` per stdin/stdout case), runs each
   test under a per-test alarm (a program run as `__main__` together with the joins of the non-daemon threads
   it started, as an interpreter waits for them at exit), and appends one `[nonce, index, passed]` JSON line
   per finished test to the results file (an unlinked file inherited as a descriptor). A test with no line
   (the process died, was killed, closed the file) counts as failed in the parent.

See `dllm_rl.rewards.code` for what this does and does not guarantee.
"""

from __future__ import annotations

import ast
import builtins
import gc
import json
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
import types

_MB = 1 << 20
_SPAWN_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.exec",
    "os.spawn",
    "os.system",
    "subprocess.Popen",
    "os.kill",
    "os.killpg",
)
_NET_EVENTS = (
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
)


class _TestTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that `except Exception` in the program does not swallow it."""


def _set_limits(spec: dict) -> None:
    cpu = int(math.ceil(spec["cpu_seconds"]))
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, spec["fsize_mb"] * _MB, spec["fsize_mb"] * _MB),
    ]
    if spec["memory_mb"]:
        limits.append((resource.RLIMIT_AS, spec["memory_mb"] * _MB, spec["memory_mb"] * _MB))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us


def _audit(event: str, args) -> None:
    if event.startswith(_SPAWN_EVENTS) or event in _NET_EVENTS:
        raise PermissionError(f"{event} is disabled in the dllm_rl code sandbox")
    if event == "socket.__new__" and args[1] != socket.AF_UNIX:  # AF_UNIX pairs: asyncio's self-pipe
        raise PermissionError("network sockets are disabled in the dllm_rl code sandbox")


def _alarm(signum, frame):
    raise _TestTimeout()


class _Runner:
    def __init__(self, spec: dict, results_fd: int):
        self.spec, self.fd, self.nonce = spec, results_fd, spec["nonce"]
        self.timeout = float(spec["timeout"])

    def report(self, index: int, passed: bool) -> None:
        try:
            os.write(self.fd, (json.dumps([self.nonce, index, bool(passed)]) + "\n").encode())
        except OSError:  # the program closed or broke our file: the parent counts the missing tests as failed
            pass

    def guarded(self, fn, exit_ok: bool = False) -> bool:
        """True when `fn()` returns within the per-test timeout, or, for a whole program (`exit_ok`: the
        solution's import, a run as `__main__`), exits with status 0. Inside a test an exit is a failure: a
        solution that calls `exit(0)` must not pass the tests it stops."""
        try:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            try:
                fn()
                return True
            except SystemExit as e:
                return exit_ok and e.code in (None, 0)
            except BaseException:  # noqa: BLE001 - any failure of the program is a failed test, timeouts too
                return False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _TestTimeout:  # the alarm fired between the body and the `finally` above
            return False

    def load_solution(self, compiled) -> types.ModuleType | None:
        """The solution as module `solution` (so tests may `from solution import f`); None if it raised.
        A top-level `exit()` just stops the module early: the tests still run against what it defined."""
        module = types.ModuleType("solution")
        module.__file__ = os.path.abspath("solution.py")
        sys.modules["solution"] = module
        ok = self.guarded(lambda: exec(compiled, module.__dict__), exit_ok=True)
        return module if ok else None


def _same(a, b) -> bool:
    """Equality that treats tuples as lists (JSON round trips) and compares floats with a small tolerance."""
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


def _output_matches(got: str, expected: str) -> bool:
    """Lines compared with surrounding whitespace and blank trailing lines ignored, else token by token."""

    def lines(s):
        return [ln.strip() for ln in s.strip().splitlines()]

    return lines(got) == lines(expected) or got.split() == expected.split()


def _run_asserts(run: _Runner, compiled, cases: list[str]) -> None:
    module = run.load_solution(compiled)
    for i, snippet in enumerate(cases):
        ok = False
        if module is not None:
            try:
                code = compile(snippet, f"<test {i}>", "exec")
                ok = run.guarded(lambda code=code: exec(code, module.__dict__))
            except SyntaxError:
                ok = False
        run.report(i, ok)


def _call_with_optional_argument(fn, arg) -> None:
    """pytest's convention for `setup_method(self, method)`-style hooks: pass `arg` only if `fn` takes it."""
    code = getattr(fn, "__code__", None)
    count = (code.co_argcount if code is not None else 1) - isinstance(fn, types.MethodType)
    fn(arg) if count > 0 else fn()


def _pytest_method(cls, name: str) -> None:
    """One test method of a pytest-style `Test*` class, as pytest runs it: a fresh instance (no arguments),
    `setup_method`, the method, then `teardown_method` (also after a failure)."""
    obj = cls()
    method = getattr(obj, name)
    setup, teardown = getattr(obj, "setup_method", None), getattr(obj, "teardown_method", None)
    if callable(setup):
        _call_with_optional_argument(setup, method)
    try:
        method()
    finally:
        if callable(teardown):
            _call_with_optional_argument(teardown, method)


def _unittest_method(cls, name: str) -> None:
    """One test method of a `unittest.TestCase` subclass, run by unittest itself (a one-test suite, so
    `setUpClass`/`setUp`/`tearDown`/`tearDownClass` run around it). Raises unless it succeeded; a skipped
    test fails: the skip may come from the solution under test (`raise unittest.SkipTest`)."""
    import unittest

    result = unittest.TestResult()
    unittest.TestSuite([cls(name)]).run(result)
    if not (result.wasSuccessful() and result.testsRun == 1 and not result.skipped):
        raise AssertionError(f"{cls.__name__}.{name} did not pass")


def _class_test(namespace: dict, class_name: str, method: str):
    """The test `class_name.method` as a no-argument callable: unittest-style for a `TestCase` subclass (the
    class at run time decides), pytest-style otherwise."""

    def run():
        cls = namespace.get(class_name)
        if not isinstance(cls, type):
            raise TypeError(f"{class_name} is not a class")
        unittest = sys.modules.get("unittest")  # a TestCase subclass exists only once unittest is imported
        if unittest is not None and issubclass(cls, unittest.TestCase):
            _unittest_method(cls, method)
        else:
            _pytest_method(cls, method)

    return run


def _run_module(run: _Runner, compiled, spec: dict) -> None:
    """A test file, its tests in the order the parent counted them: its top-level asserts, the `test*`
    functions (called with no arguments, as pytest would without fixtures), the `test*` methods of its test
    classes (`spec["test_classes"]`: `[class name, [method names]]`), then HumanEval's `check(entry_point)`.
    With `spec["as_main"]` (the parent found no test in it) the whole file is the one test: it runs as
    `__main__`, so its `if __name__ == "__main__":` block runs, and passes if it finishes (or exits with
    status 0) within the per-test timeout, its non-daemon threads included."""
    module = run.load_solution(compiled)
    namespace = {"__name__": "dllm_rl_tests"}
    if module is not None:  # tests that use the solution's names without importing them (MBPP style)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    if spec.get("as_main"):
        namespace["__name__"] = "__main__"
        program = lambda: exec(compile(spec["test_code"], "<tests>", "exec"), namespace)
        run.report(0, module is not None and run.guarded(_joining_threads(program, run.timeout), exit_ok=True))
        return
    index = 0
    for stmt in ast.parse(spec["test_code"]).body:
        code = compile(ast.Module(body=[stmt], type_ignores=[]), "<tests>", "exec")
        ok = run.guarded(lambda code=code: exec(code, namespace))
        if isinstance(stmt, ast.Assert):
            run.report(index, ok and module is not None)
            index += 1
    for name in spec["test_functions"]:
        fn = namespace.get(name)
        run.report(index, module is not None and callable(fn) and run.guarded(fn))
        index += 1
    for class_name, methods in spec.get("test_classes", ()):
        for method in methods:
            run.report(index, module is not None and run.guarded(_class_test(namespace, class_name, method)))
            index += 1
    if spec["check"]:
        check, candidate = namespace.get("check"), getattr(module, spec["entry_point"], None)
        run.report(index, callable(check) and candidate is not None and run.guarded(lambda: check(candidate)))
        index += 1


def _run_call(run: _Runner, compiled, fn_name: str, cases: list) -> None:
    """APPS/TACO call-based tests: `fn(*args)` must equal the expected value (or its one-element list)."""
    module = run.load_solution(compiled)
    fn = getattr(module, fn_name, None) if module is not None else None
    if fn is None and module is not None and isinstance(getattr(module, "Solution", None), type):
        try:
            fn = getattr(module.Solution(), fn_name, None)  # LeetCode style
        except Exception:  # noqa: BLE001
            fn = None
    for i, (args, expected) in enumerate(cases):

        def check(args=args, expected=expected):  # compared under the alarm too: __eq__ is the program's code
            got = fn(*args)
            if not (_same(got, expected) or _same([got], expected)):
                raise AssertionError

        run.report(i, fn is not None and run.guarded(check))


def _point(fd: int, path: str, flags: int) -> None:
    """Point file descriptor `fd` at `path` (the program may have closed `fd`: `os.open` can return it)."""
    new = os.open(path, flags, 0o600)
    if new != fd:
        os.dup2(new, fd)
        os.close(new)


def _joining_threads(fn, timeout: float):
    """`fn` followed, as at interpreter exit, by joins of the non-daemon threads started while it ran (and by
    those threads), within `timeout` seconds from the start; run it under `_Runner.guarded`, whose alarm also
    interrupts a join. Raises TimeoutError if such a thread is still alive at the deadline. The joins happen
    after an exception or `sys.exit` too (an interpreter joins then as well), so that the threads' output does
    not spill into the next test."""

    def run():
        before = set(threading.enumerate())
        deadline = time.monotonic() + timeout
        try:
            fn()
        finally:
            while True:
                current = threading.current_thread()
                started = [t for t in threading.enumerate() if t not in before and t is not current and not t.daemon]
                if not started:
                    break
                for thread in started:
                    thread.join(max(0.0, deadline - time.monotonic()))
                    if thread.is_alive():
                        raise TimeoutError(f"thread {thread.name} still running at the per-test timeout")

    return run


def _run_stdio(run: _Runner, compiled, cases: list, scratch: str) -> None:
    """Each case runs the whole program as `__main__` with fd 0 and 1 pointing at files, so `input()`,
    `sys.stdin.buffer`, `open(0)`, `print` and `os.write(1, ...)` all behave as in a real process. As a real
    interpreter does at exit, the case then waits for the non-daemon threads the program started (the
    `threading.Thread(target=main).start()` idiom) before stdout is read: the per-test timeout bounds the
    program and these joins together, and a thread still running when it expires fails the case (it cannot
    be stopped, so it may go on running and writing during the later cases)."""
    in_path, out_path = os.path.join(scratch, "stdin.txt"), os.path.join(scratch, "stdout.txt")
    for i, (stdin, expected) in enumerate(cases):
        ok, got = False, ""
        gc.collect()  # a previous run's `open(0)` left in a reference cycle must not close the fd mid-run
        try:
            with open(in_path, "w", encoding="utf-8") as f:
                f.write(stdin)
            _point(0, in_path, os.O_RDONLY)
            _point(1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            program = lambda: exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
            ok = run.guarded(_joining_threads(program, run.timeout), exit_ok=True)
            sys.stdout.flush()
            with open(out_path, encoding="utf-8", errors="replace") as f:
                got = f.read()
        except BaseException:  # noqa: BLE001 - the program broke our plumbing (closed files, filled the disk)
            ok = False
        run.report(i, ok and _output_matches(got, expected))


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    os.unlink(spec_path)
    scratch = os.path.dirname(spec_path)
    results_fd = spec["results_fd"]  # an unlinked file the parent opened and passed down
    sys.path.insert(0, os.getcwd())  # `-I` leaves the working directory off sys.path; tests import `solution`
    with open("solution.py", "w", encoding="utf-8") as f:
        f.write(spec["code"])
    _set_limits(spec)
    signal.signal(signal.SIGALRM, _alarm)
    run = _Runner(spec, results_fd)
    try:
        compiled = compile(spec["code"], os.path.abspath("solution.py"), "exec")
    except (SyntaxError, ValueError):
        return  # nothing reported: every test fails
    sys.addaudithook(_audit)
    kind = spec["kind"]
    if kind == "asserts":
        _run_asserts(run, compiled, spec["cases"])
    elif kind == "module":
        _run_module(run, compiled, spec)
    elif kind == "call":
        _run_call(run, compiled, spec["fn_name"], spec["cases"])
    else:
        _run_stdio(run, compiled, spec["cases"], scratch)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # skip interpreter teardown: the program may have left threads or broken atexit handlers
