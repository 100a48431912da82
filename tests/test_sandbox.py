"""The code sandbox: each test runs real code in it and checks that one fence holds.

ESCAPES is the attack suite: each entry is a program written to get out, and a check run on the host
afterwards. Every escape runs with the in-process guards switched off (python_guards=False), so what holds
is the kernel's doing; a reviewer adds an attack by adding an entry. The guards themselves (a second layer
that fails early with a clear message) are checked below it.
"""
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from picochat import sandbox
from picochat.sandbox import run_python


def sandbox_processes() -> list[int]:
    """Host processes (zombies aside) running as a sandbox's uid."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) >= sandbox.FIRST_UID and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def leftover_folders() -> set[str]:
    return {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("picochat-sandbox-")}


@pytest.fixture
def host(tmp_path):
    """What an escape would go for: a secret file, a process of the user's, a TCP listener on 127.0.0.1."""
    secret = tmp_path / "id_rsa"
    secret.write_text("the user's secret key")
    victim = subprocess.Popen(["sleep", "60"])
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield {"secret": str(secret), "victim": victim.pid, "port": server.getsockname()[1],
           "caller": os.getpid(), "outside": f"/tmp/picochat-escape-{uuid.uuid4().hex}", "tmp": str(tmp_path),
           "system": f"/usr/lib/picochat-escape-{uuid.uuid4().hex}"}
    victim.kill()
    victim.wait()
    server.close()


# name: (program, tests, what must hold of the result). {secret} {victim} {port} {caller} {outside} {tmp}
# are filled in from the host fixture. The program prints ESCAPED if it got what it wanted.
ESCAPES = {
    "read a secret file of the user": (
        "print('ESCAPED', open({secret!r}).read())", "", "FileNotFoundError"),
    "read /etc/shadow": ("print('ESCAPED', open('/etc/shadow').read())", "", "FileNotFoundError"),
    "list the user's home": ("import os\nprint('ESCAPED', os.listdir(os.path.expanduser('/root/.ssh')))", "",
                             "FileNotFoundError"),
    "undo the guards in three lines, then read": (   # the reported attack, guards on or off
        "import sys\nsys.modules.pop('ctypes', None)\nimport ctypes\n"
        "print('ESCAPED', open({secret!r}).read())", "", "FileNotFoundError"),
    "read the caller's environment through /proc": (
        "print('ESCAPED', open('/proc/{caller}/environ').read())", "", "FileNotFoundError"),
    "write to /tmp": ("open({outside!r}, 'w').write('x')\nprint('ESCAPED')", "", "FileNotFoundError"),
    "write to a system folder": ("open({system!r}, 'w').write('x')\nprint('ESCAPED')", "", "Read-only file system"),
    "write into the interpreter": (
        "import os\nopen(os.__file__ + '.x', 'w').write('x')\nprint('ESCAPED')", "", "Read-only file system"),
    "kill another process of the user": (
        "import os\nos.kill({victim}, 9)\nprint('ESCAPED')", "", "ProcessLookupError"),
    "kill the caller": ("import os\nos.kill({caller}, 9)\nprint('ESCAPED')", "", "ProcessLookupError"),
    "kill its parent": ("import os, time\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError:\n    pass\n"
                        "time.sleep(0.5)\nprint('alive')", "", "alive"),
    "kill every process it may": ("import os\nos.kill(-1, 9)\nprint('ESCAPED')", "", "ProcessLookupError"),
    "kill through ctypes": (
        "import ctypes\nprint('ESCAPED' if ctypes.CDLL(None).kill({victim}, 9) == 0 else 'refused')", "",
        "refused"),
    "connect to localhost": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('ESCAPED')", "",
        "Network is unreachable"),
    "raise its limits": (
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nprint('ESCAPED')", "",
        "not allowed to raise maximum limit"),
    "mount the host's disk": (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "print('ESCAPED' if libc.mount(b'none', b'/sandbox', b'proc', 0, None) == 0 else 'refused')", "",
        "refused"),
    "make a user namespace and mount in it": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('ESCAPED' if libc.unshare(0x10000000 | 0x20000) == 0 else f'refused {{ctypes.get_errno()}}')", "",
        "refused 1"),
    "clone a process into new namespaces": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = libc.syscall(56, 0x10000000 | 0x20000000 | 17, 0, 0, 0, 0)\n"
        "import os\nos._exit(0) if pid == 0 else print('ESCAPED' if pid > 0 else f'refused {{ctypes.get_errno()}}')",
        "", "refused 1"),
    "unshare through the x32 entry point": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('ESCAPED' if libc.syscall(0x40000000 | 272, 0x20000) == 0 else 'refused')", "", "refused"),
    "trace init": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "print('ESCAPED' if libc.ptrace(16, 1, 0, 0) == 0 else 'refused')", "", "refused"),
    "keep a capability in the bounding set": (
        "import ctypes\nprint('ESCAPED' if ctypes.CDLL(None).prctl(23, 21, 0, 0, 0) == 1 else 'refused')", "",
        "refused"),
    "forge 'sandbox unavailable' to stop a whole evaluation": (
        "import os, sys\nos.write(int(sys.argv[1]), b'unavailable: forged\\n')\nos._exit(125)", "", ""),   # no raise
    "fake a pass by exiting early with 0": ("import os\nos._exit(0)", "assert False", "did not run to completion"),
    "fake a pass through the harness's frames": (
        "import sys\nf = sys._getframe()\nwhile f is not None:\n"
        "    for name in ('exit_now', 'exit'):\n"
        "        if callable(f.f_locals.get(name)):\n            f.f_locals[name](0)\n"
        "    f = f.f_back\n", "assert False", "did not run to completion"),
    "fake a pass by writing to the report pipe": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n"
        "        pass\nos._exit(0)", "assert False", "did not run to completion"),
}


