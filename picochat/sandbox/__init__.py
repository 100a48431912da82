"""Run untrusted Python (a model's completion, then its tests) where the kernel, not Python, fences it in.

`run_python(code, tests)` starts inside.py as a separate interpreter (`python -I -S -B`: no environment
variables, no site-packages, no bytecode written) and hands it the code over a pipe. Three processes:

    picochat ── supervisor ── init (PID 1 of a new PID namespace) ── program (the code, then the tests)

  - the supervisor enters new mount, network, PID, IPC and UTS namespaces (as root; otherwise inside a new
    user namespace) and forks `init`; it relays init's exit status and is the process the caller kills;
  - init dies with the supervisor (PR_SET_PDEATHSIG), and when init dies the kernel kills every process in
    its namespace: children that call setsid() or fork go with it. Signals sent from inside the namespace
    never reach init (the kernel drops them), and nothing outside the namespace is visible, so the program
    cannot signal picochat or any other process;
  - init builds a fresh root file system: an empty tmpfs holding, read-only, the system's /usr, /lib*, /bin
    and the interpreter's standard library (its installed packages hidden); /dev with null, zero, full,
    random and urandom; and /sandbox, a small writable tmpfs that is the cwd, HOME and TMPDIR. /root, /home,
    /etc, /proc, /tmp and the user's files are not there at all. The network namespace has only a loopback
    that is down;
  - the program runs as a uid of its own (when started as root; in the user namespace otherwise) with an
    empty capability bounding set, no capabilities, no new privileges, a seccomp filter (x86-64) that
    refuses the system calls that make namespaces, mount, trace or load into the kernel, and resource
    limits: address space, CPU seconds, processes (RLIMIT_NPROC), file size, open files, no core dumps.
    Where a pids (and memory) cgroup can be made, the supervisor's whole tree is put in it too.
  - at the deadline the caller kills the supervisor (and the cgroup's members): the namespace, and with it
    every process the code started, is gone; the tmpfs holding /sandbox vanishes with its mount namespace.

A pass is reported over a pipe that is not the program's output: the harness writes a per-run nonce to it
after the tests ran to their end, so exiting early with status 0 (by any means) does not count as passing.
What this cannot stop: the tests run in the code's own process (as in HumanEval's harness), so code
written against this harness can find the nonce in its memory and report a pass itself — a lie about its
own result, never a way out of the sandbox.

In-process guards (no fork/exec/kill, no sockets, no files outside the folder, no ctypes) stay as a second
layer that stops accidents early with a clear error; nothing depends on them (`python_guards=False` runs
without them, which the tests use to check every fence on its own).

Where the kernel refuses the namespaces (no user namespaces, a container without the capabilities), the
sandbox refuses to run the code and says why (SandboxUnavailable), unless the caller opts out with
allow_unconfined=True or PICOCHAT_UNCONFINED_SANDBOX=1; the code then runs with the limits and in-process
guards only, which code written to escape can undo.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

from .inside import (FIRST_UID, FOLDER, MAX_FILE_BYTES, MAX_FOLDER_BYTES,  # noqa: F401 (FIRST_UID: tests)
                     MAX_PROCESSES, OPT_OUT, UNAVAILABLE, Job)

OUTPUT_TAIL = 4096              # bytes of output kept (the end: that is where the traceback is)


class SandboxUnavailable(RuntimeError):
    """The kernel would not fence the code in; the message says why and how to opt out."""


class UnconfinedWarning(UserWarning):
    """Code ran with limits and in-process guards only, because the caller opted out of the kernel's fences."""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended."""
    passed: bool            # the code and then the tests ran to their end (reported by the harness)
    status: str             # "passed", "failed", "timeout" (wall clock or CPU limit) or "killed" (by a signal)
    output: str             # the tail of its stdout and stderr together, at most OUTPUT_TAIL bytes and a note
    seconds: float          # wall clock, interpreter start included
    returncode: int | None  # None when it timed out; -N when killed by signal N


def run_python(code: str, tests: str = "", timeout: float = 10.0, memory_mb: int = 512, *,
               python_guards: bool = True, allow_unconfined: bool | None = None) -> SandboxResult:
    """Run `code`, then `tests` in the same namespace, in the sandbox. passed means both ran to their end
    with no uncaught exception (exit() before the end counts as failing: a completion must not skip its
    tests). Raises SandboxUnavailable where the kernel refuses to confine it and the caller did not opt out
    (allow_unconfined, default: the PICOCHAT_UNCONFINED_SANDBOX environment variable). Thread-safe."""
    import tempfile
    if not (timeout > 0 and memory_mb > 0):
        raise ValueError(f"timeout and memory_mb must be positive, got {timeout!r} and {memory_mb!r}")
    if allow_unconfined is None:
        allow_unconfined = os.environ.get(OPT_OUT, "") not in ("", "0")
    import shutil
    nonce = os.urandom(16).hex()
    job = Job(code, tests, nonce, memory_mb << 20, math.ceil(timeout) + 1, python_guards, allow_unconfined,
              tempfile.mkdtemp(prefix="picochat-sandbox-"))
    cgroups = []
    try:
        cgroups = _make_cgroups(memory_mb)
        with tempfile.TemporaryFile() as output:   # outside the sandbox: the code cannot read or rewrite it
            start = time.monotonic()
            returncode, report = _run_supervisor(job, cgroups, output, timeout)
            seconds = time.monotonic() - start
            return _result(returncode, report, nonce, _tail(output), seconds)
    finally:
        _remove_cgroups(cgroups)
        shutil.rmtree(job.scratch, ignore_errors=True)


