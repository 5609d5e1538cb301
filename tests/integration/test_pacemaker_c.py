"""Reference run with Debian's C fence-virt under Pacemaker and cluster-glue.

Proves the harness in tests/pcmk.py (with tests/lab.py) against the real C binaries,
so that the same steps can later be pointed at fencevirt.py:

* host netns ``fv<pid>-<n>h``: bridge br0 198.18.0.1/24, libvirtd (qemu TCG domains
  tiny1/tiny2, TCP 16509 on 198.18.0.1, auth none) and C ``fence_virtd``
  (multicast on br0, backend libvirt on qemu:///system);
* guest netns ``fv<pid>-<n>g1``: eth0 198.18.0.11/24, route 224.0.0.0/4 dev eth0,
  a single-node corosync + Pacemaker cluster (node1) with
  ``crm configure primitive st-xvm stonith:fence_xvm ... pcmk_host_map="n1:tiny1;n2:tiny2"``;
  cluster-glue's ``stonith -t external/libvirt`` runs there too.

Timings are collected in ``pcmk.TIMINGS`` and printed (``-s``) and written to
``timings.json`` in the test's tmp dir at the end of the module.
"""

import json
import os
import time
import xml.etree.ElementTree as ET

import pytest

import lab
import pcmk

pytestmark = [pytest.mark.pacemaker, pytest.mark.libvirtd]

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_XVM = os.path.join(HERE, "..", "data", "metadata", "fence_xvm.c.xml")

DOMAINS = {                              # cluster target -> (domain, uuid)
    "n1": ("tiny1", "f0f0f0f0-0000-4000-8000-000000000001"),
    "n2": ("tiny2", "f0f0f0f0-0000-4000-8000-000000000002"),
}
HOST_MAP = ";".join("%s:%s" % (t, d) for t, (d, _) in sorted(DOMAINS.items()))
GLUE_HOSTLIST = " ".join("%s:%s" % (t, d) for t, (d, _) in sorted(DOMAINS.items()))



@pytest.fixture(scope="module")
def net(module_lab):
    lab.require("root", "netns", "libvirtd", "c", commands=pcmk.COMMANDS + ("stonith",))
    if not os.path.exists(os.path.join(pcmk.GLUE_PLUGIN_DIR, "libvirt")):
        lab.skip_or_fail("cluster-glue external/libvirt plugin missing")
    return module_lab


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pcmk_c")


@pytest.fixture(scope="module")
def keyfile(workdir):
    return str(lab.make_key(workdir / "fence_xvm.key"))


@pytest.fixture(scope="module")
def libvirtd(net, libvirtd):
    # conftest's libvirtd in net's host netns; lock order: libvirtd before pacemaker
    for _, (dom, uuid) in sorted(DOMAINS.items()):
        t0 = time.monotonic()
        libvirtd.define(dom, uuid)
        pcmk.record("define+start " + dom, time.monotonic() - t0)
    return libvirtd


@pytest.fixture(scope="module")
def virtd(net, workdir, keyfile, libvirtd):
    conf = lab.mcast_conf(keyfile, libvirtd.URI, interface=net.interface)
    with lab.start_c_daemon(net.host, conf, workdir / "fence_virtd") as d:
        yield d


@pytest.fixture(scope="module")
def cluster(net, workdir, keyfile, virtd):
    with pcmk.Cluster(net.guests[0], workdir / "cluster") as cl:
        # exactly as a HowTo does it
        cl.crm("configure", "property", "stonith-enabled=true")
        cl.crm("configure", "primitive", "st-xvm", "stonith:fence_xvm", "params",
               "key_file=" + keyfile, "pcmk_host_map=" + HOST_MAP,
               "op", "monitor", "interval=60s")
        cl.wait_started("st-xvm", timeout=60)
        yield cl


@pytest.fixture(scope="module", autouse=True)
def report_timings(workdir):
    yield
    if pcmk.TIMINGS:
        lines = ["%-60s %8.3f s" % (label, secs) for label, secs in pcmk.TIMINGS]
        print("\n== timings (test_pacemaker_c) ==\n" + "\n".join(lines))
        with open(str(workdir / "timings.json"), "w") as f:
            json.dump(pcmk.TIMINGS, f, indent=1)


def _state(lv, target):
    return lv.domstate(DOMAINS[target][0])


# ---------------------------------------------------------------------------
# golden metadata of the C agents (tests/data/metadata)

@pytest.mark.parametrize("agent", ["fence_xvm", "fence_virt"])
def test_golden_c_metadata(agent):
    """The golden files validate against fence-agents' metadata.rng and still equal
    what the installed C agent prints (run in a throwaway netns: never the root one)."""
    data = os.path.join(HERE, "..", "data", "metadata")
    golden = os.path.join(data, agent + ".c.xml")
    lab.require(commands=("xmllint",))
    r = lab.run(None, ["xmllint", "--noout", "--relaxng", os.path.join(data, "metadata.rng"),
                       golden])
    assert r.rc == 0, str(r)
    lab.require("root", commands=("unshare", "/usr/sbin/" + agent))
    r = lab.run(None, ["unshare", "-n", "/usr/sbin/" + agent, "-o", "metadata"], check=True)
    with open(golden) as f:
        assert r.stdout == f.read()


