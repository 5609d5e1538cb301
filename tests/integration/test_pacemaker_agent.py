"""Our fence_xvm as a first-class Pacemaker fence agent (issue #4), with real components.

Topology (tests/lab.py, Pacemaker from tests/pcmk.py), everything stopped by PID and
the namespaces deleted:

* host netns ``fv<pid>-<n>h``: br0 198.18.0.1/24, libvirtd with two qemu TCG domains,
  the C ``fence_virtd`` (multicast 225.0.0.12:1229 on br0) and OUR daemon
  (``/usr/bin/python3 .../fence_virtd``, libvirt-python driver, port 1230 on br0),
  both on ``qemu:///system``;
* guest netns ``fv<pid>-<n>g1``: a single-node corosync + Pacemaker cluster, configured with
  crmsh as a HowTo does, with three stonith devices, one per direction:

  ==========  ==========================  ===============  =========================
  device      agent                       daemon           targets (pcmk_host_map)
  ==========  ==========================  ===============  =========================
  st-py       ours (/usr/sbin/fence_i4…)  ours (1230)      a1:<dom1> a2:<dom2>
  st-pyc      ours                        C (1229)         b1:<dom1> b2:<dom2>
  st-c        Debian's C fence_xvm        ours (1230)      c1:<dom1> c2:<dom2>
  ==========  ==========================  ===============  =========================

Each device gets the same steps: ``--list-targets``, ``--reboot``, ``--fence`` (off)
and ``--unfence`` (on), checked with ``virsh domstate`` / ``domid``. Before the cluster
starts, ``stonith_admin --metadata``, ``--validate`` and ``--list-installed`` run
against our agent. The cluster's own node (node1) is never a target.
"""

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

import fencevirt
import lab
import pcmk

ROOT = str(lab.REPO)

pytestmark = [pytest.mark.pacemaker, pytest.mark.libvirtd, pytest.mark.slow]

FENCEVIRT = str(lab.FENCEVIRT)
PYTHON = "/usr/bin/python3"                 # has python3-libvirt (the daemon's driver)
RUN = "%d" % (os.getpid() % 10000)
AGENT = "fence_i4pyxvm" + RUN               # per-run name: never clashes with Debian's
DOMS = ("i4tiny1", "i4tiny2")
UUIDS = ("f0f0f0f0-0000-4000-8000-0000000000a1", "f0f0f0f0-0000-4000-8000-0000000000a2")
OUR_PORT = 1230                             # the C daemon has 1229
DEVICES = {                                 # id -> (agent, ipport, target prefix)
    "st-py": (AGENT, OUR_PORT, "a"),
    "st-pyc": (AGENT, 1229, "b"),
    "st-c": ("fence_xvm", OUR_PORT, "c"),
}


def _require():
    lab.require("root", "netns", "libvirtd", "c", commands=pcmk.COMMANDS + (PYTHON,))
    if subprocess.run([PYTHON, "-c", "import libvirt"]).returncode != 0:
        lab.skip_or_fail(PYTHON + " has no libvirt module (python3-libvirt)")


@pytest.fixture(scope="module")
def net(module_lab):
    _require()
    return module_lab


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pcmk_agent")


@pytest.fixture(scope="module")
def keyfile(workdir):
    return str(lab.make_key(workdir / "fence_xvm.key"))


@pytest.fixture(scope="module")
def agent(workdir):
    """Our fence_xvm as /usr/sbin/<AGENT>, a wrapper that logs what Pacemaker sends."""
    _require()
    spy = str(workdir / "agent-spy.log")
    with pcmk.install_agent(FENCEVIRT, AGENT, mode="wrapper", role="xvm", python=PYTHON,
                            spy_log=spy) as a:
        yield a, spy


@pytest.fixture(scope="module")
def libvirtd(net, libvirtd):
    # conftest's libvirtd in net's host netns; lock order: libvirtd before pacemaker
    for dom, uuid in zip(DOMS, UUIDS):
        libvirtd.define(dom, uuid)
    return libvirtd


