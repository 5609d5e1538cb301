"""Issue #10: every failure class is told apart, on the client, in the daemon log and by doctor.

One lab (host + one guest on br0) for the module; per scenario our fence_virtd is started
with the fault in place, then our fence_xvm (and the C fence_xvm, where the daemon side must
still log the right reason), `fence_xvm doctor` in the guest and `fence_virtd doctor` on the
host run against it. Client timeouts are -t 2, so a scenario takes 2-8 s.
"""

import re
import sys
import time

import pytest

import lab as L

SYSTEM_PYTHON = "/usr/bin/python3"
GUEST_IP = "198.18.0.11"


class Scenario(object):
    def __init__(self, name, client_args, rc, client_re, log_re, guest_doctor_re,
                 host_doctor_re, conf=None, setup=None, daemon=True, c_rc=1, doctor_args=(),
                 timeout=2):
        self.name, self.client_args, self.rc = name, client_args, rc
        self.client_re, self.log_re = client_re, log_re
        self.guest_doctor_re, self.host_doctor_re = guest_doctor_re, host_doctor_re
        self.conf, self.setup, self.daemon, self.c_rc = conf or {}, setup, daemon, c_rc
        self.doctor_args = list(doctor_args)
        self.timeout = timeout      # the daemon's reconnect to a stopped libvirtd takes longer

    def __repr__(self):
        return self.name


def _firewall(lab_):
    L.run(lab_.guests[0], ["nft", "-f", "-"], check=True, timeout=10, stdin=(
        "table inet i10fw {\n chain input {\n  type filter hook input priority 0;\n"
        "  tcp dport 1229 drop\n }\n}\n"))
    return lambda: L.run(lab_.guests[0], ["nft", "delete", "table", "inet", "i10fw"], timeout=10)


def _other_interface(lab_):
    L.run(None, ["ip", "-n", lab_.host, "-batch", "-"], check=True, timeout=10, stdin=(
        "link add i10d0 type veth peer name i10d1\naddr add 10.99.0.1/24 dev i10d0\n"
        "link set i10d0 multicast on\nlink set i10d0 up\nlink set i10d1 up\n"))
    return lambda: L.run(None, ["ip", "-n", lab_.host, "link", "del", "i10d0"], timeout=10)


SCENARIOS = [
    Scenario("wrong-key", ["-o", "status", "-H", "pcmk-1", "-k", "{wrong}"], 1,
             r"timed out after 2 s: key mismatch: fence_virtd at 198\.18\.0\.1 dropped",
             r"drop from 198\.18\.0\.11: key mismatch",
             r"FAIL daemon: .*dropped the probe: key mismatch", r"FAIL recent drop: .*key mismatch",
             doctor_args=["-k", "{wrong}"]),
    Scenario("weak-hash", ["-o", "status", "-H", "pcmk-1", "-c", "sha1"], 1,
             r"timed out after 2 s: hash too weak: fence_virtd at 198\.18\.0\.1",
             r"drop from 198\.18\.0\.11: hash too weak",
             r"FAIL daemon: .*hash too weak", r"FAIL recent drop: .*hash too weak",
             doctor_args=["-c", "sha1"]),
    Scenario("auth-mismatch", ["-o", "status", "-H", "pcmk-1", "-C", "sha512"], 1,
             r"auth mismatch: fence_virtd at 198\.18\.0\.1 connected back but failed our sha512",
             r"drop from 198\.18\.0\.11: auth mismatch",
             r"FAIL daemon answers: auth mismatch", r"FAIL recent drop: .*auth mismatch",
             doctor_args=["-C", "sha512"]),
    Scenario("daemon-down", ["-o", "status", "-H", "pcmk-1"], 1,
             r"timed out after 2 s: no connect-back: .*fence_virtd is not running", None,
             r"nothing listens on UDP 1229 at 198\.18\.0\.1", r"FAIL group: .*joined on no "
             r"interface", daemon=False, doctor_args=["--host", "198.18.0.1"]),
    Scenario("guest-firewall", ["-o", "status", "-H", "pcmk-1"], 1,
             r"timed out after 2 s: connect-back blocked: fence_virtd tried to connect back to "
             r"TCP port 1229 from 198\.18\.0\.1",
             r"drop from 198\.18\.0\.11: connect-back failed",
             r"FAIL connect-back: .*firewall", r"FAIL recent drop: .*connect-back failed",
             setup=_firewall),
    Scenario("wrong-interface", ["-o", "status", "-H", "pcmk-1"], 1,
             r"timed out after 2 s: wrong interface: fence_virtd at 198\.18\.0\.1 dropped our "
             r"request \(request for 225\.0\.0\.12:1229 arrived on br0",
             r"drop from 198\.18\.0\.11: wrong interface: .*arrived on br0",
             r"answers unicast but not 225\.0\.0\.12", r"FAIL recent drop: .*wrong interface",
             conf={"interface": "i10d0"}, setup=_other_interface, doctor_args=["--host", "198.18.0.1"]),
    Scenario("libvirtd-down", ["-o", "off", "-H", "pcmk-1"], 1,
             r"Operation failed: fence_virtd could not off pcmk-1: .*libvirt",
             r"off 'pcmk-1' from 198\.18\.0\.11 failed: .*libvirt",
             r"FAIL list: fence_virtd answered failure", r"FAIL backend: .*libvirt",
             conf={"libvirtd": True}, timeout=10),
    Scenario("unknown-domain", ["-o", "off", "-H", "no-such-vm"], 1,
             r"Operation failed: fence_virtd could not off no-such-vm: unknown domain "
             r"'no-such-vm'",
             r"src=198\.18\.0\.11 .*op=off domain='no-such-vm' result=fail \(unknown domain",
             r"FAIL domain: 'no-such-vm' is not among", r"FAIL recent failure: .*unknown "
             r"domain", doctor_args=["-H", "no-such-vm"]),
]


