"""Sandbox isolation under attack (issue 17): other runs' files, host files, host unix sockets,
disk and inode quotas, setuid binaries, deep trees, unencodable text, truncated output, and
internal failures returned as results. Each attack succeeded (or raised) before the minimal
root; `.venv/bin/python -m pytest tests/verifiers/test_sandbox_isolation.py`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from kat_megatron.verifiers import get_verifier
from kat_megatron.verifiers import sandbox as sandbox_mod
from kat_megatron.verifiers.sandbox import UID_BASE, SandboxConfig, SubprocessSandbox

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0


def box(**kw) -> SubprocessSandbox:
    kw.setdefault("memory_mb", 256)
    kw.setdefault("max_processes", 8)
    return SubprocessSandbox(SandboxConfig(**kw))


# Looks for `secret` (assembled at run time, so the scanner's own file does not hold it) in
# every place another run or the host could have left it: temp directories, other processes'
# cmdline / environ / cwd, and the host's sandbox directories.
SCAN = """
import glob, os
secret = SECRET_A + SECRET_B
hits = []
def look(path):
    try:
        with open(path, "rb") as f:
            if secret.encode() in f.read(1 << 20):
                hits.append(path)
    except OSError:
        pass
tops = ["/tmp", "/dev/shm", "/var/tmp", "/sandbox", "/run", "/home"]
for top in tops + glob.glob("/tmp/kat_sandbox_*"):
    for d, _, files in os.walk(top):
        for name in files:
            look(os.path.join(d, name))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for p in pids:
    look(f"/proc/{p}/cmdline")
    look(f"/proc/{p}/environ")
    try:
        for name in os.listdir(f"/proc/{p}/cwd"):
            look(f"/proc/{p}/cwd/{name}")
    except OSError:
        pass