@pytest.mark.parametrize("name", ESCAPES)
def test_escape_fails_without_the_python_guards(name, host):
    program, tests, expected = ESCAPES[name]
    before = leftover_folders()
    result = run_python(program.format(**host), tests, timeout=5, python_guards=False)
    assert not result.passed or "ESCAPED" not in result.output, result.output
    assert "ESCAPED" not in result.output and expected in result.output, result.output
    assert os.path.exists(f"/proc/{host['victim']}")
    assert not os.path.exists(host["outside"]) and not os.path.exists(host["system"])
    assert leftover_folders() <= before and sandbox_processes() == []


def test_the_user_namespace_path_holds_too(host):
    # root without CAP_SYS_ADMIN takes the path unprivileged users take: a user namespace, the same uid
    probe = textwrap.dedent(f"""
        from picochat.sandbox import run_python
        programs = [
            "print(open({host['secret']!r}).read())",
            "import os, signal, time\\nos.kill(1, signal.SIGINT)\\ntime.sleep(0.3)\\nprint('init alive')",
            "import os\\nwhile True:\\n    os.fork()",
            "import ctypes\\nprint('unshare', ctypes.CDLL(None).unshare(0x20000))",
        ]
        for program in programs:
            result = run_python(program, "print('tests ran')", timeout=5, python_guards=False)
            print(repr((result.status, result.output.strip().splitlines()[-1])))
    """)
    done = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", probe],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"no setpriv here: {done.stderr.strip()}")
    results = [eval(line) for line in done.stdout.splitlines()]
    assert len(results) == 4, done
    assert results[0][0] == "failed" and "FileNotFoundError" in results[0][1]
    assert results[1] == ("passed", "tests ran")   # the SIGINT never reached init
    assert results[2][0] == "failed" and "Resource temporarily unavailable" in results[2][1]
    assert results[3] == ("passed", "tests ran")   # unshare returned -1 (EPERM) and the program went on
    assert "secret" not in done.stdout


