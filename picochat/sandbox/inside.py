"""The sandbox's inside: the supervisor, init and the program (see __init__.py for the whole picture).

This file runs as a script (`python -I -S -B inside.py REPORT_FD CGROUP...`) in a fresh interpreter that
imports nothing of picochat: it reads the Job as JSON from stdin, fences itself in and runs the code.
run_python (in __init__.py) imports it only for its constants and the Job.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

MAX_FILE_BYTES = 16 << 20       # RLIMIT_FSIZE: the largest file (output included) the code may write
MAX_FOLDER_BYTES = 64 << 20     # the size of the writable /sandbox tmpfs
MAX_OPEN_FILES = 64             # RLIMIT_NOFILE
MAX_PROCESSES = 16              # RLIMIT_NPROC and the cgroup's pids.max
FOLDER = "/sandbox"             # the program's folder inside its root file system
PROGRAM, TESTS = "main.py", "tests.py"   # the file names tracebacks show
UNAVAILABLE = 125               # the supervisor's exit status when it could not fence the code in
OPT_OUT = "PICOCHAT_UNCONFINED_SANDBOX"

# Linux constants (<sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>, asm/unistd_64.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x20, 0x1000, 0x4000, 0x40000, 0x2
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 0x1, 0x2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 24, 38
SECCOMP_MODE_FILTER, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 2, 0xC000003E, 0x40000000
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
CLONE_NAMESPACES = 0x7E020000   # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
SYS_CLONE, SYS_CLONE3 = 56, 435
DENIED_SYSCALLS = {  # x86-64 numbers: namespaces, mounts, tracing other processes, kernel subsystems
    272: "unshare", 308: "setns", 165: "mount", 166: "umount2", 155: "pivot_root", 161: "chroot",
    428: "open_tree", 429: "move_mount", 430: "fsopen", 431: "fsconfig", 432: "fsmount", 433: "fspick",
    442: "mount_setattr", 101: "ptrace", 310: "process_vm_readv", 311: "process_vm_writev", 321: "bpf",
    298: "perf_event_open", 323: "userfaultfd", 248: "add_key", 249: "request_key", 250: "keyctl",
    246: "kexec_load", 320: "kexec_file_load", 175: "init_module", 313: "finit_module",
    176: "delete_module", 167: "swapon", 168: "swapoff", 169: "reboot", 163: "acct", 172: "iopl",
    173: "ioperm",
}
CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
SYSTEM_FOLDERS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
DEVICES = ("null", "zero", "full", "random", "urandom")
FIRST_UID = 1 << 20             # program uids are drawn above this (no user of the machine has them)

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
class Job:
    """What the supervisor needs, sent to it over its stdin (not its command line: /proc shows that)."""
    code: str
    tests: str
    nonce: str
    memory_bytes: int
    cpu_seconds: int        # a busy loop meets the wall clock first; this backs it up
    python_guards: bool
    allow_unconfined: bool
    scratch: str            # the folder an unconfined run works in (confined runs get a tmpfs at FOLDER)


def _supervisor_main(report_fd: str, *cgroups: str) -> None:
    """Read the job, join the cgroups, enter the namespaces, fork init and relay its exit status."""
    import json
    job = Job(**json.loads(sys.stdin.buffer.read()))
    report = int(report_fd)
    for path in cgroups:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    libc = _libc()
    why, user_namespace = ("not Linux, or no ctypes", False) if libc is None else _enter_namespaces(libc)
    if why:
        if not job.allow_unconfined:
            os.write(report, f"unavailable: {why}\n".encode())
            os._exit(UNAVAILABLE)
        os.write(report, f"unconfined: {why}\n".encode())
        _run_program(job, report, job.scratch, uid=None)
    lifeline_read, lifeline_write = os.pipe()   # init checks it is still open: the supervisor is alive
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_write)
        _init_main(job, report, libc, lifeline_read, user_namespace)
    os.close(lifeline_read)
    os.close(report)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _libc():
    """The C library through ctypes, or None off Linux or where ctypes is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _enter_namespaces(libc) -> tuple[str, bool]:
    """New mount, network, PID, IPC and UTS namespaces: as root directly, else (or where root lacks the
    capability, in a container) inside a new user namespace. ("" or what the kernel refused, whether a user
    namespace was made)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    user_namespace = os.geteuid() != 0 or libc.unshare(flags) != 0
    if user_namespace:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(flags | CLONE_NEWUSER) != 0:
            return (f"the kernel refused new namespaces ({os.strerror(_errno())}; unprivileged user "
                    f"namespaces may be disabled)"), True
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:   # root inside (for the mounts), this user outside
                f.write(text)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:   # mount changes stay in here
        return f"could not make the mounts private ({os.strerror(_errno())})", user_namespace
    return "", user_namespace


def _errno() -> int:
    import ctypes
    return ctypes.get_errno()


def _init_main(job: Job, report: int, libc, lifeline: int, user_namespace: bool) -> None:
    """PID 1 of the new namespace: die with the supervisor, build the root, fork the program, pass on how
    it ended. Never returns."""
    try:
        # the kernel drops signals sent to a namespace's init from inside it, unless init handles them:
        # Python handles SIGINT, which a program of the same uid (user namespace) could otherwise send
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.set_blocking(lifeline, False)
        try:
            if os.read(lifeline, 1) == b"":   # the supervisor died before the line above
                os._exit(1)
        except BlockingIOError:
            pass
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)   # the program (same uid in a user namespace) cannot trace it
        uid = None if user_namespace else FIRST_UID + int.from_bytes(os.urandom(3), "little")
        _build_root(libc, uid)
        os.write(report, b"confined\n")
        pid = os.fork()
        if pid == 0:
            _run_program(job, report, FOLDER, uid, libc)
        os.close(report)
        status = _wait_for(pid)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException as error:   # a failed fence: refuse rather than run the code half-fenced
        try:
            os.write(report, f"unavailable: could not build the sandbox's file system ({error})\n".encode())
        except OSError:
            pass
        os._exit(UNAVAILABLE)


def _wait_for(pid: int) -> int:
    """Reap children (orphans are re-parented to init) until `pid` exits; its wait status."""
    while True:
        child, status = os.waitpid(-1, 0)
        if child == pid:
            return status


def _build_root(libc, uid: int | None) -> None:
    """A tmpfs root holding the system folders and the interpreter read-only, a few devices and a writable
    FOLDER; pivot into it and let go of the old root."""
    new_root = "/tmp"   # any existing folder: in this mount namespace the tmpfs just covers it
    _mount(libc, b"tmpfs", new_root, b"tmpfs", 0, b"size=1m,mode=0755")
    for folder in SYSTEM_FOLDERS + _interpreter_folders():
        _bind_read_only(libc, folder, new_root)
    _hide_site_packages(libc, new_root)
    os.makedirs(new_root + "/dev")
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            open(f"{new_root}/dev/{device}", "w").close()
            _mount(libc, f"/dev/{device}".encode(), f"{new_root}/dev/{device}", None, MS_BIND, None)
    os.makedirs(new_root + FOLDER)
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    _mount(libc, b"tmpfs", new_root + FOLDER, b"tmpfs", MS_NOSUID | MS_NODEV,
           f"size={MAX_FOLDER_BYTES},mode=0700{owner}".encode())
    os.chdir(new_root)
    if libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b".") != 0:   # the old root now lies under "."
        raise OSError(_errno(), "pivot_root: " + os.strerror(_errno()))
    if libc.umount2(b".", MNT_DETACH) != 0:
        raise OSError(_errno(), "detaching the old root: " + os.strerror(_errno()))
    _mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(FOLDER)


def _interpreter_folders() -> tuple[str, ...]:
    """The standard library's folders, wherever the interpreter lives (say under /root/.pyenv): nothing is
    executed inside, so the interpreter's binary and libpython (already loaded) need not be there."""
    import sysconfig
    paths = sysconfig.get_paths()
    folders = {os.path.realpath(paths[name]) for name in ("stdlib", "platstdlib")}
    outermost = [f for f in folders if not any(f.startswith(other + "/") for other in folders)]
    return tuple(sorted(f for f in outermost if not any(f == s or f.startswith(s + "/") for s in SYSTEM_FOLDERS)))


