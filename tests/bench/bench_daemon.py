#!/usr/bin/env python3
"""Benchmark: our fence_virtd vs the C fence_virtd, side by side in one run (issue #9).

Not a pass/fail test: it prints a table with every figure as a ratio ours/C.
Run as root from the repo:  python3 tests/bench/bench_daemon.py [--runs 30]

* The client is held fixed (C fence_xvm in guest namespaces) while the daemon
  changes: status, list, off+on, reboot (median/p95 over --runs), list of 1,000
  domains, N=8 concurrent reboots of different domains (from 8 guests), and
  legitimate status during a bounded flood of 20,000 bad packets.
* The daemon is held fixed (the C one) while the client changes: our fence_xvm vs
  C fence_xvm for status, as overhead above a bare `python3 -c pass`.
Both daemons use the libvirt test driver (one connection, so state persists);
ours runs under /usr/bin/python3 with the libvirt-python driver.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import lab  # noqa: E402

OUR_PY = "/usr/bin/python3"
N_CONC = 8


def domains(n, prefix="bench"):
    return tuple(lab.Domain("%s-%d" % (prefix, i), "%08x-0000-4000-8000-%012x" % (0xbe, i), True)
                 for i in range(n))


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def timed(ns, args, key, timeout=10, client="c"):
    argv = list(args) + ["-k", str(key), "-t", str(timeout)]
    if client == "c":
        r = lab.c_client(ns, argv, timeout=timeout + 20)
    else:
        r = lab.our_client(ns, argv, python=client, timeout=timeout + 20)
    return r


def series(fn, runs):
    out = []
    for _ in range(runs):
        t, ok = fn()
        if not ok:
            raise AssertionError("benchmark step failed")
        out.append(t)
    return out


def start(kind, the_lab, conf, workdir):
    if kind == "ours":
        return lab.start_our_daemon(the_lab.host, conf, workdir, python=OUR_PY,
                                    env={"FENCEVIRT_LIBVIRT_DRIVER": "python"})
    return lab.start_c_daemon(the_lab.host, conf, workdir, debug=0)


def flood(ns, target, key_bad, count):
    """Send `count` wrong-key requests as fast as possible from netns ns."""
    code = r"""
import os, socket, sys
sys.path.insert(0, %r)
import fencevirt as fv
key = b'not the key' * 8
src = %r
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sent = 0
for i in range(%d):
    req = fv.make_request(fv.Request.OFF, 'bench-1', address=socket.inet_aton(src),
                          family=socket.AF_INET, port=1229, seqno=i, random=os.urandom(6))
    try:
        u.sendto(fv.sign_request(fv.pack_request(req), fv.Hash.SHA256, key), (%r, 1229))
        sent += 1
    except OSError:
        pass