@pytest.fixture(scope="module")
def c_daemon(net, workdir, keyfile, libvirtd):
    conf = lab.mcast_conf(keyfile, libvirtd.URI, interface=net.interface)
    with lab.start_c_daemon(net.host, conf, workdir) as d:
        yield d


@pytest.fixture(scope="module")
def our_daemon(net, workdir, keyfile, libvirtd):
    conf = lab.mcast_conf(keyfile, libvirtd.URI, interface=net.interface, port=OUR_PORT)
    with lab.start_our_daemon(net.host, conf, workdir, python=PYTHON, ready_timeout=15,
                              env={"FENCEVIRT_LIBVIRT_DRIVER": "python"}) as d:
        yield d


def _host_map(prefix):
    return ";".join("%s%d:%s" % (prefix, i, dom) for i, dom in enumerate(DOMS, 1))


@pytest.fixture(scope="module")
def cluster(net, workdir, keyfile, agent, c_daemon, our_daemon):
    with pcmk.Cluster(net.guests[0], workdir / "cluster") as cl:
        cl.crm("configure", "property", "stonith-enabled=true")
        # one device at a time: two agents on the same ipport cannot both take the
        # TCP connect-back port, so their first monitors must not overlap
        for dev, (agent_name, port, prefix) in DEVICES.items():
            cl.crm("configure", "primitive", dev, "stonith:" + agent_name, "params",
                   "key_file=" + keyfile, "ipport=%d" % port,
                   "pcmk_host_map=" + _host_map(prefix), "op", "monitor", "interval=60s")
            cl.wait_started(dev, timeout=60)
        yield cl


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    yield
    if pcmk.TIMINGS:
        print("\n== timings (test_pacemaker_agent) ==\n" + "\n".join(
            "%-60s %8.3f s" % t for t in pcmk.TIMINGS))


# ---------------------------------------------------------------------------
# Pacemaker's CLI against our agent, no cluster (the agent runs in the guest netns)

def test_list_installed(net, agent):
    r = lab.run(net.guests[0], ["stonith_admin", "--list-installed"])
    assert r.rc == 0 and AGENT in r.stdout.split(), str(r)


def test_metadata_via_stonith_admin(net, agent):
    r = lab.run(net.guests[0], ["stonith_admin", "--metadata", "--agent", AGENT])
    pcmk.record("stonith_admin --metadata (ours)", r.elapsed)
    assert r.rc == 0, str(r)
    got = ET.fromstring(r.stdout)
    ours = ET.fromstring(fencevirt.agent_metadata("xvm"))
    gold = ET.parse(os.path.join(ROOT, "tests", "data", "metadata",
                                 "fence_xvm.c.xml")).getroot()
    names = [p.get("name") for p in got.iter("parameter")]
    # Pacemaker rewrites the XML: compare names, not bytes
    assert names == [p.get("name") for p in ours.iter("parameter")]
    assert names[:len(list(gold.iter("parameter")))] == \
        [p.get("name") for p in gold.iter("parameter")]
    actions = [a.get("name") for a in got.iter("action")]
    assert actions[:len(fencevirt.ACTIONS)] == list(fencevirt.ACTIONS)


def test_validate_good(net, agent, keyfile):
    r = lab.run(net.guests[0], ["stonith_admin", "--validate", "--agent", AGENT, "-o",
                                "key_file=" + keyfile, "-o", "ipport=1230", "-o", "delay=2"])
    pcmk.record("stonith_admin --validate (ours, good)", r.elapsed)
    assert r.rc == 0, str(r)
    assert "Validation of %s succeeded" % AGENT in r.output, str(r)


