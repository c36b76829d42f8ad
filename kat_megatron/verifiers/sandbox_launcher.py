"""The sandbox launcher: isolates one run, then `exec`s `python -I -B main.py` (docs/sandbox.md).

`SubprocessSandbox` runs this file's source as `python -I -c SOURCE ARGS_JSON` in a fresh
session; it is not meant to be run by hand. Standard library only (it runs before, and outside,
any environment the program gets). Steps:
1. `unshare` network, PID, mount, IPC and UTS namespaces (plus a user namespace when not root);
2. a minimal root: a small tmpfs holding read-only, nosuid, nodev bind mounts of the
   interpreter's prefixes and the system libraries (`binds`), /dev/{null,zero,full,random,
   urandom}, a fresh /proc of the PID namespace, and the run's directory /sandbox, a tmpfs of
   `disk_kb` KiB and `max_files` inodes (/tmp and /dev/shm point to it); `pivot_root` into it
   and detach the host's tree; the root tmpfs is then remounted read-only;
3. report the set-up (one JSON line on `report_fd`), fork the PID namespace's init, which forks
   the program: rlimits, its own uid (as root), PR_SET_NO_NEW_PRIVS, only fds 0-2 (and the
   channel at 3/4, when given) open; after it ends, the init reports the exit status and the
   run directory's free space (a second JSON line).
Any failure of step 2 is reported as `error` and nothing is run.
"""

import ctypes
import fcntl
import json
import os
import resource
import shutil
import signal
import sys

NEWNS, NEWUTS, NEWIPC, NEWUSER = 0x20000, 0x4000000, 0x8000000, 0x10000000
NEWPID, NEWNET = 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# statvfs f_flag bit -> mount flag to keep when remounting a bind (the kernel refuses to clear
# locked flags inherited from a parent user namespace)
KEEP = {1: RDONLY, 2: NOSUID, 4: NODEV, 8: NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ("null", "zero", "full", "random", "urandom")
WORK = "/sandbox"
"""The run's directory inside the minimal root (also its cwd, HOME and TMPDIR)."""

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def check(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, dst, fs, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(src), enc(dst), enc(fs), flags, enc(data)) == 0, f"mount {dst}")


def ro_bind(src: str, dst: str, extra: int = NODEV) -> None:
    """Bind `src` at `dst`, then remount it read-only and nosuid (keeping locked flags)."""
    mount(src, dst, None, BIND)
    kept = sum(flag for bit, flag in KEEP.items() if os.statvfs(dst).f_flag & bit)
    mount(None, dst, None, REMOUNT | BIND | RDONLY | NOSUID | extra | kept)


def userns(uid_map: str, gid_map: str) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


