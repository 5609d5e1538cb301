"""Issue 8: fencing across several hypervisors.

Two hypervisor namespaces (h1, h2) and a guest (g1) on one bridge:
* owner-only answers on a shared multicast group without a host cluster;
* the cpg backend on two real corosync instances (routing, migration, loss of a
  daemon and of corosync, the no_owner rule), with our client and the C fence_xvm;
* a mixed group: the C fence_virtd (cpg backend) on one host, ours on the other.
Figures (requests, failures, latencies) are printed with -s.
"""
import os
import statistics
import subprocess
import sys
import time

import pytest

import lab

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_lab as mh  # noqa: E402

pytestmark = [pytest.mark.slow]

A = [("a1", "aaaaaaaa-0000-4000-8000-000000000001", "on"),
     ("a2", "aaaaaaaa-0000-4000-8000-000000000002", "on"),
     ("a3", "aaaaaaaa-0000-4000-8000-000000000003", "off")]
B = [("b1", "bbbbbbbb-0000-4000-8000-000000000001", "on"),
     ("b2", "bbbbbbbb-0000-4000-8000-000000000002", "on"),
     ("b3", "bbbbbbbb-0000-4000-8000-000000000003", "off")]
FAST = ["-t", "2", "-r", "10"]        # two 1 s rounds: a silent group fails in 2 s


def report(title, **figures):
    sys.stderr.write("\n[issue-8 figures] %s: %s\n" % (
        title, ", ".join("%s=%s" % kv for kv in figures.items())))


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    lab.require("root", "netns", "c")
    with mh.Topology(tmp_path_factory.mktemp("i8")) as t:
        yield t


@pytest.fixture
def key(tmp_path):
    return lab.make_key(tmp_path / "fence_xvm.key")


def client(kind, ns, key, *args, timeout=30):
    argv = list(args) + ["-k", str(key)]
    if "-t" not in argv:
        argv += ["-t", "5"]
    if kind == "c":
        return lab.c_client(ns, argv, timeout=timeout)
    return lab.our_client(ns, argv, timeout=timeout)


def status_of(res):
    return {0: "on", 2: "off"}.get(res.rc, "rc%s" % res.rc)


def start_pair(topo, tmp_path, key, backend="sim", listener_extra=None, cpg_extra="",
               domains=(A, B)):
    """Our daemon on h1 and h2, sim domains A / B in state files; returns (daemons, states)."""
    daemons, states = [], []
    for host, doms, peer in (("h1", domains[0], "198.18.8.2"), ("h2", domains[1], "198.18.8.1")):
        state = tmp_path / ("%s.state" % host)
        mh.write_state(state, doms)
        extra = listener_extra if listener_extra is not None else '\t\tpeers = "%s";\n' % peer
        conf = mh.sim_conf(key, state, backend=backend, listener_extra=extra,
                           cpg_extra=cpg_extra)
        daemons.append(lab.start_our_daemon(topo.ns[host], conf, tmp_path / host,
                                            args=["-d", "3"]))
        states.append(state)
    return daemons, states


def expected_status(doms_by_host, name):
    for doms in doms_by_host:
        for n, _u, st in doms:
            if n == name:
                return st
    return None


# ---------------------------------------------------------------------------
# owner-only answers, no host cluster

def test_owner_only_50_in_a_row(topo, tmp_path, key):
    """50 requests with each client on a shared group: every answer is the owner's."""
    daemons, states = start_pair(topo, tmp_path, key)
    try:
        names = [d[0] for d in A + B]
        cycle = ("status", "off", "status", "on")
        for kind in ("ours", "c"):
            wrong, times = [], []
            truth = {n: st for n, _u, st in A + B}
            visits = dict.fromkeys(names, 0)
            for i in range(50):
                name = names[i % len(names)]
                action = cycle[visits[name] % 4] if name not in ("a3", "b3") else "status"
                visits[name] += 1
                res = client(kind, topo.guest, key, "-o", action, "-H", name)
                times.append(res.elapsed)
                if action == "status":
                    ok = status_of(res) == truth[name]
                else:
                    ok = res.rc == 0
                    truth[name] = action
                if not ok:
                    wrong.append("%d %s %s (expected %s): %r" % (i, action, name, truth[name],
                                                                 res))
            for name, st in truth.items():          # back to the start for the next client
                if st == "off" and name not in ("a3", "b3"):
                    assert client(kind, topo.guest, key, "-o", "on", "-H", name).rc == 0
            report("owner-only %s client" % kind, requests=50, wrong=len(wrong),
                   median_ms="%.0f" % (statistics.median(times) * 1000))
            assert not wrong, "\n".join(wrong)
        # nobody answers for a domain no host has: the client times out (rc 1), never 0/2
        for kind in ("ours", "c"):
            res = client(kind, topo.guest, key, "-o", "off", "-H", "nowhere", *FAST)
            assert res.rc == 1, res
            res = client(kind, topo.guest, key, "-o", "status", "-H", "nowhere", *FAST)
            assert res.rc == 1, res
        for d in daemons:
            d.assert_alive()
        assert "not owner" in daemons[0].log() and "not owner" in daemons[1].log()
    finally:
        lab.stop_all(daemons)