def _hide_site_packages(libc, new_root: str) -> None:
    """An empty read-only tmpfs over the installed packages (-S does not import them; -I no user's)."""
    import sysconfig
    for name in ("purelib", "platlib"):
        folder = new_root + os.path.realpath(sysconfig.get_paths()[name])
        if os.path.isdir(folder):
            _mount(libc, b"tmpfs", folder, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k")


def _bind_read_only(libc, folder: str, new_root: str) -> None:
    """`folder` seen at the same path under `new_root`, read-only; a symbolic link (/lib -> usr/lib) as is."""
    if os.path.islink(folder):
        os.symlink(os.readlink(folder), new_root + folder)
        return
    if not os.path.isdir(folder):
        return
    target = new_root + folder
    os.makedirs(target)
    _mount(libc, folder.encode(), target, None, MS_BIND | MS_REC, None)
    if _read_only_tree(libc, target):   # the mounts below it too (mount_setattr, Linux 5.12+)
        return
    # an older kernel: the top mount only; a remount keeps the flags the kernel locked on the original
    kept = os.statvfs(folder).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept, None)


def _read_only_tree(libc, target: str) -> bool:
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    return libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE, ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))) == 0


def _mount(libc, source, target: str, kind, flags: int, data) -> None:
    if libc.mount(source, target.encode(), kind, flags, data) != 0:
        raise OSError(_errno(), f"mount {target}: {os.strerror(_errno())}")


