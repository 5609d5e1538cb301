"""Packet signatures and challenge/response against bytes captured from C fence-virt 4.12.1.

protocol.md §2.1: hash = H(key || packet[0:112] || 64 zero bytes), zero-filled to 64 bytes,
all 64 compared. §4.2: response = H(key || challenge64), zero-filled to 64. Not HMAC.
"""

import hashlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fencevirt  # noqa: E402

from vectors import load_vectors  # noqa: E402

CASES = load_vectors()
REQUEST_CASES = sorted(k for k, v in CASES.items() if "decoded" in v)
SIGNED_CASES = [k for k in REQUEST_CASES if CASES[k]["decoded"]["hashtype"] != 0]
UNSIGNED_CASES = [k for k in REQUEST_CASES if CASES[k]["decoded"]["hashtype"] == 0]
EXCHANGE_CASES = sorted(k for k, v in CASES.items()
                        if v.get("exchange", {}).get("auth", "none") != "none")
# one C-signed packet per hash type for the (slow-ish) bit-flip sweep
FLIP_CASES = ["xvm_status_hash_sha1", "xvm_status_sha256", "xvm_status_hash_sha512",
              "virt_tcp_status_sha256", "xvm_status_textkey"]

H = fencevirt.Hash
ALGO = {H.SHA1: "sha1", H.SHA256: "sha256", H.SHA512: "sha512"}


def _key(case):
    return bytes.fromhex(CASES[case]["key_hex"])


def _packet(case):
    return bytes.fromhex(CASES[case]["request_hex"])


def test_vectors_present():
    assert len(SIGNED_CASES) >= 25 and len(UNSIGNED_CASES) >= 3
    assert {CASES[k]["decoded"]["hashtype"] for k in SIGNED_CASES} == {1, 2, 3}
    assert {CASES[k]["exchange"]["auth"] for k in EXCHANGE_CASES} == {"sha1", "sha256", "sha512"}


@pytest.mark.parametrize("hashtype,size", [(H.SHA1, 20), (H.SHA256, 32), (H.SHA512, 64)])
def test_keyed_digest_is_plain_hash_of_key_then_data(hashtype, size):
    key, data = b"k" * 32, b"some data"
    d = fencevirt.keyed_digest(hashtype, key, data)
    assert len(d) == size
    assert d == hashlib.new(ALGO[hashtype], key + data).digest()


@pytest.mark.parametrize("case", SIGNED_CASES)
def test_resigning_captured_packet_reproduces_c_hash(case):
    pkt = _packet(case)
    hashtype = H(pkt[1])
    assert fencevirt.sign_request(pkt, hashtype, _key(case)) == pkt
    zeroed = pkt[:112] + bytes(64)
    assert fencevirt.sign_request(zeroed, hashtype, _key(case)) == pkt
    garbage = pkt[:112] + b"\xa5" * 64          # the old hash field is not hashed
    assert fencevirt.sign_request(garbage, hashtype, _key(case)) == pkt


@pytest.mark.parametrize("case", SIGNED_CASES)
def test_signature_formula(case):
    pkt = _packet(case)
    hashtype = H(pkt[1])
    digest = hashlib.new(ALGO[hashtype], _key(case) + pkt[:112] + bytes(64)).digest()
    assert pkt[112:] == digest + bytes(64 - len(digest))
    assert fencevirt.keyed_digest(hashtype, _key(case), pkt[:112] + bytes(64)) == digest


@pytest.mark.parametrize("case", UNSIGNED_CASES)
def test_sign_with_none_leaves_hash_zero(case):
    pkt = _packet(case)
    assert pkt[112:] == bytes(64)
    assert fencevirt.sign_request(pkt, H.NONE, _key(case)) == pkt


def test_text_key_includes_trailing_newline():
    data = CASES["xvm_status_textkey"]
    key = _key("xvm_status_textkey")
    assert key == data["key_text"].encode() and key.endswith(b"\n")
    pkt = _packet("xvm_status_textkey")
    assert fencevirt.sign_request(pkt, H.SHA256, key) == pkt
    assert fencevirt.sign_request(pkt, H.SHA256, key.rstrip(b"\n")) != pkt


@pytest.mark.parametrize("case", SIGNED_CASES)
def test_verify_accepts_up_to_packet_hash(case):
    pkt = _packet(case)
    hashtype = pkt[1]
    want = fencevirt.unpack_request(pkt)
    for min_hash in H:
        if min_hash <= hashtype:
            assert fencevirt.verify_request(pkt, _key(case), min_hash) == want
        else:
            with pytest.raises(fencevirt.AuthError):
                fencevirt.verify_request(pkt, _key(case), min_hash)


@pytest.mark.parametrize("case", UNSIGNED_CASES)
def test_verify_unsigned_only_with_min_none(case):
    pkt = _packet(case)
    assert fencevirt.verify_request(pkt, _key(case), H.NONE) == fencevirt.unpack_request(pkt)
    assert fencevirt.verify_request(pkt, b"", H.NONE) == fencevirt.unpack_request(pkt)
    for min_hash in (H.SHA1, H.SHA256, H.SHA512):
        with pytest.raises(fencevirt.AuthError):
            fencevirt.verify_request(pkt, _key(case), min_hash)


