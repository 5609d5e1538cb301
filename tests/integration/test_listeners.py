"""The unicast ways in (issue #6): tcp, vsock and serial listeners, fence_virt, groups.

Every pairing runs against Debian's C fence-virt 4.12.1:

* tcp:    our daemon + C fence_virt -T, C daemon + our fence_virt -T (lab namespaces);
* groups: the same requests from two guests to the C daemon and to ours, answers compared;
* serial: a fake "qemu" binds each domain's unix socket (as qemu does), the daemon
          connects to it; the guest side is a pty (fence_virt -D /dev/pts/N) or a TCP
          port standing in for qemu's guestfwd (fence_virt -A 127.0.0.1 -p PORT).
          No network is involved, so these run in the root namespace on loopback only;
* vsock:  through the kernel's vsock_loopback, or skipped with the kernel's reason;
* bad input on tcp and serial: garbage, half-open and silent clients are timed out,
          logged, and never delay a good request.
"""

import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tty
from pathlib import Path

import pytest

from lab import (C_DAEMON, C_MODULE_PATH, DEFAULT_DOMAINS, Step, c_client,
                 expected_list, ns_argv, norm_list, norm_status, our_client, require,
                 run, run_sequence, sequence_mismatches, start_c_daemon, start_our_daemon,
                 stop_all, stop_by_pid, tcp_conf, wait_for)

ON, OFF = ("Status: ON",), ("Status: OFF",)
D = {d.name: d for d in DEFAULT_DOMAINS}


def virt(client_fn, *fixed):
    """client_fn(ns, args) running fence_virt (C or ours) with `fixed` args first."""
    def call(ns, args):
        if client_fn is c_client:
            return c_client(ns, list(fixed) + list(args), binary="fence_virt", timeout=30)
        return our_client(ns, list(fixed) + list(args), role="fence_virt", timeout=30)
    call.__name__ = "%s_fence_virt" % ("c" if client_fn is c_client else "our")
    return call


# What C fence_virt sees from the C daemon (protocol.md §5.1, §7), over any stream path.
TCP_STEPS = (
    Step("list", ["-o", "list"], norm_list, 0, expected_list()),
    Step("status-running", ["-o", "status", "-n", "pcmk-1"], norm_status, 0, ON),
    Step("status-off", ["-o", "status", "-n", "pcmk-4"], norm_status, 2, OFF),
    Step("status-missing", ["-o", "status", "-n", "no-such-vm"], norm_status, 2, OFF),
    Step("status-uuid", ["-o", "status", "-n", D["pcmk-2"].uuid], norm_status, 0, ON),
    Step("off-missing", ["-o", "off", "-n", "no-such-vm"], norm_status, 1, ()),
    Step("off", ["-o", "off", "-n", "pcmk-2"], norm_status, 0, ()),
    Step("status-after-off", ["-o", "status", "-n", "pcmk-2"], norm_status, 2, OFF),
    Step("list-after-off", ["-o", "list"], norm_list, 0, expected_list(off=("pcmk-2",))),
    Step("on", ["-o", "on", "-n", "pcmk-2"], norm_status, 0, ()),
    Step("status-after-on", ["-o", "status", "-n", "pcmk-2"], norm_status, 0, ON),
    Step("monitor", ["-o", "monitor"], norm_status, 0, ()),
    Step("wrong-key", ["-o", "status", "-n", "pcmk-1", "-k", "{wrong_key}"], norm_status, 1, ()),
    Step("auth-mismatch", ["-o", "status", "-n", "pcmk-1", "-C", "sha512"], norm_status, 1, ()),
    Step("weak-hash", ["-o", "status", "-n", "pcmk-1", "-c", "sha1"], norm_status, 1, ()),
)


@pytest.fixture(autouse=True)
def _components():
    require("root", "c", "ours")


# ---------------------------------------------------------------------------
# tcp

@pytest.mark.parametrize("daemon_kind, client_kind", [("ours", "c"), ("c", "ours"),
                                                      ("ours", "ours")])
