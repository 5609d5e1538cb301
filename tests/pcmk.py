"""Pacemaker, corosync, cluster-glue and libvirtd harness for fencevirt's tests.

Everything here starts real system components by hand (no systemd), inside network
namespaces that the caller created, and stops them again by PID. Import it from a
test (``tests/`` is on ``sys.path``)::

    import pcmk

    with pcmk.Topology("pk%d" % (os.getpid() % 100000)) as net:     # host ns + guest ns
        with pcmk.Cluster(net.guests[0], workdir) as cl:             # corosync + pacemaker
            cl.crm("configure", "primitive", "st-xvm", "stonith:fence_xvm", "params",
                   "key_file=/k", "pcmk_host_map=n1:tiny1;n2:tiny2",
                   "op", "monitor", "interval=60s")
            cl.wait_started("st-xvm")
            r = cl.stonith_admin("--reboot", "n1", timeout=60)

Only one Pacemaker and one libvirtd can run per machine (fixed paths under
/var/lib/pacemaker, /run/libvirt and shared /dev/shm names), so ``Cluster`` and
``Libvirtd`` hold an exclusive ``flock`` while they run:
``/run/lock/fencevirt-pacemaker.lock`` and ``/run/lock/fencevirt-libvirtd.lock``.
Take the libvirtd lock before the Pacemaker lock (start libvirtd first) so that
two test sessions cannot deadlock.

Never fence the cluster's own node name: the agent succeeds, then pacemakerd exits
100 and takes corosync down with it. Fence names mapped by ``pcmk_host_map``.
"""

import atexit
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET

PACEMAKER_LOCK = "/run/lock/fencevirt-pacemaker.lock"
LIBVIRTD_LOCK = "/run/lock/fencevirt-libvirtd.lock"
AGENT_DIR = "/usr/sbin"                                  # Pacemaker looks only here
GLUE_PLUGIN_DIR = "/usr/lib/stonith/plugins/external"    # cluster-glue external/*
PCMK_STATE_DIRS = ("/var/lib/pacemaker/cib", "/var/lib/pacemaker/pengine")
MARKER = "# installed by fencevirt tests/pcmk.py; safe to delete"

# Every timing measured by this module: (label, seconds). Tests may print it.
TIMINGS = []


def record(label, seconds):
    TIMINGS.append((label, seconds))
    return seconds


class HarnessError(RuntimeError):
    """A component could not be started, configured or stopped."""


# ---------------------------------------------------------------------------
# skipping / failing

def need(condition, reason):
    """Skip the calling test when ``condition`` is false; fail instead under env CI."""
    if condition:
        return
    import pytest
    if os.environ.get("CI"):
        pytest.fail("CI: required component missing: " + reason, pytrace=False)
    pytest.skip(reason)


def missing_commands(*names):
    """The names from ``names`` that are not found in PATH or as absolute paths."""
    out = []
    for n in names:
        if os.path.isabs(n):
            if not os.access(n, os.X_OK):
                out.append(n)
        elif shutil.which(n) is None and not any(
                os.access(os.path.join(d, n), os.X_OK) for d in ("/usr/sbin", "/sbin")):
            out.append(n)
    return out


def need_root_and(*commands):
    need(os.geteuid() == 0, "needs root (network namespaces, /usr/sbin, daemons)")
    miss = missing_commands(*commands)
    need(not miss, "missing commands: " + " ".join(miss))


# ---------------------------------------------------------------------------
# running commands

class Result:
    """Outcome of one command: ``rc``, ``stdout``, ``stderr`` (str), ``elapsed`` (s)."""

    def __init__(self, argv, rc, stdout, stderr, elapsed):
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed

    @property
    def returncode(self):
        return self.rc

    @property
    def output(self):
        return self.stdout + self.stderr

    def __iter__(self):                   # rc, out, err = cl.stonith_admin(...)
        return iter((self.rc, self.stdout, self.stderr))

    def __repr__(self):
        return "Result(rc=%r, %.3fs, argv=%r)" % (self.rc, self.elapsed, self.argv)

    def __str__(self):
        return "%s\n  rc=%s after %.3f s\n  stdout: %s\n  stderr: %s" % (
            " ".join(self.argv), self.rc, self.elapsed,
            self.stdout.strip().replace("\n", "\n          "),
            self.stderr.strip().replace("\n", "\n          "))


def ns_argv(ns, argv):
    """``argv`` prefixed to run inside network namespace ``ns`` (None: as is)."""
    argv = [str(a) for a in argv]
    return argv if ns is None else ["ip", "netns", "exec", ns] + argv