def test_the_reported_guard_undoing_attack_with_the_guards_on(host):
    # the attack as reported: drop ctypes from sys.modules, re-import it; widen the open() allow-list
    program = textwrap.dedent(f"""
        import sys
        sys.modules.pop("ctypes", None)
        import builtins
        for cell in builtins.open.__closure__ or ():
            if isinstance(cell.cell_contents, list):
                cell.cell_contents.append("/")
        print("ESCAPED", open({host['secret']!r}).read())
    """)
    result = run_python(program, timeout=5)
    assert "secret" not in result.output and "ESCAPED" not in result.output and not result.passed


def test_processes_it_starts_die_with_it_even_after_setsid():
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
               "print('parent done', flush=True)")
    result = run_python(program, timeout=5, python_guards=False)
    assert result.passed and "parent done" in result.output
    assert sandbox_processes() == []


def test_the_deadline_kills_the_whole_tree_and_removes_the_folder():
    before = leftover_folders()
    program = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
               "open('/sandbox/left', 'w').write('x')\ntime.sleep(60)")
    result = run_python(program, timeout=1, python_guards=False)
    assert result.status == "timeout" and result.seconds < 4
    assert sandbox_processes() == [] and leftover_folders() <= before


def test_fork_bomb_is_bounded_and_leaves_nothing():
    result = run_python("import os\nwhile True:\n    os.fork()", timeout=3, python_guards=False)
    assert not result.passed and result.seconds < 5
    assert "Resource temporarily unavailable" in result.output or result.status == "timeout"
    assert sandbox_processes() == []


def test_the_folder_is_its_own_small_file_system():
    result = run_python("import os\nprint(os.getcwd(), os.environ['HOME'], sorted(os.listdir('/')))\n"
                        "open('big', 'wb').write(bytes(15 << 20))\nopen('big2', 'wb').write(bytes(15 << 20))\n"
                        "open('big3', 'wb').write(bytes(15 << 20))\nopen('big4', 'wb').write(bytes(15 << 20))\n"
                        "open('big5', 'wb').write(bytes(15 << 20))", python_guards=False)
    first = result.output.splitlines()[0]
    assert first.startswith("/sandbox /sandbox [") and "'home'" not in first and "'etc'" not in first
    assert "No space left on device" in result.output   # 64 MiB in all, in memory, gone with the namespace


def test_refuses_to_run_where_the_kernel_has_no_namespaces():
    # root without CAP_SYS_ADMIN, in a user namespace that may make no more user namespaces
    probe = ("from picochat.sandbox import run_python, SandboxUnavailable\n"
             "try:\n    run_python('print(1)')\nexcept SandboxUnavailable as e:\n    print('refused:', e)\n"
             "print(run_python('print(\"ran\")', allow_unconfined=True).output.strip())")
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces && "
              f"setpriv --bounding-set=-sys_admin {sys.executable} -c \"$PROBE\"")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PROBE": probe})
    lines = done.stdout.splitlines()
    if done.returncode != 0 or not lines:   # no unshare or setpriv, or no user namespaces at all
        pytest.skip(f"cannot build the restricted environment here: {done.stderr.strip()}")
    assert lines[0].startswith("refused: unavailable: the kernel refused new namespaces"), done
    assert sandbox.OPT_OUT in lines[0] and lines[1] == "ran"
    assert "UnconfinedWarning: the sandbox ran code without the kernel's fences" in done.stderr


# ------------------------------------------------------------------------- results and limits

def test_passing_and_failing_programs():
    ok = run_python("print('hello', 6 * 7)")
    assert (ok.passed, ok.status, ok.output, ok.returncode) == (True, "passed", "hello 42\n", 0)
    wrong = run_python("def f():\n    return 1\nassert f() == 2, 'wrong answer'")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError: wrong answer" in wrong.output and 'File "main.py", line 3' in wrong.output
    assert run_python("def f(:\n").status == "failed"
    crash = run_python("import signal\nsignal.raise_signal(signal.SIGSEGV)")
    assert (crash.status, crash.returncode) == ("killed", -11) and "Segmentation fault" in crash.output