class Root:
    """Builds the minimal root under `top` (a host directory), before `pivot_root`."""

    def __init__(self, top: str) -> None:
        self.top, self.bound = top, []

    def inside(self, path: str) -> str:
        dst = self.top + path
        # only directories made here or bind-mounted copies: never a symlink to the host
        assert os.path.realpath(os.path.dirname(dst)) == os.path.dirname(dst), dst
        return dst

    def visible(self, path: str) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in self.bound)

    def mirror(self, path: str, depth: int = 0) -> None:
        """Make host `path` appear at the same place: symlinks on the way are copied as
        symlinks (and their targets mirrored), the real file or directory is bound read-only."""
        if depth > 40:
            raise OSError(f"too many symlinks under {path}")
        parts, cur = os.path.normpath(path).strip("/").split("/"), "/"
        for i, name in enumerate(parts):
            host = os.path.join(cur, name)
            if not os.path.lexists(host):
                return
            if os.path.islink(host):
                if not self.visible(host) and not os.path.lexists(self.inside(host)):
                    os.symlink(os.readlink(host), self.inside(host))
                rest = "/".join(parts[i + 1 :])
                target = os.path.join(cur, os.readlink(host))  # absolute targets stay absolute
                return self.mirror(os.path.normpath(os.path.join(target, rest)), depth + 1)
            if self.visible(host):
                cur = host
                continue
            dst = self.inside(host)
            if i < len(parts) - 1:
                os.path.isdir(dst) or os.mkdir(dst, 0o755)
            else:
                os.mkdir(dst, 0o755) if os.path.isdir(host) else open(dst, "w").close()
                ro_bind(host, dst)
                self.bound.append(host)
            cur = host

    def build(self, a: dict, run_uid: int) -> None:
        top = self.top
        mount("tmpfs", top, "tmpfs", NOSUID | NODEV, "size=4m,nr_inodes=4096,mode=0755")
        for path in sorted(
            a["binds"], key=lambda p: (os.path.islink(p) or not os.path.isdir(p), p)
        ):
            self.mirror(path)
        for d in ("/dev", "/proc", WORK, "/.old"):
            os.mkdir(top + d, 0o755)
        for dev in DEVICES:
            open(f"{top}/dev/{dev}", "w").close()
            ro_bind(f"/dev/{dev}", f"{top}/dev/{dev}", NOEXEC)
        for name, target in (("fd", "/proc/self/fd"), ("shm", WORK), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
            os.symlink(target, f"{top}/dev/{name}")
        if not os.path.lexists(top + "/tmp"):
            os.symlink(WORK, top + "/tmp")
        opts = f"size={a['disk_kb']}k,nr_inodes={a['max_files']},mode=0700"
        mount("tmpfs", top + WORK, "tmpfs", NOSUID | NODEV, f"{opts},uid={run_uid},gid={run_uid}")
        shutil.copyfile(os.path.join(a["work"], "main.py"), top + WORK + "/main.py")
        os.chown(top + WORK + "/main.py", run_uid, run_uid)
        nr = SYS_PIVOT_ROOT.get(os.uname().machine)
        check(nr is not None, f"pivot_root on {os.uname().machine}")
        check(libc.syscall(nr, top.encode(), (top + "/.old").encode()) == 0, "pivot_root")
        os.chdir(WORK)


def finish_root() -> None:
    """In the PID namespace's init: its own /proc, then drop the host's tree for good."""
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    check(libc.umount2(b"/.old", 2) == 0, "umount /.old")  # MNT_DETACH
    os.rmdir("/.old")
    mount(None, "/", None, REMOUNT | RDONLY | NOSUID | NODEV)


def exec_program(a: dict, iso: dict, run_uid: int | None, root: bool, fail_w: int) -> None:
    """In the program's process: fds, rlimits, uid, no new privileges, then exec. If that
    fails, say why on `fail_w` (close-on-exec: EOF there means the exec happened)."""
    chan = a["channel_fds"] or []
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in chan]  # out of the way of 3/4
    for new, fd in zip((3, 4), moved):
        os.dup2(fd, new)
    libc.prctl(PR_SET_DUMPABLE, 1)  # own /proc/self files again (the nested uid maps)
    fail_w = fcntl.fcntl(fail_w, fcntl.F_DUPFD_CLOEXEC, 3 + len(chan))
    os.closerange(3 + len(chan), fail_w)
    os.closerange(fail_w + 1, 1 << 16)
    try:
        for k in ("AS", "CPU", "FSIZE", "NPROC"):
            if a[k] > 0:
                lim = (a[k], a[k] + (k == "CPU"))
                resource.setrlimit(getattr(resource, "RLIMIT_" + k), lim)
        if run_uid is not None:
            os.setgroups([])
            os.setgid(run_uid)
            os.setuid(run_uid)
        elif iso["pid"] and not root and libc.unshare(NEWUSER | NEWNS) == 0:
            userns("1000 0 1", "1000 0 1")  # nested: no capability over the mounts
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS")
        cwd = os.getcwd()
        env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
        env.update(PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
        os.execve(a["python"], [a["python"], "-I", "-B", "main.py"], env)
    except OSError as e:
        os.write(fail_w, f"cannot exec {a['python']} as uid {os.getuid()}: {e}".encode())
    os._exit(126)


def run_init(a: dict, iso: dict, run_uid, root: bool, w: int, alive_r: int) -> None:
    """PID 1 of the new namespace: finish the root, run the program, report how it ended."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_DUMPABLE, 0)
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":
            os._exit(1)  # the launcher is already gone
    except BlockingIOError:
        pass
    os.close(alive_r)
    out: dict = {}
    try:
        if iso["root"]:
            finish_root()
    except OSError as e:
        out["error"] = f"sandbox setup: {e}"
    if "error" not in out:
        fail_r, fail_w = os.pipe()
        user = os.fork()
        if user == 0:
            os.close(w)
            os.close(fail_r)
            exec_program(a, iso, run_uid, root, fail_w)
        os.close(fail_w)
        for fd in a["channel_fds"] or []:
            os.close(fd)  # the peer must see EOF when the program is gone
        failed = os.read(fail_r, 4096).decode(errors="replace")
        if failed:
            out["error"] = f"sandbox: {failed}"
        out["status"] = os.waitpid(user, 0)[1]
        if iso["root"]:
            st = os.statvfs(WORK)
            out.update(disk_free_kb=st.f_bavail * st.f_frsize // 1024, files_free=st.f_favail)
    os.write(w, json.dumps(out).encode())
    os._exit(0)


def setup(a: dict, iso: dict, root: bool, run_uid) -> None:
    """Namespaces and (with `readonly_fs`) the minimal root; failures go to `iso`."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS | (0 if root else NEWUSER)) != 0:
        iso["notes"].append(f"unshare: {os.strerror(ctypes.get_errno())}")
        return
    if not root:
        userns(f"0 {uid} 1", f"0 {gid} 1")
    iso["network"] = iso["pid"] = True
    libc.sethostname(b"sandbox", 7)
    try:
        mount(None, "/", None, REC | PRIVATE)
        if a["readonly_fs"]:
            Root(a["root_dir"]).build(a, 0 if run_uid is None else run_uid)
            iso["root"] = iso["readonly_fs"] = True
    except (OSError, AssertionError) as e:
        iso["error"] = f"sandbox setup: {e}"


def reachable(path: str) -> bool:
    """Every directory on `path` traversable by other users."""
    parts = os.path.normpath(path).split("/")[1:]
    dirs = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return all(os.stat(d).st_mode & 1 for d in dirs if os.path.isdir(d))


def main(a: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.set_inheritable(a["report_fd"], False)
    root, parent = os.geteuid() == 0, os.getpid()
    iso = {"network": False, "pid": False, "readonly_fs": False, "root": False,
           "uid": os.getuid(), "no_new_privs": True, "notes": []}  # fmt: skip
    run_uid = (a["uid"] or a["uid_base"] + parent) if root and a["drop"] else None
    if a["namespaces"]:
        setup(a, iso, root, run_uid)
    if not iso["root"]:
        os.chdir(a["work"])
        if run_uid is not None and not reachable(os.path.realpath(a["python"])):
            iso["notes"].append("kept uid 0: the interpreter is not reachable by other users")
            run_uid = None
        if run_uid is not None:
            os.chown(a["work"], run_uid, run_uid)
    iso["uid"] = run_uid if run_uid is not None else iso["uid"]
    libc.prctl(PR_SET_DUMPABLE, 0)  # after the uid maps: no ptrace, no /proc/<pid>/mem by uid
    refuse = not iso["network"] and not a["allow_net"]
    report = os.fdopen(a["report_fd"], "w")
    report.write(json.dumps(dict(iso, refused=refuse)) + "\n")
    report.flush()
    if refuse or "error" in iso:
        os._exit(a["refused_code"] if refuse else 1)
    r, w = os.pipe()
    alive_r, alive_w = os.pipe()  # EOF on alive_r: the launcher is gone
    if os.fork() == 0:
        os.close(r)
        os.close(alive_w)
        run_init(a, iso, run_uid, root, w, alive_r)
    os.close(w)
    os.close(alive_r)
    for fd in a["channel_fds"] or []:
        os.close(fd)
    raw = b""
    while chunk := os.read(r, 1 << 16):
        raw += chunk
    end = json.loads(raw or b"{}")
    report.write(json.dumps(end) + "\n")
    report.close()
    status = end.get("status", os.wait()[1] if "error" not in end else 256)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
