"""Bounded fuzzing of fence_virtd (ours, and the C one for comparison), issue #9.

Two halves:

* the **worker** (`python3 tests/fuzz/run.py worker ...`) runs inside a guest namespace.
  It sends structured mutations of valid requests by unicast UDP to the daemon (both
  daemons accept unicast on the multicast socket, protocol.md §3.2) and plays a
  malicious client on the connect-back.  It prints one JSON line of counts.
* the **orchestrator** (`fuzz_session`) builds a Lab, starts the daemon in the host
  namespace, snapshots the domain list with a legitimate client, runs the worker,
  checks with the legitimate client (C fence_xvm in another guest) that the daemon
  still answers within normal time, and compares the list afterwards.

Nothing here leaves the namespaces the Lab makes.  Every packet class is bounded
by --packets; every socket has a timeout.  Python 3.9 syntax.
"""

import json
import os
import random
import select
import socket
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import fencevirt as fv  # noqa: E402

# Packet-only classes: fire and forget, nothing may be served.
PACKET_CLASSES = ("garbage", "truncate", "extend", "bitflip", "hashtype", "wrongkey",
                  "family", "addrlen", "srcmismatch", "port", "weakhash")
# Signed with the right key and answered by a correct peer: must not act, may answer.
SERVED_CLASSES = ("domain", "reqcode")
# Signed OFF of a running domain; the connect-back peer misbehaves: never an action.
PEER_CLASSES = ("peer-garbage", "peer-badresp", "peer-stall", "peer-halfclose",
                "peer-reset", "peer-refused", "peer-flood")
REPLAY_CLASSES = ("replay", "replay-seqno")
ALL_CLASSES = PACKET_CLASSES + SERVED_CLASSES + PEER_CLASSES + REPLAY_CLASSES
# The expensive classes cost a TCP exchange (or a 10 s stall in the daemon); the
# worker sends them at most once per this many packets.
PEER_EVERY = 500
MAX_STALLED = 6            # stalled connect-backs held open at once (< MAX_WORKERS)
CLOSED_PORT = 9            # nobody listens there: connect-back is refused at once


def sign(pkt, key, hashtype=fv.Hash.SHA256):
    return fv.sign_request(pkt, hashtype, key)


def raw_request(request, domain_bytes, address4, port, seqno, family=socket.AF_INET,
                addrlen=4, flags=0, rnd=None):
    """Unsigned 176-byte request with raw fields (domain as bytes, up to 64, no NUL added)."""
    rnd = os.urandom(6) if rnd is None else rnd
    return fv.FENCE_REQ.pack(request & 0xFF, 0, addrlen & 0xFF, flags & 0xFF,
                             domain_bytes[:64].ljust(64, b"\0"), address4.ljust(28, b"\0"),
                             port & 0xFFFF, rnd, seqno & 0xFFFFFFFF, family & 0xFFFFFFFF,
                             b"\0" * 64)


