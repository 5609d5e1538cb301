"""Pacemaker, corosync and cluster-glue harness for fencevirt's tests.

Only what is specific to Pacemaker and cluster-glue lives here; namespaces,
commands, waiting, stopping by PID, libvirtd, fence_virtd, keys and
skip-or-fail come from tests/lab.py::

    import lab, pcmk

    lab.require("root", "netns", commands=pcmk.COMMANDS)
    with lab.Lab(n_guests=1) as net:                                 # host ns + guest ns
        with pcmk.Cluster(net.guests[0], workdir) as cl:             # corosync + pacemaker
            cl.crm("configure", "primitive", "st-xvm", "stonith:fence_xvm", "params",
                   "key_file=/k", "pcmk_host_map=n1:tiny1;n2:tiny2",
                   "op", "monitor", "interval=60s")
            cl.wait_started("st-xvm")
            r = cl.stonith_admin("--reboot", "n1", timeout=60)

Only one Pacemaker can run per machine (fixed paths under /var/lib/pacemaker and
shared /dev/shm names), so ``Cluster`` holds an exclusive ``flock`` on
``/run/lock/fencevirt-pacemaker.lock`` while it runs. Take the libvirtd lock
(``lab.Libvirtd``) before it (start libvirtd first) so that two test sessions
cannot deadlock.

Never fence the cluster's own node name: the agent succeeds, then pacemakerd exits
100 and takes corosync down with it. Fence names mapped by ``pcmk_host_map``.
"""

import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET

import lab
from lab import run

PACEMAKER_LOCK = "/run/lock/fencevirt-pacemaker.lock"
AGENT_DIR = "/usr/sbin"                                  # Pacemaker looks only here
GLUE_PLUGIN_DIR = "/usr/lib/stonith/plugins/external"    # cluster-glue external/*
PCMK_STATE_DIRS = ("/var/lib/pacemaker/cib", "/var/lib/pacemaker/pengine")
MARKER = "# installed by fencevirt tests/pcmk.py; safe to delete"
# what Cluster runs (pass to lab.require(commands=...))
COMMANDS = ("corosync", "corosync-quorumtool", "pacemakerd", "crm_mon", "crm_resource",
            "stonith_admin", "crm")

# Every timing measured by this module: (label, seconds). Tests may print it.
TIMINGS = []


def record(label, seconds):
    TIMINGS.append((label, seconds))
    return seconds


class HarnessError(RuntimeError):
    """A Pacemaker / cluster-glue step could not be done, or was refused."""