def test_owner_only_list_merge(topo, tmp_path, key):
    """list: ours merges both hosts' connect-backs; C gets one host's list, intact."""
    daemons, _states = start_pair(topo, tmp_path, key)
    try:
        all_rows = sorted((n, u, s) for n, u, s in A + B)
        times = []
        for _ in range(5):
            res = client("ours", topo.guest, key, "-o", "list")
            assert res.rc == 0, res
            assert lab.norm_list(res) == tuple(all_rows), res
            times.append(res.elapsed)
        single = []
        for _ in range(5):
            res = client("ours", topo.guest, key, "-o", "status", "-H", "a1")
            single.append(res.elapsed)
        c_lists = set()
        for _ in range(5):
            res = client("c", topo.guest, key, "-o", "list")
            assert res.rc == 0, res
            c_lists.add(lab.norm_list(res))
        for rows in c_lists:            # each is exactly one host's list
            assert rows in (tuple(sorted(A)), tuple(sorted(B))), rows
        report("owner-only list merge", our_list_median_ms="%.0f" % (
            statistics.median(times) * 1000), our_status_median_ms="%.0f" % (
            statistics.median(single) * 1000), c_distinct_lists=len(c_lists))
    finally:
        lab.stop_all(daemons)


def test_owner_only_auto_needs_peers(topo, tmp_path, key):
    """One host: auto without peers keeps C answers (unknown -> off, rc 2); yes -> silent."""
    state = tmp_path / "h1.state"
    mh.write_state(state, A)
    for extra, want_rc in (("", 2), ('\t\towner_only = "yes";\n', 1)):
        d = lab.start_our_daemon(topo.ns["h1"], mh.sim_conf(key, state, listener_extra=extra),
                                 tmp_path / "h1")
        try:
            res = client("ours", topo.guest, key, "-o", "status", "-H", "b1", *FAST)
            assert res.rc == want_rc, res
            assert ("owner-only answers" in d.log()) == (want_rc == 1)
        finally:
            d.stop()


# ---------------------------------------------------------------------------
# cpg backend on two real corosync instances

SHIM_C = r"""
/* Debian's cpg.so (4.12.1) may start its dispatch thread before it stores the CPG
 * handle (testlab.md 8.4): a 0 handle in cpg_dispatch() is replaced by the one
 * cpg_initialize() returned, after a pause that lets cpg_start() finish. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <unistd.h>
static uint64_t saved;
static void *cpg(const char *f) { return dlsym(dlopen("libcpg.so.4", RTLD_LAZY | RTLD_NOLOAD), f); }
int cpg_initialize(uint64_t *h, void *cb) {
	int rc = ((int (*)(uint64_t *, void *))cpg("cpg_initialize"))(h, cb);
	if (rc == 1) saved = *h;
	return rc;
}
int cpg_dispatch(uint64_t h, int flags) {
	if (h == 0) { usleep(200000); h = saved; }
	return ((int (*)(uint64_t, int))cpg("cpg_dispatch"))(h, flags);
}
"""


def require_corosync():
    missing = [p for p in ("/usr/sbin/corosync", "/usr/sbin/corosync-quorumtool")
               if not os.access(p, os.X_OK)]
    if not any(os.path.exists(d + "/libcpg.so.4") for d in ("/usr/lib/x86_64-linux-gnu",
                                                             "/usr/lib64", "/usr/lib")):
        missing.append("libcpg.so.4 (libcpg4)")
    if missing:
        msg = "corosync missing: " + ", ".join(missing)
        if lab.in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def cluster(topo):
    """corosync on h1 and h2 (2 members), for the whole module."""
    require_corosync()
    procs = {h: topo.start_corosync(h) for h in ("h1", "h2")}
    topo.wait_members(2)
    topo.corosync = procs
    yield topo


