"""History: the C (request, seqno, domain) window and our exact-packet replay store."""

import os
import socket

import fencevirt as fv

KEY = b"k" * 32


def packet(seqno=7, domain="vm-1", rnd=None):
    req = fv.make_request(fv.Request.OFF, domain, address=socket.inet_aton("10.0.0.5"),
                          family=socket.AF_INET, port=1229, seqno=seqno,
                          random=rnd or os.urandom(6))
    pkt = fv.sign_request(fv.pack_request(req), fv.Hash.SHA256, KEY)
    return fv.unpack_request(pkt), pkt


def serve(h, req, pkt, now):
    assert h.begin(req, pkt, now) is None
    h.end(req, pkt, True, now)


def test_exact_replay_is_refused_long_after_the_c_window():
    h = fv.History()
    req, pkt = packet()
    serve(h, req, pkt, 1000.0)
    for later in (1.0, 11.0, 300.0, fv.REPLAY_SECONDS - 1):
        assert "replay" in h.begin(req, pkt, 1000.0 + later)
    # past the replay window the bytes are forgotten (auth still needs the key)
    assert h.begin(req, pkt, 1000.0 + fv.REPLAY_SECONDS + 1) is None


def test_retransmission_same_seqno_is_a_duplicate_for_10_s_only():
    h = fv.History()
    req, pkt = packet()
    serve(h, req, pkt, 0.0)
    req2, pkt2 = packet()                       # same seqno/domain, new random bytes
    assert "duplicate" in h.begin(req2, pkt2, 9.0)
    assert h.begin(req2, pkt2, fv.HISTORY_SECONDS + 1) is None     # C compat


def test_in_flight_duplicate_and_unserved_packets():
    h = fv.History()
    req, pkt = packet()
    assert h.begin(req, pkt, 0.0) is None
    req2, pkt2 = packet()
    assert "being served" in h.begin(req2, pkt2, 0.1)
    h.end(req, pkt, False, 0.2)                 # auth failed: nothing is recorded
    assert h.begin(req, pkt, 0.3) is None


def test_replay_store_is_bounded():
    h = fv.History()
    first_req, first_pkt = packet(seqno=0)
    serve(h, first_req, first_pkt, 0.0)
    for i in range(1, fv.REPLAY_MAX + 5):
        req, pkt = packet(seqno=i, rnd=i.to_bytes(6, "little"))
        h.end(req, pkt, True, 1.0)
    h.begin(*packet(seqno=10 ** 9), 20.0)
    assert len(h.packets) <= fv.REPLAY_MAX
