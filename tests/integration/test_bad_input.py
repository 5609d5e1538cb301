"""Bad input to our daemon: each packet is dropped and logged, nothing is done, and the
daemon goes on serving legitimate requests.

The attacker is a small script run inside the lab's namespace; it uses fencevirt's own
pack/sign functions to build valid packets and then spoils them one way each.
"""

import json
import sys
import textwrap

import pytest

from lab import FENCEVIRT, our_client, require, start_our_daemon

SIM = """fence_virtd {
	listener = "multicast";
	backend = "sim";
}
listeners {
	multicast {
		key_file = "%(key)s";
		interface = "lo";
		port = "%(port)d";
	}
}
backends {
	sim {
		domain = "vm-a 0a0a0a0a-0000-4000-8000-00000000000a on";
		domain = "vm-b 0b0b0b0b-0000-4000-8000-00000000000b on";
	}
}
"""
PORT = 1231
CB_PORT = 1241

ATTACK = textwrap.dedent(r"""
    import json, os, select, socket, struct, sys, time
    sys.path.insert(0, sys.argv[1])
    import fencevirt as fv
    key = open(sys.argv[2], "rb").read()
    port, cb_port, case = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    lo = fv.LocalAddr("lo", socket.if_nametoindex("lo"), "127.0.0.1")

    def packet(request=fv.Request.OFF, domain="vm-a", hashtype=fv.Hash.SHA256, k=key):
        req = fv.make_request(request, domain, address=socket.inet_aton("127.0.0.1"),
                              family=socket.AF_INET, port=cb_port, seqno=4242,
                              random=os.urandom(6))
        return fv.sign_request(fv.pack_request(req), hashtype, k)

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", cb_port))
    lsock.listen(5)

    def send(data):
        fv.send_multicast(data, lo, socket.AF_INET, "225.0.0.12", port)

    def connect_back(wait):
        r, _, _ = select.select([lsock], [], [], wait)
        if not r:
            return None
        conn, _ = lsock.accept()
        cc = fv.ClientConfig(key, fv.Hash.SHA256, fv.Hash.SHA256, 5.0)
        with conn:
            return fv.client_exchange(conn, cc, "daemon", fv.Deadline(5))

    out = {}
    if case == "replay":
        good = packet()
        send(good)
        out["first"] = connect_back(5)
        time.sleep(float(sys.argv[6]))      # the test turns vm-a on again meanwhile
        send(good)
        out["replay"] = connect_back(2)
    else:
        good = packet()
        bad = {
            "truncated": good[:100],
            "oversized-garbage": os.urandom(300),
            "garbage": os.urandom(176),
            "wrong-key": packet(k=b"not the key" * 4),
            "bad-hash-type": good[:1] + bytes([7]) + good[2:],
            "weak-hash": packet(hashtype=fv.Hash.SHA1),
            "corrupt-tail": good[:-1] + b"\x01",
        }[case]
        send(bad)
        out["reply"] = connect_back(1.5)
    print(json.dumps(out))
""")


@pytest.fixture
def sim_daemon(loopback_lab, keyfile, tmp_path):
    require("root", "netns")
    d = start_our_daemon(loopback_lab.host, SIM % {"key": keyfile, "port": PORT}, tmp_path)
    yield d
    d.stop()


def attack(lab_, keyfile, case, *extra, timeout=30):
    res = lab_.run(lab_.host, [sys.executable, "-c", ATTACK, str(FENCEVIRT.parent), keyfile,
                               str(PORT), str(CB_PORT), case] + [str(e) for e in extra],
                   timeout=timeout)
    assert res.rc == 0, res
    return json.loads(res.stdout.strip().splitlines()[-1])


def status(lab_, keyfile, dom):
    return our_client(lab_.host, ["-o", "status", "-H", dom, "-k", keyfile, "-I", "lo",
                                  "-p", str(PORT), "-t", "5"])


@pytest.mark.parametrize("case,reason", [
    ("truncated", "malformed: short packet"),
    ("oversized-garbage", "key mismatch"),
    ("garbage", "drop from 127.0.0.1: "),
    ("wrong-key", "key mismatch"),
    ("bad-hash-type", "unknown hash type 7"),
    ("weak-hash", "hash too weak"),
    ("corrupt-tail", "key mismatch"),
])
def test_bad_packet_is_dropped_logged_and_harmless(loopback_lab, keyfile, sim_daemon, case,
                                                   reason):
    out = attack(loopback_lab, keyfile, case)
    assert out["reply"] is None, f"the daemon answered a {case} packet: {out}"
    log = sim_daemon.log()
    assert reason in log, log
    assert "audit:" not in log, f"a {case} packet was acted on:\n{log}"
    res = status(loopback_lab, keyfile, "vm-a")
    assert (res.rc, res.stdout.strip()) == (0, "Status: ON"), res
    sim_daemon.assert_alive()


def test_replayed_packet_is_refused(loopback_lab, keyfile, sim_daemon):
    import threading
    turned_on = {}

    def turn_on_again():
        import time
        time.sleep(1.0)
        turned_on["res"] = our_client(loopback_lab.host, [
            "-o", "on", "-H", "vm-a", "-k", keyfile, "-I", "lo", "-p", str(PORT), "-t", "5"])

    t = threading.Thread(target=turn_on_again)
    t.start()
    out = attack(loopback_lab, keyfile, "replay", 3.0)
    t.join()
    assert out["first"] == 0, out                 # the original off was served
    assert turned_on["res"].rc == 0, turned_on["res"]
    assert out["replay"] is None, out             # the replay got no connect-back
    log = sim_daemon.log()
    assert "duplicate" in log or "replay" in log, log
    res = status(loopback_lab, keyfile, "vm-a")
    assert (res.rc, res.stdout.strip()) == (0, "Status: ON"), (res, log)
    assert log.count("op=off") == 1, log