def restart_corosync(topo, host):
    topo.corosync[host] = topo.start_corosync(host)
    topo.wait_members(2)


def routed_ms(daemon):
    """'answered by node N in X ms' lines of a daemon log -> [X]."""
    out = []
    for line in daemon.log().splitlines():
        if "answered by node" in line and " ms:" in line:
            out.append(float(line.split(" in ")[-1].split(" ms")[0]))
    return out


def wait_log(daemon, text, timeout=10):
    lab.wait_for(lambda: text in daemon.log(), daemon.proc, daemon.log_path, timeout,
                 "%r in %s" % (text, daemon.log_path))


def both_joined(daemons):
    for d in daemons:
        lab.wait_for(lambda: "2 members" in d.log() or "joined [(" in d.log().split(
            "ready:")[-1] or d.log().count("cpg: members") >= 2, d.proc, d.log_path, 10,
            "the cpg group to show both daemons")


def ask(kind, topo, key, action, name, *extra):
    return client(kind, topo.guest, key, "-o", action, "-H", name, *extra)


def fence_round(kind, topo, key, names, truth, wrong, *extra):
    """status each domain; a running one also goes off, status, on, status. `truth`
    (name -> "on"/"off") is checked and kept current; misses go to `wrong`. Returns the
    number of requests sent."""
    n = 0
    for name in names:
        for action in (("status", "off", "status", "on", "status")
                       if truth[name] == "on" else ("status",)):
            res = ask(kind, topo, key, action, name, *extra)
            n += 1
            if action == "status":
                ok = status_of(res) == truth[name]
            else:
                ok = res.rc == 0
                truth[name] = action
            if not ok:
                wrong.append("%s %s %s %s: %r" % (kind, " ".join(extra), action, name, res))
    return n


@pytest.mark.cpg
def test_cpg_routing_and_migration(cluster, tmp_path, key):
    topo = cluster
    daemons, states = start_pair(topo, tmp_path, key, backend="cpg", listener_extra="")
    try:
        wait_log(daemons[0], "joined [(2,")
        wrong, n = [], 0
        truth = {nm: st for nm, _u, st in A + B}
        for kind in ("ours", "c"):
            n += fence_round(kind, topo, key, ("a1", "b1", "a2", "b2", "a3", "b3"), truth,
                             wrong)
            res = ask(kind, topo, key, "list", "")
            n += 1
            if kind == "ours" and lab.norm_list(res) != tuple(sorted(A + B)):
                wrong.append("list: %r" % res)
        # the owner's state files really changed and came back
        assert "b1 bbbbbbbb-0000-4000-8000-000000000001 on" in states[1].read_text()
        # migration: b1 moves from h2 to h1 (running); the next off is done by h1
        mh.write_state(states[1], [d for d in B if d[0] != "b1"])
        mh.write_state(states[0], A + [B[0]])
        for kind in ("ours", "c"):
            res = ask(kind, topo, key, "off", "b1")
            n += 1
            if res.rc != 0:
                wrong.append("after migration %s off b1: %r" % (kind, res))
            assert "b1 bbbbbbbb-0000-4000-8000-000000000001 off" in states[0].read_text()
            assert "b1" not in states[1].read_text()
            assert ask(kind, topo, key, "on", "b1").rc == 0
            n += 1
        # the old owner learns within CPG_POLL that b1 left: its list shows h1's copy
        time.sleep(1.5)
        res = ask("ours", topo, key, "list", "")
        assert ("b1", B[0][1], "on") in lab.norm_list(res), res
        lat = routed_ms(daemons[0]) + routed_ms(daemons[1])
        report("cpg routing (ours+ours)", requests=n, wrong=len(wrong),
               routed=len(lat), cpg_route_median_ms="%.1f" % statistics.median(lat),
               cpg_route_max_ms="%.1f" % max(lat))
        assert not wrong, "\n".join(wrong)
    finally:
        lab.stop_all(daemons)


