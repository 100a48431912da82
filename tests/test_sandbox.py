"""The code sandbox: each test runs real code in it and checks that one fence holds.

The OS-level layers (namespaces, capabilities) are also checked on their own, in a plain subprocess that
puts them up and then tries the raw system calls the in-process guards would otherwise stop first.
"""
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from picochat import sandbox
from picochat.sandbox import run_python


def living_members(session: int) -> list[int]:
    """Processes (zombies aside) whose session id is `session`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()   # after "(command name)"
        except (OSError, IndexError):
            continue
        if entry.isdigit() and fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry))
    return pids


def kernel_allows_namespaces(user_namespace: bool) -> bool:
    """Whether a plain unshare of new mount and network namespaces works here (independently of sandbox.py)."""
    flags = sandbox.CLONE_NEWNS | sandbox.CLONE_NEWNET | (sandbox.CLONE_NEWUSER if user_namespace else 0)
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def run_layers(script: str, folder, *, user_namespace: bool = False) -> str:
    """Put up the OS-level layers in a fresh interpreter (no in-process guards), then run `script`."""
    prologue = textwrap.dedent(f"""
        import errno, os, socket, sys
        from picochat import sandbox
        libc = sandbox._libc()
        layers = sandbox._isolate(libc, {str(folder)!r}, user_namespace={user_namespace})
        sandbox._set_limits(512 << 20, 10)
        print("layers", *layers)
        print("capabilities dropped", sandbox._drop_privileges(libc))
    """)
    done = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=30, cwd=folder)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_passing_and_failing_programs():
    ok = run_python("print('hello', 6 * 7)")
    assert (ok.passed, ok.status, ok.output, ok.returncode) == (True, "passed", "hello 42\n", 0)
    wrong = run_python("def f():\n    return 1\nassert f() == 2, 'wrong answer'")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError: wrong answer" in wrong.output and 'File "main.py", line 3' in wrong.output
    assert run_python("def f(:\n").status == "failed"
    crash = run_python("import signal\nsignal.raise_signal(signal.SIGSEGV)")
    assert (crash.status, crash.returncode) == ("killed", -11) and "Segmentation fault" in crash.output


def test_exit_before_the_end_counts_as_failing():
    # a completion that exits early would otherwise skip the tests that follow it
    for early_exit in ("import sys; sys.exit(0)", "exit()", "import os; os._exit(0)"):
        result = run_python(early_exit + "\nassert False")
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


def test_fork_bomb_is_stopped_and_leaves_no_process():
    result = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    os.fork()", timeout=3)
    assert result.status == "failed" and "os.fork is disabled" in result.output
    assert living_members(int(result.output.split()[0])) == []   # it led its own session
    for start in ("import subprocess; subprocess.run(['true'])", "import os; os.system('true')",
                  "import os; os.posix_spawn('/bin/true', ['true'], {})", "import os; os.kill(1, 0)",
                  "import multiprocessing; multiprocessing.Process(target=print).start()"):
        result = run_python(start)
        assert result.status == "failed" and "PermissionError" in result.output, start


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_killing_the_group_leaves_no_process():
    # the timeout's last resort, on a real tree: a shell and the two children it started
    tree = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        assert wait_until(lambda: len(living_members(tree.pid)) == 3)
        sandbox._kill_group(tree.pid)
        tree.wait(timeout=5)
        assert wait_until(lambda: living_members(tree.pid) == [])   # SIGKILL reaches the orphans too
    finally:
        tree.kill()


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that the sandbox must not reach."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def assert_nobody_connected(server):
    with pytest.raises(TimeoutError):
        server.accept()


def test_opening_a_socket_fails(listener):
    port = listener.getsockname()[1]
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert result.status == "failed" and "creating a socket is disabled" in result.output
    assert_nobody_connected(listener)


@pytest.mark.parametrize("user_namespace", [False, True])
def test_network_namespace_has_no_route_even_to_localhost(listener, tmp_path, user_namespace):
    if not kernel_allows_namespaces(user_namespace):
        pytest.skip("this kernel refuses new namespaces here")
    port = listener.getsockname()[1]
    out = run_layers(f"""
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            print("connected")
        except OSError as error:
            print("refused", errno.errorcode[error.errno])
    """, tmp_path, user_namespace=user_namespace)
    assert out.splitlines()[0] == "layers network filesystem" and "refused ENETUNREACH" in out
    assert_nobody_connected(listener)


def escape_path() -> str:
    return f"/tmp/picochat-sandbox-escape-{uuid.uuid4().hex}"


def test_writing_outside_the_folder_fails():
    targets = [escape_path() for _ in range(6)]
    attempts = [
        f"open({targets[0]!r}, 'w').write('x')",
        f"os.close(os.open({targets[1]!r}, os.O_WRONLY | os.O_CREAT))",
        f"pathlib.Path({targets[2]!r}).write_text('x')",
        f"os.mkdir({targets[3]!r})",
        f"os.symlink({targets[4]!r}, 'link'); open('link', 'w').write('x')",   # through a link inside
        f"shutil.copy('main.py', {targets[5]!r})",
    ]
    program = "import os, pathlib, shutil\n" + "".join(
        f"try:\n    {attempt}\n    print('escaped')\nexcept PermissionError:\n    print('refused')\n"
        for attempt in attempts)
    result = run_python(program)
    assert result.passed, result.output
    assert result.output.split() == ["refused"] * len(attempts)
    assert not any(os.path.lexists(target) for target in targets)


def test_writing_inside_the_folder_works_and_the_folder_is_deleted():
    result = run_python("import os\nos.mkdir('d')\nopen('d/f.txt', 'w').write('kept')\n"
                        "print(os.getcwd(), open('d/f.txt').read())")
    folder, text = result.output.split()
    assert result.passed and text == "kept" and os.path.basename(folder).startswith("picochat-sandbox-")
    assert not os.path.exists(folder)


@pytest.mark.parametrize("user_namespace", [False, True])
def test_file_system_is_read_only_outside_the_folder(tmp_path, user_namespace):
    if not kernel_allows_namespaces(user_namespace):
        pytest.skip("this kernel refuses new namespaces here")
    folder = tmp_path / "box"
    folder.mkdir()
    target = escape_path()
    out = run_layers(f"""
        open("inside.txt", "w").write("ok")
        try:
            open({target!r}, "w").write("x")
            print("escaped")
        except OSError as error:
            print("refused", errno.errorcode[error.errno])
    """, folder, user_namespace=user_namespace)
    assert out.splitlines()[0] == "layers network filesystem" and "refused EROFS" in out
    assert (folder / "inside.txt").read_text() == "ok"
    assert not os.path.exists(target)


def test_users_files_are_unreadable_and_home_is_the_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's secret")
    result = run_python(f"""import os