def _run_program(job: Job, report: int, folder: str, uid: int | None, libc=None) -> None:
    """The program process: its own uid, limits, no privileges, no namespace-making system calls; then the
    code and the tests. Confined (libc given) or not, never returns."""
    confined = libc is not None
    try:
        os.chdir(folder)
        os.environ.update(HOME=folder, TMPDIR=folder)
        if confined:
            _drop_bounding_set(libc)       # needs CAP_SETPCAP: before root is given up
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)   # from root to a uid of its own: every capability goes too
        _set_limits(job.memory_bytes, job.cpu_seconds, processes=confined)
        if confined:
            _drop_capabilities(libc)
            _deny_system_calls(libc)
    except BaseException as error:   # never run the code less fenced than promised
        print(f"sandbox: could not drop the program's privileges ({error}); the code was not run",
              file=sys.stderr)
        os._exit(UNAVAILABLE)
    # kept before the guards disable them, and before the program can rebind the module's names (a program
    # that sets `sys.modules['__main__']._execute` to `lambda *a: True` would otherwise pass every test)
    exit_now, write, execute = os._exit, os.write, _execute
    if job.python_guards:
        _install_guards(folder)
    passed = execute(job.code, PROGRAM) and (not job.tests or execute(job.tests, TESTS))
    if passed:
        write(report, f"{job.nonce} passed\n".encode())
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0 if passed else 1)


NAMESPACE: dict = {}    # the program's globals: the code's definitions are what the tests call


def _execute(source: str, filename: str, run=exec, build=compile) -> bool:
    """Execute `source` as __main__; True if it ran to its end, else print why and return False. (run and
    build are bound here, when the sandbox starts: a program that replaces builtins.exec cannot skip the tests.)"""
    import builtins
    NAMESPACE.setdefault("__name__", "__main__")
    NAMESPACE.setdefault("__builtins__", builtins)
    try:
        run(build(source, filename, "exec"), NAMESPACE)
        return True
    except SystemExit as stop:
        NAMESPACE.clear()
        print(f"sandbox: the program called exit({stop.code!r}) before its end", file=sys.stderr)
    except BaseException:
        NAMESPACE.clear()   # frees what a memory bomb holds, so the traceback can be printed
        import traceback    # imported after the guards: its file reads go through them
        kind, error, trace = sys.exc_info()
        traceback.print_exception(kind, error, trace.tb_next)   # from the program's frame on
    return False