def test_tcp_interop(lab, keyfile, node_xml, tmp_path, daemon_kind, client_kind):
    require("netns")
    conf = tcp_conf(keyfile, node_xml, address=lab.host_ip)
    start = start_our_daemon if daemon_kind == "ours" else start_c_daemon
    d = start(lab.host, conf, tmp_path)
    try:
        fn = virt(c_client if client_kind == "c" else our_client, "-T", lab.host_ip)
        results = run_sequence(lab, fn, d, steps=TCP_STEPS)
    finally:
        d.stop()
    assert [r.step.name for r in results] == [s.name for s in TCP_STEPS]
    assert not sequence_mismatches(results), "\n".join(sequence_mismatches(results))
    if daemon_kind == "ours":
        log = d.log()
        assert "via=tcp op=off domain='pcmk-2' result=success" in log, log
        assert "src=%s via=tcp" % lab.guest_ips[0] in log, log
        assert "key mismatch" in log and "auth mismatch" in log and "hash too weak" in log, log


def test_tcp_our_client_messages(lab, keyfile, tmp_path):
    """Our fence_virt says what failed: nothing listening, and a daemon with another key."""
    require("netns")
    res = our_client(lab.guests[0], ["-T", lab.host_ip, "-p", "1299", "-o", "status", "-n",
                                     "x", "-k", keyfile, "-t", "2"], role="fence_virt")
    assert res.rc == 1 and "unable to connect to fence_virtd at %s:1299" % lab.host_ip \
        in res.stderr, res


# ---------------------------------------------------------------------------
# groups ACL: the same questions to the C daemon and to ours

GROUPS = """groups {
	group {
		name = "guest-one";
		ip = "198.18.0.11";
		uuid = "pcmk-1";
		uuid = "%s";
	}
	group {
		ip = "198.18.0.12";
		uuid = "PCMK-3";
		uuid = "pcmk-4";
	}
}
""" % D["pcmk-2"].uuid

# (guest index, args); run in this order against each daemon (state changes included)
ACL_QUESTIONS = (
    (0, ["-o", "list"]), (1, ["-o", "list"]),
    (0, ["-o", "status", "-n", "pcmk-1"]), (0, ["-o", "status", "-n", "PCMK-1"]),
    (0, ["-o", "status", "-n", "pcmk-2"]), (0, ["-o", "status", "-n", D["pcmk-2"].uuid]),
    (0, ["-o", "status", "-n", D["pcmk-2"].uuid.upper()]),
    (0, ["-o", "status", "-n", "pcmk-3"]), (1, ["-o", "status", "-n", "pcmk-3"]),
    (1, ["-o", "status", "-n", "pcmk-1"]), (1, ["-o", "status", "-n", "pcmk-4"]),
    (0, ["-o", "off", "-n", "pcmk-3"]), (1, ["-o", "off", "-n", "pcmk-3"]),
    (1, ["-o", "status", "-n", "pcmk-3"]), (0, ["-o", "on", "-n", "pcmk-3"]),
    (1, ["-o", "on", "-n", "pcmk-3"]), (0, ["-o", "reboot", "-n", "pcmk-4"]),
    (0, ["-o", "monitor"]), (1, ["-o", "list"]),
)


def ask_all(lab, client, port, keyfile, questions=ACL_QUESTIONS):
    out = []
    for g, args in questions:
        res = client(lab.guests[g], ["-T", lab.host_ip, "-p", str(port), "-k", keyfile,
                                     "-t", "5"] + args)
        out.append((g, " ".join(args), res.rc, norm_list(res) or norm_status(res)))
    return out


def acl_pair(lab, keyfile, node_xml, tmp_path, groups):
    """C daemon on port 1229 and ours on 1239, same backend and groups."""
    c = start_c_daemon(lab.host, tcp_conf(keyfile, node_xml, address=lab.host_ip,
                                          extra=groups), tmp_path / "c")
    try:
        ours = start_our_daemon(lab.host, tcp_conf(keyfile, node_xml, address=lab.host_ip,
                                                   port=1239, extra=groups), tmp_path / "o")
    except BaseException:
        c.stop()
        raise
    return c, ours