@pytest.mark.parametrize("case", SIGNED_CASES)
def test_verify_rejects_wrong_key(case):
    key = _key(case)
    for other in (key[:-1], key + b"\n", bytes(len(key)), b"x"):
        with pytest.raises(fencevirt.AuthError):
            fencevirt.verify_request(_packet(case), other, H.NONE)


@pytest.mark.parametrize("case", ["xvm_status_sha256", "xvm_status_hash_sha1"])
def test_verify_rejects_signed_packet_without_key(case):
    with pytest.raises(fencevirt.AuthError):
        fencevirt.verify_request(_packet(case), b"", H.NONE)


@pytest.mark.parametrize("bad_type", [4, 5, 99, 255])
def test_verify_rejects_unknown_hash_type(bad_type):
    pkt = bytearray(_packet("xvm_status_hash_sha512"))
    pkt[1] = bad_type
    with pytest.raises(fencevirt.AuthError):
        fencevirt.verify_request(bytes(pkt), _key("xvm_status_hash_sha512"), H.NONE)


def test_verify_rejects_nonzero_fill_after_digest():
    pkt = bytearray(_packet("xvm_status_sha256"))
    pkt[175] = 1                       # inside the 32 zero bytes after the sha256 digest
    with pytest.raises(fencevirt.AuthError):
        fencevirt.verify_request(bytes(pkt), _key("xvm_status_sha256"), H.SHA256)


@pytest.mark.parametrize("case", FLIP_CASES)
def test_every_single_bit_flip_is_rejected(case):
    pkt = _packet(case)
    key = _key(case)
    fencevirt.verify_request(pkt, key, H.SHA1)
    accepted = []
    for i in range(176):
        for bit in range(8):
            bad = bytearray(pkt)
            bad[i] ^= 1 << bit
            try:
                fencevirt.verify_request(bytes(bad), key, H.SHA1)
            except fencevirt.AuthError:
                continue
            accepted.append((i, bit))
    assert accepted == []


# ---- challenge / response ------------------------------------------------------------

@pytest.mark.parametrize("case", EXCHANGE_CASES)
def test_challenge_response_matches_capture(case):
    ex = CASES[case]["exchange"]
    auth = H[ex["auth"].upper()]
    key = _key(case)
    r1 = fencevirt.challenge_response(auth, key, bytes.fromhex(ex["c1_hex"]))
    r2 = fencevirt.challenge_response(auth, key, bytes.fromhex(ex["c2_hex"]))
    assert r1 == bytes.fromhex(ex["r1_hex"])
    assert r2 == bytes.fromhex(ex["r2_hex"])
    assert len(r1) == 64 and len(r2) == 64


@pytest.mark.parametrize("case", EXCHANGE_CASES)
def test_challenge_response_zero_fill(case):
    ex = CASES[case]["exchange"]
    auth = H[ex["auth"].upper()]
    size = {H.SHA1: 20, H.SHA256: 32, H.SHA512: 64}[auth]
    r = fencevirt.challenge_response(auth, _key(case), bytes.fromhex(ex["c1_hex"]))
    assert r[size:] == bytes(64 - size)
    assert r[:size] == fencevirt.keyed_digest(auth, _key(case), bytes.fromhex(ex["c1_hex"]))


def test_challenge_response_depends_on_type_and_key():
    ex = CASES["xvm_status_sha256"]["exchange"]
    c1 = bytes.fromhex(ex["c1_hex"])
    key = _key("xvm_status_sha256")
    r = fencevirt.challenge_response(H.SHA256, key, c1)
    assert fencevirt.challenge_response(H.SHA1, key, c1) != r
    assert fencevirt.challenge_response(H.SHA512, key, c1) != r
    assert fencevirt.challenge_response(H.SHA256, key + b"\n", c1) != r


def test_protocol_md_walkthrough_signature():
    """protocol.md §2.2: the sha256 of the captured example request."""
    key = bytes.fromhex("f87456a38fb3a95d16c059e5425af25049e6a9259df05e8f74622d110e3b3d23")
    base = fencevirt.unpack_request(_packet("xvm_status_sha256"))
    req = base._replace(request=4, hashtype=2, addrlen=4, flags=0, domain="pr-alpha",
                        address=bytes([198, 19, 0, 2]) + bytes(24), port=1229,
                        random=bytes.fromhex("e094e31ee08c"), seqno=875464, family=2,
                        hash=bytes(64))
    pkt = fencevirt.sign_request(fencevirt.pack_request(req), H.SHA256, key)
    assert pkt[112:144].hex() == ("9aad90018e476577ccc9f49812d7cb10"
                                  "88b41513031ec8acc201523b5cd4032e")
    assert pkt[144:] == bytes(32)
    assert fencevirt.verify_request(pkt, key, H.SHA256).domain == "pr-alpha"