def _rm(path):
    """Remove a file, symlink or directory tree; gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _clean_shm(pids):
    """Remove libqb /dev/shm files of processes that were SIGKILLed."""
    for name in os.listdir("/dev/shm"):
        if any(re.match(r"qb-(?:[a-z_-]+-)?%d-" % pid, name) for pid in pids):
            _rm(os.path.join("/dev/shm", name))


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
            role_arg = (" " + shlex.quote(role)) if role else ""
            cmd = "exec %s %s%s \"$@\"" % (shlex.quote(python), shlex.quote(src), role_arg)
        else:
            cmd = "exec %s \"$@\"" % shlex.quote(src)
        spy = ""
        if spy_log:
            spy = _SPY % {"log": shlex.quote(os.path.abspath(spy_log))}
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
    _remove_ours(os.path.join(AGENT_DIR, name))


def _remove_ours(path):
    for f in list(_INSTALLED):
        if f.path == path:
            f.remove()
            return
    if os.path.lexists(path) and _is_ours(path):
        os.unlink(path)


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
            role_arg = (" " + shlex.quote(role)) if role else ""
            text = "#!/bin/sh\nexec %s %s%s \"$@\"\n" % (shlex.quote(python), shlex.quote(src), role_arg)
        elif mode == "wrapper":
            text = "#!/bin/sh\nexec %s \"$@\"\n" % shlex.quote(src)
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
    """Remove ``external/<name>`` if this module installed it."""
    _remove_ours(os.path.join(GLUE_PLUGIN_DIR, name))


def stonith_cli(ns, plugin, params, *args, timeout=60):
    """Run cluster-glue's ``stonith -t external/<plugin> k=v ... <args>`` in ``ns``.

    ``params`` is a dict (each pair is one argv word, so values may contain spaces);
    ``args`` e.g. ``"-S"``, ``"-l"``, ``"-T", "reset", "node"``. Note: ``stonith``
    lowercases the node name it hands to the plugin.
    """
    t = plugin if "/" in plugin else "external/" + plugin
    argv = ["stonith", "-t", t] + ["%s=%s" % (k, v) for k, v in params.items()] + list(args)
    r = run(ns, argv, timeout=timeout)
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
            _rm(os.path.join(d, name))


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
        self.lock = lab.FileLock(PACEMAKER_LOCK, lock_timeout)
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
        run(None, ["install", "-o", "hacluster", "-g", "haclient", "-m", "0600", seed,
                   "/var/lib/pacemaker/cib/cib.xml"], check=True)

        t0 = time.monotonic()
        with open(self.corosync_log, "ab") as out:
            self.corosync = subprocess.Popen(
                lab.ns_argv(self.ns, ["corosync", "-f", "-c", conf]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        lab.wait_for(lambda: run(self.ns, ["corosync-quorumtool", "-s"], timeout=10).rc == 0,
                     self.corosync, self.corosync_log, 15, "corosync quorate", interval=0.1)
        self.timings["corosync_ready"] = record("corosync ready", time.monotonic() - t0)

        env = dict(os.environ, PCMK_logfile=self.pacemaker_log, PCMK_logfacility="none")
        with open(self.pacemakerd_out, "ab") as out:
            self.pacemakerd = subprocess.Popen(
                lab.ns_argv(self.ns, ["pacemakerd", "-f"]), env=env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        lab.wait_for(self._online, [self.pacemakerd, self.corosync],
                     [self.pacemakerd_out, self.pacemaker_log, self.corosync_log], timeout,
                     "pacemaker node %s online" % self.node_name, interval=0.2)
        self.timings["online"] = record("cluster start (corosync start -> node Online, DC)",
                                        time.monotonic() - t0)

    def _status_xml(self):
        r = run(self.ns, ["crm_mon", "-1", "--output-as=xml"], timeout=20)
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
                kids = (lab.pid_children(self.pacemakerd.pid)
                        if self.pacemakerd.poll() is None else [])
                clean = lab.stop_by_pid(self.pacemakerd, timeout=60) != -signal.SIGKILL
                deadline = time.monotonic() + 15
                while any(lab.pid_alive(k) for k in kids) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for k in kids:
                    if lab.pid_alive(k):
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
                if lab.stop_by_pid(self.corosync, timeout=20) == -signal.SIGKILL:
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

    def crm(self, *args, check=True, timeout=120):
        """crmsh, as a HowTo uses it: ``crm("configure", "primitive", ...)``."""
        r = run(self.ns, ["crm"] + list(args), timeout=timeout, check=check)
        record("crm " + " ".join(args[:2]), r.elapsed)
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
        r = run(self.ns, argv, timeout=timeout + 30, check=check)
        record("stonith_admin " + " ".join(args), r.elapsed)
        return r

    def crm_mon(self):
        return run(self.ns, ["crm_mon", "-1"], timeout=20).stdout

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
                    resource_id, fails, self.crm_mon(), lab.tail(self.pacemaker_log, 8000)))
            st = self.resource_state(resource_id)
            if st and st[0] == "Started" and not st[1] and st[2]:
                loc = run(self.ns, ["crm_resource", "--locate", "--resource", resource_id],
                          timeout=20)
                if loc.rc == 0 and "is running on" in loc.stdout:
                    return st[2][0]
            return None

        node = lab.wait_for(started, [self.pacemakerd, self.corosync], self.pacemaker_log,
                            timeout, "resource %s started" % resource_id, interval=0.2)
        record("wait_started " + resource_id, time.monotonic() - t0)
        return node

    def install_agent(self, src_path, name, **kw):
        """``install_agent`` whose file is removed again by ``stop()``. Call it before
        ``start()`` for agents of ``resources_xml`` primitives."""
        a = install_agent(src_path, name, **kw)
        self._agents.append(a)
        return a