print(sent)
""" % (str(lab.REPO), ns[1], count, target)
    return subprocess.Popen(lab.ns_argv(ns[0], [OUR_PY, "-c", code]), stdout=subprocess.PIPE)


def bench_daemon(kind, the_lab, tmp, runs):
    res = {}
    key = lab.make_key(Path(tmp) / kind / "fence_xvm.key")
    g = the_lab.guests
    uri = lab.write_node_xml(Path(tmp) / kind / "node.xml", domains(N_CONC + 2))
    d = start(kind, the_lab, lab.mcast_conf(key, uri), Path(tmp) / kind)
    try:
        def op(args, ok_rcs=(0,)):
            def f():
                r = timed(g[0], args, key)
                return r.elapsed, r.rc in ok_rcs
            return f
        timed(g[0], ["-o", "status", "-H", "bench-0"], key)    # warm-up (ARP, connections)
        res["status"] = series(op(["-o", "status", "-H", "bench-0"]), runs)
        res["list"] = series(op(["-o", "list"]), runs)

        def offon():
            a = timed(g[0], ["-o", "off", "-H", "bench-1"], key)
            b = timed(g[0], ["-o", "on", "-H", "bench-1"], key)
            return a.elapsed + b.elapsed, a.rc == 0 and b.rc == 0
        res["off+on"] = series(offon, runs)
        res["reboot"] = series(op(["-o", "reboot", "-H", "bench-2"]), runs)

        # N concurrent reboots of different domains, one guest each
        def conc():
            out = [None] * N_CONC

            def one(i):
                out[i] = timed(g[i], ["-o", "reboot", "-H", "bench-%d" % (i + 2)], key,
                               timeout=30)
            ts = [threading.Thread(target=one, args=(i,)) for i in range(N_CONC)]
            t0 = time.monotonic()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return time.monotonic() - t0, all(r.rc == 0 for r in out)
        res["8 concurrent reboots"] = series(conc, 3)

        # legitimate status during a flood of 20,000 bad packets from the last guest
        fl = flood((g[-1], the_lab.guest_ips[-1]), the_lab.host_ip, None, 20000)
        lat, ok = [], 0
        while fl.poll() is None or len(lat) < 5:
            r = timed(g[0], ["-o", "status", "-H", "bench-0"], key, timeout=10)
            lat.append(r.elapsed)
            ok += r.rc == 0
        fl.wait(60)
        res["status during flood"] = lat
        res["flood success %"] = [100.0 * ok / len(lat)]
        res["flood sent"] = [float(fl.stdout.read().decode().strip() or 0)]
        d.assert_alive()
    finally:
        d.stop()
    # list of 1,000 domains: a fresh daemon on a 1,000-domain node file
    uri = lab.write_node_xml(Path(tmp) / kind / "node1000.xml", domains(1000, "big"))
    d = start(kind, the_lab, lab.mcast_conf(key, uri), Path(tmp) / (kind + "1000"))
    try:
        def big():
            r = timed(g[0], ["-o", "list"], key, timeout=30)
            return r.elapsed, r.rc == 0 and len(lab.norm_list(r)) == 1000
        big()
        res["list 1,000 domains"] = series(big, max(5, runs // 3))
    finally:
        d.stop()
    return res


def bench_list_rpc(the_lab, tmp, runs):
    """List of 1,000 domains with the test driver served by a real libvirtd
    (test+unix:///abs/node.xml), so every per-domain call is an RPC for both daemons.
    libvirtd gives each connection a fresh instance of the node file; fine for a list."""
    w = Path(tmp) / "rpc"
    key = lab.make_key(w / "fence_xvm.key")
    uri = lab.write_node_xml(w / "node1000.xml", domains(1000, "big"))
    uri = uri.replace("test://", "test+unix://", 1)
    res = {}
    with lab.Libvirtd(the_lab.host, w / "libvirtd", listen_addr=the_lab.host_ip):
        for kind in ("ours", "c"):
            d = start(kind, the_lab, lab.mcast_conf(key, uri), w / kind)
            try:
                def big():
                    r = timed(the_lab.guests[0], ["-o", "list"], key, timeout=30)
                    return r.elapsed, r.rc == 0 and len(lab.norm_list(r)) == 1000
                big()
                res[kind] = series(big, max(5, runs // 3))
            finally:
                d.stop()
    return res


def bench_clients(the_lab, tmp, runs):
    """C daemon fixed; our client vs the C client, and a bare interpreter start."""
    key = lab.make_key(Path(tmp) / "cl" / "fence_xvm.key")
    uri = lab.write_node_xml(Path(tmp) / "cl" / "node.xml", domains(2))
    d = start("c", the_lab, lab.mcast_conf(key, uri), Path(tmp) / "cl")
    py = sys.executable                     # the real interpreter, not a pyenv shim
    res = {}
    # Bytecode caching on for the client runs (this sandbox sets PYTHONDONTWRITEBYTECODE)
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    stub = ("import sys; sys.path.insert(0, %r); import fencevirt; "
            "sys.exit(fencevirt.main(['fence_xvm'] + sys.argv[1:]))" % str(lab.REPO))
    lab.run(None, [py, "-c", "import sys; sys.path.insert(0, %r); import fencevirt"
                   % str(lab.REPO)], env=env, timeout=30)   # write the .pyc once
    try:
        args = ["-o", "status", "-H", "bench-0"]
        timed(the_lab.guests[0], args, key)

        def ours():
            r = timed(the_lab.guests[0], args, key, client=py)
            return r.elapsed, r.rc == 0

        def ours_stub():
            r = lab.run(the_lab.guests[0], [py, "-c", stub] + args + ["-k", key, "-t", "10"],
                        env=env, timeout=30)
            return r.elapsed, r.rc == 0

        def c():
            r = timed(the_lab.guests[0], args, key)
            return r.elapsed, r.rc == 0

        def bare():
            r = lab.run(the_lab.guests[0], [py, "-c", "pass"], timeout=20)
            return r.elapsed, r.rc == 0

        def true():
            r = lab.run(the_lab.guests[0], ["/bin/true"], timeout=20)
            return r.elapsed, r.rc == 0
        res["our client status"] = series(ours, runs)
        res["our client via import"] = series(ours_stub, runs)
        res["C client status"] = series(c, runs)
        res["bare python3 -c pass"] = series(bare, runs)
        res["bare /bin/true"] = series(true, runs)
    finally:
        d.stop()
    return res


def ms(x):
    return "%8.1f" % (x * 1000)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-libvirtd", action="store_true",
                   help="skip the list of 1,000 domains through a real libvirtd")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    with lab.Lab(n_guests=N_CONC + 1) as the_lab, tempfile.TemporaryDirectory(prefix="i9bench-") \
            as tmp:
        ours = bench_daemon("ours", the_lab, tmp, a.runs)
        c = bench_daemon("c", the_lab, tmp, a.runs)
        if not a.no_libvirtd:
            try:
                rpc = bench_list_rpc(the_lab, tmp, a.runs)
                ours["list 1,000 via libvirtd"] = rpc["ours"]
                c["list 1,000 via libvirtd"] = rpc["c"]
            except Exception as e:  # noqa: BLE001 - report the other figures anyway
                print("list 1,000 via libvirtd: not measured: %s: %s" % (type(e).__name__, e))
        cl = bench_clients(the_lab, tmp, a.runs)
    print("fencevirt benchmark, %d runs, %s; our daemon under %s (libvirt-python driver), "
          "test driver; client C fence_xvm 4.12.1 in guest namespaces"
          % (a.runs, time.strftime("%Y-%m-%d %H:%M"), OUR_PY))
    print("%-24s %9s %9s %9s %9s %8s %8s" % ("daemon (client fixed)", "ours med", "C med",
                                            "ours p95", "C p95", "med o/C", "p95 o/C"))
    for k in ours:
        if k in ("flood success %", "flood sent"):
            continue
        mo, mc = statistics.median(ours[k]), statistics.median(c[k])
        po, pc = p95(ours[k]), p95(c[k])
        print("%-24s %9s %9s %9s %9s %8.2f %8.2f" % (k + " (ms)", ms(mo), ms(mc), ms(po), ms(pc),
                                                    mo / mc, po / pc))
    so, sc = ours["flood success %"][0], c["flood success %"][0]
    print("%-24s %9.1f %9.1f %29s %8.2f" % ("flood: legit success %", so, sc, "",
                                             so / sc if sc else float("inf")))
    print("%-24s %9d %9d  (bad packets sent per run)" % ("flood: packets", ours["flood sent"][0],
                                                          c["flood sent"][0]))
    print()
    bare = statistics.median(cl["bare python3 -c pass"])
    co, cc = statistics.median(cl["our client status"]), statistics.median(cl["C client status"])
    tr = statistics.median(cl["bare /bin/true"])
    print("%-24s %9s %9s %9s" % ("client (C daemon fixed)", "median", "p95", "over base"))
    print("%-24s %9s %9s %9s" % ("bare python -c pass", ms(bare), ms(p95(cl["bare python3 -c pass"])),
                                 ""))
    print("%-24s %9s %9s %9s" % ("bare /bin/true", ms(tr), ms(p95(cl["bare /bin/true"])), ""))
    print("%-24s %9s %9s %9s" % ("our fence_xvm status", ms(co), ms(p95(cl["our client status"])),
                                 ms(co - bare)))
    cs = statistics.median(cl["our client via import"])
    print("%-24s %9s %9s %9s" % ("ours, cached import", ms(cs),
                                 ms(p95(cl["our client via import"])), ms(cs - bare)))
    print("%-24s %9s %9s %9s" % ("C fence_xvm status", ms(cc), ms(p95(cl["C client status"])),
                                 ms(cc - tr)))
    print("client ratio ours/C (total): script %.2f, cached import %.2f; above bare python: "
          "script %.1f ms, cached import %.1f ms; C above /bin/true: %.1f ms"
          % (co / cc, cs / cc, (co - bare) * 1000, (cs - bare) * 1000, (cc - tr) * 1000))
    print("(script = the fence_xvm symlink to fencevirt.py, compiled on every start; cached "
          "import = a one-line launcher importing fencevirt from its .pyc)")
    print("(all times include `ip netns exec`; total bench time %.0f s)" % (time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