@pytest.fixture(scope="module")
def diag_lab(tmp_path_factory):
    L.require("root", "netns", "ours")
    with L.Lab(n_guests=1) as the_lab:
        yield the_lab


def _python():
    import subprocess
    for py in (sys.executable, SYSTEM_PYTHON):
        if subprocess.run([py, "-c", "import libvirt"], capture_output=True).returncode == 0:
            return py, {"FENCEVIRT_LIBVIRT_DRIVER": "python"}
    return sys.executable, {"FENCEVIRT_LIBVIRT_DRIVER": "virsh"}


def _fmt(args, key, wrong):
    return [a.format(key=key, wrong=wrong) for a in args]


def _start(sc, diag_lab, tmp_path):
    key = L.make_key(tmp_path / "fence_xvm.key")
    wrong = L.make_key(tmp_path / "wrong.key")
    lv = None
    if sc.conf.get("libvirtd"):
        # a real libvirtd that the daemon reaches at start-up, stopped before the client runs
        L.require("libvirtd")
        lv = L.Libvirtd(diag_lab.host, tmp_path / "libvirtd").start()
        uri = lv.tcp_uri
    else:
        uri = L.write_node_xml(tmp_path / "node.xml")
    conf = L.mcast_conf(key, uri, interface=sc.conf.get("interface", "br0"))
    if lv is not None:
        # the daemon retries a lost libvirtd within its budget: keep that short here
        conf = conf.replace("fence_virtd {\n", 'fence_virtd {\n\tbackend_timeout = "4";\n', 1)
    py, env = _python()
    try:
        daemon = L.start_our_daemon(diag_lab.host, conf, tmp_path / "d", python=py, env=env) \
            if sc.daemon else None
    finally:
        if lv is not None:
            lv.close()
    return key, wrong, conf, daemon


def _host_doctor(diag_lab, tmp_path, conf):
    confp = tmp_path / "doctor.conf"
    confp.write_text(conf)
    return L.run(diag_lab.host, [sys.executable, L.FENCEVIRT, "doctor", "virtd", "-f", confp,
                                 "-p", tmp_path / "d" / "our_fence_virtd.pid"], timeout=60)


@pytest.mark.parametrize("sc", SCENARIOS, ids=repr)
def test_scenario(sc, diag_lab, tmp_path):
    undo = sc.setup(diag_lab) if sc.setup else None
    try:
        key, wrong, conf, daemon = _start(sc, diag_lab, tmp_path)
        guest = diag_lab.guests[0]
        try:
            args = _fmt(sc.client_args, key, wrong)
            if "-k" not in args:
                args += ["-k", str(key)]
            res = L.our_client(guest, args + ["-t", str(sc.timeout)], timeout=60)
            sys.stderr.write("%s: rc=%s %.2fs %s\n" % (sc.name, res.rc, res.elapsed,
                                                       res.stderr.strip()))
            assert res.rc == sc.rc, res
            assert re.search(sc.client_re, res.stderr), res
            assert res.elapsed < sc.timeout + 1.5, res   # within the agent's timeout
            if daemon is not None and sc.log_re:
                L.wait_for(lambda: re.search(sc.log_re, daemon.log()), daemon.proc,
                           daemon.log_path, timeout=8, what=sc.log_re)
            dargs = _fmt(sc.doctor_args, key, wrong)
            if "-k" not in dargs:
                dargs += ["-k", str(key)]
            doc = L.our_client(guest, ["doctor"] + dargs + ["-t", str(sc.timeout)], timeout=90)
            assert doc.rc == 1 and re.search(sc.guest_doctor_re, doc.stdout), doc
            time.sleep(1.1)                            # the state file is written once a second
            hdoc = _host_doctor(diag_lab, tmp_path, conf)
            assert hdoc.rc == 1 and re.search(sc.host_doctor_re, hdoc.stdout), hdoc
        finally:
            if daemon is not None:
                daemon.stop()
    finally:
        if undo:
            undo()


C_SCENARIOS = [s for s in SCENARIOS if s.daemon]


@pytest.mark.parametrize("sc", C_SCENARIOS, ids=repr)
def test_c_client_daemon_log(sc, diag_lab, tmp_path):
    """The C fence_xvm gets its usual rc; our daemon still logs source and reason."""
    L.require("c")
    undo = sc.setup(diag_lab) if sc.setup else None
    try:
        key, wrong, conf, daemon = _start(sc, diag_lab, tmp_path)
        try:
            args = _fmt(sc.client_args, key, wrong)
            if "-k" not in args:
                args += ["-k", str(key)]
            res = L.c_client(diag_lab.guests[0], args + ["-t", str(sc.timeout)], timeout=60)
            assert res.rc == sc.c_rc, res
            log_re = sc.log_re.replace(r"key mismatch", r"key mismatch: sha256 digest")
            L.wait_for(lambda: re.search(log_re, daemon.log()), daemon.proc, daemon.log_path,
                       timeout=8, what=log_re)
        finally:
            daemon.stop()
    finally:
        if undo:
            undo()