def test_tests_run_after_the_code_in_its_namespace():
    code = "def add(a, b):\n    return a + b\n"
    assert run_python(code, "assert add(2, 3) == 5").passed
    failed = run_python(code, "assert add(2, 3) == 6, 'add is wrong'")
    assert failed.status == "failed" and 'File "tests.py", line 1' in failed.output
    assert not run_python("raise ValueError('broken')", "print('never')").passed


def test_exit_before_the_end_counts_as_failing():
    # a completion that exits early would otherwise skip the tests that follow it
    for early_exit in ("import sys; sys.exit(0)", "exit()", "import os; os._exit(0)"):
        result = run_python(early_exit, "assert False")
        assert result.status == "failed", early_exit


def test_infinite_loop_stops_at_the_timeout():
    result = run_python("while True:\n    pass", timeout=1.0)
    assert (result.passed, result.status, result.returncode) == (False, "timeout", None)
    assert 1.0 <= result.seconds < 3.0


def test_memory_bombs_are_stopped_by_the_address_space_limit():
    huge = run_python("x = bytearray(10**11)")        # 100 GB at once
    assert huge.status == "failed" and "MemoryError" in huge.output
    growing = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=256)
    assert growing.status in ("failed", "killed") and growing.seconds < 5
    assert "MemoryError" in growing.output or growing.status == "killed"
    # the limit is the one asked for: 200 MB fits in 512 and not in 128
    allocate = "x = bytearray(200 * 2**20); x[-1] = 1; print('allocated')"
    assert run_python(allocate, memory_mb=512).passed
    assert not run_python(allocate, memory_mb=128).passed


def test_output_is_captured_and_cut_to_its_tail():
    result = run_python("import sys\nfor i in range(5000):\n    print(i)\nprint('done', file=sys.stderr)")
    assert result.passed and result.output.endswith("4998\n4999\ndone\n")
    assert "bytes cut" in result.output and len(result.output) < sandbox.OUTPUT_TAIL + 100


def test_file_size_and_open_file_limits():
    big = run_python(f"with open('big', 'wb') as f:\n    f.write(bytes({sandbox.MAX_FILE_BYTES + 1}))")
    assert big.status == "failed" and "File too large" in big.output
    many = run_python("files = [open(f'f{i}', 'w') for i in range(1000)]")
    assert many.status == "failed" and "Too many open files" in many.output


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        run_python("pass", timeout=0)
    with pytest.raises(ValueError):
        run_python("pass", memory_mb=-1)


# ------------------------------------------------------------------------- the in-process guards (second layer)

def test_guards_stop_processes_sockets_and_files_with_a_clear_error(host):
    for start in ("import subprocess; subprocess.run(['true'])", "import os; os.system('true')",
                  "import os; os.fork()", "import os; os.kill(1, 0)",
                  "import multiprocessing; multiprocessing.Process(target=print).start()"):
        result = run_python(start)
        assert result.status == "failed" and "PermissionError" in result.output, start
    sock = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {host['port']}), timeout=1)")
    assert "creating a socket is disabled" in sock.output
    write = run_python(f"open({host['outside']!r}, 'w')")
    assert "outside the sandbox's folder" in write.output
    for program in ("import ctypes", "import resource"):
        assert "ModuleNotFoundError" in run_python(program).output


def test_home_is_the_folder_and_the_environment_is_empty():
    result = run_python("import os\nprint(os.environ['HOME'] == os.getcwd() == os.path.expanduser('~'), "
                        "sorted(os.environ))")
    assert result.output.strip() == "True ['HOME', 'LANG', 'PATH', 'TMPDIR']"
