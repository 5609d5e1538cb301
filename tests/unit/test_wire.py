"""Wire format against known answers captured from the C fence-virt 4.12.1 binaries.

The vectors live in tests/data/packets/*.json (see the README there); they were made by
tests/tools/capture_vectors.py. Layouts: protocol.md §2 (fence_req_t), §4.4 (host_state_t),
§6.1 (serial_req_t / serial_resp_t).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fencevirt  # noqa: E402

from vectors import load_vectors  # noqa: E402

CASES = load_vectors()
REQUEST_CASES = sorted(k for k, v in CASES.items() if "decoded" in v)
SERIAL_CASES = sorted(k for k, v in CASES.items() if "decoded_serial" in v)
C_LIST_CASES = sorted(k for k, v in CASES.items()
                      if k.startswith("virtd_") and "hostlist_stream_hex" in v)


def _packet(case):
    return bytes.fromhex(CASES[case]["request_hex"])


def test_vectors_present():
    assert len(REQUEST_CASES) >= 30
    assert len(SERIAL_CASES) >= 2
    assert len(C_LIST_CASES) >= 3


def test_enum_values():
    R = fencevirt.Request
    assert [R.NULL, R.OFF, R.REBOOT, R.ON, R.STATUS, R.DEVSTATUS, R.HOSTLIST, R.METADATA,
            R.VALIDATEALL] == list(range(9))
    H = fencevirt.Hash
    assert [H.NONE, H.SHA1, H.SHA256, H.SHA512] == [0, 1, 2, 3]
    S = fencevirt.Response
    assert (S.SUCCESS, S.FAIL, S.OFF, S.DENIED, S.HOSTLIST) == (0, 1, 2, 3, 253)


# ---- fence_req_t -------------------------------------------------------------------

@pytest.mark.parametrize("case", REQUEST_CASES)
def test_unpack_matches_decoded(case):
    want = CASES[case]["decoded"]
    req = fencevirt.unpack_request(_packet(case))
    assert req._fields == ("request", "hashtype", "addrlen", "flags", "domain", "address",
                           "port", "random", "seqno", "family", "hash")
    for name in ("request", "hashtype", "addrlen", "flags", "port", "seqno", "family"):
        assert getattr(req, name) == want[name], name
    assert req.domain == want["domain"]
    assert isinstance(req.domain, str)
    for name in ("address", "random", "hash"):
        assert bytes(getattr(req, name)) == bytes.fromhex(want[name]), name
    assert len(req.address) == 28 and len(req.random) == 6 and len(req.hash) == 64


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_pack_unpack_roundtrip(case):
    pkt = _packet(case)
    assert len(pkt) == 176
    assert fencevirt.pack_request(fencevirt.unpack_request(pkt)) == pkt


@pytest.mark.parametrize("case", ["xvm_status_sha256", "virtd_tcp_list"])
def test_unpack_longer_packet_is_cut_to_176(case):
    pkt = _packet(case)
    assert fencevirt.unpack_request(pkt + b"\xff" * 24) == fencevirt.unpack_request(pkt)


@pytest.mark.parametrize("size", [0, 1, 112, 175])
def test_unpack_short_packet_raises(size):
    with pytest.raises(fencevirt.ProtocolError):
        fencevirt.unpack_request(_packet("xvm_status_sha256")[:size])


def test_field_offsets_of_a_c_request():
    """Offsets of protocol.md §2, read straight off the bytes C fence_xvm sent."""
    pkt = _packet("xvm_status_port_4242")
    req = fencevirt.unpack_request(pkt)
    assert pkt[0] == fencevirt.Request.STATUS == req.request
    assert pkt[1] == fencevirt.Hash.SHA256 == req.hashtype
    assert pkt[4:12] == b"wv-alpha" and pkt[12:68] == bytes(56)
    assert pkt[68:72] == bytes([198, 19, 0, 2])
    assert pkt[96:98] == (4242).to_bytes(2, "little") and req.port == 4242
    assert int.from_bytes(pkt[104:108], "little") == req.seqno < 1000000
    assert pkt[108:112] == b"\x02\x00\x00\x00"


def test_uuid_flag_and_ipv6_fields():
    req = fencevirt.unpack_request(_packet("xvm_status_uuid_flag"))
    assert req.flags == 1 and req.domain == "11111111-1111-4111-8111-111111111111"
    req6 = fencevirt.unpack_request(_packet("xvm_status_ipv6"))
    assert (req6.addrlen, req6.family) == (16, 10)
    assert req6.address[:16] == bytes.fromhex("20010db8000000000000000000000002")
    assert req6.address[16:] == bytes(12)


def test_tcp_request_has_no_callback_address():
    req = fencevirt.unpack_request(_packet("virt_tcp_status_sha256"))
    assert (req.addrlen, req.port, req.family, req.flags) == (0, 0, 0, 0)
    assert req.address == bytes(28)


def test_hash_none_request_has_zero_random_and_hash():
    req = fencevirt.unpack_request(_packet("xvm_status_hash_none"))
    assert req.hashtype == fencevirt.Hash.NONE
    assert req.random == bytes(6) and req.hash == bytes(64)


def test_pack_domain_lengths():
    base = fencevirt.unpack_request(_packet("xvm_status_sha256"))
    pkt = fencevirt.pack_request(base._replace(domain="d" * 63))
    assert len(pkt) == 176 and pkt[4:67] == b"d" * 63 and pkt[67] == 0
    assert fencevirt.unpack_request(pkt).domain == "d" * 63
    with pytest.raises(fencevirt.ProtocolError):
        fencevirt.pack_request(base._replace(domain="d" * 64))
    with pytest.raises(fencevirt.ProtocolError):
        fencevirt.pack_request(base._replace(domain="é" * 32))     # 64 bytes in UTF-8


def test_pack_is_little_endian():
    base = fencevirt.unpack_request(_packet("xvm_status_sha256"))
    pkt = fencevirt.pack_request(base._replace(port=0x0102, seqno=0x03040506, family=10))
    assert pkt[96:98] == b"\x02\x01"
    assert pkt[104:108] == b"\x06\x05\x04\x03"
    assert pkt[108:112] == b"\x0a\x00\x00\x00"


def test_protocol_md_walkthrough_layout():
    """protocol.md §2.2, bytes 0..111 rebuilt field by field."""
    base = fencevirt.unpack_request(_packet("xvm_status_sha256"))
    req = base._replace(request=4, hashtype=2, addrlen=4, flags=0, domain="pr-alpha",
                        address=bytes([198, 19, 0, 2]) + bytes(24), port=1229,
                        random=bytes.fromhex("e094e31ee08c"), seqno=875464, family=2,
                        hash=bytes(64))
    pkt = fencevirt.pack_request(req)
    assert pkt[:12].hex() == "0402040070722d616c706861"
    assert pkt[0x44:0x48].hex() == "c6130002"
    assert pkt[0x60:0x70].hex() == "cd04e094e31ee08cc85b0d0002000000"


# ---- host_state_t and the list stream ----------------------------------------------

def _split_stream(stream):
    assert stream[0] == fencevirt.Response.HOSTLIST
    records, off = [], 1
    while True:
        rec = stream[off:off + 130]
        assert len(rec) == 130
        off += 130
        if rec[0] == 0 and rec[64] == 0:
            return records, rec, stream[off:]
        records.append(rec)


@pytest.mark.parametrize("case", sorted(k for k, v in CASES.items() if "hostlist_stream_hex" in v))
def test_hostlist_stream_decodes(case):
    data = CASES[case]
    records, terminator, tail = _split_stream(bytes.fromhex(data["hostlist_stream_hex"]))
    got = [fencevirt.unpack_host_state(r) for r in records]
    want = [(h["name"], h["uuid"], h["state"]) for h in data["hostlist"]]
    assert [tuple(g) for g in got] == want
    assert terminator == bytes(130)
    assert tail == b"\x00"


@pytest.mark.parametrize("case", C_LIST_CASES)
def test_unpack_host_state_ignores_c_garbage(case):
    """C leaves bytes 63, 127 and 129 of each record unwritten (protocol.md §4.4)."""
    records, _, _ = _split_stream(bytes.fromhex(CASES[case]["hostlist_stream_hex"]))
    for rec in records:
        want = fencevirt.unpack_host_state(rec)
        for fill in (0x00, 0xff, 0x41):
            cleaned = bytearray(rec)
            cleaned[63] = cleaned[127] = cleaned[129] = fill
            assert tuple(fencevirt.unpack_host_state(bytes(cleaned))) == tuple(want)


@pytest.mark.parametrize("case", C_LIST_CASES)
def test_pack_host_state_equals_c_record_without_garbage(case):
    data = CASES[case]
    records, _, _ = _split_stream(bytes.fromhex(data["hostlist_stream_hex"]))
    for rec, h in zip(records, data["hostlist"]):
        if len(h["name"]) >= 63:
            continue            # C cut this name; what we do with a long name is our choice
        cleaned = bytearray(rec)
        cleaned[63] = cleaned[127] = cleaned[129] = 0
        assert fencevirt.pack_host_state(h["name"], h["uuid"], h["state"]) == bytes(cleaned)


def test_long_name_record_is_cut_at_63_bytes():
    data = CASES["virtd_list"]
    records, _, _ = _split_stream(bytes.fromhex(data["hostlist_stream_hex"]))
    long_rec = [r for r in records if r[62] != 0]
    assert len(long_rec) == 1
    name, uuid, state = fencevirt.unpack_host_state(long_rec[0])
    assert name == ("wv-long-" + "x" * 60)[:63]
    assert uuid == "44444444-4444-4444-8444-444444444444" and state == 1


def test_pack_host_state_layout():
    rec = fencevirt.pack_host_state("vm1", "11111111-1111-4111-8111-111111111111", 5)
    assert len(rec) == 130
    assert rec[:4] == b"vm1\x00" and rec[4:64] == bytes(60)
    assert rec[64:100] == b"11111111-1111-4111-8111-111111111111" and rec[100:128] == bytes(28)
    assert rec[128] == 5 and rec[129] == 0
    assert tuple(fencevirt.unpack_host_state(rec)) == (
        "vm1", "11111111-1111-4111-8111-111111111111", 5)


# ---- serial_req_t / serial_resp_t --------------------------------------------------

@pytest.mark.parametrize("case", SERIAL_CASES)
def test_serial_request_from_c_fence_virt(case):
    data = CASES[case]
    pkt = bytes.fromhex(data["request_hex"])
    want = data["decoded_serial"]
    assert len(pkt) == 74 and pkt[:4] == b"abba"
    sreq = fencevirt.unpack_serial_request(pkt)
    assert sreq._fields == ("magic", "request", "flags", "domain", "seqno")
    assert (sreq.magic, sreq.request, sreq.flags, sreq.domain, sreq.seqno) == (
        want["magic"], want["request"], want["flags"], want["domain"], want["seqno"])
    assert sreq.magic == 0x61626261
    assert fencevirt.pack_serial_request(want["request"], want["domain"], want["seqno"]) == pkt
    assert fencevirt.pack_serial_request(want["request"], want["domain"], want["seqno"],
                                         flags=0) == pkt


def test_serial_protocol_md_example():
    pkt = fencevirt.pack_serial_request(fencevirt.Request.STATUS, "pr-alpha", 0x01020304)
    assert pkt.hex() == "61626261" "04" "00" "70722d616c706861" + "00" * 56 + "04030201"


def test_serial_short_request_raises():
    with pytest.raises(fencevirt.ProtocolError):
        fencevirt.unpack_serial_request(bytes.fromhex(CASES["virt_serial_status"]
                                                      ["request_hex"])[:73])


def test_serial_response_bytes():
    assert fencevirt.pack_serial_response(0) == b"abba\x00"
    assert fencevirt.pack_serial_response(fencevirt.Response.HOSTLIST) == b"abba\xfd"
    assert fencevirt.pack_serial_response(2) == bytes.fromhex("6162626102")


def test_serial_list_reply_framing():
    """What the fake server sent and C fence_virt accepted (printed three lines, rc 0)."""
    data = CASES["virt_serial_list"]
    reply = bytes.fromhex(data["reply_hex"])
    assert data["client_result"]["rc"] == 0
    assert reply[:5] == fencevirt.pack_serial_response(fencevirt.Response.HOSTLIST)
    want = b"".join(fencevirt.pack_host_state(h["name"], h["uuid"], h["state"])
                    for h in data["hostlist"])
    assert reply[5:5 + len(want)] == want
    assert reply[5 + len(want):] == bytes(130) + fencevirt.pack_serial_response(0)