@pytest.mark.parametrize("option,message", [
    ("ip_family=bogus", "Unsupported family: 'bogus'"),
    ("key_file=/nonexistent/fence_xvm.key", "key_file: key file /nonexistent/fence_xvm.key"),
    ("timeout=0", "timeout: 0 must be more than 0"),
    ("ipport=70000", "ipport: 70000 is out of range"),
    ("multicast_address=10.0.0.1", "is not a multicast address"),
    ("hash=md5", "hash: unknown hash type 'md5'"),
])
def test_validate_bad(net, agent, keyfile, option, message):
    argv = ["stonith_admin", "--validate", "--agent", AGENT, "-o", option]
    if not option.startswith("key_file="):
        argv += ["-o", "key_file=" + keyfile]
    r = lab.run(net.guests[0], argv)
    assert r.rc != 0, str(r)
    assert message in r.output, str(r)
    assert "Validation of %s failed" % AGENT in r.output, str(r)


def test_validate_sent_stdin(agent):
    """What Pacemaker handed the agent for --validate: stdin only, port= placeholder."""
    spy = open(agent[1]).read()
    assert "action=validate-all" in spy and "port=" in spy, spy


# ---------------------------------------------------------------------------
# directly, without Pacemaker: both daemons answer our agent

@pytest.mark.parametrize("port", [OUR_PORT, 1229], ids=["our-daemon", "c-daemon"])
def test_direct_list(net, keyfile, c_daemon, our_daemon, port):
    r = lab.run(net.guests[0], [PYTHON, FENCEVIRT, "xvm", "-o", "list", "-k", keyfile,
                                "-p", str(port), "-t", "5"])
    assert r.rc == 0, str(r) + lab.tail(our_daemon.log_path)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert {(d, u, "on") for d, u in zip(DOMS, UUIDS)} <= {tuple(x) for x in rows}, str(r)


# ---------------------------------------------------------------------------
# under the cluster, for each direction

def _dev_target(dev, i):
    return "%s%d" % (DEVICES[dev][2], i)


@pytest.mark.parametrize("dev", list(DEVICES))
def test_list_targets(cluster, dev):
    r = cluster.stonith_admin("--list-targets", dev, timeout=30)
    assert r.rc == 0, str(r)
    words = r.stdout.split()
    for dom, uuid in zip(DOMS, UUIDS):
        assert dom in words and uuid in words, str(r)


@pytest.mark.parametrize("dev", list(DEVICES))
def test_reboot(cluster, libvirtd, dev):
    dom = DOMS[0]
    if libvirtd.domstate(dom) != "running":
        libvirtd.virsh("start", dom, check=True)
    before = libvirtd.domid(dom)
    r = cluster.stonith_admin("--reboot", _dev_target(dev, 1), timeout=60)
    assert r.rc == 0, str(r)
    assert libvirtd.domstate(dom) == "running"
    assert libvirtd.domid(dom) != before, "%s was not restarted" % dom


@pytest.mark.parametrize("dev", list(DEVICES))
def test_fence_off_then_unfence_on(cluster, libvirtd, dev):
    dom = DOMS[1]
    if libvirtd.domstate(dom) != "running":
        libvirtd.virsh("start", dom, check=True)
    r = cluster.stonith_admin("--fence", _dev_target(dev, 2), timeout=60)
    assert r.rc == 0, str(r)
    assert libvirtd.domstate(dom) == "shut off"
    r = cluster.stonith_admin("--unfence", _dev_target(dev, 2), timeout=60)
    assert r.rc == 0, str(r)
    assert libvirtd.domstate(dom) == "running"


def test_pacemaker_sent_port(cluster, agent):
    """The fencer ran our agent with stdin only and port=<mapped domain>."""
    spy = open(agent[1]).read()
    for line in ("action=reboot", "action=off", "action=on", "port=" + DOMS[0],
                 "port=" + DOMS[1], "nodename=a1"):
        assert line in spy, line


def test_history_and_cluster_alive(cluster):
    r = cluster.stonith_admin("--history", "*", "--verbose")
    assert r.rc == 0, str(r)
    for dev in DEVICES:
        for what in ("reboot of %s successful" % _dev_target(dev, 1),
                     "turning off of %s successful" % _dev_target(dev, 2),
                     "unfencing of %s successful" % _dev_target(dev, 2)):
            assert what in r.stdout, str(r)
    assert cluster.running
    for dev in DEVICES:
        assert not cluster.failed_actions(dev), cluster.crm_mon()
