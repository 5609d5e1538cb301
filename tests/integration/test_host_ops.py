"""Host operations against the real things (issue #5).

* `fence_virtd -c` driven through a real pseudo-terminal, answered as the HowTo does
  (interface, key file); the file it writes is then served by the C fence_virtd AND ours;
* keygen, the key fingerprint (daemon start-up line, client with -d), refusing to start
  without a usable key, the pidfile conflict, SIGHUP reload (good and broken), SIGTERM
  exit time, the audit line, config errors at start-up, -w waiting for an interface;
* install / uninstall, and the installed systemd unit's ExecStart run with NOTIFY_SOCKET;
* a real libvirtd killed with SIGKILL, restarted and stopped (SIGSTOP) while requests
  are in flight: client exit codes, daemon log lines, and serving again afterwards.

Traffic stays inside the lab's namespaces; every process is stopped by its PID.
"""

import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import lab as labmod
from lab import (FENCEVIRT, LIBVIRTD, c_client, make_key, mcast_conf, ns_argv,
                 our_client, require, role_dir, run, start_c_daemon, start_our_daemon,
                 stop_by_pid, wait_for, write_node_xml)

SYSTEM_PYTHON = "/usr/bin/python3"
SIM_DOMAINS = ("sim-1 5a5a5a5a-0000-4000-8000-000000000001 on",
               "sim-2 5a5a5a5a-0000-4000-8000-000000000002 off")


def sim_conf(key_file, interface="br0", domains=SIM_DOMAINS, extra_fv="", listener_extra="",
             hash_auth=None):
    body = "".join('\t\tdomain = "%s";\n' % d for d in domains)
    ha = "" if hash_auth is None else '\t\thash = "%s";\n\t\tauth = "%s";\n' % hash_auth
    return ('fence_virtd {\n\tlistener = "multicast";\n\tbackend = "sim";\n%s}\n'
            'listeners {\n\tmulticast {\n\t\tkey_file = "%s";\n\t\tinterface = "%s";\n%s%s'
            '\t}\n}\nbackends {\n\tsim {\n%s\t}\n}\n'
            % (extra_fv, key_file, interface, ha, listener_extra, body))


def daemon_argv(workdir, conf, pidfile, python=sys.executable, extra=()):
    return [python, str(role_dir(workdir) / "fence_virtd"), "-F", "-f", str(conf),
            "-p", str(pidfile)] + list(extra)


def xvm(lab, args, guest=0, timeout=60):
    return c_client(lab.guests[guest], args, timeout=timeout)


# ---------------------------------------------------------------------------
# fence_virtd -c through a pseudo-terminal

def drive_pty(argv, answers, timeout=30):
    """Run argv on a new pty; answers: (prompt text, reply) in order. Returns (rc, text)."""
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    buf, pos = b"", 0
    deadline = time.monotonic() + timeout

    def read_more():
        r, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            raise AssertionError("no prompt within %s s; screen so far:\n%s"
                                 % (timeout, buf.decode(errors="replace")))
        try:
            return os.read(master, 4096)
        except OSError:          # EIO: the child closed the pty
            return b""

    try:
        for prompt, reply in answers:
            while prompt.encode() not in buf[pos:]:
                data = read_more()
                if not data:
                    raise AssertionError("exited before %r:\n%s"
                                         % (prompt, buf.decode(errors="replace")))
                buf += data
            pos = buf.index(prompt.encode(), pos) + len(prompt)
            os.write(master, reply.encode() + b"\n")
        while True:
            data = read_more()
            if not data:
                break
            buf += data
        return proc.wait(10), buf.decode(errors="replace")
    finally:
        os.close(master)
        stop_by_pid(proc)


