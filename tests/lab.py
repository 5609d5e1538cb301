"""Test lab: network namespaces, daemons, clients and libvirtd for fencevirt tests.

Everything here starts real processes.  Rules kept throughout (see
/work/shared/testlab.md):

* traffic stays on loopback or inside network namespaces made here, named
  ``fv<pid % 100000>-<n>...`` so that several pytest runs on one machine never
  clash;
* every process started here is stopped by its PID (``stop_by_pid``), never
  by name;
* the C ``fence_xvm`` runs only inside a namespace made here (it multicasts
  from every local address);
* every subprocess call has a timeout.

Python 3.9 syntax on purpose: the suite may be run by an older interpreter.
"""

import collections
import contextlib
import errno
import fcntl
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCEVIRT = REPO / "fencevirt.py"
C_MODULE_PATH = "/usr/lib/x86_64-linux-gnu/fence-virt"
C_DAEMON = "/usr/sbin/fence_virtd"
C_XVM = "/usr/sbin/fence_xvm"
C_VIRT = "/usr/sbin/fence_virt"
LIBVIRTD = "/usr/sbin/libvirtd"
ROLES = ("fence_virtd", "fence_xvm", "fence_virt")

HOST_IP = "198.18.0.1"
HOST_IP6 = "2001:db8::1"
MCAST4 = "225.0.0.12"
MCAST6 = "ff05::3:1"
V6_PORT = 1230          # the IPv6 daemon of the SEQUENCE listens here (1229 is the IPv4 one)

LOCK_LIBVIRTD = "/run/lock/fencevirt-libvirtd.lock"
NS_PREFIX = "fv%d" % (os.getpid() % 100000)
_ns_counter = itertools.count(1)


