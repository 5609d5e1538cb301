#!/usr/bin/env python3
"""Fuzz fence_virtd inside namespaces made here (issue #9).  Run as root from the repo:

    python3 tests/fuzz/run.py --packets 1000000            # ours, then the C daemon
    python3 tests/fuzz/run.py --packets 20000 --daemon ours
    python3 tests/fuzz/run.py worker ...                   # internal: the sender

Prints packets sent per class, what the daemon logged per drop class, legitimate
status latency during the run, the domain list before/after (any change is an
action taken), and whether the daemon survived.  Exit 1 on any of: daemon died,
list changed, a legitimate request failed, an unexpected result byte.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib  # noqa: E402


def report(s):
    w = s["worker"]
    lines = ["== %s fence_virtd: %d packets in %.1f s (%d send errors)"
             % (s["kind"], w["total"], w["seconds"], w["send_errors"])]
    for cls in fuzzlib.ALL_CLASSES:
        if w["sent"].get(cls):
            out = w["outcome"].get(cls)
            lines.append("  %-15s %9d  %s" % (cls, w["sent"][cls],
                                              ", ".join("%s x%d" % kv for kv in sorted(
                                                  out.items())) if out else ""))
    if s["kind"] == "ours":
        lines.append("  daemon log drop classes: %s" % ", ".join(
            "%s %d" % kv for kv in fuzzlib.log_classes(s["log"]).items()))
        audits = [ln for ln in s["log"].splitlines() if "audit:" in ln]
        acted = [ln for ln in audits if " op=off " in ln or " op=on " in ln or " op=reboot " in ln]
        lines.append("  audit lines %d, of them off/on/reboot %d" % (len(audits), len(acted)))
    lines.append("  host UDP counters during the run: %s" % s.get("udp"))
    lat = s["legit_latency"]
    lines.append("  legit status: %d/%d ok, median %.3f s, max %.3f s"
                 % (len(lat) - len(s["legit_failures"]), len(lat), statistics.median(lat),
                    max(lat)))
    lines.append("  list unchanged: %s; daemon survived: %s (exit %s)"
                 % (s["list_before"] == s["list_after"], s["daemon_alive"], s["exit_code"]))
    return "\n".join(lines)


def problems(s):
    out = []
    if s["list_before"] != s["list_after"] or s["list_before"][0] != 0:
        out.append("domain list changed: %r -> %r" % (s["list_before"], s["list_after"]))
    if s["legit_failures"]:
        out.append("legitimate requests failed: %s" % s["legit_failures"][:3])
    for cls, d in s["worker"]["outcome"].items():
        for what in d:
            if "UNEXPECTED" in what or "SERVED" in what or "SENT TO A PEER" in what:
                out.append("%s: %s" % (cls, what))
    if s["kind"] == "ours":
        acted = [ln for ln in s["log"].splitlines()
                 if "audit:" in ln and (" op=off " in ln or " op=on " in ln
                                        or " op=reboot " in ln) and "result=success" in ln
                 and "fz-off" not in ln]
        if acted:
            out.append("actions taken: %s" % acted[:3])
        if "Traceback" in s["log"] or "internal error" in s["log"]:
            out.append("internal error in the daemon log")
    return out


def main(argv):
    if argv[:1] == ["worker"]:
        return fuzzlib.worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packets", type=int, default=20000)
    p.add_argument("--daemon", choices=("ours", "c", "both"), default="both")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--seconds", type=float, default=1800)
    p.add_argument("--python", default="/usr/bin/python3")
    p.add_argument("--rate", type=float, default=0,
                   help="packets per second (default: as fast as the sender can)")
    a = p.parse_args(argv)
    import lab
    bad = []
    with lab.Lab(n_guests=2) as the_lab, tempfile.TemporaryDirectory(prefix="i9fuzz-") as tmp:
        for kind in (("ours", "c") if a.daemon == "both" else (a.daemon,)):
            print("seed %d, %s daemon, %d packets ..." % (a.seed, kind, a.packets), flush=True)
            # the C daemon is single-threaded: each stalled peer blocks it 10 s
            s = fuzzlib.fuzz_session(the_lab, kind, os.path.join(tmp, kind), a.packets,
                                     seconds=a.seconds, seed=a.seed, python=a.python,
                                     stall=(kind == "ours"),
                                     peer_every=max(fuzzlib.PEER_EVERY, a.packets // 2000),
                                     rate=a.rate)
            print(report(s), flush=True)
            for pr in problems(s):
                bad.append("%s: %s" % (kind, pr))
    for b in bad:
        print("PROBLEM " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