def test_configure_on_a_pty_then_c_and_our_daemon_serve(lab, tmp_path):
    require("root", "netns", "c", "virsh")
    key = tmp_path / "etc" / "cluster" / "fence_xvm.key"
    res = run(None, [sys.executable, FENCEVIRT, "keygen", key], timeout=30)
    assert res.rc == 0, res
    uri = write_node_xml(tmp_path / "node.xml")
    conf = tmp_path / "fence_virt.conf"
    screen_answers = [
        ("Start from scratch [y/N]? ", "y"),
        ("Module search path [", ""),
        ("Listener module [multicast]: ", ""),
        ("Multicast IP Address [225.0.0.12]: ", ""),
        ("Multicast IP Port [1229]: ", ""),
        ("Interface [none]: ", "br0"),                # HowTo: virbr0; the lab's bridge is br0
        ("Key File [/etc/cluster/fence_xvm.key]: ", str(key)),
        ("Backend module [libvirt]: ", ""),
        ("Libvirt URI [qemu:///system]: ", uri),
        ("Replace %s with the above [y/N]? " % conf, "y"),
    ]
    rc, screen = drive_pty(ns_argv(lab.host, [sys.executable, role_dir(tmp_path) / "fence_virtd",
                                              "-c", "-f", conf]), screen_answers)
    assert rc == 0, screen
    assert "Bridges on this host: br0" in screen          # the bridges that exist are offered
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    text = conf.read_text()
    assert 'interface = "br0";' in text and 'key_file = "%s";' % key in text, text
    assert 'module_path = "/usr/lib/x86_64-linux-gnu/fence-virt/";' in text

    # both daemons serve the written file (each on a fresh test-driver connection)
    for start, name in ((start_c_daemon, "c"), (start_our_daemon, "ours")):
        daemon = start(lab.host, text, tmp_path / name)
        try:
            res = xvm(lab, ["-o", "status", "-H", "pcmk-1", "-k", key, "-t", "5"])
            assert (res.rc, "Status: ON" in res.output) == (0, True), (name, res)
            res = xvm(lab, ["-o", "off", "-H", "pcmk-2", "-k", key, "-t", "5"])
            assert res.rc == 0, (name, res)
            res = xvm(lab, ["-o", "status", "-H", "pcmk-2", "-k", key, "-t", "5"])
            assert res.rc == 2, (name, res)
        finally:
            daemon.stop()


# ---------------------------------------------------------------------------
# keys

def test_keygen_mode_overwrite_force_and_directory(tmp_path):
    key = tmp_path / "etc" / "cluster" / "fence_xvm.key"
    res = run(None, [sys.executable, FENCEVIRT, "keygen", key], timeout=30)
    assert res.rc == 0, res
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.stat().st_size == 512
    assert (tmp_path / "etc" / "cluster").is_dir()
    first = key.read_bytes()
    m = re.search(r"fingerprint (sha256:[0-9a-f]{16})", res.stdout)
    assert m, res
    res = run(None, [sys.executable, FENCEVIRT, "keygen", key], timeout=30)
    assert res.rc == 1 and "refusing to overwrite" in res.stderr and "--force" in res.stderr
    assert key.read_bytes() == first
    res = run(None, [sys.executable, FENCEVIRT, "keygen", "--force", "--bytes", "64", key],
              timeout=30)
    assert res.rc == 0 and key.stat().st_size == 64 and key.read_bytes() != first, res
    res = run(None, [sys.executable, FENCEVIRT, "keygen", "--bytes", "8", tmp_path / "k2"],
              timeout=30)
    assert res.rc == 1 and "--bytes" in res.stderr, res


def test_fingerprint_daemon_and_client_agree(lab, tmp_path):
    require("root", "netns")
    key = make_key(tmp_path / "k.key")
    res = run(None, [sys.executable, FENCEVIRT, "keygen", "--force", key], timeout=30)
    fp = re.search(r"fingerprint (sha256:[0-9a-f]{16})", res.stdout).group(1)
    d = start_our_daemon(lab.host, sim_conf(key), tmp_path)
    try:
        ready = [ln for ln in d.log().splitlines() if "ready:" in ln][0]
        assert "key %s" % fp in ready, ready
        res = our_client(lab.guests[0], ["-d", "-o", "status", "-H", "sim-1", "-k", key,
                                         "-t", "5"])
        assert res.rc == 0 and "key %s" % fp in res.stderr, res
        audit = wait_for(lambda: [ln for ln in d.log().splitlines() if "audit:" in ln],
                         what="audit line")
        assert re.search(r"audit: src=%s via=multicast op=status domain='sim-1' "
                         r"result=success ms=\d+" % re.escape(lab.guest_ips[0]), audit[-1]), audit
    finally:
        d.stop()


def _refusal(ns, tmp_path, conf_text, python=sys.executable, prefix=()):
    conf = tmp_path / "refuse.conf"
    conf.write_text(conf_text)
    conf.chmod(0o600)
    argv = list(prefix) + daemon_argv(tmp_path, conf, tmp_path / "refuse.pid", python)
    return run(ns, argv, timeout=20)


