"""Issue #7: fencevirt as a cluster-glue external plugin (external/libvirt drop-in), and
fence_xvm --hypervisor-uri, against a real libvirtd with tiny qemu TCG domains.

The host namespace runs libvirtd on 198.18.0.1:16509 (auth_tcp none); a guest namespace
reaches it as qemu+tcp://198.18.0.1/system, as in the HowTo. The cluster-glue `stonith`
CLI runs ours (a symlink in /usr/lib/stonith/plugins/external, picked by argv[0]) and
cluster-glue's own external/libvirt side by side, each on its own domain, and every step
is checked against `virsh domstate`/`domid`. Pacemaker runs ours through fence_legacy.

Run with -s to see the side-by-side table (op, rc, state, seconds).
"""

import os
import stat
import subprocess
import sys
import time

import pytest

import lab
import pcmk

pytestmark = [pytest.mark.libvirtd, pytest.mark.slow]

PLUGIN_NAME = "fencevirt-t%d" % (os.getpid() % 100000)
PLUGIN_PATH = os.path.join("/usr/lib/stonith/plugins/external", PLUGIN_NAME)
DOMS = {   # plugin flavour -> (node, domain, uuid)
    "ours-python": ("i7node-p", "i7-ours-py", "17000000-0000-4000-8000-000000000001"),
    "ours-virsh": ("i7node-v", "i7-ours-virsh", "17000000-0000-4000-8000-000000000002"),
    "glue": ("i7node-g", "i7-glue", "17000000-0000-4000-8000-000000000003"),
}
DIRECT = ("i7-direct", "17000000-0000-4000-8000-000000000004")
PCMK = ("i7pnode", "I7-Pcmk", "17000000-0000-4000-8000-000000000005")
TABLE = []   # (flavour, step, rc, state, seconds)


@pytest.fixture(scope="module")
def env(libvirtd, tmp_path_factory):
    """libvirtd + domains + our plugin installed as a symlink; yields a namespace dict."""
    lab.require(commands=("stonith", "/usr/lib/stonith/plugins/external/libvirt"))
    mode = os.stat(str(lab.FENCEVIRT)).st_mode
    assert mode & stat.S_IXUSR and not mode & (stat.S_IWGRP | stat.S_IWOTH), (
        "%s must be executable and not group/other writable, or cluster-glue refuses to run "
        "it as a plugin (mode %o)" % (lab.FENCEVIRT, mode & 0o7777))
    for dom, uuid in [d[1:] for d in DOMS.values()] + [DIRECT, PCMK[1:]]:
        libvirtd.define(dom, uuid)
    # python3 first in PATH = /usr/bin/python3 (it has libvirt-python), for the python driver
    pybin = tmp_path_factory.mktemp("pybin")
    os.symlink("/usr/bin/python3", str(pybin / "python3"))
    if os.path.lexists(PLUGIN_PATH):
        os.unlink(PLUGIN_PATH)
    os.symlink(str(lab.FENCEVIRT), PLUGIN_PATH)
    try:
        yield {"lv": libvirtd, "ns": libvirtd.lab.guests[0], "uri": libvirtd.tcp_uri,
               "pybin": str(pybin), "tmp": pybin}
    finally:
        if os.path.islink(PLUGIN_PATH):
            os.unlink(PLUGIN_PATH)
        if TABLE:
            sys.stdout.write("\n%-12s %-24s %4s %-12s %7s\n" % ("plugin", "step", "rc",
                                                                "state/resets", "seconds"))
            for row in TABLE:
                sys.stdout.write("%-12s %-24s %4s %-12s %7.2f\n" % row)


def _flavour_env(env, flavour):
    """(plugin type, extra environment) for one flavour."""
    if flavour == "glue":
        return "external/libvirt", {}
    if flavour == "ours-python":
        return "external/" + PLUGIN_NAME, {
            "FENCEVIRT_LIBVIRT_DRIVER": "python",
            "PATH": env["pybin"] + ":" + os.environ.get("PATH", "/usr/bin:/bin")}
    return "external/" + PLUGIN_NAME, {"FENCEVIRT_LIBVIRT_DRIVER": "virsh"}