def test_groups_acl_matches_c_daemon(lab, keyfile, node_xml, tmp_path):
    require("netns")
    c, ours = acl_pair(lab, keyfile, node_xml, tmp_path, GROUPS)
    try:
        client = virt(c_client)
        ref = ask_all(lab, client, 1229, keyfile)
        got = ask_all(lab, client, 1239, keyfile)
        got_ours = ask_all(lab, virt(our_client), 1239, keyfile, ACL_QUESTIONS[:11])
    finally:
        stop_all([c, ours])
    assert got == ref, "\n".join("C %r\nus %r" % p for p in zip(ref, got) if p[0] != p[1])
    assert got_ours == ref[:11]
    # and the C reference is what protocol.md §8.3 says, so both cannot be wrong together
    by_q = {(g, q): (rc, out) for g, q, rc, out in ref}
    one = expected_list(domains=[D["pcmk-1"], D["pcmk-2"]])
    two = expected_list(domains=[D["pcmk-3"], D["pcmk-4"]])
    assert by_q[(0, "-o list")] == (0, one) and by_q[(1, "-o list")] == (0, two)
    assert by_q[(0, "-o status -n pcmk-2")][0] == 3           # allowed by UUID, not by name
    assert by_q[(0, "-o status -n %s" % D["pcmk-2"].uuid)] == (0, ON)
    assert by_q[(0, "-o status -n PCMK-1")] == (2, OFF)       # ACL passes, libvirt does not
    assert by_q[(0, "-o off -n pcmk-3")][0] == 3 and by_q[(1, "-o off -n pcmk-3")][0] == 0
    assert by_q[(0, "-o monitor")][0] == 0                   # no ACL on devstatus
    assert "denied: %s may not off 'pcmk-3'" % lab.guest_ips[0] in ours.log()


@pytest.mark.parametrize("order", ["empty-last", "empty-first"])
def test_groups_with_an_empty_group_match_c_daemon(lab, keyfile, node_xml, tmp_path, order):
    """C stops loading groups at an empty one (group[1] = the last in the file)."""
    require("netns")
    real = '\tgroup {\n\t\tip = "198.18.0.11";\n\t\tuuid = "pcmk-1";\n\t}\n'
    empty = '\tgroup {\n\t\tname = "empty";\n\t}\n'
    body = real + empty if order == "empty-last" else empty + real
    c, ours = acl_pair(lab, keyfile, node_xml, tmp_path, "groups {\n%s}\n" % body)
    questions = ((0, ["-o", "status", "-n", "pcmk-3"]), (1, ["-o", "status", "-n", "pcmk-1"]),
                 (0, ["-o", "status", "-n", "pcmk-1"]))
    try:
        ref = ask_all(lab, virt(c_client), 1229, keyfile, questions)
        got = ask_all(lab, virt(c_client), 1239, keyfile, questions)
    finally:
        stop_all([c, ours])
    assert got == ref
    denied = [rc for _g, _q, rc, _o in ref[:2]]
    assert denied == ([0, 0] if order == "empty-last" else [3, 3])
    assert "has no ip and no uuid" in ours.log()


# ---------------------------------------------------------------------------
# bad input on tcp

ATTACK = textwrap.dedent(r"""
    import json, os, select, socket, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    def conn():
        s = socket.create_connection((host, port), timeout=5)
        return s
    socks = {"silent-%d" % i: conn() for i in range(3)}
    socks["half-open"] = conn(); socks["half-open"].sendall(b"\x04\x02" + b"\0" * 98)
    socks["garbage"] = conn(); socks["garbage"].sendall(b"\xab" * 176)
    socks["short-eof"] = conn(); socks["short-eof"].sendall(b"\x04" * 50)
    socks["short-eof"].shutdown(socket.SHUT_WR)
    t0 = time.monotonic()
    print("open", flush=True)
    closed = {name: [None, 0] for name in socks}
    waiting = dict(socks)
    while waiting and time.monotonic() - t0 < 5:
        ready, _, _ = select.select(list(waiting.values()), [], [], 0.05)
        for s in ready:
            name = next(n for n, x in waiting.items() if x is s)
            try:
                got = len(s.recv(64))
            except OSError as e:
                got = str(e)
            closed[name] = [round(time.monotonic() - t0, 2), got]
            del waiting[name]
    print(json.dumps(closed), flush=True)
""")