def run(argv, ns=None, timeout=60, input=None, env=None, check=False):
    """Run ``argv`` (inside ``ns``), return a ``Result``; raise on rc != 0 if ``check``."""
    full = ns_argv(ns, argv)
    e = None
    if env:
        e = dict(os.environ)
        e.update(env)
    t0 = time.monotonic()
    try:
        p = subprocess.run(full, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, env=e, universal_newlines=True,
                           errors="replace")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        err = exc.stderr or b""
        if isinstance(out, bytes):
            out = out.decode("utf-8", "replace")
        if isinstance(err, bytes):
            err = err.decode("utf-8", "replace")
        raise HarnessError("timed out after %ss: %s\nstdout: %s\nstderr: %s"
                           % (timeout, " ".join(full), out, err))
    r = Result(full, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
    if check and r.rc != 0:
        raise HarnessError("command failed: %s" % r)
    return r


def tail(path, n=40):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return "<%s: %s>" % (path, exc)
    lines = data.decode("utf-8", "replace").splitlines()[-n:]
    return "---- %s (last %d lines)\n%s" % (path, len(lines), "\n".join(lines))


def wait_for(pred, timeout, what, procs=(), logs=(), interval=0.1):
    """Poll ``pred()`` until it returns something true and return that.

    Fails with the tails of ``logs`` when ``timeout`` passes or one of the
    ``procs`` (``subprocess.Popen``) exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise HarnessError("%s: process %d exited with %s while waiting\n%s" % (
                    what, p.pid, p.returncode, "\n".join(tail(l) for l in logs)))
        if time.monotonic() > deadline:
            raise HarnessError("%s: not reached within %.1f s\n%s" % (
                what, timeout, "\n".join(tail(l) for l in logs)))
        time.sleep(interval)


# ---------------------------------------------------------------------------
# processes, by PID only

def pid_alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def pid_children(pid):
    """PIDs whose parent is ``pid``."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(d))
    return kids


def stop_pid(proc, timeout=10.0, kill_after=True):
    """SIGTERM ``proc`` (a Popen or a PID), wait up to ``timeout`` s, then SIGKILL.

    Returns True when it exited on SIGTERM, False when SIGKILL was needed.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    popen = None if isinstance(proc, int) else proc

    def alive():
        if popen is not None:
            return popen.poll() is None
        return pid_alive(pid)

    if not alive():
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not alive():
        return True
    if kill_after:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    return False


def _clean_shm(pids):
    """Remove libqb /dev/shm files of processes that were SIGKILLed."""
    for name in os.listdir("/dev/shm"):
        for pid in pids:
            if re.match(r"qb-(?:[a-z_-]+-)?%d-" % pid, name):
                path = os.path.join("/dev/shm", name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass


# ---------------------------------------------------------------------------
# locks

class FileLock:
    """Exclusive ``fcntl.flock`` on ``path``, waited for up to ``timeout`` s."""

    def __init__(self, path, timeout=600.0):
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
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise HarnessError("could not lock %s within %.0f s (holder: %s)" % (
                        self.path, self.timeout, self._holder()))
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, ("%d\n" % os.getpid()).encode())
        self.fd = fd
        return self

    def _holder(self):
        try:
            with open(self.path) as f:
                return "pid " + f.read().strip()
        except OSError:
            return "?"

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------
# network namespaces

def unique_prefix():
    """Namespace name prefix for this process: ``pk<pid % 100000>``."""
    return "pk%d" % (os.getpid() % 100000)


class Topology:
    """A "hypervisor host" namespace with a bridge and N "guest" namespaces on it.

    host ``<prefix>h``: lo up, ``br0`` 198.18.0.1/24 (mcast_snooping 0), one veth
    ``vg<i>`` per guest enslaved to br0. guest ``<prefix>g<i>``: lo up, ``eth0``
    198.18.0.<10+i>/24, route 224.0.0.0/4 dev eth0. No default routes anywhere.
    """

    def __init__(self, prefix=None, guests=1, subnet="198.18.0", bridge="br0"):
        self.prefix = prefix or unique_prefix()
        self.host = self.prefix + "h"
        self.guests = ["%sg%d" % (self.prefix, i) for i in range(1, guests + 1)]
        self.bridge = bridge
        self.host_addr = subnet + ".1"
        self.guest_addrs = ["%s.%d" % (subnet, 10 + i) for i in range(1, guests + 1)]
        self._made = []

    def _ip(self, *args):
        run(["ip"] + list(args), check=True, timeout=20)

    def _add_ns(self, name):
        if os.path.exists("/run/netns/" + name):
            # a leftover of an earlier run of this very prefix (same pid % 100000)
            run(["ip", "netns", "del", name], timeout=20)
        self._ip("netns", "add", name)
        self._made.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def setup(self):
        try:
            self._add_ns(self.host)
            h = self.host
            self._ip("-n", h, "link", "add", self.bridge, "type", "bridge")
            self._ip("-n", h, "link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
            self._ip("-n", h, "addr", "add", self.host_addr + "/24", "dev", self.bridge)
            self._ip("-n", h, "link", "set", self.bridge, "up")
            for i, (g, addr) in enumerate(zip(self.guests, self.guest_addrs), 1):
                self._add_ns(g)
                port = "vg%d" % i
                self._ip("link", "add", port, "netns", h, "type", "veth",
                         "peer", "name", "eth0", "netns", g)
                self._ip("-n", h, "link", "set", port, "master", self.bridge)
                self._ip("-n", h, "link", "set", port, "up")
                self._ip("-n", g, "addr", "add", addr + "/24", "dev", "eth0")
                self._ip("-n", g, "link", "set", "eth0", "up")
                self._ip("-n", g, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self):
        for name in reversed(self._made):
            run(["ip", "netns", "del", name], timeout=20)
        self._made = []

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.teardown()


# ---------------------------------------------------------------------------
# installing files Pacemaker / cluster-glue look for

_INSTALLED = []


class InstalledFile:
    """A file this module put into a system directory; ``remove()`` takes it out."""

    def __init__(self, path, target):
        self.path = path
        self.target = target
        _INSTALLED.append(self)

    def remove(self):
        if self in _INSTALLED:
            _INSTALLED.remove(self)
        try:
            if _is_ours(self.path):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return "InstalledFile(%r -> %r)" % (self.path, self.target)


@atexit.register
def _remove_installed():
    for f in list(_INSTALLED):
        f.remove()


def _is_ours(path):
    """True for a symlink, or a file carrying MARKER: something this module made."""
    if os.path.islink(path):
        return True
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


def _place(dst, text=None, link_to=None, mode=0o755):
    """Atomically create ``dst`` as a file with ``text`` or a symlink to ``link_to``."""
    if os.path.lexists(dst) and not _is_ours(dst):
        raise HarnessError("refusing to replace %s: not installed by tests/pcmk.py" % dst)
    tmp = os.path.join(os.path.dirname(dst), ".%s.pcmk%d" % (os.path.basename(dst), os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if link_to is not None:
        os.symlink(link_to, tmp)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)          # explicit: not group/other writable whatever umask
    os.replace(tmp, dst)


def install_agent(src_path, name, mode="auto", role=None, python="/usr/bin/python3",
                  spy_log=None):
    """Install a fence agent as ``/usr/sbin/<name>``; returns an ``InstalledFile``.

    ``mode``: ``"symlink"`` (argv[0] becomes ``name``; ``src_path`` must be
    executable), ``"wrapper"`` (a /bin/sh script: ``exec python src role "$@"`` for a
    ``.py`` file or when ``role`` is given, else ``exec src "$@"``), or ``"auto"``
    (wrapper for .py/role/non-executable sources, else symlink).
    ``role``: the fencevirt.py subcommand put before the arguments; for a ``.py``
    source without one it is guessed from ``name`` ("virt" if the name ends in
    "virt", else "xvm"), so ``install_agent("fencevirt.py", "fence_pyxvm")`` gives
    ``exec /usr/bin/python3 .../fencevirt.py xvm "$@"``.
    ``spy_log``: a path; forces a wrapper that appends each call's argv, uid, the
    PCMK_/OCF_/HA_ environment and (when there are no arguments) stdin to it.
    Pacemaker only considers ``fence_*`` names. An existing file that this module
    did not make (e.g. Debian's ``/usr/sbin/fence_xvm``) is never replaced.
    Removed again by ``.remove()``, the context manager, or at interpreter exit.
    """
    if not re.match(r"^fence_[A-Za-z0-9_.-]+$", name):
        raise ValueError("Pacemaker only runs agents named fence_*: %r" % name)
    src = os.path.abspath(src_path)
    if not os.path.exists(src):
        raise HarnessError("agent source missing: %s" % src)
    is_py = src.endswith(".py")
    if mode == "auto":
        mode = "wrapper" if (role or is_py or spy_log or not os.access(src, os.X_OK)) \
            else "symlink"
    if spy_log and mode != "wrapper":
        raise ValueError("spy_log needs mode='wrapper'")
    dst = os.path.join(AGENT_DIR, name)
    if mode == "symlink":
        if not os.access(src, os.X_OK):
            raise HarnessError("%s is not executable; use mode='wrapper'" % src)
        _place(dst, link_to=src)
    elif mode == "wrapper":
        if is_py and not role:
            role = "virt" if name.endswith("virt") else "xvm"
        if is_py or role:
            role_arg = (" " + _shq(role)) if role else ""
            cmd = "exec %s %s%s \"$@\"" % (_shq(python), _shq(src), role_arg)
        else:
            cmd = "exec %s \"$@\"" % _shq(src)
        spy = ""
        if spy_log:
            spy = _SPY % {"log": _shq(os.path.abspath(spy_log))}
        _place(dst, text="#!/bin/sh\n%s\n%s%s\n" % (MARKER, spy, cmd))
    else:
        raise ValueError("mode must be auto, symlink or wrapper: %r" % mode)
    return InstalledFile(dst, src)


_SPY = """\
{ echo "--- $(date +%%s.%%N) pid $$ uid $(id -u) argv: $0 $*"
  env | grep -E '^(PCMK_|OCF_|HA_)' | sort; } >> %(log)s
if [ $# -eq 0 ]; then
	spy_in=$(mktemp) && cat > "$spy_in" && { echo "stdin:"; cat "$spy_in"; } >> %(log)s
	exec 0< "$spy_in"; rm -f "$spy_in"
fi
"""


def remove_agent(name):
    """Remove ``/usr/sbin/<name>`` if this module installed it."""
    path = os.path.join(AGENT_DIR, name)
    for f in list(_INSTALLED):
        if f.path == path:
            f.remove()
            return
    if os.path.lexists(path) and _is_ours(path):
        os.unlink(path)


def _shq(s):
    s = str(s)
    if re.match(r"^[A-Za-z0-9_./:=+-]+$", s):
        return s
    return "'" + s.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------
# cluster-glue

def install_glue_plugin(name, src_path=None, text=None, mode="wrapper", role=None,
                        python="/usr/bin/python3"):
    """Install ``/usr/lib/stonith/plugins/external/<name>`` (0755, root-owned).

    Give either ``text`` (the whole script; MARKER is inserted after the #! line) or
    ``src_path``: ``mode="wrapper"`` writes ``exec src "$@"`` (``exec python src role
    "$@"`` for a ``.py`` source or when ``role`` is given), ``mode="copy"`` copies it
    (with MARKER inserted after its first line). cluster-glue refuses plugins that
    are group/other writable or not regular executable files. Debian's own plugins
    (e.g. ``libvirt``) are never replaced, so pick another name.
    """
    if not re.match(r"^[A-Za-z0-9_.-]+$", name):
        raise ValueError("bad plugin name %r" % name)
    if (text is None) == (src_path is None):
        raise ValueError("give exactly one of text= or src_path=")
    if src_path is not None:
        src = os.path.abspath(src_path)
        if mode == "wrapper" and (role or src.endswith(".py")):
            role_arg = (" " + _shq(role)) if role else ""
            text = "#!/bin/sh\nexec %s %s%s \"$@\"\n" % (_shq(python), _shq(src), role_arg)
        elif mode == "wrapper":
            text = "#!/bin/sh\nexec %s \"$@\"\n" % _shq(src)
        elif mode == "copy":
            with open(src) as f:
                text = f.read()
        else:
            raise ValueError("mode must be wrapper or copy: %r" % mode)
    else:
        src = None
    first, nl, rest = text.partition("\n")
    if first.startswith("#!"):
        text = first + "\n" + MARKER + "\n" + rest
    else:
        text = MARKER + "\n" + text
    dst = os.path.join(GLUE_PLUGIN_DIR, name)
    _place(dst, text=text, mode=0o755)
    return InstalledFile(dst, src)


def remove_glue_plugin(name):
    path = os.path.join(GLUE_PLUGIN_DIR, name)
    for f in list(_INSTALLED):
        if f.path == path:
            f.remove()
            return
    if os.path.lexists(path) and _is_ours(path):
        os.unlink(path)


def stonith_cli(ns, plugin, params, *args, timeout=60):
    """Run cluster-glue's ``stonith -t external/<plugin> k=v ... <args>`` in ``ns``.

    ``params`` is a dict (each pair is one argv word, so values may contain spaces);
    ``args`` e.g. ``"-S"``, ``"-l"``, ``"-T", "reset", "node"``. Note: ``stonith``
    lowercases the node name it hands to the plugin.
    """
    t = plugin if "/" in plugin else "external/" + plugin
    argv = ["stonith", "-t", t] + ["%s=%s" % (k, v) for k, v in params.items()] + list(args)
    r = run(argv, ns=ns, timeout=timeout)
    record("stonith %s %s" % (t, " ".join(args)), r.elapsed)
    return r


# ---------------------------------------------------------------------------
# corosync + pacemaker

COROSYNC_CONF = """\
totem {
	version: 2
	cluster_name: %(cluster)s
	transport: knet
	crypto_cipher: none
	crypto_hash: none
}
logging {
	to_stderr: yes
	to_logfile: no
	to_syslog: no
}
quorum {
	provider: corosync_votequorum
}
nodelist {
	node {
		name: %(node)s
		nodeid: 1
		ring0_addr: 127.0.0.1
	}
}
"""

CIB_SEED = """\
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="true"/>
        <nvpair id="cib-bootstrap-options-no-quorum-policy" name="no-quorum-policy" value="ignore"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>%(resources)s</resources>
    <constraints/>
  </configuration>
  <status/>
</cib>
"""


def _traversable_by_others(path):
    """True when every directory from / down to ``path`` has the o+x bit."""
    path = os.path.abspath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def wipe_pacemaker_state():
    for d in PCMK_STATE_DIRS:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


class Cluster:
    """A single-node corosync 3 + Pacemaker 2.1 cluster inside network namespace ``ns``.

    ``ns`` must exist with lo up (corosync's ring is 127.0.0.1 there). ``workdir``
    receives corosync.conf, cib-seed.xml and the logs (corosync.log,
    pacemaker.log, pacemakerd.out). ``resources_xml`` optionally pre-seeds
    ``<primitive>`` elements into the CIB. ``start()`` waits for the node to be
    Online with a DC (about 5.5 s). Holds PACEMAKER_LOCK while running.
    """

    def __init__(self, ns, workdir, node_name="node1", cluster_name="fvtest",
                 resources_xml="", lock_timeout=600.0):
        self.ns = ns
        self.workdir = os.path.abspath(str(workdir))
        self.node_name = node_name
        self.cluster_name = cluster_name
        self.resources_xml = resources_xml
        self.lock = FileLock(PACEMAKER_LOCK, lock_timeout)
        self.corosync = None
        self.pacemakerd = None
        self.timings = {}
        self._agents = []
        self._killed = []
        self.corosync_log = os.path.join(self.workdir, "corosync.log")
        self.pacemaker_log = os.path.join(self.workdir, "pacemaker.log")
        self.pacemakerd_out = os.path.join(self.workdir, "pacemakerd.out")
        self._logdir = None

    # -- life cycle

    def start(self, timeout=60.0):
        os.makedirs(self.workdir, exist_ok=True)
        self.lock.acquire()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        wipe_pacemaker_state()
        if not _traversable_by_others(self.workdir):
            # pacemaker-based/-controld/... run as hacluster and open PCMK_logfile
            # themselves: a log under pytest's 0700 tmp dir would lose their lines.
            self._logdir = tempfile.mkdtemp(prefix="fencevirt-pcmklog-")
            os.chmod(self._logdir, 0o755)
            self.pacemaker_log = os.path.join(self._logdir, "pacemaker.log")
        conf = os.path.join(self.workdir, "corosync.conf")
        with open(conf, "w") as f:
            f.write(COROSYNC_CONF % {"cluster": self.cluster_name, "node": self.node_name})
        seed = os.path.join(self.workdir, "cib-seed.xml")
        with open(seed, "w") as f:
            f.write(CIB_SEED % {"resources": self.resources_xml})
        run(["install", "-o", "hacluster", "-g", "haclient", "-m", "0600", seed,
             "/var/lib/pacemaker/cib/cib.xml"], check=True)

        t0 = time.monotonic()
        with open(self.corosync_log, "ab") as out:
            self.corosync = subprocess.Popen(
                ns_argv(self.ns, ["corosync", "-f", "-c", conf]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: run(["corosync-quorumtool", "-s"], ns=self.ns, timeout=10).rc == 0,
                 15, "corosync quorate", procs=[self.corosync], logs=[self.corosync_log])
        self.timings["corosync_ready"] = record("corosync ready", time.monotonic() - t0)

        env = dict(os.environ, PCMK_logfile=self.pacemaker_log, PCMK_logfacility="none")
        with open(self.pacemakerd_out, "ab") as out:
            self.pacemakerd = subprocess.Popen(
                ns_argv(self.ns, ["pacemakerd", "-f"]), env=env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._online, timeout, "pacemaker node %s online" % self.node_name,
                 procs=[self.pacemakerd, self.corosync],
                 logs=[self.pacemakerd_out, self.pacemaker_log, self.corosync_log], interval=0.2)
        self.timings["online"] = record("cluster start (corosync start -> node Online, DC)",
                                        time.monotonic() - t0)

    def _status_xml(self):
        r = run(["crm_mon", "-1", "--output-as=xml"], ns=self.ns, timeout=20)
        if r.rc != 0:
            return None
        try:
            return ET.fromstring(r.stdout)
        except ET.ParseError:
            return None

    def _online(self):
        x = self._status_xml()
        if x is None:
            return False
        dc = x.find("./summary/current_dc")
        if dc is None or dc.get("present") != "true":
            return False
        for n in x.iter("node"):
            if n.get("name") == self.node_name and n.get("online") == "true":
                return True
        return False

    def stop(self):
        """Stop pacemakerd (and wait for its children), then corosync; by PID only."""
        if self.lock.fd is None:          # not started (or stopped): touch nothing shared
            for a in self._agents:
                a.remove()
            self._agents = []
            return
        t0 = time.monotonic()
        try:
            if self.pacemakerd is not None:
                kids = pid_children(self.pacemakerd.pid) if self.pacemakerd.poll() is None else []
                clean = stop_pid(self.pacemakerd, timeout=60)
                deadline = time.monotonic() + 15
                while any(pid_alive(k) for k in kids) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for k in kids:
                    if pid_alive(k):
                        clean = False
                        try:
                            os.kill(k, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                if not clean:
                    self._killed += [self.pacemakerd.pid] + kids
                self.timings["pacemaker_stop"] = record("pacemaker stop", time.monotonic() - t0)
            if self.corosync is not None:
                t1 = time.monotonic()
                if not stop_pid(self.corosync, timeout=20):
                    self._killed.append(self.corosync.pid)
                self.timings["corosync_stop"] = record("corosync stop", time.monotonic() - t1)
            if self._killed:
                time.sleep(0.2)
                _clean_shm(self._killed)
        finally:
            self.pacemakerd = None
            self.corosync = None
            for a in self._agents:
                a.remove()
            self._agents = []
            wipe_pacemaker_state()
            if self._logdir is not None:
                dst = os.path.join(self.workdir, "pacemaker.log")
                try:
                    shutil.copyfile(self.pacemaker_log, dst)
                except OSError:
                    pass
                shutil.rmtree(self._logdir, ignore_errors=True)
                self._logdir = None
                self.pacemaker_log = dst
            self.lock.release()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self):
        return (self.pacemakerd is not None and self.pacemakerd.poll() is None
                and self.corosync is not None and self.corosync.poll() is None)

    # -- tools (all must run in the cluster's netns: libqb IPC is abstract sockets)

    def run(self, *argv, timeout=60, check=False, input=None):
        return run(list(argv), ns=self.ns, timeout=timeout, check=check, input=input)

    def crm(self, *args, check=True, timeout=120):
        """crmsh, as a HowTo uses it: ``crm("configure", "primitive", ...)``."""
        r = run(["crm"] + list(args), ns=self.ns, timeout=timeout)
        record("crm " + " ".join(args[:2]), r.elapsed)
        if check and r.rc != 0:
            raise HarnessError("crm failed: %s" % r)
        return r

    def stonith_admin(self, *args, timeout=60, check=False):
        """``stonith_admin *args --timeout <timeout>``; returns a ``Result``.

        ``--timeout`` is added unless ``args`` already carry one; the command itself
        is given ``timeout + 30`` s.
        """
        args = [str(a) for a in args]
        pairs = list(zip(args, args[1:])) + [tuple(a.split("=", 1)) for a in args if "=" in a]
        for opt, val in pairs:
            if opt in ("-B", "--reboot", "-F", "--fence") and val == self.node_name:
                raise HarnessError("refusing to fence the cluster's own node %r: pacemakerd "
                                   "would exit 100 and stop corosync" % self.node_name)
        argv = ["stonith_admin"] + args
        if not any(a in ("-t", "--timeout") or str(a).startswith("--timeout=") for a in args):
            argv += ["--timeout", str(int(timeout))]
        r = run(argv, ns=self.ns, timeout=timeout + 30)
        record("stonith_admin " + " ".join(str(a) for a in args), r.elapsed)
        if check and r.rc != 0:
            raise HarnessError("stonith_admin failed: %s" % r)
        return r

    def crm_mon(self):
        return run(["crm_mon", "-1"], ns=self.ns, timeout=20).stdout

    def resource_state(self, resource_id):
        """(role, failed, nodes) of a resource from ``crm_mon --output-as=xml``, or None."""
        x = self._status_xml()
        if x is None:
            return None
        for r in x.iter("resource"):
            if r.get("id") == resource_id:
                return (r.get("role"), r.get("failed") == "true",
                        [n.get("name") for n in r.findall("node")])
        return None

    def failed_actions(self, resource_id=None):
        x = self._status_xml()
        if x is None:
            return []
        out = []
        for f in x.iter("failure"):
            if resource_id is None or (f.get("op_key") or "").startswith(resource_id + "_"):
                out.append(dict(f.attrib))
        return out

    def wait_started(self, resource_id, timeout=30.0):
        """Wait until ``resource_id`` is Started (crm_mon) and located (crm_resource)."""
        t0 = time.monotonic()

        def started():
            fails = self.failed_actions(resource_id)
            if fails:
                raise HarnessError("%s failed: %r\n%s\n%s" % (
                    resource_id, fails, self.crm_mon(), tail(self.pacemaker_log, 60)))
            st = self.resource_state(resource_id)
            if st and st[0] == "Started" and not st[1] and st[2]:
                loc = run(["crm_resource", "--locate", "--resource", resource_id],
                          ns=self.ns, timeout=20)
                if loc.rc == 0 and "is running on" in loc.stdout:
                    return st[2][0]
            return None

        node = wait_for(started, timeout, "resource %s started" % resource_id,
                        procs=[p for p in (self.pacemakerd, self.corosync) if p],
                        logs=[self.pacemaker_log], interval=0.2)
        record("wait_started " + resource_id, time.monotonic() - t0)
        return node

    def install_agent(self, src_path, name, **kw):
        """``install_agent`` whose file is removed again by ``stop()``. Call it before
        ``start()`` for agents of ``resources_xml`` primitives."""
        a = install_agent(src_path, name, **kw)
        self._agents.append(a)
        return a


# ---------------------------------------------------------------------------
# libvirtd (private minimal starter; tests/lab.py may offer a fuller one)

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
"""

LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 1
listen_addr = "%(addr)s"
tcp_port = "%(port)d"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""

TINY_DOMAIN = """\
<domain type='qemu'>
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


def ensure_libvirt_system_setup():
    """Create what libvirt-daemon-system would: kvm/libvirt-qemu groups, the
    libvirt-qemu user and a /etc/libvirt/qemu.conf for a systemd-less libvirtd.
    Only what is missing; an existing qemu.conf is left alone."""
    def have(db, name):
        return run(["getent", db, name]).rc == 0
    if not have("group", "kvm"):
        run(["groupadd", "-r", "kvm"])
    if not have("group", "libvirt-qemu"):
        run(["groupadd", "-r", "libvirt-qemu"])
    if not have("passwd", "libvirt-qemu"):
        run(["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt",
             "-s", "/usr/sbin/nologin", "libvirt-qemu"])
    if not (have("group", "kvm") and have("group", "libvirt-qemu")
            and have("passwd", "libvirt-qemu")):
        raise HarnessError("could not create the libvirt-qemu user/groups")
    path = "/etc/libvirt/qemu.conf"
    if not os.path.exists(path):
        os.makedirs("/etc/libvirt", exist_ok=True)
        tmp = path + ".pcmk%d" % os.getpid()
        with open(tmp, "w") as f:
            f.write(QEMU_CONF)
        try:
            os.link(tmp, path)          # no clobbering if someone else just made it
        except FileExistsError:
            pass
        os.unlink(tmp)


class Libvirtd:
    """``/usr/sbin/libvirtd --listen`` inside netns ``ns`` on ``listen_addr:tcp_port``
    (auth none) with tiny qemu TCG domains. Holds LIBVIRTD_LOCK while running.
    ``stop()`` destroys and undefines the domains it defined, then stops libvirtd."""

    uri = "qemu:///system"       # unix socket: reachable from every netns

    def __init__(self, ns, workdir, listen_addr="198.18.0.1", tcp_port=16509,
                 lock_timeout=600.0):
        self.ns = ns
        self.workdir = os.path.abspath(str(workdir))
        self.listen_addr = listen_addr
        self.tcp_port = tcp_port
        self.tcp_uri = "qemu+tcp://%s/system" % listen_addr if tcp_port == 16509 else \
            "qemu+tcp://%s:%d/system" % (listen_addr, tcp_port)
        self.lock = FileLock(LIBVIRTD_LOCK, lock_timeout)
        self.proc = None
        self.domains = []
        self.log = os.path.join(self.workdir, "libvirtd.log")
        self.timings = {}

    def start(self, timeout=60.0):
        os.makedirs(self.workdir, exist_ok=True)
        self.lock.acquire()
        try:
            ensure_libvirt_system_setup()
            if run(["virsh", "-c", self.uri, "version"], timeout=10).rc == 0:
                raise HarnessError("a libvirtd not started by this harness is already running")
            conf = os.path.join(self.workdir, "libvirtd.conf")
            with open(conf, "w") as f:
                f.write(LIBVIRTD_CONF % {"addr": self.listen_addr, "port": self.tcp_port})
            t0 = time.monotonic()
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    ns_argv(self.ns, ["/usr/sbin/libvirtd", "--listen", "-f", conf]),
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_for(lambda: run(["virsh", "-c", self.uri, "version"], timeout=10).rc == 0,
                     timeout, "libvirtd ready", procs=[self.proc], logs=[self.log])
            self.timings["ready"] = record("libvirtd ready", time.monotonic() - t0)
        except BaseException:
            self.stop()
            raise
        return self

    def virsh(self, *args, check=False, timeout=60, ns=None, uri=None):
        """``virsh -c <uri> args`` (default: qemu:///system from the current netns)."""
        r = run(["virsh", "-c", uri or self.uri] + list(args), ns=ns, timeout=timeout)
        if check and r.rc != 0:
            raise HarnessError("virsh failed: %s" % r)
        return r

    def define_tiny(self, name, uuid, start=True):
        """Define (and start) a 32 MiB TCG domain with no disk; replaces a leftover."""
        if self.virsh("dominfo", name).rc == 0:
            self.virsh("destroy", name)
            self.virsh("undefine", name)
        path = os.path.join(self.workdir, name + ".xml")
        with open(path, "w") as f:
            f.write(TINY_DOMAIN % {"name": name, "uuid": uuid})
        self.virsh("define", path, check=True)
        self.domains.append(name)
        if start:
            self.virsh("start", name, check=True)

    def domstate(self, name):
        return self.virsh("domstate", name, check=True).stdout.strip()

    def domid(self, name):
        """Numeric domain id (new on every start), or None when shut off."""
        out = self.virsh("domid", name, check=True).stdout.strip()
        return int(out) if out.isdigit() else None

    def stop(self):
        if self.lock.fd is None:
            return
        try:
            if self.proc is not None and self.proc.poll() is None:
                for name in self.domains:
                    self.virsh("destroy", name)
                    self.virsh("undefine", name)
                t0 = time.monotonic()
                stop_pid(self.proc, timeout=20)
                self.timings["stop"] = record("libvirtd stop", time.monotonic() - t0)
        finally:
            self.domains = []
            self.proc = None
            self.lock.release()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------
# C fence_virtd (reference daemon)

FENCE_VIRTD_CONF = """\
fence_virtd {
	listener = "multicast";
	backend = "libvirt";
	module_path = "%(module_path)s";
}
listeners {
	multicast {
		key_file = "%(key_file)s";
		address = "225.0.0.12";
		port = "1229";
		family = "ipv4";
		interface = "%(interface)s";
	}
}
backends {
	libvirt {
		uri = "%(uri)s";
	}
}
"""


class FenceVirtd:
    """A ``fence_virtd`` (C by default) with multicast listener + libvirt backend
    inside netns ``ns``; ready when UDP 1229 is bound there."""

    def __init__(self, ns, workdir, key_file, interface, uri,
                 binary="/usr/sbin/fence_virtd",
                 module_path="/usr/lib/x86_64-linux-gnu/fence-virt", debug=2):
        self.ns = ns
        self.workdir = os.path.abspath(str(workdir))
        self.binary = binary
        self.conf = os.path.join(self.workdir, "fence_virt.conf")
        self.pidfile = os.path.join(self.workdir, "fence_virtd.pid")
        self.log = os.path.join(self.workdir, "fence_virtd.log")
        self.params = dict(key_file=key_file, interface=interface, uri=uri,
                           module_path=module_path)
        self.debug = debug
        self.proc = None

    def start(self, timeout=10.0):
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(FENCE_VIRTD_CONF % self.params)
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ns_argv(self.ns, ["stdbuf", "-oL", "-eL", self.binary, "-F",
                                  "-d%d" % self.debug, "-p", self.pidfile, "-f", self.conf]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: run(["ss", "-Hlun", "sport = :1229"], ns=self.ns).stdout.strip(),
                 timeout, "fence_virtd bound to udp 1229", procs=[self.proc], logs=[self.log])
        record("fence_virtd ready", time.monotonic() - t0)
        return self

    def stop(self):
        if self.proc is not None:
            stop_pid(self.proc, timeout=5)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