@pytest.mark.cpg
def test_cpg_loss_of_daemon_and_corosync(cluster, tmp_path, key):
    topo = cluster
    daemons, states = start_pair(topo, tmp_path, key, backend="cpg", listener_extra="")
    h1, h2 = daemons
    results = []
    try:
        wait_log(h1, "joined [(2,")
        # 1. h2's daemon stops: its domains have no live owner -> every request fails
        h2.stop()
        wait_log(h1, "forgot 3 domains")
        for kind in ("ours", "c"):
            for action in ("off", "reboot", "status", "on"):
                res = ask(kind, topo, key, action, "b1")
                results.append(res.rc)
                assert res.rc == 1, res          # never 0 (success) nor 2 (off)
            assert ask(kind, topo, key, "status", "a1").rc == 0
        assert "b1 bbbbbbbb-0000-4000-8000-000000000001 on" in states[1].read_text()
        assert "no live member" in h1.log() and "no_owner = fail" in h1.log()
        # 2. h2's daemon back; then h2's corosync is killed under it
        mh.write_state(states[1], B)
        h2 = daemons[1] = lab.start_our_daemon(topo.ns["h2"], h2.conf_text, tmp_path / "h2b",
                                               args=["-d", "3"])
        wait_log(h1, "joined [(2,", timeout=10)
        assert ask("ours", topo, key, "status", "b1").rc == 0
        t_kill = time.monotonic()
        topo.corosync["h2"].kill()
        topo.stop(topo.corosync["h2"])
        wait_log(h2, "lost corosync")
        lab.wait_for(lambda: h1.log().count("left [(2,") >= 2, h1.proc, h1.log_path, 10,
                     "h1 to see node 2 leave")
        detect = time.monotonic() - t_kill
        for kind in ("ours", "c"):
            for name in ("b1", "a1"):
                for action in ("off", "status"):
                    res = ask(kind, topo, key, action, name)
                    results.append(res.rc)
                    # whoever answers: b1's owner h2 may act locally (a true answer) while
                    # h1 cannot reach it; a1 seen from h2 has no route. Never a false 0/2.
                    truth_off = {"b1": "b1 bbbbbbbb-0000-4000-8000-000000000001 off",
                                 "a1": "a1 aaaaaaaa-0000-4000-8000-000000000001 off"}[name]
                    state = (states[1] if name == "b1" else states[0]).read_text()
                    if res.rc == 0 and action == "off":
                        assert truth_off in state, res
                    if res.rc == 2:
                        assert truth_off in state, res
                    if action == "off" and res.rc == 0:      # restore, behind the daemons
                        mh.write_state(states[1] if name == "b1" else states[0],
                                       B if name == "b1" else A)
        # 3. corosync back: h2 reconnects by itself and routing works again
        t_back = time.monotonic()
        restart_corosync(topo, "h2")
        wait_log(h2, "joined group", timeout=10)
        lab.wait_for(lambda: h2.log().count("joined group") >= 2, h2.proc, h2.log_path, 10,
                     "h2 to rejoin")
        rejoin = time.monotonic() - t_back
        time.sleep(0.5)
        for kind in ("ours", "c"):
            for name in ("a1", "b1"):
                res = ask(kind, topo, key, "status", name)
                assert res.rc == 0, res
        report("cpg loss", requests=len(results), successes_without_owner=0,
               nodedown_detect_s="%.1f" % detect, reconnect_s="%.1f" % rejoin)
    finally:
        lab.stop_all(daemons)
        if topo.corosync["h2"].poll() is not None:
            restart_corosync(topo, "h2")


@pytest.mark.cpg
def test_cpg_no_owner_assume_off_is_opt_in(cluster, tmp_path, key):
    topo = cluster
    extra = '\t\tno_owner = "assume-off";\n\t\tsettle = "1";\n'
    daemons, states = start_pair(topo, tmp_path, key, backend="cpg", listener_extra="",
                                 cpg_extra=extra)
    try:
        wait_log(daemons[0], "joined [(2,")
        daemons[1].stop()
        wait_log(daemons[0], "forgot 3 domains")
        res = ask("ours", topo, key, "off", "b1")      # membership changed < settle ago
        assert res.rc == 1, res
        assert "membership changed" in daemons[0].log()
        time.sleep(1.2)
        for kind in ("ours", "c"):
            assert ask(kind, topo, key, "off", "b1").rc == 0
            assert ask(kind, topo, key, "status", "b1").rc == 2
            assert ask(kind, topo, key, "on", "b1").rc == 1
        assert daemons[0].log().count("no_owner = assume-off answers") >= 4
        assert "b1 bbbbbbbb-0000-4000-8000-000000000001 on" in states[1].read_text()
    finally:
        lab.stop_all(daemons)


