"""Run untrusted Python (a model's completion plus its tests) in a fenced-off subprocess.

`run_python(code)` writes the code to a fresh temporary folder and runs this very file on it as a separate
interpreter (`python -I -S -B`: no environment variables, no site-packages, no bytecode written). Before the
code runs, that interpreter puts up these fences, outermost first:

  OS level (the kernel enforces them; Linux):
  - a process group of its own, killed as a whole when the wall-clock timeout runs out (and at the end);
  - resource limits: address space (memory bombs get MemoryError), CPU seconds, file size, open files, no
    core dumps;
  - a private network namespace: no interface but a loopback that is down, so no socket reaches any host,
    127.0.0.1 included;
  - a private mount namespace in which every mount is read-only except the temporary folder;
  - no capabilities and no new privileges (a root process can then no longer undo the above);
  - the temporary folder as cwd, HOME and TMPDIR, an environment with nothing else; it is deleted after.
  The namespaces need root or unprivileged user namespaces; where the kernel refuses them they are skipped.

  In process (plain Python patches, they stop accidents, not a determined attacker):
  - os.fork, exec, spawn, system, kill and friends, subprocess's fork_exec raise PermissionError;
  - creating a socket raises PermissionError;
  - open(), os.open and the os functions that write refuse paths outside the folder; reading is allowed only
    in the folder and the interpreter's own installation (so not the user's home);
  - ctypes and resource cannot be imported; exit() before the end counts as a failure.

What it cannot stop: code written to undo the in-process patches (say through a patched function's closure)
can read any file the user may (reads are fenced in process only), and running as root it can fork until the
timeout (RLIMIT_NPROC does not apply to root). Where the namespaces are refused, such code can also write
wherever the user may and open sockets. C extensions that open files themselves (sqlite3) bypass the read
guard. CPU time and memory bandwidth are shared with the rest of the machine.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

PROGRAM = "main.py"             # the untrusted code's file inside the temporary folder
OUTPUT_TAIL = 4096              # bytes of output kept (the end: that is where the traceback is)
MAX_FILE_BYTES = 16 << 20       # RLIMIT_FSIZE: the largest file (output included) the code may write
MAX_OPEN_FILES = 64             # RLIMIT_NOFILE

# Linux constants (<sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_REMOUNT, MS_REC, MS_PRIVATE = 0x1000, 0x20, 0x4000, 0x40000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, CAPABILITY_VERSION_3 = 38, 24, 0x20080522

PROCESS_FUNCTIONS = (  # os / posix functions that start, replace, signal or re-parent processes, or exit early
    "fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
    "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
    "spawnlp", "spawnlpe", "kill", "killpg", "pidfd_open", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
    "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "chroot", "unshare",
    "setns", "_exit",
)
WRITE_FUNCTIONS = (  # os / posix functions that change the file system at a path
    "mkdir", "rmdir", "remove", "unlink", "rename", "replace", "link", "symlink", "chmod", "lchmod", "chown",
    "lchown", "chflags", "lchflags", "truncate", "utime", "mkfifo", "mknod",
)
READ_FUNCTIONS = ("listdir", "scandir", "chdir")  # ... that read (or move to) a directory at a path
BLOCKED_MODULES = ("ctypes", "_ctypes", "resource")  # raw system calls; raising the limits


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended."""
    passed: bool            # the program ran to its end without an uncaught exception
    status: str             # "passed", "failed", "timeout" (wall clock or CPU limit) or "killed" (by a signal)
    output: str             # the tail of its stdout and stderr together
    seconds: float          # wall clock, interpreter start included
    returncode: int | None  # None when it timed out


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` as a program in the sandbox; passed means it ran to its end with no uncaught exception
    (calling exit() counts as failing: a completion must not skip its tests). Thread-safe."""
    import shutil
    import tempfile
    if not (timeout > 0 and memory_mb > 0):
        raise ValueError(f"timeout and memory_mb must be positive, got {timeout!r} and {memory_mb!r}")
    folder = tempfile.mkdtemp(prefix="picochat-sandbox-")
    try:
        with open(os.path.join(folder, PROGRAM), "w", encoding="utf-8") as f:
            f.write(code)
        with tempfile.TemporaryFile() as output:  # outside the folder: the code cannot read or rewrite it
            start = time.monotonic()
            returncode = _run_child(folder, output, timeout, memory_mb)
            seconds = time.monotonic() - start
            return _result(returncode, _tail(output), seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_child(folder: str, output, timeout: float, memory_mb: int) -> int | None:
    """Start the sandboxed interpreter, wait up to `timeout` seconds, kill its process group; its exit code,
    or None when it ran out of time."""
    import subprocess   # here, not at the top: the sandboxed interpreter must not have it loaded unguarded
    cpu_seconds = math.ceil(timeout) + 1   # a busy loop meets the wall clock first; this backs it up
    # -I: no PYTHON* variables, no user site; -S: no site-packages; -B: no .pyc written; -u: output not
    # held in a buffer when the timeout kills it
    command = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", os.path.abspath(__file__),
               folder, str(memory_mb), str(cpu_seconds)]
    environment = {"HOME": folder, "TMPDIR": folder, "PATH": os.defpath, "LANG": "C.UTF-8"}
    # no preexec_fn (unsafe with threads): the child sets its own limits before the code runs
    child = subprocess.Popen(command, cwd=folder, env=environment, stdin=subprocess.DEVNULL, stdout=output,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished = _wait_for_exit(child.pid, timeout)
    finally:
        _kill_group(child.pid)   # before reaping: the group id cannot have been reused by then
        child.wait()
    return child.returncode if finished else None


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
    """SIGKILL every process left in the child's process group (it leads its own session)."""
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


def _result(returncode: int | None, output: str, seconds: float) -> SandboxResult:
    if returncode is None:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode < 0:
        status = "killed"
        output += f"\n[killed by signal {-returncode}: {signal.strsignal(-returncode)}]"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, output, seconds, returncode)


# ---------------------------------------------------------------------------------------------------------
# Everything below runs inside the sandboxed interpreter (this file is its script).

def _child_main(folder: str, memory_mb: str, cpu_seconds: str) -> None:
    """Fence this process in, then run the folder's program; exit 0 only if it ran to its end."""
    with open(os.path.join(folder, PROGRAM), encoding="utf-8") as f:
        source = f.read()
    libc = _libc()
    if libc is not None:
        _isolate(libc, folder, user_namespace=os.geteuid() != 0)
    _set_limits(int(memory_mb) << 20, int(cpu_seconds))
    if libc is not None:
        _drop_privileges(libc)
    exit_now = os._exit          # kept before the guards disable it for the program
    _install_guards(folder)
    status = _run_program(source)
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(status)


def _libc():
    """The C library through ctypes, or None off Linux or where ctypes is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _isolate(libc, folder: str, user_namespace: bool = False) -> list[str]:
    """Enter new network and mount namespaces and make every mount but `folder` read-only; the layers that
    took effect ("network", "filesystem"). Needs CAP_SYS_ADMIN, or (user_namespace) unprivileged user
    namespaces; a refused step is skipped."""
    flags = CLONE_NEWNS | CLONE_NEWNET | (CLONE_NEWUSER if user_namespace else 0)
    if libc.unshare(flags) != 0:
        return []
    layers = ["network", "filesystem"] if _read_only_except(libc, folder) else ["network"]
    os.chdir(folder)   # the old cwd lies on the mount under the folder's writable bind mount
    return layers


def _read_only_except(libc, folder: str) -> bool:
    """In this (private) mount namespace: every mount read-only (mount_setattr, Linux 5.12+), then `folder`
    bound onto itself and made writable again."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    path = os.fsencode(folder)
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    return (libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0   # changes stay in here
            and libc.mount(path, path, None, MS_BIND, None) == 0
            and libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr))) == 0
            and libc.mount(None, path, None, MS_BIND | MS_REMOUNT, None) == 0)


def _set_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """Soft = hard limits, which an unprivileged process cannot raise again."""
    import resource
    limits = {resource.RLIMIT_AS: memory_bytes, resource.RLIMIT_CPU: cpu_seconds,
              resource.RLIMIT_FSIZE: MAX_FILE_BYTES, resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
              resource.RLIMIT_CORE: 0}
    for name, value in limits.items():
        # the hard CPU limit one second later: SIGXCPU (reported as a timeout) comes first
        resource.setrlimit(name, (value, value + 1 if name == resource.RLIMIT_CPU else value))


def _drop_privileges(libc) -> bool:
    """No new privileges (no setuid programs), and for root: an empty capability bounding set and no
    capabilities, so the limits cannot be raised nor the namespaces left. True if the capabilities went."""
    import ctypes

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for cap in range(64):   # beyond the kernel's last capability prctl just fails
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    no_capabilities = (ctypes.c_uint32 * 6)()   # effective, permitted, inheritable, twice (64 bits)
    return libc.capset(ctypes.byref(CapHeader(CAPABILITY_VERSION_3, 0)), no_capabilities) == 0


def _install_guards(folder: str) -> None:
    """The in-process guards (see the module docstring)."""
    _block_processes()
    _block_sockets()
    _confine_files(folder)
    for name in BLOCKED_MODULES:
        sys.modules[name] = None   # `import ctypes` now raises ImportError


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")
    return refused


def _block_processes() -> None:
    import _posixsubprocess
    import posix
    for module in (os, posix):
        for name in PROCESS_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = _refuse("starting a process")   # subprocess and multiprocessing
    if "subprocess" in sys.modules:   # it keeps its own reference
        sys.modules["subprocess"]._fork_exec = _posixsubprocess.fork_exec


def _block_sockets() -> None:
    import _socket
    import socket

    def subclass(base):   # a subclass keeps `class SSLSocket(socket.socket)` and isinstance working
        return type(base.__name__, (base,), {"__init__": _refuse("creating a socket")})

    socket.socket = socket.SocketType = subclass(socket.socket)
    _socket.socket = _socket.SocketType = subclass(_socket.socket)
    socket.socketpair = _socket.socketpair = _refuse("creating a socket")


def _confine_files(folder: str) -> None:
    """Writes only inside `folder`; reads inside it and inside the interpreter's installation (imports)."""
    import _io
    import io
    import posix
    import builtins
    write_roots = [os.path.realpath(folder)]
    read_roots = write_roots + sorted({os.path.realpath(p) for p in
                                       (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})
    real_open, real_os_open, real_open_code, real_file_io = io.open, os.open, io.open_code, io.FileIO

    def guarded_open(file, mode="r", *args, **kwargs):
        _check_path(file, write_roots if set(mode) & set("wax+") else read_roots)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        _check_path(path, write_roots if writes else read_roots, kwargs)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open_code(path):
        _check_path(path, read_roots)
        return real_open_code(path)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            _check_path(file, write_roots if set(mode) & set("wax+") else read_roots)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.open_code = _io.open_code = guarded_open_code
    io.FileIO = _io.FileIO = GuardedFileIO
    for module in (os, posix):
        module.open = guarded_os_open
        for names, roots in ((WRITE_FUNCTIONS, write_roots), (READ_FUNCTIONS, read_roots)):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, _guard_paths(getattr(module, name), roots))


def _guard_paths(function, roots: list[str]):
    """`function` that first checks each path among its arguments."""
    def guarded(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, (str, bytes, os.PathLike)):
                _check_path(arg, roots, kwargs)
        return function(*args, **kwargs)
    return guarded


def _check_path(path, roots: list[str], kwargs: dict | None = None) -> None:
    """Raise PermissionError unless `path` (symbolic links resolved) lies in one of `roots`. A file
    descriptor passes (it was opened under the same rules); paths relative to a directory descriptor don't."""
    if kwargs and any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
        raise PermissionError("paths relative to a directory descriptor are refused in the sandbox")
    if isinstance(path, int):
        return
    real = os.path.realpath(os.fsdecode(path))
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise PermissionError(13, "outside the sandbox's folder", os.fsdecode(path))


def _run_program(source: str) -> int:
    """Execute the program as __main__; 0 if it ran to its end, else 1 after printing why."""
    import builtins
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, PROGRAM, "exec"), namespace)
        return 0
    except SystemExit as stop:
        namespace.clear()
        print(f"sandbox: the program called exit({stop.code!r}) before its end", file=sys.stderr)
    except BaseException:
        namespace.clear()   # frees what a memory bomb holds, so the traceback can be printed
        import traceback    # imported after the guards: its file reads go through them
        kind, error, trace = sys.exc_info()
        traceback.print_exception(kind, error, trace.tb_next)   # from the program's frame on
    return 1


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