def stonith(env, flavour, params, *args):
    """cluster-glue `stonith -t TYPE k=v ... ARGS` in the guest namespace."""
    typ, extra = _flavour_env(env, flavour)
    argv = ["stonith", "-t", typ] + ["%s=%s" % kv for kv in params.items()] + list(args)
    return lab.run(env["ns"], argv, env=extra, timeout=90)


# Counts libvirt REBOOT events (a guest reset) of one domain; prints "ready" once registered.
EVENT_WATCHER = """
import sys, libvirt
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open(sys.argv[1])
conn.domainEventRegisterAny(conn.lookupByName(sys.argv[2]), libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                            lambda *a: print("reboot", flush=True), None)
print("ready", flush=True)
while True:
    libvirt.virEventRunDefaultImpl()
"""


class RebootEvents(object):
    """with RebootEvents(dom, log) as ev: ...; ev.count() -> guest resets seen so far."""

    def __init__(self, dom, log_path):
        self.dom = dom
        self.log_path = str(log_path)

    def __enter__(self):
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(["/usr/bin/python3", "-c", EVENT_WATCHER,
                                          "qemu:///system", self.dom], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        lab.wait_for(lambda: b"ready" in open(self.log_path, "rb").read(), self.proc,
                     self.log_path, 10, "libvirt event watcher")
        return self

    def count(self):
        return open(self.log_path).read().split().count("reboot")

    def __exit__(self, *exc):
        lab.stop_by_pid(self.proc, timeout=5)


# step, stonith args, expected rc == 0, expected state after, domid: "new" | "same" | None
STEPS = (
    ("status -S", ["-S"], True, None, None),
    ("list -l", ["-l"], True, None, None),
    ("off", ["-T", "off", "{node}"], True, "shut off", None),
    ("off (already off)", ["-T", "off", "{node}"], True, "shut off", None),
    ("reset (from off)", ["-T", "reset", "{node}"], True, "running", None),
    ("on (already on)", ["-T", "on", "{node}"], True, "running", "same"),
    ("off", ["-T", "off", "{node}"], True, "shut off", None),
    ("on (from off)", ["-T", "on", "{node}"], True, "running", None),
    ("reset power_cycle", ["-T", "reset", "{NODE}"], True, "running", "new"),
    ("reset reboot", ["-T", "reset", "{node}"], True, "running", "same"),
)


@pytest.mark.parametrize("flavour", ["ours-python", "ours-virsh", "glue"])
def test_side_by_side(env, flavour):
    node, dom, _uuid = DOMS[flavour]
    params = {"hostlist": "%s:%s" % (node, dom), "hypervisor_uri": env["uri"]}
    for name, args, ok, want_state, want_id in STEPS:
        p = dict(params, reset_method="reboot") if name == "reset reboot" else params
        before = env["lv"].domid(dom)
        with RebootEvents(dom, env["tmp"] / ("events-%s.log" % flavour)) as ev:
            r = stonith(env, flavour, p, *[a.format(node=node, NODE=node.upper()) for a in args])
            if name == "reset reboot":      # the guest reset is reported asynchronously
                deadline = time.monotonic() + 3
                while ev.count() == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            resets = ev.count()
        state = env["lv"].domstate(dom)
        TABLE.append((flavour, name, r.rc, "%s/%d" % (state, resets), r.elapsed))
        assert (r.rc == 0) == ok, "%s %s: %r" % (flavour, name, r)
        if want_state:
            assert state == want_state, "%s %s: domain %s is %r\n%r" % (
                flavour, name, dom, state, r)
        if want_id == "new":
            assert env["lv"].domid(dom) != before, "%s %s: same qemu process" % (flavour, name)
        if want_id == "same":
            assert env["lv"].domid(dom) == before
        if name == "list -l":
            assert r.stdout.split() == [node]
        if name == "reset reboot":
            # ours: virDomainReset, the guest really resets. cluster-glue: `virsh reboot`
            # asks the guest by ACPI; this guest (SeaBIOS, no OS) ignores it, and the
            # plugin still reports success: a false success on a hung guest.
            # (one reset gives 1-3 REBOOT events)
            assert (resets == 0) if flavour == "glue" else (resets >= 1), (flavour, resets, r)


# fault, params, args; ours must fail with the message, cluster-glue's result is recorded
FAULTS = (
    ("unknown domain: off", {"hostlist": "i7ghost:i7-no-such-domain"}, ["-T", "off", "i7ghost"],
     "no domain 'i7-no-such-domain'"),
    ("unknown domain: reset", {"hostlist": "i7ghost:i7-no-such-domain"},
     ["-T", "reset", "i7ghost"], "nothing was done"),
    ("libvirtd unreachable: -S", {"hypervisor_uri": "qemu+tcp://198.18.0.1:16599/system"},
     ["-S"], "Connection refused"),
    ("libvirtd unreachable: off", {"hypervisor_uri": "qemu+tcp://198.18.0.1:16599/system"},
     ["-T", "off", "{node}"], "Connection refused"),
    ("URI typo: -S", {"hypervisor_uri": "qemu+tpc://198.18.0.1/system"}, ["-S"],
     "transport in URL not recognised"),
    ("URI typo: off", {"hypervisor_uri": "qemu+tcp//198.18.0.1/system"},
     ["-T", "off", "{node}"], "is not a libvirt URI"),
    ("node not in hostlist", {}, ["-T", "off", "i7-stranger"], "not in hostlist"),
    ("bad reset_method", {"reset_method": "cycle"}, ["-T", "reset", "{node}"],
     "unrecognized reset_method"),
)


@pytest.mark.parametrize("flavour", ["ours-python", "ours-virsh", "glue"])
def test_faults(env, flavour):
    node, dom, _uuid = DOMS[flavour]
    base = {"hostlist": "%s:%s" % (node, dom), "hypervisor_uri": env["uri"]}
    before = env["lv"].domstate(dom)
    for name, params, args, message in FAULTS:
        r = stonith(env, flavour, dict(base, **params), *[a.format(node=node) for a in args])
        TABLE.append((flavour, name, r.rc, "-", r.elapsed))
        if flavour != "glue":
            assert r.rc != 0, "%s: %s succeeded: %r" % (flavour, name, r)
            assert message in r.stderr, "%s: %s: %r" % (flavour, name, r)
    assert env["lv"].domstate(dom) == before, "a failed call changed the domain's state"


def direct(env, *args, python=None):
    return lab.our_client(env["ns"], ["--hypervisor-uri", env["uri"]] + list(args),
                          python=python or sys.executable, timeout=60)


@pytest.mark.parametrize("python", ["/usr/bin/python3", sys.executable],
                         ids=["python-driver", "default-python"])
def test_fence_xvm_direct_uri(env, python):
    dom = DIRECT[0]
    steps = ((["-o", "status", "-n", dom], 0, "running"),
             (["-o", "off", "-n", dom], 0, "shut off"),
             (["-o", "status", "-n", dom], 2, "shut off"),
             (["-o", "on", "-n", dom], 0, "running"),
             (["-o", "reboot", "-n", dom], 0, "running"),
             (["-o", "monitor"], 0, "running"))
    for args, rc, state in steps:
        before = env["lv"].domid(dom)
        r = direct(env, *args, python=python)
        TABLE.append(("fence_xvm", " ".join(args[:2]), r.rc, env["lv"].domstate(dom),
                      r.elapsed))
        assert r.rc == rc, r
        assert env["lv"].domstate(dom) == state, r
        if args[1] == "reboot":
            assert env["lv"].domid(dom) != before, "reboot did not power-cycle %s" % dom
    r = direct(env, "-o", "list", python=python)
    assert any(line.split()[:2] == [dom, DIRECT[1]] for line in r.stdout.splitlines()), r
    r = direct(env, "-o", "off", "-n", "i7-no-such-domain", python=python)
    assert r.rc == 1 and "no domain 'i7-no-such-domain'" in r.stderr, r
    r = lab.our_client(env["ns"], ["--hypervisor-uri", "qemu+tcp://198.18.0.1:16599/system",
                                   "-o", "off", "-n", dom, "-t", "3"], python=python)
    assert r.rc == 1 and "Connection refused" in r.stderr, r
    r = lab.our_client(env["ns"], ["--hypervisor-uri", "qemu+tcp:/198.18.0.1/system",
                                   "-o", "off", "-n", dom], python=python)
    assert r.rc == 1 and "is not a libvirt URI" in r.stderr, r
    assert env["lv"].domstate(dom) == "running"


@pytest.mark.pacemaker
def test_pacemaker_fence_legacy(env, tmp_path):
    """The HowTo's primitive through fence_legacy: --reboot power-cycles a real domain,
    --fence leaves it off."""
    lab.require("root", commands=pcmk.COMMANDS + ("/usr/sbin/fence_legacy",))
    node, dom, _uuid = PCMK
    with pcmk.Cluster(env["ns"], tmp_path / "cluster") as cl:
        cl.crm("configure", "primitive", "st-i7", "stonith:external/" + PLUGIN_NAME,
               "params", 'hostlist=%s:%s' % (node, dom), 'hypervisor_uri=%s' % env["uri"],
               "op", "monitor", "interval=60")
        cl.crm("configure", "location", "l-st-i7", "st-i7", "-inf:", node)
        cl.crm("configure", "property", "stonith-enabled=true")
        cl.wait_started("st-i7", timeout=60)
        before = env["lv"].domid(dom)
        r = cl.stonith_admin("--reboot", node, timeout=60)
        TABLE.append(("pacemaker", "stonith_admin --reboot", r.rc, env["lv"].domstate(dom),
                      r.elapsed))
        assert r.rc == 0, "%s\n%s" % (r, lab.tail(cl.pacemaker_log, 8000))
        assert env["lv"].domstate(dom) == "running"
        assert env["lv"].domid(dom) not in (None, before), "the domain was not power-cycled"
        r = cl.stonith_admin("--fence", node, timeout=60)
        TABLE.append(("pacemaker", "stonith_admin --fence", r.rc, env["lv"].domstate(dom),
                      r.elapsed))
        assert r.rc == 0, "%s\n%s" % (r, lab.tail(cl.pacemaker_log, 8000))
        assert env["lv"].domstate(dom) == "shut off"
        r = cl.stonith_admin("--reboot", "i7-not-listed", timeout=20)
        assert r.rc != 0, r


@pytest.mark.parametrize("flavour", ["ours-python", "glue"])
def test_mixed_case_hostlist_node(env, flavour):
    """stonith(8) lowercases the node it passes: cluster-glue's script then misses a
    hostlist entry written `Node:domain` ("Should never happen"); ours matches it."""
    _node, dom, _uuid = DOMS[flavour]
    params = {"hostlist": "I7Mixed-Node:%s" % dom, "hypervisor_uri": env["uri"]}
    r = stonith(env, flavour, params, "-T", "on", "I7Mixed-Node")
    TABLE.append((flavour, "on, hostlist Node:dom", r.rc, env["lv"].domstate(dom), r.elapsed))
    if flavour == "glue":
        assert r.rc != 0, r          # its "Should never happen" goes to syslog only
    else:
        assert r.rc == 0, r
    assert env["lv"].domstate(dom) == "running"