for attempt in (lambda: open({str(secret)!r}).read(), lambda: os.listdir({str(tmp_path)!r}),
                lambda: open(f"/proc/{{os.getppid()}}/environ").read(),   # the caller's environment
                lambda: open({os.path.expanduser("~/.bashrc")!r}).read()):
    try:
        print(attempt())
    except PermissionError:
        print("refused")
print(os.environ["HOME"] == os.getcwd() == os.path.expanduser("~"), sorted(os.environ))
""")
    assert result.passed, result.output
    assert "secret" not in result.output
    assert result.output.split("\n")[:4] == ["refused"] * 4
    assert result.output.split("\n")[4] == "True ['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_raw_system_calls_and_limits_cannot_be_reached():
    for program in ("import ctypes", "import resource"):
        result = run_python(program)
        assert result.status == "failed" and "ModuleNotFoundError" in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities matter for root only")
def test_root_loses_its_capabilities(tmp_path):
    out = run_layers("""
        import resource
        print(next(line for line in open("/proc/self/status") if line.startswith("CapEff")).split()[1])
        try:
            resource.setrlimit(resource.RLIMIT_AS, (-1, -1))
            print("raised")
        except (ValueError, OSError):
            print("refused")
    """, tmp_path)
    assert out.split("\n")[1:4] == ["capabilities dropped True", "0000000000000000", "refused"]


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