# ---------------------------------------------------------------------------
# Pacemaker CLI without the cluster (agent runs inside the guest netns)

def test_metadata_via_stonith_admin(net):
    r = lab.run(net.guests[0], ["stonith_admin", "--metadata", "--agent", "fence_xvm"])
    pcmk.record("stonith_admin --metadata", r.elapsed)
    assert r.rc == 0, str(r)
    got = ET.fromstring(r.stdout)
    gold = ET.parse(GOLDEN_XVM).getroot()
    assert got.get("name") == "fence_xvm"
    assert [p.get("name") for p in got.iter("parameter")] == \
        [p.get("name") for p in gold.iter("parameter")]
    # Pacemaker rewrites the agent's metadata: plug/port become optional (the fencer
    # supplies port=) and start/stop actions are appended.
    req = {p.get("name"): p.get("required") for p in got.iter("parameter")}
    assert req["plug"] == "0" and req["port"] == "0"
    actions = [a.get("name") for a in got.iter("action")]
    assert actions[:10] == [a.get("name") for a in gold.iter("action")]
    assert set(actions[10:]) == {"start", "stop"}


def test_validate_good(net, keyfile):
    r = lab.run(net.guests[0], ["stonith_admin", "--validate", "--agent", "fence_xvm",
                                "-o", "key_file=" + keyfile])
    pcmk.record("stonith_admin --validate (good)", r.elapsed)
    assert r.rc == 0, str(r)
    assert "Validation of fence_xvm succeeded" in r.output


@pytest.mark.parametrize("option,message", [
    ("ip_family=bogus", "Unsupported family: 'bogus'"),
    ("key_file=/nonexistent/fence_xvm.key", "Invalid key file"),
])
def test_validate_bad(net, keyfile, option, message):
    argv = ["stonith_admin", "--validate", "--agent", "fence_xvm", "-o", option]
    if not option.startswith("key_file="):
        argv += ["-o", "key_file=" + keyfile]
    r = lab.run(net.guests[0], argv)
    pcmk.record("stonith_admin --validate (bad %s)" % option.split("=")[0], r.elapsed)
    assert r.rc != 0, str(r)
    assert message in r.output, str(r)
    assert "Validation of fence_xvm failed" in r.output, str(r)


@pytest.mark.parametrize("mode,expect_name", [("symlink", None), ("wrapper", "fence_xvm")])
def test_install_agent_modes(net, workdir, mode, expect_name):
    """Installer self-test: Pacemaker finds /usr/sbin/<name>; a symlink keeps argv[0]."""
    name = "fence_%sxvm%s" % (lab.NS_PREFIX, mode[0])
    spy = str(workdir / ("spy-%s.log" % mode)) if mode == "wrapper" else None
    with pcmk.install_agent("/usr/sbin/fence_xvm", name, mode=mode, spy_log=spy) as a:
        assert os.path.islink(a.path) == (mode == "symlink")
        assert not os.stat(a.path).st_mode & 0o022
        r = lab.run(net.guests[0], ["stonith_admin", "--list-installed"])
        assert name in r.stdout.split(), str(r)
        r = lab.run(net.guests[0], ["stonith_admin", "--metadata", "--agent", name])
        assert r.rc == 0, str(r)
        assert ET.fromstring(r.stdout).get("name") == (expect_name or name)
    assert not os.path.lexists(a.path)
    if spy:
        log = open(spy).read()
        assert "argv: /usr/sbin/%s" % name in log and "action=metadata" in log, log


# ---------------------------------------------------------------------------
# the C fence_virtd + libvirtd reference path, sanity-checked without Pacemaker

def test_c_fence_xvm_list_direct(net, keyfile, virtd):
    r = lab.run(net.guests[0], ["fence_xvm", "-o", "list", "-k", keyfile, "-t", "5"])
    pcmk.record("fence_xvm -o list (direct)", r.elapsed)
    assert r.rc == 0, str(r) + "\n" + lab.tail(virtd.log_path)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert {"tiny1", "tiny2"} <= set(names), str(r)


# ---------------------------------------------------------------------------
# under the cluster

def test_cluster_started_fast(cluster):
    # seeded CIB with dc-deadtime=2s: ~5.5 s (22 s with an empty CIB)
    assert cluster.timings["online"] < 20, cluster.timings


def test_list_targets(cluster):
    r = cluster.stonith_admin("--list-targets", "st-xvm", timeout=30)
    assert r.rc == 0, str(r)
    words = r.stdout.split()
    assert "tiny1" in words and "tiny2" in words, str(r)
    print("\n" + r.stdout)


