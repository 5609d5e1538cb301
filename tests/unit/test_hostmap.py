"""host-map matching, the diagnosis wire extras (note, hint, key tag) and the BPF filter."""

import socket
import struct
import subprocess
import sys

import pytest

import fencevirt as fv

H = fv.HostInfo
DOMS = [H("node1", "11111111-1111-4111-8111-111111111111", 1),
        H("Node2", "22222222-2222-4222-8222-222222222222", 1),
        H("node3.lab.example", "33333333-3333-4333-8333-333333333333", 5),
        H("node5.invalid", "44444444-4444-4444-8444-444444444444", 1)]


@pytest.mark.parametrize("nodes, pairs", [
    (["node1"], [("node1", "node1")]),                                  # exact
    (["node2"], [("node2", "Node2")]),                                  # case
    (["NODE1.lab.example"], [("NODE1.lab.example", "node1")]),          # FQDN node, short domain
    (["node3"], [("node3", "node3.lab.example")]),                      # short node, FQDN domain
    (["node5"], [("node5", "44444444-4444-4444-8444-444444444444")]),   # mangled name -> UUID
])
def test_matches(nodes, pairs):
    got, warnings = fv.build_host_map(nodes, DOMS)
    assert got == pairs and warnings == []


def test_unmatched_and_ambiguous_warn():
    got, warnings = fv.build_host_map(["node9", "x"], DOMS + [H("x.a", "u1", 1), H("x.b", "u2", 1)])
    assert got == []
    assert any("'node9' matches no domain" in w for w in warnings)
    assert any("'x' matches 2 domains by short name" in w for w in warnings)


def test_a_domain_is_used_once():
    got, warnings = fv.build_host_map(["node1", "NODE1"], DOMS)
    assert got == [("node1", "node1")] and "'NODE1' matches no domain" in warnings[0]


def test_cli_prints_map_and_fails_on_unmatched():
    run = [sys.executable, fv.__file__, "host-map", "--domains", "node1,Node2"]
    ok = subprocess.run(run + ["--nodes", "node1,node2"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout) == (0, 'pcmk_host_map="node1:node1;node2:Node2"\n')
    bad = subprocess.run(run + ["--nodes", "node1,nodeX"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == 'pcmk_host_map="node1:node1"\n'
    assert "'nodeX' matches no domain" in bad.stderr


def test_note_round_trip_and_c_daemon_silence():
    assert fv.unpack_note(fv.pack_note("unknown domain 'x'")) == "unknown domain 'x'"
    assert fv.pack_note("") == b"" and fv.unpack_note(b"") == "" and fv.unpack_note(b"junk") == ""
    assert len(fv.pack_note("y" * 5000)) == len(fv.NOTE_MAGIC) + 2 + fv.MAX_NOTE_LEN


def test_hint_never_longer_than_a_request():
    h = fv.pack_hint("key mismatch", "z" * 500)
    assert len(h) <= fv.REQ_SIZE and fv.unpack_hint(h)[0] == "key mismatch"
    assert fv.unpack_hint(b"\0" * 176) is None


def test_key_tag_names_the_signer_and_keeps_the_address():
    key = b"k" * 32
    addr = socket.inet_aton("198.18.0.11").ljust(28, b"\0")
    req = fv.make_request(fv.Request.STATUS, "pcmk-1", address=socket.inet_aton("198.18.0.11"),
                          family=socket.AF_INET, port=1229)
    req = req._replace(address=fv.tag_key(req.address, key))
    pkt = fv.sign_request(fv.pack_request(req), fv.Hash.SHA256, key)
    assert fv.request_key_tag(pkt) == fv.key_fingerprint(key)
    assert fv.request_address(fv.verify_request(pkt, key, fv.Hash.SHA256)) == "198.18.0.11"
    assert fv.tag_key(addr, b"") == addr
    with pytest.raises(fv.AuthError):
        fv.verify_request(pkt, b"other", fv.Hash.SHA256)
    reason, detail = fv.auth_drop_reason(fv.AuthError("key mismatch: x"), pkt)
    assert reason == "key mismatch" and fv.key_fingerprint(key) in detail


def test_bpf_filter_jumps_stay_inside_the_program():
    for proto, syn in (("tcp", True), ("udp", False)):
        prog = fv.bpf_port_filter(proto, 1229, syn)
        n = len(prog) // 8
        for pc in range(n):
            code, jt, jf, k = struct.unpack_from("HBBI", prog, pc * 8)
            if code == 0x05:
                assert pc + 1 + k < n
            elif code & 0x07 == 0x05:
                assert pc + 1 + jt < n and pc + 1 + jf < n
        assert struct.unpack_from("HBBI", prog, (n - 1) * 8) == (0x06, 0, 0, 0)


def test_no_answer_message_orders_causes():
    cc = fv.ClientConfig(b"k" * 32, fv.Hash.SHA1, fv.Hash.SHA256, 2.0)
    addrs = [fv.LocalAddr("eth0", 2, "198.18.0.11")]
    msg = fv.no_answer_message(cc, 1229, "225.0.0.12", 1, addrs, {}, {}, [])
    assert msg.startswith("timed out after 2 s: no connect-back")
    assert msg.index("stronger packet hash") < msg.index("not running")
    fw = fv.no_answer_message(cc, 1229, "225.0.0.12", 1, addrs, {}, {("198.18.0.1", "eth0"): 2},
                              [])
    assert "connect-back blocked" in fw and "firewall on this guest" in fw