@pytest.mark.cpg
def test_cpg_mixed_with_c_daemon(cluster, tmp_path, key):
    """C fence_virtd (cpg backend, libvirt test driver) on h2, ours on h1, one group."""
    topo = cluster
    if not os.access("/usr/bin/gcc", os.X_OK):
        pytest.skip("gcc missing: the LD_PRELOAD shim for C cpg.so cannot be built")
    shim_c = tmp_path / "cpgfix.c"
    shim_c.write_text(SHIM_C)
    shim = tmp_path / "cpgfix.so"
    lab.run(None, ["gcc", "-shared", "-fPIC", "-O2", "-o", shim, shim_c, "-ldl"], check=True)
    node = lab.write_node_xml(tmp_path / "node.xml", [lab.Domain(n, u, s == "on")
                                                      for n, u, s in B])
    state = tmp_path / "h1.state"
    mh.write_state(state, A)
    ours = lab.start_our_daemon(topo.ns["h1"], mh.sim_conf(key, state, backend="cpg",
                                                          listener_extra=""),
                                tmp_path / "h1", args=["-d", "3"])
    c_conf = tmp_path / "c.conf"
    c_conf.write_text(
        'fence_virtd {\n\tlistener = "multicast";\n\tbackend = "cpg";\n\tmodule_path = "%s";\n}\n'
        'listeners {\n\tmulticast {\n\t\tkey_file = "%s";\n\t\taddress = "225.0.0.12";\n'
        '\t\tport = "1230";\n\t\tinterface = "eth0";\n\t\tfamily = "ipv4";\n\t}\n}\n'
        'backends {\n\tcpg {\n\t\turi = "%s";\n\t}\n}\n' % (lab.C_MODULE_PATH, key, node))
    c_log = tmp_path / "c.log"
    with open(str(c_log), "wb") as out:
        cproc = subprocess.Popen(lab.ns_argv(topo.ns["h2"], [
            "env", "LD_PRELOAD=%s" % shim, "stdbuf", "-oL", "-eL", lab.C_DAEMON, "-F", "-d2",
            "-p", tmp_path / "c.pid", "-f", c_conf]), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        wait_log(ours, "joined [(2,")
        time.sleep(0.5)                         # the shim's pause + the C STORE_VMs
        # ours listens on 1229, C on 1230: -p picks the daemon that routes the request
        wrong, n = [], 0
        truth = {nm: st for nm, _u, st in A + B}
        for kind in ("ours", "c"):
            for port in ("1229", "1230"):
                n += fence_round(kind, topo, key, ("a1", "b1", "a3", "b3", "b2"), truth,
                                 wrong, "-p", port)
        # nobody has it: C (node 2, the highest) answers 0 for off; our daemon does not
        # take that from a member that does not store the domain, and answers FAIL
        res = ask("ours", topo, key, "off", "nowhere", "-p", "1229")
        n += 1
        assert res.rc == 1 and "no live member" in res.output, res
        c_says = ask("c", topo, key, "off", "nowhere", "-p", "1230").rc
        n += 1
        lat = routed_ms(ours)
        report("cpg mixed C+ours", requests=n, wrong=len(wrong), routed_by_ours=len(lat),
               route_median_ms="%.1f" % statistics.median(lat) if lat else "-",
               c_daemon_off_unknown_rc=c_says)
        assert lat, ours.log()
        assert not wrong, "\n".join(wrong) + "\n--- C log ---\n" + c_log.read_text()[-3000:]
        assert cproc.poll() is None, c_log.read_text()
    finally:
        lab.stop_by_pid(cproc, timeout=2)
        ours.stop()


@pytest.mark.cpg
def test_cpg_without_corosync_fails_with_a_reason(topo, tmp_path, key):
    """No corosync in this network namespace: the daemon stops at start with the reason."""
    require_corosync()
    state = tmp_path / "g.state"
    mh.write_state(state, A)
    conf = tmp_path / "g.conf"
    conf.write_text(mh.sim_conf(key, state, backend="cpg"))
    roles = lab.role_dir(tmp_path)
    res = lab.run(topo.guest, [sys.executable, roles / "fence_virtd", "-F", "-f", conf, "-p",
                               tmp_path / "g.pid"], timeout=20)
    assert res.rc == 1, res
    assert "cpg_initialize failed: cs_error 2" in res.output, res
    assert "corosync running in this network namespace" in res.output, res