def in_ci():
    """True when running under CI (CI=true/1/yes...)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------------------
# polling, stopping, running

def tail(log_path, nbytes=4000):
    """The last `nbytes` of log_path, headed for an assertion message ("" for None)."""
    if not log_path:
        return ""
    try:
        with open(str(log_path), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            data = f.read()
    except OSError as e:
        return "\n(log %s unreadable: %s)" % (log_path, e)
    return "\n--- tail of %s ---\n%s" % (log_path, data.decode("utf-8", "replace"))


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def wait_for(cond, proc=None, log_path=None, timeout=5, what="", interval=0.02):
    """Poll cond() every `interval` s until it returns something truthy; return that.

    Raises AssertionError after `timeout` seconds, or as soon as `proc` (a
    Popen, or a list of them) has exited, with the tail of `log_path` (a path
    or a list of paths) in the message.
    """
    deadline = time.monotonic() + timeout
    label = what or getattr(cond, "__name__", "condition")
    procs, log_paths = _as_list(proc), _as_list(log_path)

    def logs():
        return "".join(tail(p) for p in log_paths)
    while True:
        value = cond()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError("process %s exited with %s while waiting for %s%s"
                                     % (p.pid, p.returncode, label, logs()))
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s%s"
                                 % (timeout, label, logs()))
        time.sleep(interval)


def pid_alive(pid):
    """True while pid exists and is not a zombie (also for processes not our children)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def pid_children(pid):
    """PIDs whose parent is pid."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(d))
    return kids


def stop_by_pid(proc_or_pid, timeout=10):
    """SIGTERM, wait up to `timeout` s, then SIGKILL.  Never by name.

    Accepts a Popen (returns its exit code) or a bare pid (returns None).
    """
    if isinstance(proc_or_pid, subprocess.Popen):
        proc = proc_or_pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        return proc.returncode
    pid = int(proc_or_pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return None
        except ChildProcessError:
            if not pid_alive(pid):
                return None
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return None


class Result(object):
    """Outcome of one command: rc, stdout, stderr (str), elapsed (s), argv."""

    def __init__(self, argv, rc, stdout, stderr, elapsed, timed_out=False):
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed
        self.timed_out = timed_out

    @property
    def output(self):
        return self.stdout + self.stderr

    def __repr__(self):
        return ("Result(rc=%r, %.3fs, argv=%s)\n--- stdout ---\n%s--- stderr ---\n%s"
                % (self.rc, self.elapsed, " ".join(shlex.quote(str(a)) for a in self.argv),
                   self.stdout, self.stderr))


def _merged_env(env):
    if env is None:
        return None
    merged = dict(os.environ)
    merged.update({k: str(v) for k, v in env.items()})
    return merged


def ns_argv(ns, argv):
    argv = [str(a) for a in argv]
    return ["ip", "netns", "exec", ns] + argv if ns else argv


def run(ns, argv, stdin=None, env=None, timeout=60, check=False, allow_timeout=False):
    """Run argv inside netns `ns` (None = this namespace); return a Result.

    `env` is merged over os.environ.  `stdin` is str or bytes.  A command
    still running after `timeout` s is killed; that raises AssertionError
    unless allow_timeout (then rc is None and timed_out True).
    """
    full = ns_argv(ns, argv)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    t0 = time.monotonic()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                            env=_merged_env(env))
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, err = proc.communicate(timeout=10)
    res = Result(full, None if timed_out else proc.returncode, out.decode("utf-8", "replace"),
                 err.decode("utf-8", "replace"), time.monotonic() - t0, timed_out)
    if timed_out and not allow_timeout:
        raise AssertionError("command timed out after %s s: %r" % (timeout, res))
    if check and res.rc != 0:
        raise AssertionError("command failed: %r" % (res,))
    return res


# ---------------------------------------------------------------------------
# environment checks (conftest turns these into skip locally / fail under CI)

def missing_components(*what):
    """Reasons why the named components are unusable; [] when all are there.

    Names: root, netns, c (C fence-virt binaries), libvirtd, virsh, ours.
    """
    reasons = []
    for w in what:
        if w == "root":
            if os.geteuid() != 0:
                reasons.append("not root (network namespaces need root)")
        elif w == "netns":
            if not shutil.which("ip") or subprocess.run(
                    ["ip", "netns", "list"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, timeout=10).returncode != 0:
                reasons.append("no working `ip netns` (iproute2)")
            if not shutil.which("ss") or not shutil.which("stdbuf"):
                reasons.append("`ss` or `stdbuf` missing")
        elif w == "c":
            for b in (C_DAEMON, C_XVM, C_VIRT):
                if not os.access(b, os.X_OK):
                    reasons.append("C binary %s missing (run tests/run-all.sh)" % b)
            for so in ("multicast.so", "tcp.so", "virt.so"):
                if not os.path.exists(os.path.join(C_MODULE_PATH, so)):
                    reasons.append("C plugin %s/%s missing" % (C_MODULE_PATH, so))
        elif w == "libvirtd":
            if not os.access(LIBVIRTD, os.X_OK):
                reasons.append("%s missing (run tests/run-all.sh)" % LIBVIRTD)
            elif not os.path.exists("/usr/bin/qemu-system-x86_64"):
                reasons.append("qemu-system-x86_64 missing")
            else:
                conf = ""
                with contextlib.suppress(OSError):
                    conf = Path("/etc/libvirt/qemu.conf").read_text()
                if 'security_driver = "none"' not in conf:
                    reasons.append("/etc/libvirt/qemu.conf not set up for a systemd-less libvirtd "
                                   "(run tests/run-all.sh)")
                if subprocess.run(["getent", "passwd", "libvirt-qemu"], stdout=subprocess.DEVNULL,
                                  timeout=10).returncode != 0:
                    reasons.append("user libvirt-qemu missing (run tests/run-all.sh)")
            if not shutil.which("virsh"):
                reasons.append("virsh missing (apt-get install libvirt-clients)")
        elif w == "virsh":
            if not shutil.which("virsh"):
                reasons.append("virsh missing (apt-get install libvirt-clients)")
        elif w == "ours":
            if not FENCEVIRT.exists():
                reasons.append("%s does not exist yet" % FENCEVIRT)
        else:
            raise ValueError("unknown component %r" % w)
    return reasons


def missing_commands(*names):
    """Reasons why the named commands (on PATH, in /usr/sbin or /sbin, or absolute
    paths) are not executable; [] when all are."""
    reasons = []
    for n in names:
        if os.path.isabs(n):
            found = os.access(n, os.X_OK)
        else:
            found = shutil.which(n) is not None or any(
                os.access(os.path.join(d, n), os.X_OK) for d in ("/usr/sbin", "/sbin"))
        if not found:
            reasons.append("command %s missing" % n)
    return reasons


def skip_or_fail(*reasons):
    """Skip the calling test locally, or fail it under CI, when any reason is given."""
    if reasons:
        import pytest
        msg = "; ".join(reasons)
        if in_ci():
            pytest.fail("required component missing under CI: " + msg, pytrace=False)
        pytest.skip(msg)


def require(*components, commands=()):
    """Skip the calling test locally, or fail it under CI, unless every named
    component (names as for missing_components) and command is usable."""
    skip_or_fail(*(missing_components(*components) + missing_commands(*commands)))


# ---------------------------------------------------------------------------
# machine-wide locks

class FileLock(object):
    """Exclusive flock on `path`, waited for up to `timeout` s; the holder's pid is
    written into the file.  Take LOCK_LIBVIRTD before any other lock."""

    def __init__(self, path, timeout=900):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    holder = "?"
                    with contextlib.suppress(OSError):
                        holder = Path(self.path).read_text().strip()
                    raise AssertionError("could not lock %s within %s s (held by pid %s: "
                                         "another test run)" % (self.path, self.timeout, holder))
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, ("%d\n" % os.getpid()).encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)       # releases the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------
# network namespaces

def _new_ns_base():
    return "%s-%d" % (NS_PREFIX, next(_ns_counter))


def _ns_add(name):
    """Create netns `name`; False if it already exists (someone else's)."""
    res = run(None, ["ip", "netns", "add", name], timeout=20)
    if res.rc == 0:
        return True
    if "exists" in res.stderr:
        return False
    raise AssertionError("ip netns add %s failed: %r" % (name, res))


def _ip_batch(ns, lines):
    """Run `ip -batch -` inside netns ns (-n sets the namespace for every line)."""
    run(None, ["ip", "-n", ns, "-batch", "-"], stdin="\n".join(lines) + "\n", timeout=30,
        check=True)


class Lab(object):
    """A host namespace and N guest namespaces joined by a bridge.

    host:     namespace with bridge br0 = 198.18.0.1/24, 2001:db8::1/64
    guests:   namespaces whose eth0 = 198.18.0.(10+i)/24, 2001:db8::(10+i)/64, i = 1..N
    Each has lo up and a route 224.0.0.0/4 on its bridge/eth0.

    Lab.loopback() is the single-namespace variant: only lo (127.0.0.1, ::1),
    with a multicast route on lo; its client namespace is the host itself.

    Use as a context manager or call close().
    """

    def __init__(self, n_guests=2, bridge=True):
        self.bridge = bridge
        self.namespaces = []
        self.guests = []
        self.guest_ips = []
        self.guest_ip6s = []
        try:
            self._build(n_guests if bridge else 0)
        except BaseException:
            self.close()
            raise

    @classmethod
    def loopback(cls):
        return cls(n_guests=0, bridge=False)

    def _build(self, n_guests):
        while True:
            base = _new_ns_base()
            if _ns_add(base + "h"):
                break
        self.host = base + "h"
        self.namespaces.append(self.host)
        host_lines = ["link set lo up"]
        if not self.bridge:
            self.interface = "lo"
            self.host_ip = "127.0.0.1"
            self.host_ip6 = "::1"
            host_lines += ["link set lo multicast on", "route add 224.0.0.0/4 dev lo"]
            _ip_batch(self.host, host_lines)
            return
        self.interface = "br0"
        self.host_ip = HOST_IP
        self.host_ip6 = HOST_IP6
        host_lines += [
            "link add br0 type bridge mcast_snooping 0",
            "addr add %s/24 dev br0" % HOST_IP,
            "addr add %s/64 dev br0 nodad" % HOST_IP6,
            "link set br0 up",
            "route add 224.0.0.0/4 dev br0",
        ]
        guest_lines = {}
        for i in range(1, n_guests + 1):
            g = base + "g%d" % i
            if not _ns_add(g):
                raise AssertionError("netns %s exists already (stale from pid reuse?)" % g)
            self.namespaces.append(g)
            self.guests.append(g)
            ip4, ip6 = "198.18.0.%d" % (10 + i), "2001:db8::%d" % (10 + i)
            self.guest_ips.append(ip4)
            self.guest_ip6s.append(ip6)
            # the veth is created inside the host ns, its peer straight in the guest ns
            host_lines += ["link add vg%d type veth peer name eth0 netns %s" % (i, g),
                           "link set vg%d master br0" % i,
                           "link set vg%d up" % i]
            guest_lines[g] = ["link set lo up",
                              "addr add %s/24 dev eth0" % ip4,
                              "addr add %s/64 dev eth0 nodad" % ip6,
                              "link set eth0 up",
                              "route add 224.0.0.0/4 dev eth0"]
        _ip_batch(self.host, host_lines)
        for g, lines in guest_lines.items():
            _ip_batch(g, lines)

    @property
    def client_namespaces(self):
        """Where clients run: the guests, or the host itself for a loopback lab."""
        return self.guests or [self.host]

    def run(self, ns, argv, stdin=None, env=None, timeout=60, **kw):
        return run(ns, argv, stdin=stdin, env=env, timeout=timeout, **kw)

    def close(self):
        for ns in reversed(self.namespaces):
            # only processes inside our own, uniquely named namespaces: ours by construction
            res = run(None, ["ip", "netns", "pids", ns], timeout=20)
            for pid in res.stdout.split():
                sys.stderr.write("lab: stopping leftover pid %s in netns %s\n" % (pid, ns))
                stop_by_pid(int(pid), timeout=5)
            run(None, ["ip", "netns", "del", ns], timeout=20)
        self.namespaces = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# files: key, libvirt test-driver node XML, configs

def make_key(path, nbytes=512):
    """Write nbytes of random key material to path with mode 0600; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(nbytes))
    os.chmod(str(path), 0o600)
    return path


Domain = collections.namedtuple("Domain", "name uuid running")

DEFAULT_DOMAINS = (
    Domain("pcmk-1", "11111111-1111-4111-8111-111111111111", True),
    Domain("pcmk-2", "22222222-2222-4222-8222-222222222222", True),
    Domain("pcmk-3", "33333333-3333-4333-8333-333333333333", True),
    Domain("pcmk-4", "44444444-4444-4444-8444-444444444444", False),
)

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_NODE_HEAD = ("<node>\n  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes>"
              "<sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\n"
              "  <memory>8388608</memory>\n")


def write_node_xml(path, domains=DEFAULT_DOMAINS):
    """Write a libvirt test-driver node file; return its URI test:///abs/path.

    domains: (name, uuid, running) where running is True/False, or an int
    libvirt state for the test driver's <test:runstate> (3 = paused, 5 = off).
    """
    path = Path(path).resolve()
    parts = [_NODE_HEAD]
    for name, uuid, running in domains:
        if running is True:
            state = ""
        else:
            state = "<test:runstate>%d</test:runstate>" % (5 if running is False else int(running))
        parts.append("  <domain type='test' xmlns:test='%s'>"
                     "<name>%s</name><uuid>%s</uuid>%s<memory>65536</memory><vcpu>1</vcpu>"
                     "<os><type>hvm</type></os></domain>\n" % (_TEST_NS, name, uuid, state))
    parts.append("</node>\n")
    path.write_text("".join(parts))
    return "test://" + str(path)


def _uri_lines(uri):
    uris = [uri] if isinstance(uri, str) else list(uri)
    return "".join('\t\t%s = "%s";\n' % ("uri" if i == 0 else "uri%d" % i, u)
                   for i, u in enumerate(uris))


def _conf(listener, listener_body, uri, backend, extra):
    return ('fence_virtd {\n'
            '\tlistener = "%s";\n'
            '\tbackend = "%s";\n'
            '\tmodule_path = "%s";\n'
            '}\n'
            'listeners {\n'
            '\t%s {\n%s\t}\n'
            '}\n'
            'backends {\n'
            '\t%s {\n%s\t}\n'
            '}\n%s' % (listener, backend, C_MODULE_PATH, listener, listener_body,
                       backend, _uri_lines(uri), extra))


def _kv(**items):
    return "".join('\t\t%s = "%s";\n' % (k, v) for k, v in items.items() if v is not None)


def mcast_conf(key_file, uri, interface="br0", family="ipv4", address=None, port=1229,
               hash=None, auth=None, backend="libvirt", extra=""):
    """fence_virt.conf text for the multicast listener, accepted by the C daemon and ours.

    uri may be a list (uri, uri1, ...).  None values are left out (daemon
    default).  `extra` is appended at top level (e.g. a groups block).
    """
    body = _kv(key_file=key_file, address=address, port=port, family=family,
               interface=interface, hash=hash, auth=auth)
    return _conf("multicast", body, uri, backend, extra)


def tcp_conf(key_file, uri, address="127.0.0.1", family="ipv4", port=1229,
             hash=None, auth=None, backend="libvirt", extra=""):
    """fence_virt.conf text for the tcp listener (client: fence_virt -T address)."""
    body = _kv(key_file=key_file, address=address, port=port, family=family, hash=hash, auth=auth)
    return _conf("tcp", body, uri, backend, extra)


def _conf_value(conf_text, key, default=None):
    m = re.search(r'^\s*%s\s*=\s*"([^"]*)"' % key, conf_text, re.M | re.I)
    return m.group(1) if m else default


# ---------------------------------------------------------------------------
# daemons

def role_dir(tmp):
    """tmp/roles with symlinks fence_virtd, fence_xvm, fence_virt -> REPO/fencevirt.py."""
    d = Path(tmp) / "roles"
    d.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        link = d / role
        if not link.is_symlink():
            link.symlink_to(FENCEVIRT)
    return d


_shared_roles = []


def _default_role_dir():
    if not _shared_roles:
        tmp = tempfile.mkdtemp(prefix="fencevirt-roles-")
        import atexit
        atexit.register(shutil.rmtree, tmp, True)
        _shared_roles.append(role_dir(tmp))
    return _shared_roles[0]


class Daemon(object):
    """A running fence_virtd: proc (Popen), log_path, conf_path, pid_path, ns, kind."""

    def __init__(self, kind, ns, proc, log_path, conf_path, pid_path, conf_text):
        self.kind = kind
        self.ns = ns
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.conf_path = conf_path
        self.pid_path = pid_path
        self.conf_text = conf_text
        self.key_file = _conf_value(conf_text, "key_file")
        self.port = int(_conf_value(conf_text, "port", "1229"))
        self.exit_code = None

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10):
        self.exit_code = stop_by_pid(self.proc, timeout)
        return self.exit_code

    def assert_alive(self):
        if not self.alive():
            raise AssertionError("%s daemon (pid %s) died with %s%s" % (
                self.kind, self.pid, self.proc.returncode, tail(self.log_path)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<%s fence_virtd pid %s in %s, log %s>" % (
            self.kind, self.pid, self.ns, self.log_path)


def stop_all(daemons, timeout=10):
    """SIGTERM every daemon first, then wait for each (the C one takes 1-2 s to exit)."""
    daemons = [d for d in daemons if d is not None]
    for d in daemons:
        if d.alive():
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        d.stop(timeout)


def _prepare(conf_text, workdir, name):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf_path = workdir / (name + ".conf")
    conf_path.write_text(conf_text)
    os.chmod(str(conf_path), 0o600)
    return workdir, conf_path, workdir / (name + ".pid"), workdir / (name + ".log")


def _listening(ns, port):
    res = run(ns, ["ss", "-Hlutn", "sport = :%d" % port], timeout=10)
    return res.rc == 0 and res.stdout.strip() != ""


def _joined(ns, group):
    res = run(ns, ["ip", "maddr", "show"], timeout=10)
    return re.search(r"\binet6?\s+%s\s*$" % re.escape(group), res.stdout, re.M) is not None


def start_c_daemon(ns, conf_text, workdir, debug=2, name="c_fence_virtd", ready_timeout=10):
    """Start the C fence_virtd in netns ns; wait until its port is bound.

    Runs `ip netns exec NS stdbuf -oL -eL /usr/sbin/fence_virtd -F -dN -p PID -f CONF`.
    """
    workdir, conf_path, pid_path, log_path = _prepare(conf_text, workdir, name)
    port = int(_conf_value(conf_text, "port", "1229"))
    group = None
    if (_conf_value(conf_text, "listener") or "").lower() == "multicast":
        v6 = (_conf_value(conf_text, "family") or "").lower() == "ipv6"
        group = _conf_value(conf_text, "address", MCAST6 if v6 else MCAST4)
    with open(str(log_path), "wb") as out:
        proc = subprocess.Popen(ns_argv(ns, ["stdbuf", "-oL", "-eL", C_DAEMON, "-F", "-d%d" % debug,
                                             "-p", pid_path, "-f", conf_path]),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    d = Daemon("c", ns, proc, log_path, conf_path, pid_path, conf_text)
    try:
        # bound first, then joined: wait for both (no ready line at -d2)
        wait_for(lambda: _listening(ns, port) and (group is None or _joined(ns, group)), proc,
                 log_path, ready_timeout, "C fence_virtd to bind port %d%s in %s"
                 % (port, " and join %s" % group if group else "", ns))
    except BaseException:
        d.stop()
        raise
    return d


def start_our_daemon(ns, conf_text, workdir, python=sys.executable, env=None, args=(),
                     name="our_fence_virtd", ready_timeout=10):
    """Start fencevirt.py as fence_virtd in netns ns; wait for `ready:` in its log.

    Runs `ip netns exec NS PYTHON ROLEDIR/fence_virtd -F -f CONF -p PIDFILE [args]`.
    env (merged over os.environ) passes e.g. FENCEVIRT_LIBVIRT_DRIVER=python|virsh.
    """
    workdir, conf_path, pid_path, log_path = _prepare(conf_text, workdir, name)
    roles = role_dir(workdir)
    full_env = {"PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    with open(str(log_path), "wb") as out:
        proc = subprocess.Popen(ns_argv(ns, [python, roles / "fence_virtd", "-F", "-f", conf_path,
                                             "-p", pid_path] + list(args)),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_merged_env(full_env))
    d = Daemon("ours", ns, proc, log_path, conf_path, pid_path, conf_text)
    try:
        wait_for(lambda: b"ready:" in Path(log_path).read_bytes(), proc, log_path, ready_timeout,
                 "'ready:' from our fence_virtd in %s" % ns)
    except BaseException:
        d.stop()
        raise
    return d


# ---------------------------------------------------------------------------
# clients

def _argv(args):
    return shlex.split(args) if isinstance(args, str) else [str(a) for a in args]


def c_client(ns, args, stdin=None, binary="fence_xvm", timeout=60, env=None):
    """Run the C /usr/sbin/fence_xvm (or fence_virt) in netns ns.  Never ns=None."""
    if not ns:
        raise ValueError("the C client must run inside a lab namespace, never in the root one")
    return run(ns, [os.path.join("/usr/sbin", binary)] + _argv(args), stdin=stdin, env=env,
               timeout=timeout)


def our_client(ns, args, stdin=None, python=sys.executable, role="fence_xvm", timeout=60,
               env=None):
    """Run fencevirt.py as `role` (fence_xvm / fence_virt) in netns ns."""
    exe = _default_role_dir() / role
    return run(ns, [python, exe] + _argv(args), stdin=stdin, env=env, timeout=timeout)


# ---------------------------------------------------------------------------
# real libvirtd + tiny qemu domains

_TINY_XML = """<domain type='qemu'>
  <name>%(name)s</name>
  <uuid>%(uuid)s</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
</domain>
"""

_LIBVIRTD_CONF = """listen_tls = 0
listen_tcp = 1
listen_addr = "%(addr)s"
tcp_port = "16509"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""


class Libvirtd(object):
    """A real libvirtd in netns `ns`, TCP on listen_addr:16509 (auth none).

    Only one libvirtd can run per machine (fixed /run/libvirt paths), so
    start() takes an exclusive flock on LOCK_LIBVIRTD and close() releases it.
    URIs: `qemu:///system` (unix socket, any netns), and from guests
    `qemu+tcp://<listen_addr>/system` (see tcp_uri).
    """

    URI = "qemu:///system"

    def __init__(self, ns, workdir, listen_addr=HOST_IP):
        self.ns = ns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.listen_addr = listen_addr
        self.tcp_uri = "qemu+tcp://%s/system" % listen_addr
        self.log_path = self.workdir / "libvirtd.log"
        self.proc = None
        self.domains = []
        self._lock = None

    def virsh(self, *args, **kw):
        """virsh -c qemu:///system ARGS (in this namespace; the unix socket is reachable)."""
        return run(None, ["virsh", "-c", self.URI] + [str(a) for a in args],
                   timeout=kw.get("timeout", 60), check=kw.get("check", False))

    def start(self, lock_timeout=900, ready_timeout=60):
        self._lock = FileLock(LOCK_LIBVIRTD, lock_timeout).acquire()
        try:
            if self.virsh("version", timeout=10).rc == 0:
                raise AssertionError("a libvirtd not started by this harness is already running")
            conf = self.workdir / "libvirtd.conf"
            conf.write_text(_LIBVIRTD_CONF % {"addr": self.listen_addr})
            with open(str(self.log_path), "wb") as out:
                self.proc = subprocess.Popen(ns_argv(self.ns, [LIBVIRTD, "--listen", "-f", conf]),
                                             stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT)
            # first start on a machine: 6-8 s (qemu capability probe); later ~0.2 s
            wait_for(lambda: self.virsh("version", timeout=10).rc == 0, self.proc, self.log_path,
                     ready_timeout, "libvirtd to answer on qemu:///system")
        except BaseException:
            self.close()
            raise
        return self

    def define(self, name, uuid, start=True):
        """Define (and start) a tiny qemu TCG domain: 32 MiB, no disk, idles in SeaBIOS."""
        self._remove(name, uuid)          # stale leftovers of a crashed run
        xml = self.workdir / ("%s.xml" % name)
        xml.write_text(_TINY_XML % {"name": name, "uuid": uuid})
        self.virsh("define", xml, check=True)
        self.domains.append(name)
        if start:
            self.virsh("start", name, check=True)
        return name

    def _remove(self, *names):
        for n in names:
            if self.virsh("domstate", n, timeout=30).rc == 0:
                self.virsh("destroy", n, timeout=30)
                self.virsh("undefine", n, timeout=30)

    def domstate(self, name):
        """'running', 'shut off', ... (virsh domstate)."""
        return self.virsh("domstate", name, check=True).stdout.strip()

    def domid(self, name):
        """Numeric domain id (new on every start), or None when shut off."""
        out = self.virsh("domid", name, check=True).stdout.strip()
        return int(out) if out.isdigit() else None

    def close(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                for n in reversed(self.domains):
                    self.virsh("destroy", n, timeout=30)
                    self.virsh("undefine", n, timeout=30)
            self.domains = []
            if self.proc is not None:
                stop_by_pid(self.proc, timeout=15)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# the scripted interop SEQUENCE

_LIST_RE = re.compile(r"^(\S+)\s+([0-9a-fA-F-]{36})\s+(on|off)\s*$")
_STATUS_RE = re.compile(r"^\s*(Status: (?:ON|OFF))\s*$")


def norm_list(res):
    """List output -> sorted tuple of (name, uuid, 'on'/'off') from stdout."""
    return tuple(sorted(m.groups() for m in map(_LIST_RE.match, res.stdout.splitlines()) if m))


def norm_status(res):
    """Result lines only: the `Status: ON/OFF` lines (stdout or stderr, 4.12.1 vs HEAD)."""
    return tuple(m.group(1) for m in map(_STATUS_RE.match, res.output.splitlines()) if m)


def expected_list(domains=DEFAULT_DOMAINS, off=(), on=()):
    """The norm_list() value for `domains`, with names in off/on overridden."""
    rows = []
    for name, uuid, running in domains:
        state = "on" if running is True else "off"
        if name in off:
            state = "off"
        if name in on:
            state = "on"
        rows.append((name, uuid, state))
    return tuple(sorted(rows))


class Step(object):
    """One step: client args (placeholders {key}, {wrong_key}), normaliser, C reference.

    family 'ipv6' steps go to the IPv6 daemon (port V6_PORT); -k {key} and
    -t 5 are added unless the args set -k / -t themselves.
    """

    def __init__(self, name, args, normalise, expect_rc, expect_out, family="ipv4"):
        self.name = name
        self.args = list(args)
        self.normalise = normalise
        self.expect_rc = expect_rc
        self.expect_out = expect_out
        self.family = family

    @property
    def expect(self):
        return (self.expect_rc, self.expect_out)

    def argv(self, key, wrong_key):
        argv = [a.format(key=key, wrong_key=wrong_key) for a in self.args]
        if "-k" not in argv:
            argv += ["-k", str(key)]
        if "-t" not in argv:
            argv += ["-t", "5"]
        return argv

    def __repr__(self):
        return "Step(%s)" % self.name


ON, OFF = ("Status: ON",), ("Status: OFF",)
FAST_TIMEOUT = ["-t", "1", "-r", "10"]   # one 1 s attempt (attempts = t*10 // r)
_D = {d.name: d for d in DEFAULT_DOMAINS}

SEQUENCE = (
    Step("list", ["-o", "list"], norm_list, 0, expected_list()),
    Step("status-running", ["-o", "status", "-H", "pcmk-1"], norm_status, 0, ON),
    Step("status-off", ["-o", "status", "-H", "pcmk-4"], norm_status, 2, OFF),
    Step("status-missing", ["-o", "status", "-H", "no-such-vm"], norm_status, 2, OFF),
    Step("status-uuid", ["-o", "status", "-u", "-H", _D["pcmk-2"].uuid], norm_status, 0, ON),
    Step("off-missing", ["-o", "off", "-H", "no-such-vm"], norm_status, 1, ()),
    Step("off", ["-o", "off", "-H", "pcmk-2"], norm_status, 0, ()),
    Step("status-after-off", ["-o", "status", "-H", "pcmk-2"], norm_status, 2, OFF),
    Step("list-after-off", ["-o", "list"], norm_list, 0, expected_list(off=("pcmk-2",))),
    Step("on", ["-o", "on", "-H", "pcmk-2"], norm_status, 0, ()),
    Step("status-after-on", ["-o", "status", "-H", "pcmk-2"], norm_status, 0, ON),
    Step("reboot", ["-o", "reboot", "-H", "pcmk-3"], norm_status, 0, ()),
    Step("status-after-reboot", ["-o", "status", "-H", "pcmk-3"], norm_status, 0, ON),
    Step("wrong-key", ["-o", "status", "-H", "pcmk-1", "-k", "{wrong_key}"] + FAST_TIMEOUT,
         norm_status, 1, ()),
    Step("weak-hash", ["-o", "status", "-H", "pcmk-1", "-c", "sha1"] + FAST_TIMEOUT,
         norm_status, 1, ()),
    Step("auth-mismatch", ["-o", "status", "-H", "pcmk-1", "-C", "sha512"], norm_status, 1, ()),
    Step("list-ipv6", ["-o", "list", "-i", "ipv6", "-a", MCAST6, "-p", str(V6_PORT)],
         norm_list, 0, expected_list(), family="ipv6"),
)


def sequence_confs(key_file, uri, interface="br0"):
    """(IPv4 conf, IPv6 conf) for the two daemons the SEQUENCE talks to."""
    return (mcast_conf(key_file, uri, interface=interface),
            mcast_conf(key_file, uri, interface=interface, family="ipv6", address=MCAST6,
                       port=V6_PORT))


class SeqResult(object):
    """(step, rc, normalised) - unpacks as a 3-tuple; .result is the raw Result."""

    def __init__(self, step, result):
        self.step = step
        self.result = result
        self.rc = result.rc
        self.normalised = step.normalise(result)

    def __iter__(self):
        return iter((self.step, self.rc, self.normalised))

    @property
    def ok(self):
        return (self.rc, self.normalised) == self.step.expect

    def __repr__(self):
        return "%s: rc=%r out=%r (C reference: rc=%r out=%r) %.2fs" % (
            self.step.name, self.rc, self.normalised, self.step.expect_rc,
            self.step.expect_out, self.result.elapsed)


def run_sequence(lab, client_fn, daemon, daemon6=None, steps=SEQUENCE, wrong_key=None):
    """Run `steps` with client_fn(ns, args) against daemon (IPv4) and daemon6 (IPv6).

    Steps alternate between the lab's client namespaces.  IPv6 steps are left
    out when daemon6 is None.  The key comes from daemon.key_file; a wrong key
    is made next to the daemon's config unless given.  Returns [SeqResult].
    """
    key = daemon.key_file
    if wrong_key is None:
        wrong_key = make_key(Path(daemon.conf_path).parent / "wrong.key")
    spaces = lab.client_namespaces
    results = []
    for i, step in enumerate(steps):
        target = daemon6 if step.family == "ipv6" else daemon
        if target is None:
            continue
        target.assert_alive()
        res = client_fn(spaces[i % len(spaces)], step.argv(key, wrong_key))
        results.append(SeqResult(step, res))
        target.assert_alive()
    return results


def sequence_mismatches(results):
    """Human-readable lines for every result that differs from the C reference."""
    return ["%r\n%r" % (r, r.result) for r in results if not r.ok]