class Worker(object):
    """Sends the mutations; counts what it sent and what the daemon did."""

    def __init__(self, target, port, key, wrong_key, src, running, off_domain, seed,
                 classes, peer_every=PEER_EVERY, stall=True, rate=0):
        self.target = target
        self.port = port
        self.key = key
        self.wrong_key = wrong_key
        self.src = src
        self.src_b = socket.inet_aton(src)
        self.running = running            # a running domain: OFF of it must never happen
        self.off_domain = off_domain      # an off domain: OFF of it changes nothing
        self.rng = random.Random(seed)
        self.classes = classes
        self.peer_every = peer_every
        self.stall = stall
        self.rate = rate                  # packets per second, 0 = as fast as we can
        self.sent = dict.fromkeys(ALL_CLASSES, 0)
        self.outcome = {}                 # class -> {what happened: count}
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((src, 0))
        self.lsock.listen(64)
        self.lport = self.lsock.getsockname()[1]
        self.stalled = []
        self.send_errors = 0

    # -- helpers
    def note(self, cls, what):
        d = self.outcome.setdefault(cls, {})
        d[what] = d.get(what, 0) + 1

    def seqno(self):
        return self.rng.getrandbits(32)

    def valid(self, request=fv.Request.STATUS, domain=None, port=None, rnd=None):
        dom = (self.running if domain is None else domain).encode()
        return sign(raw_request(request, dom, self.src_b, self.lport if port is None else port,
                                self.seqno(), rnd=rnd), self.key)

    def send(self, cls, data):
        try:
            self.udp.sendto(data, (self.target, self.port))
        except OSError:
            self.send_errors += 1         # ENOBUFS under load: the packet never left
            return
        self.sent[cls] += 1

    def drain_accepts(self):
        """The sink port is in packets that must never be served: any connect-back to it
        is counted (and closed unanswered)."""
        while True:
            r, _, _ = select.select([self.lsock], [], [], 0)
            if not r:
                return
            conn, _ = self.lsock.accept()
            conn.close()
            self.note("sink", "CONNECT-BACK FOR A PACKET THAT MUST NOT BE SERVED")

    def recv_n(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    # -- packet-only mutations (never served)
    def m_garbage(self):
        return os.urandom(self.rng.choice((176, 176, 177, 300, 1000)))

    def m_truncate(self):
        return self.valid()[:self.rng.randrange(0, 176)]

    def m_extend(self):
        # a valid OFF signed with the wrong key, extended (C cuts at 176 and accepts)
        base = sign(raw_request(fv.Request.OFF, self.running.encode(), self.src_b, self.lport,
                                self.seqno()), self.wrong_key)
        return base + os.urandom(self.rng.choice((1, 8, 200, 3000, 8000)))

    def m_bitflip(self):
        pkt = bytearray(self.valid(fv.Request.OFF))
        # distinct bits: flipping one bit twice would give back the valid packet
        for bit in self.rng.sample(range(176 * 8), self.rng.randint(1, 3)):
            pkt[bit // 8] ^= 1 << (bit % 8)
        return bytes(pkt)

    def m_hashtype(self):
        pkt = bytearray(self.valid(fv.Request.OFF))
        b = self.rng.randrange(256)
        if b == 2:
            b = 3                          # 2 would be the valid packet itself
        pkt[1] = b
        return bytes(pkt)

    def m_weakhash(self):
        ht = self.rng.choice((fv.Hash.NONE, fv.Hash.SHA1))
        return sign(raw_request(fv.Request.OFF, self.running.encode(), self.src_b, self.lport,
                                self.seqno()), self.key, ht)

    def m_wrongkey(self):
        return sign(raw_request(fv.Request.OFF, self.running.encode(), self.src_b, self.lport,
                                self.seqno()), self.wrong_key)

    def m_family(self):
        # signed with the right key: only the family is wrong (unknown, or v6 with v4 bytes)
        fam = self.rng.choice((0, 1, 3, 10, 17, 0xFFFFFFFF, self.rng.getrandbits(32)))
        if fam == 2:
            fam = 0
        return sign(raw_request(fv.Request.OFF, self.running.encode(), self.src_b, CLOSED_PORT,
                                self.seqno(), family=fam), self.key)

    def m_addrlen(self):
        # addrlen is ignored by both daemons; the connect-back goes to a closed port
        return sign(raw_request(fv.Request.STATUS, self.running.encode(), self.src_b,
                                CLOSED_PORT, self.seqno(), addrlen=self.rng.randrange(256)),
                    self.key)

    def m_srcmismatch(self):
        # a third party as call-back address: the daemon must not connect there (ours)
        other = self.rng.choice(("198.18.0.1", "198.18.0.12", "127.0.0.1", "198.18.0.99",
                                 "0.0.0.0", "255.255.255.255"))
        return sign(raw_request(fv.Request.OFF, self.running.encode(), socket.inet_aton(other),
                                CLOSED_PORT, self.seqno()), self.key)

    def m_port(self):
        return sign(raw_request(fv.Request.OFF, self.running.encode(), self.src_b,
                                self.rng.choice((0, 0, CLOSED_PORT, 65535)), self.seqno()),
                    self.key)

    # -- signed and served by a correct peer: weird domains and request codes
    def exchange(self, build, cls, behave="good", keep=None):
        """Send build(port), accept the connect-back, act as `behave`; the result byte.

        Every exchange listens on a fresh port, so a late connect-back for an earlier
        packet (the daemon may lag behind a flood) can never be taken for this one.
        `keep` (a list) receives the listener and packet instead of closing it.
        """
        self.drain_accepts()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind((self.src, 0))
        ls.listen(8)
        pkt = build(ls.getsockname()[1])
        if keep is not None:
            keep.extend((ls, pkt))
        conn = None
        try:
            for _ in range(3):          # a real client retransmits a lost datagram too
                self.send(cls, pkt)
                r, _, _ = select.select([ls], [], [], 1.0)
                if r:
                    conn, _ = ls.accept()
                    conn.settimeout(3.0)
                    break
        finally:
            if keep is None:
                ls.close()
        if conn is None:
            self.note(cls, "no connect-back")
            return None
        try:
            if behave == "good":
                c1 = os.urandom(64)
                conn.sendall(c1)
                r1 = self.recv_n(conn, 64)
                if not fv.check_response(fv.Hash.SHA256, self.key, c1, r1):
                    self.note(cls, "daemon failed our challenge")
                    return None
                c2 = self.recv_n(conn, 64)
                conn.sendall(fv.challenge_response(fv.Hash.SHA256, self.key, c2))
                first = self.recv_n(conn, 1)
                if not first:
                    self.note(cls, "closed without result")
                    return None
                return first[0]
            return self.misbehave(conn, behave, cls)
        except OSError as e:
            self.note(cls, "socket error %s" % type(e).__name__)
            return None
        finally:
            if conn not in self.stalled:
                conn.close()

    def misbehave(self, conn, behave, cls):
        if behave == "peer-garbage":
            conn.sendall(os.urandom(self.rng.randrange(1, 64)))
            conn.shutdown(socket.SHUT_WR)
        elif behave == "peer-badresp":
            conn.sendall(os.urandom(64))
            self.recv_n(conn, 128)                    # R1 + C2
            conn.sendall(os.urandom(64))              # wrong response to C2
        elif behave == "peer-stall":
            self.stalled.append(conn)                 # say nothing, keep it open
            while len(self.stalled) > MAX_STALLED:
                self.stalled.pop(0).close()
            return None
        elif behave == "peer-halfclose":
            conn.sendall(os.urandom(64))
            self.recv_n(conn, 128)
            conn.shutdown(socket.SHUT_WR)
        elif behave == "peer-reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif behave == "peer-flood":
            try:
                conn.sendall(os.urandom(1 << 16))
            except OSError:
                pass
        # Read to EOF: after our C1 the daemon may send R1 + C2 (128 bytes), never more.
        got = 0
        conn.settimeout(2.0)
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass
        if behave in ("peer-garbage", "peer-reset"):
            got += 128                    # the daemon never got a full C1: nothing is due
        if got > 128 or (behave in ("peer-badresp", "peer-halfclose") and got > 0):
            self.note(cls, "RESULT SENT TO A PEER THAT FAILED AUTH (%d extra bytes)" % got)
        else:
            self.note(cls, "no result")
        return None

    def served(self, cls):
        if cls == "domain":
            choice = self.rng.randrange(6)
            if choice == 0:
                dom = b"A" * 64                                        # no NUL at all
            elif choice == 1:
                dom = os.urandom(64)
            elif choice == 2:
                dom = b"-" + os.urandom(self.rng.randrange(1, 60))    # option-like
            elif choice == 3:
                dom = ("\u00e9" * 40).encode()[:64]                   # cut inside UTF-8
            elif choice == 4:
                dom = b"x\0" + self.running.encode()                  # NUL before a name
            else:
                dom = b"../../" + os.urandom(20) + b"\n\r%s"
            # never an existing name after NUL-cutting: then it is an unknown domain
            if dom.split(b"\0", 1)[0] in (self.running.encode(), self.off_domain.encode()):
                dom = b"zz" + dom
            req = self.rng.choice((fv.Request.STATUS, fv.Request.OFF, fv.Request.REBOOT,
                                   fv.Request.ON))
            seq = self.seqno()
            res = self.exchange(lambda port: sign(raw_request(req, dom, self.src_b, port, seq),
                                                  self.key), cls)
            want = {fv.Request.STATUS: 2}.get(req, 1)
            if res is not None:
                self.note(cls, "result %s (%s)" % (res, "expected" if res == want
                                               else "UNEXPECTED, want %d" % want))
        else:
            code = self.rng.choice((0, 5, 6, 7, 8, 9, 99, 255, self.rng.randrange(256)))
            if code in (1, 2, 3):
                code = 0
            seq = self.seqno()
            res = self.exchange(lambda port: sign(raw_request(code, b"", self.src_b, port, seq),
                                                  self.key), cls)
            if code == 6:
                want = 253
            elif code == 5:
                want = 0
            else:
                want = 1
            if res is not None:
                self.note(cls, "result %s (%s)" % (res, "expected" if res == want
                                               else "UNEXPECTED, want %d" % want))

    def peer(self, cls):
        if cls == "peer-refused":
            pkt = self.valid(fv.Request.OFF, port=CLOSED_PORT)
            self.send(cls, pkt)
            self.note(cls, "sent")
            return
        if cls == "peer-stall" and not self.stall:
            return
        self.exchange(lambda port: self.valid(fv.Request.OFF, port=port), cls, behave=cls)

    def replay(self, cls):
        """Serve one OFF of the off domain (no state change), then replay it."""
        rnd = os.urandom(6)
        seq = self.seqno()
        kept = []
        first = self.exchange(lambda port: sign(raw_request(
            fv.Request.OFF, self.off_domain.encode(), self.src_b, port, seq, rnd=rnd),
            self.key), cls, keep=kept)
        ls, pkt = kept
        try:
            if first != 0:
                self.note(cls, "original not served (result %s)" % first)
                return
            if cls == "replay":
                again = pkt                               # the exact captured bytes
            else:                                         # same seqno, new random
                again = sign(raw_request(fv.Request.OFF, self.off_domain.encode(), self.src_b,
                                         ls.getsockname()[1], seq), self.key)
            for _ in range(3):
                self.send(cls, again)
            # A marker exchange: the daemon reads packets in order, so once the marker is
            # answered the replays were handled; any connect-back for them is here by now.
            self.exchange(lambda port: self.valid(fv.Request.STATUS, port=port), cls)
            r, _, _ = select.select([ls], [], [], 0.3)
            if r:
                ls.accept()[0].close()
                self.note(cls, "REPLAY SERVED")
            else:
                self.note(cls, "replay refused")
        finally:
            ls.close()

    def run(self, packets, deadline_s):
        start = time.monotonic()
        end = start + deadline_s
        pkt_classes = [c for c in PACKET_CLASSES if c in self.classes]
        slow = [c for c in SERVED_CLASSES + PEER_CLASSES + REPLAY_CLASSES if c in self.classes]
        gens = {c: getattr(self, "m_" + c) for c in pkt_classes}
        n = 0
        slow_i = 0
        # every slow class at least once, first, then interleaved every peer_every packets
        for c in slow:
            self.one_slow(c)
            n += 1
        while n < packets and time.monotonic() < end:
            if slow and n % self.peer_every == 0:
                self.one_slow(slow[slow_i % len(slow)])
                slow_i += 1
            elif pkt_classes:
                c = pkt_classes[n % len(pkt_classes)]
                self.send(c, gens[c]())
            n += 1
            if self.rate and n % 100 == 0:
                ahead = n / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if n % 2000 == 0:
                self.drain_accepts()
        for s in self.stalled:
            s.close()
        self.drain_accepts()
        return {"sent": self.sent, "outcome": self.outcome, "send_errors": self.send_errors,
                "total": sum(self.sent.values())}

    def one_slow(self, c):
        if c in SERVED_CLASSES:
            self.served(c)
        elif c in PEER_CLASSES:
            self.peer(c)
        else:
            self.replay(c)


def worker_main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="run.py worker")
    p.add_argument("--target", required=True)
    p.add_argument("--port", type=int, default=1229)
    p.add_argument("--key", required=True)
    p.add_argument("--wrong-key", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--running", required=True)
    p.add_argument("--off-domain", required=True)
    p.add_argument("--packets", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--classes", default=",".join(ALL_CLASSES))
    p.add_argument("--peer-every", type=int, default=PEER_EVERY)
    p.add_argument("--no-stall", action="store_true")
    p.add_argument("--rate", type=float, default=0)
    a = p.parse_args(argv)
    key = Path(a.key).read_bytes()[:fv.MAX_KEY_LEN]
    wrong = Path(a.wrong_key).read_bytes()[:fv.MAX_KEY_LEN]
    w = Worker(a.target, a.port, key, wrong, a.src, a.running, a.off_domain, a.seed,
               a.classes.split(","), a.peer_every, stall=not a.no_stall, rate=a.rate)
    t0 = time.monotonic()
    out = w.run(a.packets, a.seconds)
    out["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------
# orchestrator

SIM_DOMAINS = (("fz-run", "f0f0f0f0-0000-4000-8000-000000000001", "on"),
               ("fz-run2", "f0f0f0f0-0000-4000-8000-000000000002", "on"),
               ("fz-off", "f0f0f0f0-0000-4000-8000-000000000003", "off"))


def sim_conf(key_file, interface="br0", extra_virtd="", sim_extra=""):
    doms = "".join('\t\tdomain = "%s %s %s";\n' % d for d in SIM_DOMAINS)
    return ('fence_virtd {\n\tlistener = "multicast";\n\tbackend = "sim";\n%s}\n'
            'listeners {\n\tmulticast {\n\t\tkey_file = "%s";\n\t\tinterface = "%s";\n'
            '\t\tfamily = "ipv4";\n\t\tport = "1229";\n\t}\n}\n'
            'backends {\n\tsim {\n%s%s\t}\n}\n' % (extra_virtd, key_file, interface, doms,
                                                   sim_extra))


def node_domains():
    import lab
    return tuple(lab.Domain(n, u, s == "on") for n, u, s in SIM_DOMAINS)


def c_status(ns, key, domain, timeout=5):
    import lab
    return lab.c_client(ns, ["-o", "status", "-H", domain, "-k", key, "-t", str(timeout)],
                        timeout=timeout + 10)


def c_list(ns, key):
    import lab
    res = lab.c_client(ns, ["-o", "list", "-k", key, "-t", "5"], timeout=20)
    return res.rc, lab.norm_list(res)


def fuzz_session(the_lab, kind, workdir, packets, seconds=600, seed=1, classes=ALL_CLASSES,
                 peer_every=PEER_EVERY, checks=3, python="/usr/bin/python3", stall=True,
                 progress=None, rate=0):
    """Run one fuzz session against `kind` ('ours' or 'c'); return a summary dict.

    The daemon runs in the_lab.host; the worker in guest 1; the legitimate
    client (C fence_xvm) in guest 2.  ours uses the sim backend, C the libvirt
    test driver with the same domains.
    """
    import subprocess
    import lab
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = lab.make_key(workdir / "fence_xvm.key")
    wrong = lab.make_key(workdir / "wrong.key")
    if kind == "ours":
        d = lab.start_our_daemon(the_lab.host, sim_conf(key), workdir, python=python)
    else:
        uri = lab.write_node_xml(workdir / "node.xml", node_domains())
        d = lab.start_c_daemon(the_lab.host, lab.mcast_conf(key, uri), workdir, debug=1)
    legit_ns = the_lab.guests[1]
    summary = {"kind": kind, "daemon_alive": True}
    udp0 = udp_counters(the_lab.host)
    try:
        rc, before = c_list(legit_ns, key)
        summary["list_before"] = (rc, before)
        worker = subprocess.Popen(
            lab.ns_argv(the_lab.guests[0], [
                python, str(HERE / "run.py"), "worker", "--target", the_lab.host_ip,
                "--key", key, "--wrong-key", wrong, "--src", the_lab.guest_ips[0],
                "--running", SIM_DOMAINS[0][0], "--off-domain", SIM_DOMAINS[2][0],
                "--packets", packets, "--seconds", seconds, "--seed", seed,
                "--classes", ",".join(classes), "--peer-every", peer_every]
                + ([] if stall else ["--no-stall"]) + ["--rate", rate]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lat = []
        fails = []
        t0 = time.monotonic()
        while worker.poll() is None or len(lat) < checks:
            # a legitimate status from the other guest while the fuzz runs
            r = c_status(legit_ns, key, SIM_DOMAINS[1][0], timeout=10)
            lat.append(r.elapsed)
            if r.rc != 0:
                fails.append(repr(r))
            if progress:
                progress("legit status rc=%s %.3f s (fuzz running %.0f s)"
                         % (r.rc, r.elapsed, time.monotonic() - t0))
            if worker.poll() is not None and len(lat) >= checks:
                break
            time.sleep(0.2 if worker.poll() is None else 0)
        out, err = worker.communicate(timeout=seconds + 120)
        if worker.returncode != 0:
            raise AssertionError("fuzz worker failed (%s):\n%s" % (worker.returncode,
                                                                    err.decode()))
        summary["worker"] = json.loads(out.decode().strip().splitlines()[-1])
        summary["legit_latency"] = lat
        summary["legit_failures"] = fails
        d.assert_alive()
        rc, after = c_list(legit_ns, key)
        summary["list_after"] = (rc, after)
        udp1 = udp_counters(the_lab.host)
        summary["udp"] = {k: udp1.get(k, 0) - udp0.get(k, 0)
                          for k in ("InDatagrams", "RcvbufErrors", "InErrors")}
    except BaseException:
        summary["daemon_alive"] = d.alive()
        raise
    finally:
        d.stop()
        summary["log"] = d.log()
    summary["exit_code"] = d.exit_code
    return summary


def udp_counters(ns):
    """The Udp: line of /proc/net/snmp in netns ns, as a dict."""
    import lab
    lines = [ln.split() for ln in lab.run(ns, ["cat", "/proc/net/snmp"], timeout=10)
             .stdout.splitlines() if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


DROP_CLASSES = ("malformed", "key mismatch", "hash too weak", "source mismatch",
                "duplicate", "auth failed", "auth mismatch", "connect-back failed", "busy")


def log_classes(text):
    """Counts of our daemon's drop classes in its log (lines and suppression summaries)."""
    import re
    counts = dict.fromkeys(DROP_CLASSES, 0)
    for line in text.splitlines():
        m = re.search(r"drop from \S+: ([a-z -]+?):", line)
        if m and m.group(1) in counts:
            counts[m.group(1)] += 1
        m = re.search(r"suppressed (\d+) more '([a-z -]+)' drops", line)
        if m and m.group(2) in counts:
            counts[m.group(2)] += int(m.group(1))
    return counts
