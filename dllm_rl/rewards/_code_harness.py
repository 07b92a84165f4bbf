"""The test runner that executes inside the sandboxed child process of `dllm_rl.rewards.code`.

Run as a script (`python -I _code_harness.py SPEC.json`), never imported by the reward: it uses the standard
library only, because `-I` puts neither this directory nor the current one on `sys.path`. In order it

1. reads the JSON spec the parent wrote, then deletes it (the program under test cannot read the result nonce
   from disk; the expected outputs of call-based and stdin/stdout tests are not in it: the parent compares);
2. lowers its own resource limits (address space, CPU seconds, file size, no core dumps), each capped at the
   hard limit in force, so that everything it runs afterwards inherits them;
3. binds its result writer, hides itself from `sys.modules["__main__"]`, replaces
   `_posixsubprocess.fork_exec` and installs an audit hook that refuses sockets (other than AF_UNIX pairs),
   name resolution, process creation (a fresh import of `_posixsubprocess` too) and sending signals;
4. loads the solution as the module `solution` (or runs it as `__main__` per stdin/stdout case), runs each
   test under a per-test alarm (a program run as `__main__` together with the joins of the non-daemon threads
   it started, as an interpreter waits for them at exit), and appends one `[nonce, index, verdict]` JSON line
   per finished test to the results file (an unlinked file inherited as a write-only descriptor): `true` or
   `false`, a call's result as `[value]`, or the digests of a stdout. A test with no line (the process died,
   was killed, closed the file) counts as failed in the parent.

See `dllm_rl.rewards.code` for what this does and does not guarantee.
"""

from __future__ import annotations

import ast
import builtins
import gc
import hashlib
import json
import math
import operator
import os
import resource
import signal
import socket
import sys
import threading
import time
import types

# The harness's own functions resolve builtins (exec, compile, callable, ...) through this private copy, bound
# when each function is defined: a program that replaces `builtins.exec` or `builtins.bool` changes what it
# sees, not what the harness runs. The program itself gets the real `builtins` module (`_program_globals`).
__builtins__ = dict(vars(builtins))

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


def _set_limits(spec: dict) -> int:
    """Lower the limits, each capped at the current hard limit (a limit above it cannot be set without
    privileges: `prlimit --fsize=...` or a container's limits may be lower than ours); a limit that still
    cannot be set is left as it is. Returns the file size limit in force (bytes; -1: none)."""
    cpu = int(math.ceil(spec["cpu_seconds"]))
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, spec["fsize_mb"] * _MB, spec["fsize_mb"] * _MB),
    ]
    if spec["memory_mb"]:
        limits.append((resource.RLIMIT_AS, spec["memory_mb"] * _MB, spec["memory_mb"] * _MB))
    for which, soft, hard in limits:
        try:
            current = resource.getrlimit(which)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError) as e:
            sys.stderr.write(f"dllm_rl code sandbox: could not set resource limit {which}: {e}\n")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0]


def _refuse_spawn(*args, **kwargs):
    raise PermissionError("_posixsubprocess.fork_exec is disabled in the dllm_rl code sandbox")


def _disable_fork_exec() -> None:
    """`_posixsubprocess.fork_exec` (what `subprocess` calls) raises no audit event: replace it in the one
    module instance `import` hands out, and let the audit hook refuse a fresh import of the module. `import
    subprocess` still works; starting a process is refused (by the `subprocess.Popen` event already)."""
    try:
        import _posixsubprocess
    except ImportError:  # not POSIX
        return
    _posixsubprocess.fork_exec = _refuse_spawn


def _audit(event: str, args) -> None:
    if event.startswith(_SPAWN_EVENTS) or event in _NET_EVENTS:
        raise PermissionError(f"{event} is disabled in the dllm_rl code sandbox")
    if event == "import" and args[0] == "_posixsubprocess":  # a re-import after `del sys.modules[...]`
        raise PermissionError("importing _posixsubprocess anew is disabled in the dllm_rl code sandbox")
    if event == "socket.__new__" and args[1] != socket.AF_UNIX:  # AF_UNIX pairs: asyncio's self-pipe
        raise PermissionError("network sockets are disabled in the dllm_rl code sandbox")


def _alarm(signum, frame):
    raise _TestTimeout()


def _make_reporter(fd: int, nonce: str, budget: int):
    """`report(index, verdict)`, bound before the program runs: it writes `[nonce, index, verdict]` lines with
    the `os.write` and the built-in types captured here, so a program that replaces `os.write`, `json.dumps`,
    `bool` or anything else reachable by name cannot change what is written. `verdict` is True (passed), a
    JSON text (a result the parent judges) or anything else (failed). `budget`: the bytes the results file may
    take (the file size limit applies to it too; -1: no limit); a result that does not fit is reported as a
    failure."""
    write, exact_str, length, error = os.write, str, len, OSError
    used = [0]

    def report(index: int, verdict) -> None:
        if verdict is True:
            text = "true"
        elif type(verdict) is exact_str and "\n" not in verdict:
            text = verdict
        else:
            text = "false"
        line = f'["{nonce}",{index},{text}]\n'.encode()
        if budget >= 0 and used[0] + length(line) > budget:
            line = f'["{nonce}",{index},false]\n'.encode()
        try:
            used[0] += write(fd, line)
        except error:  # the program closed or broke our file: the parent counts the missing tests as failed
            pass

    return report


def _program_globals(name: str) -> dict:
    """A fresh namespace for the program (its globals) that sees the real `builtins` module."""
    return {"__name__": name, "__builtins__": builtins}