print("HITS", hits, "PIDS", len(pids))
"""


def scan(a: str, b: str) -> str:
    return SCAN.replace("SECRET_A", repr(a)).replace("SECRET_B", repr(b))


def wait_for_sandboxed(n: int, timeout_s: float = 30.0) -> None:
    """Until `n` sandboxed programs (`python -I -B main.py` under a per-run uid) are running."""
    if not ROOT:
        time.sleep(3)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = 0
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read()
                uid = os.stat(f"/proc/{p}").st_uid
            except OSError:
                continue
            found += uid >= UID_BASE and cmd.endswith(b"-B\0main.py\0")
        if found >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} sandboxed programs started")


def test_a_run_cannot_read_a_concurrent_runs_files():
    a, b = "kat-victim-", uuid.uuid4().hex
    victim = (
        f"# {a + b}\nimport time\nfor p in ('secret', '/tmp/s2', '/dev/shm/s3'):\n"
        f"    open(p, 'w').write({a + b!r})\ntime.sleep(4)"
    )
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", box().run(victim, timeout_s=20)))
    t.start()
    try:
        wait_for_sandboxed(1)
        r = box().run(scan(a, b), timeout_s=20)
    finally:
        t.join()
    assert out["v"].ok and r.ok, r.stderr
    assert "HITS []" in r.stdout  # neither its files nor its program text
    assert "PIDS 2" in r.stdout  # its own PID namespace: init + itself


def test_the_peer_of_run_pair_is_out_of_reach():
    a, b = "kat-hidden-", uuid.uuid4().hex
    peer = (
        f"# the judge's hidden tests: {a + b}\nimport os\nopen('tests.txt', 'w').write({a + b!r})"
        "\nos.write(4, b'go\\n')\nos.read(3, 1)"  # wait until the program has looked
    )
    program = "import os\nos.read(3, 3)\n" + scan(a, b)
    r, p = box().run_pair(program, peer, timeout_s=20, peer_timeout_s=20)
    assert r.ok and p.ok, (r.stderr, p.stderr)
    assert "HITS []" in r.stdout and "PIDS 2" in r.stdout


def test_a_concurrent_program_cannot_find_the_hidden_tests():
    """A slow verification holds its (secret) tests while another run searches for them."""
    secret = f"kat_secret_{uuid.uuid4().hex}"
    victim = {"tests": [f"{secret} = 1\nassert add(1, 2) == 3"], "timeout_s": 20}
    slow = "import time\ntime.sleep(4)\n" + "def add(a, b):\n    return a + b\n"
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", get_verifier("code")(slow, victim)))
    t.start()
    try:
        wait_for_sandboxed(2)  # the program and its judge
        r = box().run(scan(secret[:11], secret[11:]), timeout_s=20)
    finally:
        t.join()
    assert out["v"].correct and r.ok, r.stderr
    assert "HITS []" in r.stdout


def test_host_files_and_the_checkout_are_not_visible():
    readme = REPO / "README.md"
    assert readme.exists()
    program = (
        "import os, sys\n"
        f"for p in ({str(readme)!r}, '/etc/passwd', '/etc/hostname', {str(REPO)!r} + '/setup.py'):\n"
        "    try:\n        open(p).read(1)\n        print('READ', p)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        f"print(sorted(os.listdir({str(REPO)!r})) if os.path.isdir({str(REPO)!r}) else None)\n"
        "print(sorted(os.listdir('/')))"
    )
    r = box().run(program)
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["FileNotFoundError"] * 4  # /etc is not in the root at all
    # of the checkout, at most the interpreter's venv is there (read-only)
    assert lines[4] in ("None", "[]", "['.venv']")
    top = set(eval(lines[5]))
    assert {"sandbox", "proc", "dev", "tmp", "usr"} <= top and "etc" not in top
    assert top <= {"sandbox", "proc", "dev", "tmp", "usr", "lib", "lib64", "lib32", "libx32"} | {
        Path(p).parts[1] for p in sandbox_mod._interpreter_paths(sys.executable)
    }


def test_host_unix_sockets_are_unreachable(request):
    d = tempfile.mkdtemp(prefix="kat_sock_", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    os.chmod(d, 0o777)
    path = os.path.join(d, "s")
    servers = []
    for addr in (path, "\0kat-abstract-" + uuid.uuid4().hex):
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
        s.listen(4)
        s.setblocking(False)
        servers.append(s)
        request.addfinalizer(s.close)
    os.chmod(path, 0o777)  # world-writable: any uid on the host may connect
    program = (
        "import socket\n"
        f"for addr in ({path!r}, {servers[1].getsockname()!r}):\n"
        "    try:\n        socket.socket(socket.AF_UNIX).connect(addr)\n        print('CONNECTED')\n"
        "    except OSError as e:\n        print(type(e).__name__)"
    )
    r = box().run(program)
    assert r.ok and "CONNECTED" not in r.stdout, r.stdout
    for s in servers:
        with pytest.raises(BlockingIOError):
            s.accept()  # nothing reached the host's listeners


def test_disk_quota_covers_the_directory_tmp_and_shm():
    program = (
        "import os\nst = os.statvfs('.')\nprint(st.f_blocks * st.f_frsize // 2**20, flush=True)\n"
        "for i in range(2048):  # 2 GiB, 1 MiB per file (RLIMIT_FSIZE caps each file)\n"
        "    d = ('.', '/tmp', '/dev/shm')[i % 3]\n"
        "    open(f'{d}/f{i}', 'wb').write(b'x' * 2**20)\n"
        "    print(i, flush=True)"
    )
    start = time.monotonic()
    r = box(disk_mb=16).run(program, timeout_s=30)
    assert r.returncode == 1 and r.violation == "disk" and r.error is None
    assert "No space left on device" in r.stderr
    written = r.stdout.split()
    assert written[0] == "16" and 10 <= len(written) - 1 <= 16  # within the 16 MiB tmpfs
    assert r.isolation["disk_free_kb"] <= 4 and time.monotonic() - start < 25


def test_file_count_limit():
    program = "import os\nos.mkdir('d')\nfor i in range(100_000):\n    open(f'd/{i}', 'w').close()"
    r = box(max_files=64).run(program, timeout_s=30)
    assert r.returncode == 1 and r.violation == "files" and r.isolation["files_free"] == 0


def test_no_new_privileges_and_nosuid_mounts():
    program = (
        "status = open('/proc/self/status').read()\n"
        "print([l for l in status.splitlines() if l.startswith('NoNewPrivs')][0])\n"
        "opts = [l.split()[5] for l in open('/proc/self/mountinfo')]\n"
        "print(all('nosuid' in o.split(',') for o in opts), len(opts))"
    )
    r = box().run(program)
    assert r.ok and r.isolation["no_new_privs"], r.stderr
    assert r.stdout.splitlines()[0].split() == ["NoNewPrivs:", "1"]
    assert r.stdout.splitlines()[1].startswith("True ")


@pytest.mark.skipif(not ROOT, reason="needs root to make a root-owned setuid binary")
def test_setuid_binary_runs_without_its_privileges(request):
    d = tempfile.mkdtemp(prefix="kat_suid_", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    os.chmod(d, 0o755)
    suid = os.path.join(d, "id")
    shutil.copy("/usr/bin/id", suid)
    os.chmod(suid, 0o4755)
    # the reference: on the host, an unprivileged uid running it gets euid 0
    ref = subprocess.run([suid, "-u"], capture_output=True, text=True, user=65534, check=True)
    assert ref.stdout.strip() == "0"
    program = (
        f"import subprocess\nprint(subprocess.run([{suid!r}, '-u'], capture_output=True).stdout)"
    )
    r = box(ro_paths=(d,)).run(program, timeout_s=20)
    assert r.ok, r.stderr
    assert r.stdout.strip() == repr(f"{r.isolation['uid']}\n".encode()) and r.isolation["uid"] != 0


@pytest.mark.parametrize("readonly_fs", [True, False])
def test_a_deep_directory_tree_returns_a_result(readonly_fs, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # to see what is left behind
    program = (
        "import os\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    )
    r = box(readonly_fs=readonly_fs, max_files=4096).run(program, timeout_s=30)
    assert r.ok and r.stdout == "deep\n" and r.error is None, r.stderr
    assert not list(tmp_path.iterdir())


def test_unencodable_text_is_the_programs_error_not_the_sandboxs():
    r = box().run("print('\ud800')", stdin="\udcff")
    assert r.returncode == 1 and r.error is None and "SyntaxError" in r.stderr
    r = box().run("import sys\nprint(len(sys.stdin.buffer.read()))", stdin="a\udcffb")
    assert r.ok and r.stdout == "5\n"  # the surrogate's 3 bytes reach the program as they are


def test_truncated_output_is_flagged():
    sandbox = box(max_output_kb=64)
    r = sandbox.run("import sys\nsys.stdout.write('x' * 65536)")
    assert r.ok and not r.truncated and len(r.stdout) == 65536  # exactly the limit: whole
    r = sandbox.run("print('x' * 10**6)")
    assert r.truncated and len(r.stdout) == 65536 and not r.ok
    r = sandbox.run("import sys\nsys.stderr.write('e' * 10**6)")
    assert r.truncated and len(r.stderr) == 65536
    assert not sandbox.run("print('hi')").truncated


def test_internal_failures_are_results(monkeypatch):
    r = box(python="/nonexistent/python").run("print(1)")
    assert r.error and "cannot exec /nonexistent/python" in r.error and not r.ok
    with monkeypatch.context() as m:
        m.setattr(sandbox_mod, "_LAUNCHER", "import sys\nsys.exit(3)")
        r = box().run("print(1)")
    assert r.error and "launcher exited with 3" in r.error and r.returncode is None
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(OSError(28, "full")))
        r = box().run("print(1)")
        assert r.error == "sandbox: OSError: [Errno 28] full"
        p, q = box().run_pair("print(1)", "print(2)")
        assert p.error and q.error