@pytest.mark.parametrize("case", ["missing", "empty", "directory"])
def test_refuses_to_start_without_a_key(loopback_lab, tmp_path, case):
    key = tmp_path / "fence_xvm.key"
    if case == "empty":
        key.write_bytes(b"")
    elif case == "directory":
        key.mkdir()
    res = _refusal(loopback_lab.host, tmp_path, sim_conf(key, interface="lo"))
    assert res.rc == 1, res
    assert str(key) in res.stderr and "keygen" in res.stderr, res
    assert {"missing": "does not exist", "empty": "is empty",
            "directory": "is a directory"}[case] in res.stderr
    assert "ready:" not in res.stderr


def test_refuses_an_unreadable_key_as_non_root(loopback_lab):
    require("root")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv missing (util-linux)")
    # a world-traversable directory: pytest's tmp_path is 0700
    top = Path(tempfile.mkdtemp(prefix="i5-nobody-"))
    try:
        top.chmod(0o755)
        shutil.copy(str(FENCEVIRT), str(top / "fencevirt.py"))
        (top / "fence_virtd").symlink_to(top / "fencevirt.py")
        key = make_key(top / "root-only.key")              # 0600, owned by root
        conf = top / "nobody.conf"
        conf.write_text(sim_conf(key, interface="lo"))
        os.chown(str(conf), 65534, 65534)
        conf.chmod(0o600)
        run_dir = top / "run"
        run_dir.mkdir()
        os.chown(str(run_dir), 65534, 65534)
        res = run(loopback_lab.host, ["setpriv", "--reuid=65534", "--regid=65534",
                                      "--clear-groups", SYSTEM_PYTHON, top / "fence_virtd",
                                      "-F", "-f", conf, "-p", run_dir / "d.pid"], timeout=20)
        assert res.rc == 1, res
        assert "key file %s is not readable by uid 65534" % key in res.stderr, res
        assert "Refusing to start without the key" in res.stderr
    finally:
        shutil.rmtree(str(top), ignore_errors=True)


def test_no_key_only_with_hash_and_auth_none(loopback_lab, tmp_path):
    missing = tmp_path / "no-such.key"
    res = _refusal(loopback_lab.host, tmp_path, sim_conf(missing, "lo", hash_auth=("none",
                                                                                  "sha256")))
    assert res.rc == 1 and "does not exist" in res.stderr, res
    d = start_our_daemon(loopback_lab.host, sim_conf(missing, "lo", hash_auth=("none", "none")),
                         tmp_path)
    try:
        assert "NOT authenticated" in d.log() and "key none" in d.log()
    finally:
        d.stop()


