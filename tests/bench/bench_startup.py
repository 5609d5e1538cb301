#!/usr/bin/env python3
"""Start-up cost of the fence agent: ours against the C fence_xvm and a bare interpreter.

Pacemaker runs the agent for every monitor, and `-o metadata` at every device
registration. This measures, in one run and interleaved (round-robin, so drift hits
every command alike), the wall time of one process from fork to exit:

* bare      ``PY -c pass``                                  the interpreter alone
* script    ``PY fencevirt.py xvm -o ...``                   as a symlink/wrapper runs it:
            CPython never caches the main script's bytecode, so it compiles every time
* import    ``PY -c 'import fencevirt; main([...])'``        as an installed wrapper would:
            bytecode cached in __pycache__ (here PYTHONPYCACHEPREFIX, a temp dir)
* C         ``/usr/sbin/fence_xvm -o ...``
* core imports ``PY -c 'import collections, enum, ... logging ...'``: the modules
            style.md §5 allows at top level, i.e. the floor of the import path

for ``-o metadata`` and ``-o monitor`` (monitor against our daemon, sim backend, on lo in
a network namespace ``i4b<pid>`` made for the run), with /usr/bin/python3 and the
tests/.venv interpreter. It prints medians and the overhead over the bare interpreter,
asserts nothing about time (style.md §9), and exits 0 unless a command fails.

    sudo tests/bench/bench_startup.py [-n RUNS] [--json FILE]

Without root only metadata is measured (no namespace, no daemon; the C binary then
does not run either: it never runs in the root namespace).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FENCEVIRT = os.path.join(REPO, "fencevirt.py")
C_AGENT = "/usr/sbin/fence_xvm"
IMPORT_WRAPPER = ("import sys; sys.path.insert(0, %r); import fencevirt; "
                  "sys.exit(fencevirt.main(['fence_xvm'] + sys.argv[1:]))" % REPO)
# style.md §5: what fencevirt.py imports at top level; the floor for the import path
CORE_IMPORTS = ("import collections, enum, errno, hashlib, hmac, logging, os, select, "
                "socket, struct, sys, syslog, threading, time")
CONF = """\
fence_virtd {
	listener = "multicast";
	backend = "sim";
}
listeners {
	multicast {
		key_file = "%(key)s";
		address = "225.0.0.12";
		port = "%(port)d";
		interface = "lo";
		family = "ipv4";
	}
}
backends {
	sim {
		domain = "bench-1 5a5a5a5a-0000-4000-8000-000000000001 on";
	}
}
"""


def interpreters():
    out = []
    for py in ("/usr/bin/python3", os.path.join(REPO, "tests", ".venv", "bin", "python")):
        if os.access(py, os.X_OK):
            real = os.path.realpath(py)
            ver = subprocess.run([py, "-c", "import sys; print('%d.%d.%d' % "
                                  "sys.version_info[:3])"], capture_output=True,
                                 text=True).stdout.strip()
            out.append((py, real, ver))
    return out


def run_once(argv, env):
    """Wall seconds and CPU seconds (user+sys) of one process; raises on failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else status >> 8
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError("%s exited %d: %s" % (" ".join(argv), p.returncode, err))
    return wall, ru.ru_utime + ru.ru_stime


def measure(cases, runs, env):
    """cases: {label: argv}. Round-robin `runs` times after one warm-up each."""
    for argv in cases.values():
        run_once(argv, env)
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for _ in range(runs):
        for label, argv in cases.items():
            w, c = run_once(argv, env)
            wall[label].append(w)
            cpu[label].append(c)
    return {k: {"median_ms": statistics.median(wall[k]) * 1000,
                "min_ms": min(wall[k]) * 1000,
                "cpu_ms": statistics.median(cpu[k]) * 1000} for k in cases}


def start_daemon(tmp, key, port, env):
    conf = os.path.join(tmp, "fence_virt.conf")
    with open(conf, "w") as f:
        f.write(CONF % {"key": key, "port": port})
    os.chmod(conf, 0o600)
    log = os.path.join(tmp, "fence_virtd.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/usr/bin/python3", FENCEVIRT, "virtd", "-F", "-f", conf,
                                 "-p", os.path.join(tmp, "pid")], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 10
    while b"ready:" not in open(log, "rb").read():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("our daemon did not start:\n" + open(log).read())
        time.sleep(0.02)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bench(runs, with_network):
    tmp = tempfile.mkdtemp(prefix="i4bench.")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV",)}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
    daemon = None
    try:
        key = os.path.join(tmp, "fence_xvm.key")
        with open(key, "wb") as f:
            f.write(os.urandom(256))
        os.chmod(key, 0o600)
        port = 1229
        actions = {"metadata": ["-o", "metadata"]}
        if with_network:
            daemon = start_daemon(tmp, key, port, env)
            actions["monitor"] = ["-o", "monitor", "-k", key, "-p", str(port), "-t", "5"]
        cases = {}
        pys = interpreters()
        for py, real, ver in pys:
            tag = "%s (%s)" % (py.replace(REPO + "/", ""), ver)
            cases["bare | " + tag] = [py, "-c", "pass"]
            cases["core imports | " + tag] = [py, "-c", CORE_IMPORTS]
            for act, args in actions.items():
                cases["script %s | %s" % (act, tag)] = [py, FENCEVIRT, "xvm"] + args
                cases["import %s | %s" % (act, tag)] = [py, "-c", IMPORT_WRAPPER] + args
        if with_network and os.access(C_AGENT, os.X_OK):
            for act, args in actions.items():
                cases["C %s | %s" % (act, C_AGENT)] = [C_AGENT] + args
        results = measure(cases, runs, env)
    finally:
        if daemon is not None:
            stop(daemon)
        shutil.rmtree(tmp, ignore_errors=True)
    return pys, results


def report(pys, results, runs):
    lines = ["fence agent start-up, %d interleaved runs each, median wall ms "
             "(min, CPU user+sys)" % runs, ""]
    for label, r in results.items():
        lines.append("  %-62s %6.1f ms  (min %5.1f, cpu %5.1f)" % (
            label, r["median_ms"], r["min_ms"], r["cpu_ms"]))
    lines += ["", "overhead over the bare interpreter (target <= 15 ms):"]
    for py, real, ver in pys:
        tag = "%s (%s)" % (py.replace(REPO + "/", ""), ver)
        bare = results["bare | " + tag]["median_ms"]
        for label, r in results.items():
            if label.endswith("| " + tag) and not label.startswith("bare"):
                c_label = [k for k in results if k.startswith("C " + label.split()[1])]
                vs_c = (" = %.1fx the C binary" % (r["median_ms"] / results[c_label[0]]
                                                   ["median_ms"])) if c_label else ""
                lines.append("  %-62s +%5.1f ms%s" % (label, r["median_ms"] - bare, vs_c))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=20)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--inside", help=argparse.SUPPRESS)      # re-exec'd inside the netns
    args = ap.parse_args()
    if os.geteuid() == 0 and not args.inside and shutil.which("ip"):
        ns = "i4b%d" % (os.getpid() % 100000)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "lo"],
                           check=True)
            argv = [sys.executable, os.path.abspath(__file__), "--inside", ns,
                    "-n", str(args.runs)] + (["--json", args.json] if args.json else [])
            return subprocess.run(["ip", "netns", "exec", ns] + argv).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns])
    pys, results = bench(args.runs, with_network=bool(args.inside))
    print(report(pys, results, args.runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