def _run_supervisor(job: Job, cgroups: list[str], output, timeout: float) -> tuple[int | None, str]:
    """Start the supervisor, wait up to `timeout` seconds, kill whatever is left; its exit code (None when
    it ran out of time) and what the sandbox reported over its pipe."""
    import json
    import subprocess   # here, not at the top: the sandboxed interpreter must not have it loaded unguarded
    report_read, report_write = os.pipe()
    inside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inside.py")
    command = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", inside, str(report_write), *cgroups]
    environment = {"HOME": FOLDER, "TMPDIR": FOLDER, "PATH": os.defpath, "LANG": "C.UTF-8"}
    try:
        # no preexec_fn (unsafe with threads): the supervisor fences itself in before the code runs
        child = subprocess.Popen(command, cwd="/", env=environment, stdin=subprocess.PIPE, stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(report_write,))
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
    try:
        child.stdin.write(json.dumps(job.__dict__).encode())
        child.stdin.close()
        finished = _wait_for_exit(child.pid, timeout)
    except BrokenPipeError:   # it died before reading the job: its status says why
        finished = _wait_for_exit(child.pid, timeout)
    finally:
        _kill_group(child.pid)   # before reaping: the group id cannot have been reused by then
        _kill_cgroups(cgroups)
        child.wait()
        report = _read_all(report_read)
    return (child.returncode if finished else None), report


def _read_all(fd: int, limit: int = 1 << 16) -> str:
    """What is in a pipe whose writers are all gone (at most `limit` bytes), then close it."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size < limit:
            try:
                chunk = os.read(fd, limit - size)
            except BlockingIOError:   # a writer survived (cannot after the kill): do not wait for it
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until the child exits or `timeout` passes, without reaping it (WNOWAIT); True if it exited."""
    deadline, delay = time.monotonic() + timeout, 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:    # reaped elsewhere (SIGCHLD ignored): it has exited
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the supervisor's process group (it leads its own session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(output) -> str:
    """The last OUTPUT_TAIL bytes of the captured output, decoded, with a note if the start was cut."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - OUTPUT_TAIL))
    text = output.read().decode("utf-8", errors="replace")
    return f"[... {size - OUTPUT_TAIL} bytes cut ...]\n{text}" if size > OUTPUT_TAIL else text


def _result(returncode: int | None, report: str, nonce: str, output: str, seconds: float) -> SandboxResult:
    """Read the supervisor's exit code and the report: a pass needs the harness's nonce line."""
    lines = report.splitlines()
    # only the supervisor's or init's first line can refuse: the program writes after init's "confined"
    if returncode == UNAVAILABLE and lines and lines[0].startswith("unavailable:"):
        raise SandboxUnavailable(f"{lines[0]}. The code was not run. Set {OPT_OUT}=1 to run untrusted code "
                                 f"with only resource limits and in-process guards (which code written to "
                                 f"escape can undo).")
    if lines and lines[0].startswith("unconfined:"):
        import warnings
        warnings.warn(f"the sandbox ran code without the kernel's fences ({lines[0][12:]}): only limits and "
                      f"in-process guards held it", UnconfinedWarning, stacklevel=3)
    if returncode is not None and 128 < returncode < 128 + signal.NSIG:   # init: killed by signal N → 128 + N
        returncode = -(returncode - 128)
    if returncode is None or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode < 0:
        status = "killed"
        output += f"\n[killed by signal {-returncode}: {signal.strsignal(-returncode) or 'unknown'}]"
    elif returncode == 0 and f"{nonce} passed" in lines:
        status = "passed"
    else:
        status = "failed"
        if returncode == 0:
            output += "\n[the program exited before its end: the tests did not run to completion]"
    return SandboxResult(status == "passed", status, output, seconds, returncode)


# ---------------------------------------------------------------------------------------------------------
# cgroups: a pids (and memory) limit on the whole tree, where the machine lets picochat make one

def _make_cgroups(memory_mb: int) -> list[str]:
    """A fresh cgroup below this process's own in each hierarchy that has the pids or memory controller (v2:
    one, holding both limits; v1: one per controller), with the limits written; [] where none can be made
    (not root, read-only /sys/fs/cgroup, the controller not enabled): RLIMIT_NPROC then bounds processes."""
    import uuid
    memory = ((memory_mb + 64) << 20) + MAX_FOLDER_BYTES   # the program, the two helpers, its tmpfs folder
    limits = {"pids.max": MAX_PROCESSES, "memory.max": memory, "memory.limit_in_bytes": memory}
    made = []
    for parent in _cgroup_parents():
        path = os.path.join(parent, f"picochat-sandbox-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        made.append(path)   # removed by the caller, limits or not
        written = 0
        for name, value in limits.items():
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(value))
                written += 1
        if not written:   # a controller listed but not enabled below: no limit here, and no use
            os.rmdir(path)
            made.pop()
    return made


def _cgroup_parents() -> list[str]:
    """The folders of this process's cgroups that have the pids or memory controller, v1 or v2."""
    root = "/sys/fs/cgroup"
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return []
    found = []
    for hierarchy, controllers, path in entries:
        if hierarchy == "0":   # v2: one tree; the limit files show whether the controllers are enabled
            found.append(os.path.join(root, path.lstrip("/")))
        else:
            found += [os.path.join(root, c, path.lstrip("/")) for c in ("pids", "memory")
                      if c in controllers.split(",")]
    return [folder for folder in found if os.path.isdir(folder)]


def _kill_cgroups(cgroups: list[str]) -> None:
    """SIGKILL every member (none can leave: moving needs write access to /sys/fs/cgroup, absent inside)."""
    for path in cgroups:
        for _ in range(3):   # a fork between reading and killing puts a new member in; init's death ends it
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(line) for line in f if line.strip()]
            except OSError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _remove_cgroups(cgroups: list[str]) -> None:
    for path in cgroups:
        for _ in range(100):   # members that were just killed leave it a moment later
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