def test_insecure_key_and_config_made_0600(loopback_lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    key.chmod(0o644)
    d = start_our_daemon(loopback_lab.host, sim_conf(key, "lo"), tmp_path)
    try:
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        assert "insecure permissions on %s: changing from 0644 to 0600" % key in d.log()
    finally:
        d.stop()


# ---------------------------------------------------------------------------
# lifecycle

def test_pidfile_conflict_names_the_other_pid(loopback_lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    d = start_our_daemon(loopback_lab.host, sim_conf(key, "lo"), tmp_path)
    try:
        res = run(loopback_lab.host, daemon_argv(tmp_path, d.conf_path, d.pid_path), timeout=20)
        assert res.rc == 1, res
        assert "another fence_virtd (pid %d) holds %s" % (d.pid, d.pid_path) in res.stderr, res
        assert Path(d.pid_path).read_text().strip() == str(d.pid)
        assert d.alive()
    finally:
        d.stop()
    assert not Path(d.pid_path).exists()


def test_config_error_at_start_names_the_line(loopback_lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    text = sim_conf(key, "lo", listener_extra='\t\tport = "70000";\n')
    res = _refusal(loopback_lab.host, tmp_path, text)
    line = text.splitlines().index('\t\tport = "70000";') + 1
    assert res.rc == 1 and "refuse.conf: line %d: port: 70000 is out of range" % line \
        in res.stderr, res


def _list_names(lab, key):
    res = our_client(lab.guests[0], ["-o", "list", "-k", key, "-t", "5"])
    assert res.rc == 0, res
    return sorted(line.split()[0] for line in res.stdout.splitlines() if line.strip())


def test_sighup_reload_good_broken_and_sigterm(lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    d = start_our_daemon(lab.host, sim_conf(key), tmp_path)
    conf = Path(d.conf_path)
    try:
        assert _list_names(lab, key) == ["sim-1", "sim-2"]
        # good reload: a new domain appears
        conf.write_text(sim_conf(key, domains=SIM_DOMAINS + (
            "sim-9 5a5a5a5a-0000-4000-8000-000000000009 on",)))
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded %s" % conf in d.log(), d.proc, d.log_path, what="reload")
        assert _list_names(lab, key) == ["sim-1", "sim-2", "sim-9"]
        # broken config: kept, and the log says which line
        conf.write_text(sim_conf(key).replace('backend = "sim";', 'backend = "sim"'))
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "reload of %s failed" % conf in d.log(), d.proc, d.log_path,
                 what="failed reload")
        line = [ln for ln in d.log().splitlines() if "reload of" in ln and "failed" in ln][-1]
        assert "keeping the running configuration" in line and "line 4" in line, line
        assert _list_names(lab, key) == ["sim-1", "sim-2", "sim-9"]
        # a key that vanished: fail closed on reload too, the running key stays
        conf.write_text(sim_conf(tmp_path / "gone.key"))
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: d.log().count("failed, keeping the running configuration") >= 2,
                 d.proc, d.log_path, what="second failed reload")
        assert "gone.key does not exist" in d.log()
        assert _list_names(lab, key) == ["sim-1", "sim-2", "sim-9"]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(5)
        elapsed = time.monotonic() - t0
        assert rc == 0 and elapsed < 1.0, (rc, elapsed)
        print("SIGTERM -> exit: %.3f s" % elapsed)
    finally:
        d.stop()


def test_wait_for_interface(loopback_lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    conf = tmp_path / "w.conf"
    conf.write_text(sim_conf(key, interface="i5w0"))
    log_path = tmp_path / "w.log"
    # without -w: a clear error at once
    res = run(loopback_lab.host, daemon_argv(tmp_path, conf, tmp_path / "w.pid"), timeout=20)
    assert res.rc == 1 and "interface 'i5w0' does not exist" in res.stderr, res
    with open(str(log_path), "wb") as out:
        proc = subprocess.Popen(ns_argv(loopback_lab.host, daemon_argv(
            tmp_path, conf, tmp_path / "w.pid", extra=["-w"])), stdout=out,
            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(lambda: "not ready" in log_path.read_text(), proc, log_path, 10, "not ready")
        run(None, ["ip", "-n", loopback_lab.host, "link", "add", "i5w0", "type", "bridge"],
            check=True)
        run(None, ["ip", "-n", loopback_lab.host, "link", "set", "i5w0", "up"], check=True)
        wait_for(lambda: "ready:" in log_path.read_text(), proc, log_path, 10, "ready")
    finally:
        stop_by_pid(proc)


# ---------------------------------------------------------------------------
# install / uninstall, and the unit's ExecStart under a NOTIFY_SOCKET

def test_install_unit_notify_and_uninstall(loopback_lab, tmp_path):
    key = make_key(tmp_path / "k.key")
    conf = tmp_path / "fence_virt.conf"
    conf.write_text(sim_conf(key, "lo"))
    conf.chmod(0o600)
    sbin, units = tmp_path / "sbin", tmp_path / "units"
    stonith = tmp_path / "stonith" / "plugins" / "external"
    manifest = tmp_path / "install.manifest"
    sbin.mkdir()
    (sbin / "fence_xvm").write_text("someone else's\n")
    base = [sys.executable, FENCEVIRT, "install", "--prefix", sbin, "--host", "--unit-dir",
            units, "--stonith", "--stonith-dir", stonith, "--manifest", manifest,
            "--config", conf, "--pidfile", tmp_path / "d.pid"]
    res = run(None, base, timeout=30)
    assert res.rc == 1 and "%s exist(s)" % (sbin / "fence_xvm") in res.stderr, res
    assert not (sbin / "fence_virtd").exists()                  # nothing half-done
    res = run(None, base + ["--force"], timeout=30)
    assert res.rc == 0, res
    for role in ("fence_virtd", "fence_xvm", "fence_virt"):
        assert os.readlink(str(sbin / role)) == os.path.realpath(str(FENCEVIRT))
    assert os.path.islink(str(stonith / "fencevirt"))
    unit = (units / "fence_virtd.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))
    assert exec_start[1] == str(sbin / "fence_virtd") and "-F" in exec_start

    # the unit's command, run as systemd would: NOTIFY_SOCKET, SIGHUP reload, SIGTERM
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(10)
    log_path = tmp_path / "unit.log"
    with open(str(log_path), "wb") as out:
        proc = subprocess.Popen(ns_argv(loopback_lab.host, exec_start), stdout=out,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, NOTIFY_SOCKET=notify_path))
    try:
        assert sock.recv(256) == b"READY=1", log_path.read_text()
        assert "ready:" in log_path.read_text()
        proc.send_signal(signal.SIGHUP)
        assert [sock.recv(256), sock.recv(256)] == [b"RELOADING=1", b"READY=1"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(5) == 0 and time.monotonic() - t0 < 1.0
    finally:
        stop_by_pid(proc)
        sock.close()

    res = run(None, [sys.executable, FENCEVIRT, "uninstall", "--manifest", manifest], timeout=30)
    assert res.rc == 0, res
    assert sorted(os.listdir(str(sbin))) == ["fence_xvm"]
    assert (sbin / "fence_xvm").read_text() == "someone else's\n"          # put back
    assert not units.exists() and not (tmp_path / "stonith").exists() and not manifest.exists()
    res = run(None, [sys.executable, FENCEVIRT, "uninstall", "--manifest", manifest], timeout=30)
    assert res.rc == 1 and "no install manifest" in res.stderr


# ---------------------------------------------------------------------------
# a real libvirtd: SIGKILL, restart, SIGSTOP while requests are in flight

TINY = ("i5-tiny", "15151515-0000-4000-8000-000000000005")


def _kill_libvirtd(d, sig=signal.SIGKILL):
    d.proc.send_signal(sig)
    d.proc.wait(15)


def _restart_libvirtd(d):
    with open(str(d.log_path), "ab") as out:
        d.proc = subprocess.Popen(ns_argv(d.ns, [LIBVIRTD, "--listen", "-f",
                                                 d.workdir / "libvirtd.conf"]),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: d.virsh("version", timeout=10).rc == 0, d.proc, d.log_path, 60,
             "libvirtd to answer again")


def _faults(lab, d, daemon, key, report):
    status = ["-o", "status", "-H", TINY[0], "-k", key, "-t", "15"]

    def note(what, res, pattern=None):
        line = ""
        if pattern:
            line = wait_for(lambda: [ln for ln in daemon.log().splitlines()
                                     if re.search(pattern, ln)], daemon.proc,
                            daemon.log_path, 10, pattern)[-1]
        report.append("%-40s rc=%s %.1fs | %s" % (what, res.rc, res.elapsed, line.strip()))

    res = xvm(lab, status)
    assert res.rc == 0, res
    note("baseline status", res)

    _kill_libvirtd(d)
    res = xvm(lab, status)
    assert res.rc == 1 and "Operation failed" in res.output, res
    assert res.elapsed < 10, res                         # within the daemon's budget (4 s)
    note("libvirtd SIGKILLed: status", res, r"status 'i5-tiny' from \S+ failed")

    client = subprocess.Popen(labmod.ns_argv(lab.guests[0], [labmod.C_XVM] + [str(a) for a in
                                                                              status]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    time.sleep(1.0)
    _restart_libvirtd(d)
    out, _ = client.communicate(timeout=30)
    res = labmod.Result(client.args, client.returncode, out.decode(), "", time.monotonic() - t0)
    assert res.rc == 0 and "Status: ON" in res.stdout, res
    note("restarted while the request waited", res, r"reconnect|answers again")

    for op, want in (("off", "shut off"), ("on", "running")):
        res = xvm(lab, ["-o", op, "-H", TINY[0], "-k", key, "-t", "15"])
        assert res.rc == 0 and d.domstate(TINY[0]) == want, res
        note("after restart: %s" % op, res, r"op=%s domain='i5-tiny' result=success" % op)

    d.proc.send_signal(signal.SIGSTOP)
    try:
        res = xvm(lab, status)
        assert res.rc == 1 and res.elapsed < 10, res
        note("libvirtd SIGSTOPped (hung): status", res, r"status 'i5-tiny' from \S+ failed")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    res = wait_for(lambda: (lambda r: r if r.rc == 0 else None)(xvm(lab, status)),
                   timeout=30, what="serving after SIGCONT")
    note("after SIGCONT: status", res)


@pytest.mark.libvirtd
@pytest.mark.parametrize("driver", ["python", "virsh"])
def test_libvirtd_killed_restarted_and_hung(libvirtd, tmp_path, driver):
    require("root", "netns", "libvirtd", "c")
    lab = libvirtd.lab
    if TINY[0] not in libvirtd.domains:
        libvirtd.define(*TINY)
    elif libvirtd.domstate(TINY[0]) != "running":
        libvirtd.virsh("start", TINY[0], check=True)
    key = make_key(tmp_path / "k.key")
    text = mcast_conf(key, libvirtd.URI).replace('backend = "libvirt";',
                                                 'backend = "libvirt";\n\tbackend_timeout = "4";')
    daemon = start_our_daemon(lab.host, text, tmp_path, python=SYSTEM_PYTHON,
                              env={"FENCEVIRT_LIBVIRT_DRIVER": driver})
    report = []
    try:
        _faults(lab, libvirtd, daemon, key, report)
        # -w: started while libvirtd is down, ready once it is back
        daemon.stop()
        _kill_libvirtd(libvirtd)
        res = run(lab.host, daemon_argv(tmp_path, daemon.conf_path, tmp_path / "x.pid",
                                        SYSTEM_PYTHON), env={"FENCEVIRT_LIBVIRT_DRIVER": driver},
                  timeout=30)
        assert res.rc == 1 and "fence_virtd -w" in res.stderr, res
        report.append("%-40s rc=%s | %s" % ("start without -w, libvirtd down", res.rc,
                                            res.stderr.strip().splitlines()[-1][:150]))
        log_path = tmp_path / "w.log"
        with open(str(log_path), "wb") as out:
            proc = subprocess.Popen(ns_argv(lab.host, daemon_argv(
                tmp_path, daemon.conf_path, tmp_path / "w.pid", SYSTEM_PYTHON, ["-w"])),
                stdout=out, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", FENCEVIRT_LIBVIRT_DRIVER=driver))
        try:
            wait_for(lambda: "not ready" in log_path.read_text(), proc, log_path, 15)
            _restart_libvirtd(libvirtd)
            wait_for(lambda: "ready:" in log_path.read_text(), proc, log_path, 15)
            res = xvm(lab, ["-o", "status", "-H", TINY[0], "-k", key, "-t", "15"])
            assert res.rc == 0, res
            report.append("%-40s rc=%s | ready after libvirtd came back" % (
                "start with -w, libvirtd down", res.rc))
        finally:
            stop_by_pid(proc)
    finally:
        daemon.stop()
        if libvirtd.proc.poll() is not None:
            _restart_libvirtd(libvirtd)
        sys.stderr.write("\n".join(["", "libvirt faults, %s driver:" % driver] + report) + "\n")


def test_install_launcher_runs_cached_bytecode_and_uninstalls(tmp_path):
    """--launcher: the role links point at a small script that imports the byte-compiled
    file; every role still works through it, and uninstall removes it again."""
    import importlib.util
    sbin, lib, manifest = tmp_path / "sbin", tmp_path / "lib", tmp_path / "m.json"
    res = run(None, [sys.executable, FENCEVIRT, "install", "--prefix", sbin, "--launcher", lib,
                     "--manifest", manifest, "--python", "/usr/bin/python3"], timeout=60)
    assert res.rc == 0, res
    launcher = lib / "fencevirt"
    assert os.readlink(str(sbin / "fence_xvm")) == str(launcher)
    assert os.stat(str(launcher)).st_mode & 0o777 == 0o755
    assert os.path.exists(importlib.util.cache_from_source(str(FENCEVIRT)))
    direct = run(None, [sys.executable, FENCEVIRT, "xvm", "-o", "metadata"], timeout=30)
    via = run(None, [sbin / "fence_xvm", "-o", "metadata"], timeout=30)
    assert via.rc == 0 and via.stdout == direct.stdout, via
    via = run(None, [sbin / "fence_virt", "-o", "metadata"], timeout=30)
    assert via.rc == 0 and 'name="fence_virt"' in via.stdout, via
    res = run(None, [sbin / "fence_xvm", "-o", "bogus"], timeout=30)
    assert res.rc == 1 and "Unrecognised action" in res.stderr, res
    res = run(None, [sys.executable, FENCEVIRT, "uninstall", "--manifest", manifest], timeout=30)
    assert res.rc == 0, res
    assert not sbin.exists() and not lib.exists()