def test_list_devices_for_target(cluster):
    r = cluster.stonith_admin("--list", "n1", timeout=30)
    assert r.rc == 0, str(r)
    assert "st-xvm" in r.stdout, str(r)


def test_reboot(cluster, libvirtd):
    dom = DOMAINS["n1"][0]
    assert _state(libvirtd, "n1") == "running"
    before = libvirtd.domid(dom)
    r = cluster.stonith_admin("--reboot", "n1", timeout=60)
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n1") == "running"
    assert libvirtd.domid(dom) != before, "domain id unchanged: tiny1 was not restarted"


def test_fence_off(cluster, libvirtd):
    assert _state(libvirtd, "n2") == "running"
    r = cluster.stonith_admin("--fence", "n2", timeout=60)
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n2") == "shut off"


def test_unfence_on(cluster, libvirtd):
    if _state(libvirtd, "n2") != "shut off":
        libvirtd.virsh("destroy", DOMAINS["n2"][0], check=True)
    r = cluster.stonith_admin("--unfence", "n2", timeout=60)
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n2") == "running"


def test_unknown_target_is_refused(cluster):
    r = cluster.stonith_admin("--reboot", "n9", timeout=20)
    assert r.rc != 0, str(r)


def test_refuses_to_fence_own_node(cluster):
    with pytest.raises(pcmk.HarnessError):
        cluster.stonith_admin("--reboot", cluster.node_name)
    with pytest.raises(pcmk.HarnessError):
        cluster.stonith_admin("--fence=" + cluster.node_name)


def test_history(cluster):
    # without --verbose only the latest success is shown ("1 event found")
    r = cluster.stonith_admin("--history", "*", "--verbose")
    assert r.rc == 0, str(r)
    for line in ("reboot of n1 successful", "turning off of n2 successful",
                 "unfencing of n2 successful", "reboot of n9 failed"):
        assert line in r.stdout, str(r)
    assert cluster.running


# ---------------------------------------------------------------------------
# cluster-glue: stonith -t external/libvirt over qemu+tcp from the guest netns

def _glue(net, libvirtd, *args):
    params = {"hostlist": GLUE_HOSTLIST, "hypervisor_uri": libvirtd.tcp_uri}
    return pcmk.stonith_cli(net.guests[0], "libvirt", params, *args, timeout=60)


def test_glue_status(net, libvirtd):
    r = _glue(net, libvirtd, "-S")
    assert r.rc == 0, str(r)


def test_glue_list(net, libvirtd):
    r = _glue(net, libvirtd, "-l")
    assert r.rc == 0, str(r)
    assert r.stdout.split() == ["n1", "n2"], str(r)


def test_glue_off_on_reset(net, libvirtd):
    if _state(libvirtd, "n2") != "running":
        libvirtd.virsh("start", DOMAINS["n2"][0], check=True)
    r = _glue(net, libvirtd, "-T", "off", "n2")
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n2") == "shut off"
    r = _glue(net, libvirtd, "-T", "on", "n2")
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n2") == "running"
    before = libvirtd.domid(DOMAINS["n1"][0])
    r = _glue(net, libvirtd, "-T", "reset", "n1")
    assert r.rc == 0, str(r)
    assert _state(libvirtd, "n1") == "running"
    assert libvirtd.domid(DOMAINS["n1"][0]) != before


def test_glue_plugin_install(net, libvirtd, workdir):
    """Installer self-test: a spy plugin that execs external/libvirt."""
    name = "%sspy" % lab.NS_PREFIX
    log = str(workdir / "glue-spy.log")
    text = ("#!/bin/sh\n"
            "{ echo \"argv: $*\"; env | grep -E '^(hostlist|hypervisor_uri)='; } >> %s\n"
            "exec %s/libvirt \"$@\"\n" % (log, pcmk.GLUE_PLUGIN_DIR))
    with pcmk.install_glue_plugin(name, text=text) as p:
        assert oct(os.stat(p.path).st_mode & 0o777) == oct(0o755)
        params = {"hostlist": GLUE_HOSTLIST, "hypervisor_uri": libvirtd.tcp_uri}
        r = pcmk.stonith_cli(net.guests[0], name, params, "-S")
        assert r.rc == 0, str(r)
        r = pcmk.stonith_cli(net.guests[0], name, params, "-T", "off", "N2")
        assert r.rc == 0, str(r)
        assert _state(libvirtd, "n2") == "shut off"
    assert not os.path.exists(p.path)
    spy = open(log).read()
    assert "argv: status" in spy and "argv: off n2" in spy, spy   # stonith lowercases
    assert "hypervisor_uri=" + libvirtd.tcp_uri in spy, spy
    libvirtd.virsh("start", DOMAINS["n2"][0], check=True)