class _Runner:
    def __init__(self, spec: dict, report):
        self.spec, self.report = spec, report
        self.timeout = float(spec["timeout"])
        self.report_cap = int(spec.get("report_cap", _MB))

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
                return exit_ok and (e.code is None or (type(e.code) is int and e.code == 0))
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
        module.__builtins__ = builtins
        sys.modules["solution"] = module
        ok = self.guarded(lambda: exec(compiled, module.__dict__), exit_ok=True)
        return module if ok else None


def _plain_default(value):
    """`json.dumps`'s fallback for a call result: numpy arrays and scalars as plain data; anything else fails."""
    if hasattr(type(value), "tolist"):
        return value.tolist()
    if hasattr(type(value), "__index__"):
        return operator.index(value)
    raise TypeError(f"a result of type {type(value).__name__} is not plain data")


def _digests(text: str) -> str:
    """The JSON pair the parent compares a stdout with: the sha256 of its stripped lines (blank ones around
    it dropped) and of its whitespace-separated tokens (`dllm_rl.rewards.code._stdout_digests` computes the
    expected side, which the child never sees)."""

    def digest(parts):
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    lines = [ln.strip() for ln in text.strip().splitlines()]
    return f'["{digest(lines)}","{digest(text.split())}"]'


def _run_asserts(run: _Runner, compiled, cases: list[str]) -> None:
    tests = []  # compiled before the solution runs
    for i, snippet in enumerate(cases):
        try:
            tests.append(compile(snippet, f"<test {i}>", "exec"))
        except (SyntaxError, ValueError):
            tests.append(None)
    module = run.load_solution(compiled)
    for i, code in enumerate(tests):
        ok = module is not None and code is not None
        run.report(i, ok and run.guarded(lambda code=code: exec(code, module.__dict__)))


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
    # the test file is parsed and compiled before the solution runs (it could replace `ast.parse`)
    statements = [
        (isinstance(stmt, ast.Assert), compile(ast.Module(body=[stmt], type_ignores=[]), "<tests>", "exec"))
        for stmt in ast.parse(spec["test_code"]).body
    ]
    whole = compile(spec["test_code"], "<tests>", "exec")
    module = run.load_solution(compiled)
    namespace = _program_globals("dllm_rl_tests")
    if module is not None:  # tests that use the solution's names without importing them (MBPP style)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    if spec.get("as_main"):
        namespace["__name__"] = "__main__"
        program = lambda: exec(whole, namespace)
        run.report(0, module is not None and run.guarded(_joining_threads(program, run.timeout), exit_ok=True))
        return
    index = 0
    for is_assert, code in statements:
        ok = run.guarded(lambda code=code: exec(code, namespace))
        if is_assert:
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
    """APPS/TACO call-based tests: reports `fn(*args)` as JSON text (plain data only: an object of the program's
    own class is no result, so its `__eq__` never runs); the parent compares it with the expected value."""
    module = run.load_solution(compiled)
    fn = getattr(module, fn_name, None) if module is not None else None
    if fn is None and module is not None and isinstance(getattr(module, "Solution", None), type):
        try:
            fn = getattr(module.Solution(), fn_name, None)  # LeetCode style
        except Exception:  # noqa: BLE001
            fn = None
    for i, args in enumerate(cases):  # the child never sees the expected values: the parent compares
        result = []

        def call(args=args, result=result):  # under the alarm: the conversion may run the program's code too
            result.append(json.dumps(fn(*args), default=_plain_default, allow_nan=True))

        ok = fn is not None and run.guarded(call) and len(result[0]) <= run.report_cap
        run.report(i, f"[{result[0]}]" if ok else False)


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
    for i, stdin in enumerate(cases):  # the parent compares the stdout (digests of it) with the expected one
        verdict = False
        gc.collect()  # a previous run's `open(0)` left in a reference cycle must not close the fd mid-run
        try:
            with open(in_path, "w", encoding="utf-8") as f:
                f.write(stdin)
            _point(0, in_path, os.O_RDONLY)
            _point(1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            main_module = types.ModuleType("__main__")  # the program's `__main__`, not the harness
            main_module.__builtins__ = builtins
            sys.modules["__main__"] = main_module
            program = lambda: exec(compiled, main_module.__dict__)
            ok = run.guarded(_joining_threads(program, run.timeout), exit_ok=True)
            sys.stdout.flush()
            with open(out_path, encoding="utf-8", errors="replace") as f:
                verdict = _digests(f.read()) if ok else False
        except BaseException:  # noqa: BLE001 - the program broke our plumbing (closed files, filled the disk)
            verdict = False
        run.report(i, verdict)


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    os.unlink(spec_path)
    scratch = os.path.dirname(spec_path)
    results_fd = spec["results_fd"]  # an unlinked file the parent opened and passed down
    sys.path.insert(0, os.getcwd())  # `-I` leaves the working directory off sys.path; tests import `solution`
    with open("solution.py", "w", encoding="utf-8") as f:
        f.write(spec["code"])
    fsize = _set_limits(spec)
    signal.signal(signal.SIGALRM, _alarm)
    budget = fsize - 64 * (spec["n"] + 16) if fsize != resource.RLIM_INFINITY else -1
    run = _Runner(spec, _make_reporter(results_fd, spec["nonce"], max(budget, 0) if budget != -1 else -1))
    try:
        compiled = compile(spec["code"], os.path.abspath("solution.py"), "exec")
    except (SyntaxError, ValueError):
        return  # nothing reported: every test fails
    # the program must not reach the harness as `__main__` (to replace its functions); `harness` keeps it alive
    harness = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    sys.modules["__main__"].__builtins__ = builtins
    _disable_fork_exec()
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
    del harness


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # skip interpreter teardown: the program may have left threads or broken atexit handlers