def test_tcp_bad_input_times_out_is_logged_and_blocks_nobody(lab, keyfile, node_xml, tmp_path):
    require("netns")
    d = start_our_daemon(lab.host, tcp_conf(keyfile, node_xml, address=lab.host_ip), tmp_path)
    attacker = subprocess.Popen(ns_argv(lab.guests[0], [sys.executable, "-c", ATTACK,
                                                        lab.host_ip, "1229"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attacker.stdout.readline().strip() == b"open", attacker.stderr.read()
        res = c_client(lab.guests[1], ["-T", lab.host_ip, "-o", "status", "-n", "pcmk-1",
                                       "-k", keyfile, "-t", "5"], binary="fence_virt")
        out, err = attacker.communicate(timeout=15)
    finally:
        stop_by_pid(attacker)
        d.stop()
    assert (res.rc, norm_status(res)) == (0, ON), res
    assert res.elapsed < 0.9, "a good request waited for the bad clients: %r" % res
    closed = json.loads(out.decode().strip().splitlines()[-1])
    for name in ("silent-0", "silent-1", "silent-2", "half-open"):
        t, got = closed[name]
        assert t is not None and 0.8 <= t <= 2.5 and got == 0, (name, closed)
    assert closed["garbage"][0] is not None and closed["garbage"][0] < 0.8, closed
    assert closed["short-eof"][0] is not None and closed["short-eof"][0] < 0.8, closed
    log = d.log()
    assert log.count("timed out reading request (0 of 176 bytes arrived)") == 3, log
    assert "timed out reading request (100 of 176 bytes arrived)" in log, log
    assert "connection closed while reading request (50 of 176 bytes arrived)" in log, log
    assert "unknown hash type 171" in log, log
    assert "via=tcp op=status domain='pcmk-1' result=success" in log, log


# ---------------------------------------------------------------------------
# vsock

def vsock_unavailable():
    """Why vsock cannot be tested on this machine's kernel, or None."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    if not os.path.isdir("/sys/module/vsock_loopback") and shutil.which("modprobe"):
        run(None, ["modprobe", "vsock_loopback"], timeout=20)
    if not os.path.isdir("/sys/module/vsock_loopback"):
        return ("kernel %s offers no vsock_loopback transport (/sys/module/vsock_loopback is "
                "absent and modprobe vsock_loopback is unavailable or failed); its vsock "
                "transports (%s) would carry a connection to our own CID out to the "
                "hypervisor, so vsock is not tested here"
                % (os.uname().release,
                   ", ".join(sorted(m for m in os.listdir("/sys/module") if "vsock" in m))
                   or "none"))
    return None


def local_cid():
    with open("/dev/vsock", "rb") as f:
        return struct.unpack("I", fcntl.ioctl(f, 0x7B9, b"\0" * 4))[0]


def vsock_conf(key_file, uri, port):
    return ('fence_virtd {\n\tlistener = "vsock";\n\tbackend = "libvirt";\n'
            '\tmodule_path = "%s";\n}\nlisteners {\n\tvsock {\n\t\tkey_file = "%s";\n'
            '\t\tport = "%d";\n\t}\n}\nbackends {\n\tlibvirt {\n\t\turi = "%s";\n\t}\n}\n'
            % (C_MODULE_PATH, key_file, port, uri))


@pytest.mark.parametrize("daemon_kind, client_kind", [("ours", "c"), ("c", "ours")])
def test_vsock_interop(loopback_lab, keyfile, node_xml, tmp_path, daemon_kind, client_kind):
    reason = vsock_unavailable()
    if reason:
        pytest.skip(reason)          # kernel reason: skips under CI too (issue #6)
    cid = local_cid()
    if cid < 2:
        pytest.skip("local vsock CID is %d; fence_virt -S takes 2..4294967294 only" % cid)
    port = 40000 + os.getpid() % 20000        # vsock ports are machine-wide
    conf = vsock_conf(keyfile, node_xml, port)
    if daemon_kind == "ours":
        d = start_our_daemon(None, conf, tmp_path)
    else:
        d = start_c_plain(conf, tmp_path, lambda: ("%d" % port) in run(
            None, ["ss", "-Hl", "--vsock"], timeout=10).stdout)
    try:
        fn = virt(c_client if client_kind == "c" else our_client, "-S%d" % cid, "-p",
                  str(port))
        results = run_sequence(loopback_lab, fn, d, steps=TCP_STEPS)
    finally:
        d.stop()
    assert not sequence_mismatches(results), "\n".join(sequence_mismatches(results))


# ---------------------------------------------------------------------------
# serial: a fake qemu binds each domain's socket; a pty or a TCP port is the guest side

SER = (("ser-1", "5e000000-0000-4000-8000-000000000001", True),
       ("ser-2", "5e000000-0000-4000-8000-000000000002", True),
       ("ser-3", "5e000000-0000-4000-8000-000000000003", False))
SER_D = {n: u for n, u, _r in SER}


def write_serial_node(workdir):
    """test:/// node file whose domains have a <serial> and a guestfwd <channel> each."""
    parts = ["<node>\n  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1"
             "</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\n"
             "  <memory>8388608</memory>\n"]
    for name, uuid, running in SER:
        parts.append(
            "  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
            "<name>%s</name><uuid>%s</uuid>%s<memory>65536</memory><vcpu>1</vcpu>"
            "<os><type>hvm</type></os><devices>"
            "<serial type='unix'><source mode='bind' path='%s/%s.ser'/><target port='1'/>"
            "</serial><channel type='unix'><source mode='bind' path='%s/%s.chan'/>"
            "<target type='guestfwd' address='10.0.2.179' port='1229'/></channel>"
            "</devices></domain>\n"
            % (name, uuid, "" if running else "<test:runstate>5</test:runstate>",
               workdir, name, workdir, name))
    parts.append("</node>\n")
    path = Path(workdir) / "node.xml"
    path.write_text("".join(parts))
    return "test://%s" % path


def serial_conf(uri, key_file, mode, extra=""):
    return ('fence_virtd {\n\tlistener = "serial";\n\tbackend = "libvirt";\n'
            '\tmodule_path = "%s";\n}\nlisteners {\n\tserial {\n\t\turi = "%s";\n'
            '\t\tmode = "%s";\n\t\tkey_file = "%s";\n\t}\n}\nbackends {\n\tlibvirt {\n'
            '\t\turi = "%s";\n\t}\n}\n%s' % (C_MODULE_PATH, uri, mode, key_file, uri, extra))


class FakeQemu(object):
    """Binds a domain's unix socket like qemu, accepts the daemon, and bridges the
    daemon's byte stream to a guest side: a pty ('pty') or a TCP port ('tcp', as qemu's
    guestfwd does for 10.0.2.179:1229)."""

    def __init__(self, path, guest):
        self.path = path
        self.guest = guest
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.daemon = None
        self.stop = threading.Event()
        self.thread = None
        self.master = self.slave = None
        self.tcp = None
        self.client = None

    def wait_daemon(self, timeout=10):
        r, _, _ = select.select([self.srv], [], [], timeout)
        assert r, "no daemon connected to %s within %s s" % (self.path, timeout)
        self.daemon, _ = self.srv.accept()
        if self.guest == "pty":
            self.master, self.slave = os.openpty()
            tty.setraw(self.slave)
            self.device = os.ttyname(self.slave)
        else:
            self.tcp = socket.socket()
            self.tcp.bind(("127.0.0.1", 0))
            self.tcp.listen(4)
            self.port = self.tcp.getsockname()[1]
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()
        return self

    def connected(self):
        return bool(select.select([self.srv], [], [], 0)[0])

    def _pump(self):
        while not self.stop.is_set():
            fds = [self.daemon] + ([self.master] if self.master is not None else
                                   [self.tcp] + ([self.client] if self.client else []))
            r, _, _ = select.select(fds, [], [], 0.1)
            for fd in r:
                if fd is self.tcp:
                    if self.client is not None:
                        self.client.close()
                    self.client, _ = self.tcp.accept()
                elif fd is self.daemon:
                    data = self.daemon.recv(65536)
                    if not data:
                        return
                    if self.master is not None:
                        os.write(self.master, data)
                    elif self.client is not None:
                        with contextlib.suppress(OSError):
                            self.client.sendall(data)
                elif fd is self.master:
                    self.daemon.sendall(os.read(self.master, 65536))
                else:
                    try:
                        data = self.client.recv(65536)
                    except OSError:            # the C client resets: trailer left unread
                        data = b""
                    if data:
                        self.daemon.sendall(data)
                    else:
                        self.client.close()
                        self.client = None

    def send_raw(self, data):
        """Bytes as if the guest wrote them."""
        self.daemon.sendall(data)

    def guest_args(self):
        if self.guest == "pty":
            return ["-D", self.device]
        return ["-A", "127.0.0.1", "-p", str(self.port)]

    def close(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(2)
        for s in (self.daemon, self.srv, self.tcp, self.client):
            if s is not None:
                s.close()
        for fd in (self.master, self.slave):
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Plain(object):
    """A C fence_virtd started without a port to wait on (serial, vsock listeners)."""

    def __init__(self, proc, log_path, conf_path):
        self.proc, self.log_path, self.conf_path = proc, log_path, conf_path
        self.key_file = None

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def assert_alive(self):
        assert self.proc.poll() is None, "C daemon died: %s" % self.log()

    def stop(self):
        return stop_by_pid(self.proc)


def start_c_plain(conf_text, workdir, ready, debug=3):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "c.conf"
    conf.write_text(conf_text)
    os.chmod(str(conf), 0o600)
    log_path = workdir / "c.log"
    with open(str(log_path), "wb") as out:
        proc = subprocess.Popen(["stdbuf", "-oL", "-eL", C_DAEMON, "-F", "-d%d" % debug, "-p",
                                 str(workdir / "c.pid"), "-f", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    d = Plain(proc, log_path, conf)
    try:
        wait_for(ready, proc, log_path, 10, "the C daemon to come up")
    except BaseException:
        d.stop()
        raise
    return d


@contextlib.contextmanager
def serial_setup(daemon_kind, guest, keyfile, extra="", env=None):
    """(daemon, {domain: FakeQemu}) with the fake qemus of ser-1 and ser-2 connected."""
    work = tempfile.mkdtemp(prefix="i6-ser-")       # short: unix socket paths <= 107 bytes
    uri = write_serial_node(work)
    mode = "serial" if guest == "pty" else "vmchannel"
    suffix = "ser" if mode == "serial" else "chan"
    qemus = {n: FakeQemu("%s/%s.%s" % (work, n, suffix), guest) for n, _u, r in SER if r}
    conf = serial_conf(uri, keyfile, mode, extra)
    d = None
    try:
        if daemon_kind == "ours":
            d = start_our_daemon(None, conf, work, env=env)
        else:
            d = start_c_plain(conf, work, lambda: all(q.connected() for q in qemus.values()))
        for q in qemus.values():
            q.wait_daemon()
        yield d, qemus
    finally:
        if d is not None:
            d.stop()
        for q in qemus.values():
            q.close()
        shutil.rmtree(work, ignore_errors=True)


def ser_list(*names, off=()):
    return tuple(sorted((n, SER_D[n], "off" if n in off or n == "ser-3" else "on")
                        for n in names))


SERIAL_STEPS = (
    ("list", ["-o", "list"], 0, ser_list("ser-1", "ser-2", "ser-3")),
    ("status-running", ["-o", "status", "-n", "ser-2"], 0, ON),
    ("status-off", ["-o", "status", "-n", "ser-3"], 2, OFF),
    ("status-missing", ["-o", "status", "-n", "no-such-vm"], 2, OFF),
    ("status-uuid", ["-o", "status", "-n", SER_D["ser-2"]], 0, ON),
    ("off-missing", ["-o", "off", "-n", "no-such-vm"], 1, ()),
    ("off", ["-o", "off", "-n", "ser-2"], 0, ()),
    ("status-after-off", ["-o", "status", "-n", "ser-2"], 2, OFF),
    ("list-after-off", ["-o", "list"], 0, ser_list("ser-1", "ser-2", "ser-3", off=("ser-2",))),
    ("on", ["-o", "on", "-n", "ser-2"], 0, ()),
    ("status-after-on", ["-o", "status", "-n", "ser-2"], 0, ON),
    ("monitor", ["-o", "monitor"], 0, ()),
)


def serial_client(kind, qemu, args, timeout="5"):
    argv = qemu.guest_args() + ["-t", timeout] + list(args)
    if kind == "c":
        # no network: the C client only opens the pty or connects to 127.0.0.1
        return run(None, ["/usr/sbin/fence_virt"] + argv, timeout=30)
    return our_client(None, argv, role="fence_virt", timeout=30)


@pytest.mark.parametrize("guest", ["pty", "vmchannel"])
@pytest.mark.parametrize("daemon_kind", ["ours", "c"])
def test_serial_interop(keyfile, daemon_kind, guest):
    with serial_setup(daemon_kind, "pty" if guest == "pty" else "tcp", keyfile) as (d, qemus):
        bad = []
        for client in ("c", "ours"):
            for name, args, rc, out in SERIAL_STEPS:
                res = serial_client(client, qemus["ser-1"], args)
                got = (res.rc, norm_list(res) or norm_status(res))
                if got != (rc, out):
                    bad.append("%s client, %s: got %r, C reference %r\n%r"
                               % (client, name, got, (rc, out), res))
        d.assert_alive()
        log = d.log()
    assert not bad, "\n".join(bad)
    if daemon_kind == "ours":
        assert "via=serial op=off domain='ser-2' result=success" in log, log
        assert "src=%s" % SER_D["ser-1"] in log


def test_serial_listener_with_the_virsh_driver(keyfile):
    """The listener's virsh path (list --uuid --name, dumpxml). With test:/// every virsh
    call starts from the node file, so only read-only requests are checked here."""
    with serial_setup("ours", "pty", keyfile, env={"FENCEVIRT_LIBVIRT_DRIVER": "virsh"}) \
            as (d, qemus):
        for name, args, rc, out in SERIAL_STEPS[:5]:
            res = serial_client("c", qemus["ser-2"], args)
            assert (res.rc, norm_list(res) or norm_status(res)) == (rc, out), (name, res)
        log = d.log()
    assert "libvirt (virsh)" in log and "src=%s" % SER_D["ser-2"] in log, log


SERIAL_GROUPS = """groups {
	group {
		uuid = "%s";
		uuid = "ser-1";
		uuid = "ser-3";
	}
}
""" % SER_D["ser-1"]


def test_serial_acl_source_is_the_domain_uuid_as_in_c(keyfile):
    questions = (("ser-1", ["-o", "list"]), ("ser-2", ["-o", "list"]),
                 ("ser-1", ["-o", "status", "-n", "ser-3"]),
                 ("ser-1", ["-o", "status", "-n", "ser-2"]),
                 ("ser-2", ["-o", "status", "-n", "ser-1"]),
                 ("ser-2", ["-o", "monitor"]))
    answers = {}
    for kind in ("c", "ours"):
        with serial_setup(kind, "pty", keyfile, SERIAL_GROUPS) as (_d, qemus):
            answers[kind] = [(src, " ".join(a), r.rc, norm_list(r) or norm_status(r))
                             for src, a in questions
                             for r in [serial_client("c", qemus[src], a)]]
    assert answers["ours"] == answers["c"], answers
    got = answers["c"]
    assert got[0][2:] == (0, ser_list("ser-1", "ser-3"))   # the guest lists itself too
    assert got[1][2:] == (0, ())                          # ser-2 is in no group
    assert [g[2] for g in got[2:]] == [2, 3, 3, 0]


def test_serial_bad_input_is_skipped_logged_and_blocks_nobody(keyfile):
    """Ours resynchronises on the magic (C is desynchronised for good, §6.2); a half
    request is dropped after 1 s and never delays another domain."""
    with serial_setup("ours", "pty", keyfile) as (d, qemus):
        q1, q2 = qemus["ser-1"], qemus["ser-2"]
        res = serial_client("ours", q1, ["-o", "status", "-n", "ser-2"])
        assert (res.rc, norm_status(res)) == (0, ON), res
        q1.send_raw(b"\r\nlogin: garbage\x00\xff")
        q1.send_raw(b"abba\x04\x00ser-1")               # a half request, then silence
        t0 = time.monotonic()
        res = serial_client("c", q2, ["-o", "status", "-n", "ser-1"])
        assert (res.rc, norm_status(res)) == (0, ON) and res.elapsed < 0.9, res
        wait_for(lambda: "incomplete serial request" in d.log(), d.proc, d.log_path, 3)
        assert time.monotonic() - t0 >= 0.9
        # the line works again once the partial request is discarded
        res = serial_client("c", q1, ["-o", "status", "-n", "ser-3"])
        assert (res.rc, norm_status(res)) == (2, OFF), res
        log = d.log()
    assert "bytes without the serial magic skipped on" in log, log
    assert "incomplete serial request on %s" % q1.path in log, log


def test_serial_domain_started_later_is_picked_up(keyfile):
    """A socket that is not there at start is retried (C waits for libvirt's STARTED
    event; we rescan every 2 s) and a closed one is reconnected."""
    work = tempfile.mkdtemp(prefix="i6-ser-")
    uri = write_serial_node(work)
    d = start_our_daemon(None, serial_conf(uri, keyfile, "serial"), work)
    q = None
    try:
        assert "cannot connect to %s/ser-1.ser" % work in d.log()
        q = FakeQemu("%s/ser-1.ser" % work, "pty")
        q.wait_daemon(timeout=5)
        res = serial_client("c", q, ["-o", "status", "-n", "ser-1"])
        assert (res.rc, norm_status(res)) == (0, ON), res
        q.close()                               # "qemu" goes away: the daemon notices
        wait_for(lambda: "closed %s/ser-1.ser" % work in d.log(), d.proc, d.log_path, 3)
        q = FakeQemu("%s/ser-1.ser" % work, "pty")
        q.wait_daemon(timeout=5)
        res = serial_client("ours", q, ["-o", "list"])
        assert res.rc == 0 and norm_list(res) == ser_list("ser-1", "ser-2", "ser-3"), res
    finally:
        d.stop()
        if q is not None:
            q.close()
        shutil.rmtree(work, ignore_errors=True)


def test_our_serial_client_errors_say_what_to_check(tmp_path):
    missing = our_client(None, ["-D", str(tmp_path / "ttyS9"), "-o", "status", "-n", "x",
                                "-t", "1"], role="fence_virt")
    assert missing.rc == 1 and "cannot open serial device" in missing.stderr, missing
    notty = tmp_path / "plain-file"
    notty.write_text("")
    res = our_client(None, ["-D", str(notty), "-o", "status", "-n", "x", "-t", "1"],
                     role="fence_virt")
    assert res.rc == 1 and "is not a terminal" in res.stderr, res
    res = our_client(None, ["-D", str(notty), "-P", "1200,8N1", "-o", "validate-all"],
                     role="fence_virt")
    assert res.rc == 1 and "speed '1200' is not one of" in res.stderr, res
    # VMChannel: nothing listens on this port
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = our_client(None, ["-A", "127.0.0.1", "-p", str(port), "-o", "status", "-n", "x",
                            "-t", "2"], role="fence_virt")
    assert res.rc == 1 and "unable to connect to the VMChannel at 127.0.0.1" in res.stderr, res
    # a pty nobody answers on: a timeout that names the path to check
    master, slave = os.openpty()
    device = os.ttyname(slave)
    try:
        res = our_client(None, ["-D", device, "-o", "status", "-n", "x", "-t", "1"],
                         role="fence_virt")
    finally:
        os.close(master)
        os.close(slave)
    assert res.rc == 1 and "no reply on %s within 1 s" % device in res.stderr, res
    assert 'listener "serial"' in res.stderr, res


def test_tcp_and_serial_listeners_in_one_daemon(loopback_lab, keyfile):
    """Ours only (C takes one listener name): listener = "tcp,serial" serves both."""
    work = tempfile.mkdtemp(prefix="i6-two-")
    uri = write_serial_node(work)
    conf = serial_conf(uri, keyfile, "serial").replace(
        'listener = "serial";', 'listener = "tcp,serial";').replace(
        "listeners {\n", 'listeners {\n\ttcp {\n\t\tkey_file = "%s";\n\t}\n' % keyfile)
    q = FakeQemu("%s/ser-1.ser" % work, "pty")
    d = start_our_daemon(loopback_lab.host, conf, work)
    try:
        q.wait_daemon()
        res = c_client(loopback_lab.host, ["-T", "127.0.0.1", "-k", keyfile, "-t", "5", "-o",
                                           "list"], binary="fence_virt")
        want = ser_list("ser-1", "ser-2", "ser-3")
        assert (res.rc, norm_list(res)) == (0, want), res
        res = serial_client("c", q, ["-o", "list"])
        assert (res.rc, norm_list(res)) == (0, want), res
        log = d.log()
    finally:
        d.stop()
        q.close()
        shutil.rmtree(work, ignore_errors=True)
    assert "via=tcp op=hostlist" in log and "via=serial op=hostlist" in log, log