def _set_limits(memory_bytes: int, cpu_seconds: int, processes: bool = True) -> None:
    """Soft = hard limits, which an unprivileged process cannot raise again."""
    import resource
    limits = {resource.RLIMIT_AS: memory_bytes, resource.RLIMIT_CPU: cpu_seconds,
              resource.RLIMIT_FSIZE: MAX_FILE_BYTES, resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
              resource.RLIMIT_CORE: 0}
    if processes:   # counted per uid: only meaningful for the program's own uid
        limits[resource.RLIMIT_NPROC] = MAX_PROCESSES
    for name, value in limits.items():
        # the hard CPU limit one second later: SIGXCPU (reported as a timeout) comes first
        resource.setrlimit(name, (value, value + 1 if name == resource.RLIMIT_CPU else value))


def _drop_bounding_set(libc) -> None:
    """An empty capability bounding set: no capability can come back, even through a setuid program."""
    import errno
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and _errno() != errno.EINVAL:   # EINVAL: past the last
            raise OSError(_errno(), f"dropping capability {cap}: {os.strerror(_errno())}")


def _drop_capabilities(libc) -> None:
    """No new privileges (no setuid programs) and no capabilities, so that the limits cannot be raised nor
    the namespaces left."""
    import ctypes

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(_errno(), "no_new_privs: " + os.strerror(_errno()))
    no_capabilities = (ctypes.c_uint32 * 6)()   # effective, permitted, inheritable, twice (64 bits)
    if libc.capset(ctypes.byref(CapHeader(CAPABILITY_VERSION_3, 0)), no_capabilities) != 0:
        raise OSError(_errno(), "capset: " + os.strerror(_errno()))


def _deny_system_calls(libc) -> None:
    """A seccomp filter (x86-64; elsewhere none): the system calls that make namespaces, mount, trace
    processes or reach kernel subsystems fail with EPERM, and clone() with a namespace flag too — the
    kernel's attack surface a nested user namespace would open. Everything else is allowed."""
    import ctypes
    if os.uname().machine != "x86_64":
        return

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Instruction))]

    code = _seccomp_program()
    instructions = (Instruction * len(code))(*[Instruction(*i) for i in code])
    program = Program(len(code), instructions)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(_errno(), "seccomp: " + os.strerror(_errno()))


def _seccomp_program() -> list[tuple[int, int, int, int]]:
    """The BPF program of _deny_system_calls, as (code, jump if true, jump if false, k) instructions:

        arch ≠ x86-64 → kill;  number ≥ 2^30 (the x32 entry points) or in DENIED_SYSCALLS → EPERM;
        clone3 → ENOSYS (C libraries fall back to clone);  clone with a namespace flag → EPERM;  else allow
    """
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF_LD|W|ABS, BPF_JMP|JEQ|JGE|JSET|K, BPF_RET|K
    code = [(load, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
            (load, 0, 0, 0), (jge, "deny", 0, X32_SYSCALL_BIT)]
    code += [(jeq, "deny", 0, number) for number in sorted(DENIED_SYSCALLS)]
    code += [(jeq, "nosys", 0, SYS_CLONE3), (jeq, 0, "allow", SYS_CLONE),
             (load, 0, 0, 16), (jset, "deny", "allow", CLONE_NAMESPACES)]   # 16: clone's flags (low half)
    labels = {"allow": len(code), "deny": len(code) + 1, "nosys": len(code) + 2}
    code += [(ret, 0, 0, SECCOMP_RET_ALLOW), (ret, 0, 0, SECCOMP_RET_ERRNO | 1),     # 1: EPERM
             (ret, 0, 0, SECCOMP_RET_ERRNO | 38)]                                    # 38: ENOSYS
    offset = lambda i, to: labels[to] - i - 1 if isinstance(to, str) else to        # noqa: E731 (jumps are relative)
    return [(op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code)]


def _install_guards(folder: str) -> None:
    """The in-process guards (see the module docstring): a second layer, not the fence."""
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


if __name__ == "__main__":
    _supervisor_main(*sys.argv[1:])
