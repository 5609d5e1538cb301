#!/usr/bin/env python3
"""Regenerate the known-answer vectors and check the config cases against the C fence-virt.

Needs root and Debian's fence-virt + fence-virtd 4.12.1 (fence_xvm, fence_virt, fence_virtd).

    python3 tests/tools/capture_vectors.py            # both steps below
    python3 tests/tools/capture_vectors.py packets    # rewrite tests/data/packets/*.json
    python3 tests/tools/capture_vectors.py config     # run C fence_virtd on tests/data/config/*.conf
    python3 tests/tools/capture_vectors.py selftest   # reference code only, no root, no network

All traffic stays inside two network namespaces made here, wv<pid>-h ("host", veth wvh0,
198.19.0.1/24, 2001:db8::1/64) and wv<pid>-g ("guest", veth wvg0, 198.19.0.2/24,
2001:db8::2/64), each with a route 224.0.0.0/4 on its veth. The C clients run only in the
guest namespace. Every process started here is stopped by its PID and both namespaces are
deleted at the end.

The first part of this file is a small stdlib reference implementation of the wire format,
the signature, the challenge/response and the config grammar, written from
/work/shared/protocol.md and the C sources (config.l, config.y, simpleconfig.c). The capture
checks every captured byte against it and reports each disagreement as a contradiction.
The unit tests in tests/unit/ can be run against it through a one-line shim module named
fencevirt (see tests/data/packets/README.md).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

# ====================================================================================
# 1. Reference implementation (pure)
# ====================================================================================


class Request(enum.IntEnum):
    NULL = 0
    OFF = 1
    REBOOT = 2
    ON = 3
    STATUS = 4
    DEVSTATUS = 5
    HOSTLIST = 6
    METADATA = 7
    VALIDATEALL = 8


class Hash(enum.IntEnum):
    NONE = 0
    SHA1 = 1
    SHA256 = 2
    SHA512 = 3


class Response(enum.IntEnum):
    SUCCESS = 0
    FAIL = 1
    OFF = 2
    DENIED = 3
    HOSTLIST = 253


class FenceError(Exception):
    pass


class ProtocolError(FenceError):
    pass


class AuthError(FenceError):
    pass


class ConfigError(FenceError):
    pass


HASH_ALGORITHMS = {Hash.SHA1: "sha1", Hash.SHA256: "sha256", Hash.SHA512: "sha512"}
MAX_DOMAIN_LEN = 64
MAX_HASH_LEN = 64
REQUEST_SIZE = 176
HASH_OFFSET = 112
REQUEST_STRUCT = struct.Struct("<BBBB64s28sH6sII64s")
HOST_STATE_STRUCT = struct.Struct("<64s64sBB")
SERIAL_REQ_STRUCT = struct.Struct("<IBB64sI")
SERIAL_RESP_STRUCT = struct.Struct("<IB")
SERIAL_MAGIC = 0x61626261

FenceReq = collections.namedtuple(
    "FenceReq", "request hashtype addrlen flags domain address port random seqno family hash")
SerialReq = collections.namedtuple("SerialReq", "magic request flags domain seqno")


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def unpack_request(data: bytes) -> FenceReq:
    if len(data) < REQUEST_SIZE:
        raise ProtocolError("request is %d bytes, need %d" % (len(data), REQUEST_SIZE))
    f = list(REQUEST_STRUCT.unpack(bytes(data[:REQUEST_SIZE])))
    f[4] = _cstr(f[4])
    return FenceReq(*f)


def pack_request(req: FenceReq) -> bytes:
    domain = req.domain.encode("utf-8") if isinstance(req.domain, str) else bytes(req.domain)
    if len(domain) >= MAX_DOMAIN_LEN:
        raise ProtocolError("domain name of %d bytes is too long" % len(domain))
    return REQUEST_STRUCT.pack(req.request, req.hashtype, req.addrlen, req.flags, domain,
                               req.address, req.port, req.random, req.seqno, req.family,
                               req.hash)


def keyed_digest(hashtype: Hash, key: bytes, data: bytes) -> bytes:
    return hashlib.new(HASH_ALGORITHMS[Hash(hashtype)], key + data).digest()


def challenge_response(hashtype: Hash, key: bytes, challenge: bytes) -> bytes:
    return keyed_digest(hashtype, key, challenge).ljust(MAX_HASH_LEN, b"\0")


def sign_request(packet: bytes, hashtype: Hash, key: bytes) -> bytes:
    body = bytes(packet[:HASH_OFFSET])
    if hashtype == Hash.NONE:
        return body + bytes(MAX_HASH_LEN)
    digest = keyed_digest(hashtype, key, body + bytes(MAX_HASH_LEN))
    return body + digest.ljust(MAX_HASH_LEN, b"\0")


def verify_request(packet: bytes, key: bytes, min_hash: Hash) -> FenceReq:
    req = unpack_request(packet)
    if req.hashtype < min_hash:
        raise AuthError("hash type not strong enough (%d < %d)" % (req.hashtype, min_hash))
    if req.hashtype == Hash.NONE:
        return req
    if req.hashtype not in HASH_ALGORITHMS:
        raise AuthError("unknown hash type %d" % req.hashtype)
    if not key:
        raise AuthError("hashing requested when we have no key data")
    want = sign_request(packet, Hash(req.hashtype), key)[HASH_OFFSET:REQUEST_SIZE]
    if want != bytes(packet[HASH_OFFSET:REQUEST_SIZE]):
        raise AuthError("key mismatch")
    return req


def pack_host_state(name: str, uuid: str, state: int) -> bytes:
    return HOST_STATE_STRUCT.pack(name.encode("utf-8")[:63], uuid.encode("utf-8")[:63], state, 0)


def unpack_host_state(data: bytes):
    if len(data) < HOST_STATE_STRUCT.size:
        raise ProtocolError("host record is %d bytes" % len(data))
    name, uuid, state, _pad = HOST_STATE_STRUCT.unpack(bytes(data[:HOST_STATE_STRUCT.size]))
    # C writes at most 63 bytes; byte 63 of each field is stack garbage.
    return _cstr(name[:63]), _cstr(uuid[:63]), state


def pack_serial_request(request, domain, seqno, flags=0) -> bytes:
    d = domain.encode("utf-8")
    if len(d) >= MAX_DOMAIN_LEN:
        raise ProtocolError("domain name too long")
    return SERIAL_REQ_STRUCT.pack(SERIAL_MAGIC, request, flags, d, seqno)


def unpack_serial_request(data: bytes) -> SerialReq:
    if len(data) < SERIAL_REQ_STRUCT.size:
        raise ProtocolError("serial request is %d bytes" % len(data))
    magic, request, flags, domain, seqno = SERIAL_REQ_STRUCT.unpack(
        bytes(data[:SERIAL_REQ_STRUCT.size]))
    return SerialReq(magic, request, flags, _cstr(domain), seqno)


def pack_serial_response(response: int) -> bytes:
    return SERIAL_RESP_STRUCT.pack(SERIAL_MAGIC, response)


# ---- config: an emulation of config.l (flex) + config.y (bison) + simpleconfig.c ----

_ID_STOP = set(' \t{};="\n')


def tokenize_config(text: str):
    """Yield (kind, value, line) like the flex scanner; line is _line_count after the token.

    kind is 'ID', 'VAL', '{', '}', ';', '=' and finally 'EOF'. A '"' that does not start a
    "[^"]+" string is echoed by flex's default rule and produces no token.
    """
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t":
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c in "{};=":
            yield c, c, line
            i += 1
        elif c == '"':
            j = text.find('"', i + 1)
            if j > i + 1:             # at least one character inside; newlines are not counted
                yield "VAL", text[i + 1:j], line
                i = j + 1
            else:
                i += 1                # flex ECHO of the lone quote
        else:
            j = i
            while j < n and text[j] not in _ID_STOP:
                j += 1
            yield "ID", text[i:j], line
            i = j
    yield "EOF", None, line


class ConfigNode(object):
    __slots__ = ("id", "val", "nodes", "values")

    def __init__(self, id_, val):
        self.id, self.val, self.nodes, self.values = id_, val, [], []


class Config(object):
    """Parsed tree; lists are kept in FILE order, lookups walk them backwards like C."""

    def __init__(self, root, source=""):
        self.root, self.source = root, source

    @staticmethod
    def _component(part):
        name, idx, val = part, 0, None
        m = re.match(r"^([^\[]*)\[([^\]]*)\]", part)
        if "[" in part:
            if not m:
                return None
            name, inner = m.group(1), m.group(2)
            if inner.startswith("@"):
                val = inner[1:]
                if not val:
                    return None
            else:
                idx = _atoi(inner)
                if idx <= 0:
                    return None
        return name, idx, val

    def _walk(self, path):
        node = self.root
        parts = path.split("/")
        req_index = 0                       # C compat: carried over between components
        for part in parts[:-1]:
            comp = self._component(part)
            if comp is None:
                return None, None
            name, idx, val = comp
            if idx:
                req_index = idx
            cur = 0
            found = None
            for n in reversed(node.nodes):
                if n.id.lower() != name.lower():
                    continue
                cur += 1
                if req_index and cur != req_index:
                    continue
                if val is not None and (n.val or "").lower() != val.lower():
                    continue
                found = n
                break
            if found is None:
                return None, None
            node = found
        return node, parts[-1]

    def get(self, path: str):
        node, last = self._walk(path)
        if node is None or not last.startswith("@"):
            return None
        m = re.match(r"^@([^\[]*)(?:\[([^\]]*)\])?", last)
        if "[" in last and (m is None or m.group(2) is None):
            return None
        key = m.group(1)
        idx = _atoi(m.group(2)) if m.group(2) is not None else 0
        if m.group(2) is not None and idx <= 0:
            return None
        cur = 0
        for k, v in reversed(node.values):
            if k.lower() != key.lower():
                continue
            cur += 1
            if idx and cur != idx:
                continue
            return v
        return None

    def get_all(self, path: str):
        node, last = self._walk(path)
        if node is None or not last.startswith("@"):
            return []
        key = last[1:].lower()
        return [v for k, v in node.values if k.lower() == key]

    def set(self, path: str, value: str):
        """sc_set: used here only to mirror fence_virtd's -d (fence_virtd/@debug)."""
        node = self.root
        parts = path.split("/")
        for part in parts[:-1]:
            found = None
            for n in reversed(node.nodes):
                if n.id.lower() == part.lower():
                    found = n
                    break
            if found is None:
                found = ConfigNode(part, None)
                node.nodes.append(found)
            node = found
        key = parts[-1][1:]
        for i in range(len(node.values) - 1, -1, -1):
            if node.values[i][0].lower() == key.lower():
                node.values[i] = (node.values[i][0], value)
                return
        node.values.append((key, value))

    def dump(self) -> str:
        """The text sc_dump prints (stored = reversed order, blocks before assignments)."""
        out = []

        def block(n, depth):
            tabs = "\t" * depth
            if n.val is not None:
                out.append('%s%s = "%s" {\n' % (tabs, n.id, n.val))
            else:
                out.append("%s%s {\n" % (tabs, n.id))
            for c in reversed(n.nodes):
                block(c, depth + 1)
            for k, v in reversed(n.values):
                out.append('%s\t%s = "%s";\n' % (tabs, k, v))
            out.append("%s}\n\n" % tabs)
        for n in reversed(self.root.nodes):
            block(n, 0)
        for k, v in reversed(self.root.values):
            out.append('%s = "%s";\n' % (k, v))
        return "".join(out)


def _atoi(s):
    m = re.match(r"^\s*([+-]?\d+)", s or "")
    return int(m.group(1)) if m else 0


def parse_config(text: str, source: str = "<config>") -> Config:
    """Grammar of config.y; a syntax error names the line the C parser would print."""
    toks = list(tokenize_config(text))
    pos = [0]

    def peek():
        return toks[pos[0]]

    def take(kind):
        t = toks[pos[0]]
        if t[0] != kind:
            fail(t)
        pos[0] += 1
        return t

    def fail(t):
        raise ConfigError("%s: syntax error on line %d" % (source, t[2]))

    def items(parent, closing):
        count = 0
        while True:
            t = peek()
            if t[0] != "ID":
                if count == 0 or t[0] != closing:
                    fail(t)
                return
            item(parent)
            count += 1

    def item(parent):
        name = take("ID")[1]
        t = peek()
        if t[0] == "{":
            pos[0] += 1
            node = ConfigNode(name, None)
            body(node)
            parent.nodes.append(node)
        elif t[0] == "=":
            pos[0] += 1
            val = take("VAL")[1]
            t = peek()
            if t[0] == ";":
                pos[0] += 1
                parent.values.append((name, val))
            elif t[0] == "{":
                pos[0] += 1
                node = ConfigNode(name, val)
                body(node)
                parent.nodes.append(node)
            else:
                fail(t)
        else:
            fail(t)

    def body(node):
        if peek()[0] == "}":
            pos[0] += 1
            return
        items(node, "}")
        take("}")

    root = ConfigNode(None, None)
    items(root, "EOF")
    return Config(root, source)


# ====================================================================================
# 2. Small socket helpers (used inside the namespaces)
# ====================================================================================

def recv_exact(sock, n, timeout=5.0):
    buf = b""
    end = time.monotonic() + timeout
    while len(buf) < n:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("got %d of %d bytes" % (len(buf), n))
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def recv_until_eof(sock, timeout=5.0):
    buf = b""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return buf, "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return buf, "timeout"
        except ConnectionResetError:
            return buf, "reset"
        if not chunk:
            return buf, "eof"
        buf += chunk


def server_exchange(conn, auth, key, reply):
    """The daemon's side of protocol.md §4.2 after the connection is up."""
    ex = {"auth": Hash(auth).name.lower()}
    if auth != Hash.NONE:
        c1 = recv_exact(conn, 64)
        r1 = challenge_response(auth, key, c1)
        conn.sendall(r1)
        c2 = os.urandom(64)
        conn.sendall(c2)
        r2 = recv_exact(conn, 64)
        ex.update(c1_hex=c1.hex(), r1_hex=r1.hex(), c2_hex=c2.hex(), r2_hex=r2.hex())
        if r2 != challenge_response(auth, key, c2):
            ex["r2_ok"] = False
            conn.close()
            return ex
        ex["r2_ok"] = True
    conn.sendall(reply)
    ex["reply_hex"] = reply.hex()
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    rest, _how = recv_until_eof(conn, 2.0)
    ex["client_trailing_hex"] = rest.hex()
    conn.close()
    return ex


def client_exchange(conn, auth, key):
    """The agent's side of protocol.md §4.2 after the request went out."""
    ex = {"auth": Hash(auth).name.lower()}
    if auth != Hash.NONE:
        c1 = os.urandom(64)
        conn.sendall(c1)
        r1 = recv_exact(conn, 64)
        c2 = recv_exact(conn, 64)
        r2 = challenge_response(auth, key, c2)
        conn.sendall(r2)
        ex.update(c1_hex=c1.hex(), r1_hex=r1.hex(), c2_hex=c2.hex(), r2_hex=r2.hex())
        ex["r1_ok"] = r1 == challenge_response(auth, key, c1)
    reply, how = recv_until_eof(conn, 5.0)
    ex["reply_hex"] = reply.hex()
    ex["reply_end"] = how
    conn.close()
    return ex


def _ifindex(name):
    return socket.if_nametoindex(name)


def helper_fake_xvm_daemon(a):
    """Multicast receiver + call-back client (what fence_virtd does), for C fence_xvm."""
    key = bytes.fromhex(a["key_hex"])
    v6 = a["family"] == "ipv6"
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", a["port"]))
        mreq = socket.inet_pton(socket.AF_INET6, a["group"]) + struct.pack("@I", _ifindex(a["iface"]))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", a["port"]))
        mreqn = socket.inet_aton(a["group"]) + socket.inet_aton("0.0.0.0") + struct.pack(
            "@i", _ifindex(a["iface"]))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    print("ready", flush=True)
    s.settimeout(15)
    data, src = s.recvfrom(4096)
    out = {"request_hex": data.hex(), "udp_src": [src[0], src[1]]}
    req = unpack_request(data)
    if req.family == 10:
        addr = socket.inet_ntop(socket.AF_INET6, req.address[:16])
        c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    else:
        addr = socket.inet_ntop(socket.AF_INET, req.address[:4])
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect((addr, req.port))
    out["callback"] = [addr, req.port]
    out["exchange"] = server_exchange(c, Hash(a["auth"]), key, bytes.fromhex(a["reply_hex"]))
    # Collect any further copies (retransmissions or other source addresses) for a moment.
    more = []
    s.settimeout(0.3)
    try:
        while True:
            d2, src2 = s.recvfrom(4096)
            more.append({"request_hex": d2.hex(), "udp_src": [src2[0], src2[1]]})
    except socket.timeout:
        pass
    out["more_packets"] = more
    print(json.dumps(out), flush=True)


def helper_fake_tcp_server(a):
    """TCP listener for C fence_virt: -T (176-byte request + auth) or VMChannel (74 bytes)."""
    key = bytes.fromhex(a["key_hex"])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a["addr"], a["port"]))
    s.listen(5)
    print("ready", flush=True)
    s.settimeout(15)
    conn, peer = s.accept()
    out = {"peer": [peer[0], peer[1]]}
    if a["mode"] == "serial":
        req = recv_exact(conn, 74)
        out["request_hex"] = req.hex()
        reply = bytes.fromhex(a["reply_hex"])
        conn.sendall(reply)
        out["exchange"] = {"reply_hex": reply.hex()}
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        rest, _how = recv_until_eof(conn, 2.0)
        out["exchange"]["client_trailing_hex"] = rest.hex()
        conn.close()
    else:
        req = recv_exact(conn, 176)
        out["request_hex"] = req.hex()
        out["exchange"] = server_exchange(conn, Hash(a["auth"]), key,
                                          bytes.fromhex(a["reply_hex"]))
    print(json.dumps(out), flush=True)


def helper_client(a):
    """Minimal stdlib agent: multicast (with call-back listener) or TCP, then §4.2."""
    key = bytes.fromhex(a["key_hex"])
    hashtype = Hash(a["hash"])
    auth = Hash(a["auth"])
    mode = a["mode"]
    random6 = os.urandom(6) if hashtype != Hash.NONE else bytes(6)
    out = {}
    if mode == "tcp":
        req = FenceReq(a["request"], hashtype, 0, a.get("flags", 0), a["domain"], bytes(28), 0,
                       random6, a["seqno"], 0, bytes(64))
        pkt = sign_request(pack_request(req), hashtype, key)
        c = socket.create_connection((a["daemon"], a["port"]), timeout=5)
        c.sendall(pkt)
        out["request_hex"] = pkt.hex()
        out["exchange"] = client_exchange(c, auth, key)
        print(json.dumps(out), flush=True)
        return
    v6 = a["family"] == "ipv6"
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    lsock = socket.socket(fam, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("::" if v6 else "0.0.0.0", a["cb_port"]))
    lsock.listen(10)
    raw = socket.inet_pton(fam, a["src"])
    req = FenceReq(a["request"], hashtype, len(raw), a.get("flags", 0), a["domain"],
                   raw.ljust(28, b"\0"), a["cb_port"], random6, a["seqno"], 10 if v6 else 2,
                   bytes(64))
    pkt = sign_request(pack_request(req), hashtype, key)
    u = socket.socket(fam, socket.SOCK_DGRAM)
    if v6:
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, _ifindex(a["iface"]))
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 2)
        u.bind((a["src"], 0))
        u.sendto(pkt, (a["group"], a["port"], 0, 0))
    else:
        u.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, raw)
        u.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        u.bind((a["src"], 0))
        u.sendto(pkt, (a["group"], a["port"]))
    u.close()
    out["request_hex"] = pkt.hex()
    lsock.settimeout(5)
    conn, peer = lsock.accept()
    out["callback_from"] = [peer[0], peer[1]]
    out["exchange"] = client_exchange(conn, auth, key)
    lsock.close()
    print(json.dumps(out), flush=True)


HELPERS = {
    "_fake-xvm-daemon": helper_fake_xvm_daemon,
    "_fake-tcp-server": helper_fake_tcp_server,
    "_client": helper_client,
}

# ====================================================================================
# 3. Lab: namespaces, processes
# ====================================================================================

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKET_DIR = os.path.join(REPO, "tests", "data", "packets")
CONFIG_DIR = os.path.join(REPO, "tests", "data", "config")
MODULE_PATH = "/usr/lib/x86_64-linux-gnu/fence-virt"
C_VERSION = "4.12.1"

HOST_V4, GUEST_V4 = "198.19.0.1", "198.19.0.2"
HOST_V6, GUEST_V6 = "2001:db8::1", "2001:db8::2"
GROUP_V4, GROUP_V6 = "225.0.0.12", "ff05::3:1"

KEY32 = bytes.fromhex("5f0c3a7e91d24b68a0e6b3c4d5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718")
TEXT_KEY = b"fencevirt-text-key\n"

DOMAINS = [  # name, uuid, libvirt runstate (test driver), expected state in a list
    ("wv-alpha", "11111111-1111-4111-8111-111111111111", None, 1),
    ("wv-beta", "22222222-2222-4222-8222-222222222222", 5, 5),
    ("Wv-Gamma", "33333333-3333-4333-8333-333333333333", 3, 3),
    ("wv-long-" + "x" * 60, "44444444-4444-4444-8444-444444444444", None, 1),
]


class Lab(object):
    def __init__(self):
        tag = "wv%d" % (os.getpid() % 100000)
        self.tag = tag
        self.hns, self.gns = tag + "-h", tag + "-g"
        self.work = "/tmp/%s-capture" % tag
        self.procs = []
        self.made = []

    def sh(self, *cmd, check=True):
        r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if check and r.returncode != 0:
            raise RuntimeError("%s: rc %d: %s" % (" ".join(cmd), r.returncode, r.stderr.strip()))
        return r

    def up(self):
        os.makedirs(self.work, exist_ok=True)
        for ns in (self.hns, self.gns):
            self.sh("ip", "netns", "add", ns)
            self.made.append(ns)
            self.sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.sh("ip", "link", "add", "wvh0", "netns", self.hns, "type", "veth",
                "peer", "name", "wvg0", "netns", self.gns)
        for ns, dev, v4, v6 in ((self.hns, "wvh0", HOST_V4, HOST_V6),
                                (self.gns, "wvg0", GUEST_V4, GUEST_V6)):
            self.sh("ip", "-n", ns, "addr", "add", v4 + "/24", "dev", dev)
            self.sh("ip", "-n", ns, "addr", "add", v6 + "/64", "dev", dev, "nodad")
            self.sh("ip", "-n", ns, "link", "set", dev, "up")
            self.sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        end = time.monotonic() + 10
        while True:      # a fresh veth drops what is sent before its carrier is up
            r = self.sh("ip", "netns", "exec", self.gns, "ping", "-c1", "-W1", HOST_V4,
                        check=False)
            r6 = self.sh("ip", "netns", "exec", self.gns, "ping", "-6", "-c1", "-W1", HOST_V6,
                         check=False)
            if r.returncode == 0 and r6.returncode == 0:
                break
            if time.monotonic() > end:
                raise RuntimeError("veth between %s and %s did not come up" % (self.hns, self.gns))
            time.sleep(0.1)

    def down(self):
        for p in reversed(self.procs):
            stop_pid(p)
        for ns in reversed(self.made):
            self.sh("ip", "netns", "del", ns, check=False)
        self.made = []
        shutil.rmtree(self.work, ignore_errors=True)

    def spawn_helper(self, ns, name, args):
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                              name, json.dumps(args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
        self.procs.append(p)
        return p

    def wait_ready(self, p, timeout=5.0):
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ""
        if line.strip() != "ready":
            stop_pid(p)
            raise RuntimeError("helper not ready: %r %s" % (line, p.stderr.read()))

    def finish_helper(self, p, timeout=20.0):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_pid(p)
            out, err = p.communicate()
        self.procs.remove(p)
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError("helper failed rc=%s: %s %s" % (p.returncode, out, err))
        return json.loads(lines[-1])

    def run_in(self, ns, cmd, timeout=30, stdin=None):
        t0 = time.monotonic()
        r = subprocess.run(["ip", "netns", "exec", ns] + cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                           input=stdin)
        return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                "seconds": round(time.monotonic() - t0, 3)}


def stop_pid(p, grace=5.0):
    """SIGTERM this one process by PID, then SIGKILL after `grace` seconds."""
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


# ====================================================================================
# 4. Packet captures
# ====================================================================================

CONTRADICTIONS = []


def note(case, msg):
    CONTRADICTIONS.append("%s: %s" % (case, msg))
    print("  !! %s: %s" % (case, msg), file=sys.stderr)


def expect_equal(case, what, got, want):
    if got != want:
        note(case, "%s: got %r, expected %r" % (what, got, want))


def decoded_dict(req: FenceReq):
    d = req._asdict()
    for k in ("address", "random", "hash"):
        d[k] = d[k].hex()
    return d


def check_request(case, pkt_hex, key, want):
    """Compare a captured request with the fields we know it must carry."""
    pkt = bytes.fromhex(pkt_hex)
    expect_equal(case, "request length", len(pkt), 176)
    req = unpack_request(pkt)
    got = decoded_dict(req)
    for k, v in want.items():
        expect_equal(case, "field " + k, got[k], v)
    if req.hashtype:
        expect_equal(case, "hash recomputed", sign_request(pkt, req.hashtype, key).hex(), pkt_hex)
        try:
            verify_request(pkt, key, Hash(req.hashtype))
        except AuthError as e:
            note(case, "reference verify failed: %s" % e)
    else:
        expect_equal(case, "random (hash none)", req.random, bytes(6))
        expect_equal(case, "hash (hash none)", req.hash, bytes(64))
    if not (0 <= req.seqno < 1000000) and "seqno" not in want:
        note(case, "seqno %d is not a tv_usec value" % req.seqno)
    return got


def check_exchange(case, ex, key, client_is_c):
    if ex.get("auth", "none") == "none":
        return
    auth = Hash[ex["auth"].upper()]
    r1 = challenge_response(auth, key, bytes.fromhex(ex["c1_hex"])).hex()
    r2 = challenge_response(auth, key, bytes.fromhex(ex["c2_hex"])).hex()
    expect_equal(case, "R1 = H(key||C1)", ex["r1_hex"], r1)
    expect_equal(case, "R2 = H(key||C2)", ex["r2_hex"], r2)


def parse_hostlist_stream(stream: bytes):
    """FD, 130-byte records until an all-NUL name+uuid record, then the final byte."""
    if not stream or stream[0] != 0xFD:
        raise ProtocolError("stream does not start with FD")
    recs, off = [], 1
    while True:
        rec = stream[off:off + 130]
        if len(rec) < 130:
            raise ProtocolError("short record at %d" % off)
        off += 130
        if rec[0] == 0 and rec[64] == 0:
            break
        name, uuid, state = unpack_host_state(rec)
        recs.append({"name": name, "uuid": uuid, "state": state,
                     "garbage_hex": bytes([rec[63], rec[127], rec[129]]).hex()})
    return recs, rec, stream[off:]


def write_case(case, data):
    path = os.path.join(PACKET_DIR, case + ".json")
    data = dict(data)
    data["case"] = case
    ordered = collections.OrderedDict()
    for k in ("case", "source", "command", "transport", "key_hex", "key_text", "request_hex",
              "decoded"):
        if k in data:
            ordered[k] = data.pop(k)
    ordered.update(sorted(data.items()))
    with open(path, "w") as f:
        json.dump(ordered, f, indent=1)
        f.write("\n")
    print("  wrote %s" % os.path.relpath(path, REPO))


def hostlist_reply(domains):
    """What a daemon sends for a list: FD, records, zero record, result 0 (zeros, no garbage)."""
    out = bytes([Response.HOSTLIST])
    for name, uuid, state in domains:
        out += pack_host_state(name, uuid, state)
    return out + bytes(130) + b"\x00"


FAKE_LIST = [("wv-alpha", "11111111-1111-4111-8111-111111111111", 1),
             ("wv-beta", "22222222-2222-4222-8222-222222222222", 5),
             ("Wv-Gamma", "33333333-3333-4333-8333-333333333333", 3)]

ACTION_CODES = {"null": 0, "off": 1, "reboot": 2, "on": 3, "status": 4, "monitor": 5,
                "list": 6}


def xvm_cases():
    """(case, extra fence_xvm args, action, domain, key, hash, auth, flags, family, port)."""
    c = []
    for action in ("null", "off", "reboot", "on", "status", "monitor", "list"):
        dom = "" if action in ("monitor", "list") else "wv-alpha"
        c.append(("xvm_%s_sha256" % action, [], action, dom, KEY32, "sha256", "sha256", 0,
                  "ipv4", 1229))
    c += [
        ("xvm_status_hash_sha1", ["-c", "sha1"], "status", "wv-alpha", KEY32, "sha1", "sha256",
         0, "ipv4", 1229),
        ("xvm_status_hash_sha512", ["-c", "sha512"], "status", "wv-alpha", KEY32, "sha512",
         "sha256", 0, "ipv4", 1229),
        ("xvm_status_hash_none", ["-c", "none"], "status", "wv-alpha", KEY32, "none", "sha256",
         0, "ipv4", 1229),
        ("xvm_status_auth_sha1", ["-C", "sha1"], "status", "wv-alpha", KEY32, "sha256", "sha1",
         0, "ipv4", 1229),
        ("xvm_status_auth_sha512", ["-C", "sha512"], "status", "wv-alpha", KEY32, "sha256",
         "sha512", 0, "ipv4", 1229),
        ("xvm_status_auth_none_hash_none", ["-C", "none", "-c", "none"], "status", "wv-alpha",
         KEY32, "none", "none", 0, "ipv4", 1229),
        ("xvm_status_uuid_flag", ["-u"], "status", "11111111-1111-4111-8111-111111111111",
         KEY32, "sha256", "sha256", 1, "ipv4", 1229),
        ("xvm_status_port_4242", ["-p", "4242"], "status", "wv-alpha", KEY32, "sha256",
         "sha256", 0, "ipv4", 4242),
        ("xvm_status_textkey", [], "status", "wv-alpha", TEXT_KEY, "sha256", "sha256", 0,
         "ipv4", 1229),
        ("xvm_status_ipv6", ["-i", "ipv6", "-a", GROUP_V6], "status", "wv-alpha", KEY32,
         "sha256", "sha256", 0, "ipv6", 1229),
        ("xvm_list_ipv6", ["-i", "ipv6", "-a", GROUP_V6], "list", "", KEY32, "sha256", "sha256",
         0, "ipv6", 1229),
    ]
    return c


def capture_xvm(lab, spec):
    case, extra, action, dom, key, hname, aname, flags, family, port = spec
    keyfile = os.path.join(lab.work, "%s.key" % case)
    with open(keyfile, "wb") as f:
        f.write(key)
    reply = hostlist_reply(FAKE_LIST) if action == "list" else b"\x00"
    v6 = family == "ipv6"
    args = {"key_hex": key.hex(), "family": family, "group": GROUP_V6 if v6 else GROUP_V4,
            "port": port, "iface": "wvh0", "auth": int(Hash[aname.upper()]),
            "reply_hex": reply.hex()}
    helper = lab.spawn_helper(lab.hns, "_fake-xvm-daemon", args)
    lab.wait_ready(helper)
    cmd = ["fence_xvm", "-o", action] + (["-H", dom] if dom else []) + ["-k", keyfile, "-t", "5"]
    cmd += extra
    res = lab.run_in(lab.gns, cmd)
    try:
        cap = lab.finish_helper(helper)
    except RuntimeError as e:
        raise RuntimeError("%s; C client: %r" % (e, res))
    want = {"request": ACTION_CODES[action], "hashtype": int(Hash[hname.upper()]),
            "addrlen": 16 if v6 else 4, "flags": flags, "domain": dom,
            "address": (socket.inet_pton(socket.AF_INET6, GUEST_V6) if v6
                        else socket.inet_aton(GUEST_V4)).ljust(28, b"\0").hex(),
            "port": port, "family": 10 if v6 else 2}
    decoded = check_request(case, cap["request_hex"], key, want)
    ex = cap["exchange"]
    check_exchange(case, ex, key, client_is_c=True)
    if ex.get("r2_ok") is False:
        note(case, "C client's R2 did not match")
    if ex.get("client_trailing_hex"):
        note(case, "C client sent extra bytes %s" % ex["client_trailing_hex"])
    if res["rc"] != 0:
        note(case, "C client rc %d: %s %s" % (res["rc"], res["stdout"], res["stderr"]))
    data = {
        "source": "C fence_xvm %s (Debian fence-virt %s-1) -> Python fake daemon "
                  "(tests/tools/capture_vectors.py)" % (C_VERSION, C_VERSION),
        "command": " ".join(["fence_xvm"] + cmd[1:]).replace(keyfile, "KEYFILE"),
        "transport": "multicast-" + family,
        "key_hex": key.hex(),
        "request_hex": cap["request_hex"],
        "decoded": decoded,
        "hash": hname, "auth": aname,
        "udp_src": cap["udp_src"],
        "exchange": {k: v for k, v in ex.items() if k not in ("r2_ok", "client_trailing_hex")},
        "exchange_roles": "c1/r2 sent by C fence_xvm; r1/c2/reply sent by the Python fake daemon",
        "client_result": {"rc": res["rc"], "stdout": res["stdout"]},
    }
    if key == TEXT_KEY:
        data["key_text"] = key.decode()
    if action == "list":
        data["hostlist"] = [{"name": n, "uuid": u, "state": s} for n, u, s in FAKE_LIST]
        data["hostlist_stream_hex"] = reply.hex()
    if cap["more_packets"]:
        data["more_packets_note"] = "%d more datagrams arrived" % len(cap["more_packets"])
    write_case(case, data)


def capture_virt_tcp(lab, case, action, dom):
    keyfile = os.path.join(lab.work, "%s.key" % case)
    with open(keyfile, "wb") as f:
        f.write(KEY32)
    reply = hostlist_reply(FAKE_LIST) if action == "list" else b"\x00"
    args = {"key_hex": KEY32.hex(), "addr": HOST_V4, "port": 1229, "mode": "tcp",
            "auth": int(Hash.SHA256), "reply_hex": reply.hex()}
    helper = lab.spawn_helper(lab.hns, "_fake-tcp-server", args)
    lab.wait_ready(helper)
    cmd = ["fence_virt", "-T", HOST_V4, "-o", action] + (["-H", dom] if dom else []) + \
        ["-k", keyfile, "-t", "5"]
    res = lab.run_in(lab.gns, cmd)
    cap = lab.finish_helper(helper)
    want = {"request": ACTION_CODES[action], "hashtype": 2, "addrlen": 0, "flags": 0,
            "domain": dom, "address": bytes(28).hex(), "port": 0, "family": 0}
    decoded = check_request(case, cap["request_hex"], KEY32, want)
    ex = cap["exchange"]
    check_exchange(case, ex, KEY32, client_is_c=True)
    if res["rc"] != 0:
        note(case, "C client rc %d: %s" % (res["rc"], res["stdout"]))
    data = {
        "source": "C fence_virt %s (Debian fence-virt %s-1) -T -> Python fake TCP server" % (
            C_VERSION, C_VERSION),
        "command": " ".join(cmd).replace(keyfile, "KEYFILE"),
        "transport": "tcp",
        "key_hex": KEY32.hex(),
        "request_hex": cap["request_hex"],
        "decoded": decoded,
        "hash": "sha256", "auth": "sha256",
        "exchange": {k: v for k, v in ex.items() if k not in ("r2_ok", "client_trailing_hex")},
        "exchange_roles": "request/c1/r2 sent by C fence_virt; r1/c2/reply by the fake server",
        "client_result": {"rc": res["rc"], "stdout": res["stdout"]},
    }
    if action == "list":
        data["hostlist"] = [{"name": n, "uuid": u, "state": s} for n, u, s in FAKE_LIST]
        data["hostlist_stream_hex"] = reply.hex()
    write_case(case, data)


def capture_virt_serial(lab, case, action, dom):
    if action == "list":
        reply = pack_serial_response(Response.HOSTLIST)
        for n, u, s in FAKE_LIST:
            reply += pack_host_state(n, u, s)
        reply += bytes(130) + pack_serial_response(0)
    else:
        reply = pack_serial_response(0)
    args = {"key_hex": "", "addr": HOST_V4, "port": 1229, "mode": "serial",
            "reply_hex": reply.hex()}
    helper = lab.spawn_helper(lab.hns, "_fake-tcp-server", args)
    lab.wait_ready(helper)
    cmd = ["fence_virt", "-A", HOST_V4, "-o", action] + (["-H", dom] if dom else []) + \
        ["-t", "5"]
    res = lab.run_in(lab.gns, cmd)
    cap = lab.finish_helper(helper)
    pkt = bytes.fromhex(cap["request_hex"])
    sreq = unpack_serial_request(pkt)
    expect_equal(case, "serial magic", sreq.magic, SERIAL_MAGIC)
    expect_equal(case, "serial magic bytes", pkt[:4], b"abba")
    expect_equal(case, "serial request", sreq.request, ACTION_CODES[action])
    expect_equal(case, "serial flags", sreq.flags, 0)
    expect_equal(case, "serial domain", sreq.domain, dom)
    expect_equal(case, "repack", pack_serial_request(sreq.request, sreq.domain, sreq.seqno,
                                                     sreq.flags), pkt)
    if res["rc"] != 0:
        note(case, "C client rc %d: %s" % (res["rc"], res["stdout"]))
    data = {
        "source": "C fence_virt %s (Debian fence-virt %s-1) VMChannel-over-TCP (-A) -> "
                  "Python fake TCP server" % (C_VERSION, C_VERSION),
        "command": " ".join(cmd),
        "transport": "serial-over-tcp",
        "request_hex": cap["request_hex"],
        "decoded_serial": sreq._asdict(),
        "reply_hex": reply.hex(),
        "client_result": {"rc": res["rc"], "stdout": res["stdout"]},
    }
    if action == "list":
        data["hostlist"] = [{"name": n, "uuid": u, "state": s} for n, u, s in FAKE_LIST]
    write_case(case, data)


NODE_XML_HEAD = """<node>
  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
"""


def node_xml():
    out = NODE_XML_HEAD
    for name, uuid, runstate, _ in DOMAINS:
        rs = "<test:runstate>%d</test:runstate>" % runstate if runstate else ""
        out += ("  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
                "<name>%s</name><uuid>%s</uuid>%s<memory>65536</memory><vcpu>1</vcpu>"
                "<os><type>hvm</type></os></domain>\n" % (name, uuid, rs))
    return out + "</node>\n"


def daemon_conf(lab, listener, extra, family="ipv4"):
    if listener == "multicast":
        lblock = ('\tmulticast {\n\t\tkey_file = "%s/d.key";\n\t\taddress = "%s";\n'
                  '\t\tport = "1229";\n\t\tinterface = "wvh0";\n\t\tfamily = "%s";\n%s\t}\n' % (
                      lab.work, GROUP_V6 if family == "ipv6" else GROUP_V4, family, extra))
    else:
        lblock = ('\ttcp {\n\t\tkey_file = "%s/d.key";\n\t\taddress = "%s";\n'
                  '\t\tport = "1229";\n\t\tfamily = "ipv4";\n%s\t}\n' % (lab.work, HOST_V4, extra))
    return ('fence_virtd {\n\tlistener = "%s";\n\tbackend = "libvirt";\n'
            '\tmodule_path = "%s";\n}\nlisteners {\n%s}\nbackends {\n\tlibvirt {\n'
            '\t\turi = "test://%s/node.xml";\n\t}\n}\n' % (listener, MODULE_PATH, lblock,
                                                          lab.work))


def start_c_daemon(lab, name, conf_text, proto):
    lab.daemon_conf = conf_text.replace(lab.work, "WORKDIR")
    conf = os.path.join(lab.work, name + ".conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    with open(os.path.join(lab.work, "node.xml"), "w") as f:
        f.write(node_xml())
    with open(os.path.join(lab.work, "d.key"), "wb") as f:
        f.write(KEY32)
    os.chmod(os.path.join(lab.work, "d.key"), 0o600)
    log = open(os.path.join(lab.work, name + ".log"), "w")
    p = subprocess.Popen(["ip", "netns", "exec", lab.hns, "stdbuf", "-oL", "-eL", "fence_virtd",
                          "-F", "-d99", "-f", conf, "-p", os.path.join(lab.work, name + ".pid")],
                         stdout=log, stderr=subprocess.STDOUT)
    log.close()
    lab.procs.append(p)
    flag = "-Hlun" if proto == "udp" else "-Hltn"
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError("fence_virtd exited %s: %s" % (p.returncode, read_log(lab, name)))
        r = lab.sh("ip", "netns", "exec", lab.hns, "ss", flag, "sport = :1229", check=False)
        if r.stdout.strip():
            return p
        time.sleep(0.05)
    raise RuntimeError("fence_virtd not listening: %s" % read_log(lab, name))


def read_log(lab, name):
    with open(os.path.join(lab.work, name + ".log")) as f:
        return f.read()


def stop_c_daemon(lab, p):
    stop_pid(p, grace=10)
    lab.procs.remove(p)


DAEMON_SEQNO = [100001]


def run_client(lab, case, mode, action, dom, hashtype=Hash.SHA256, auth=Hash.SHA256,
               family="ipv4", expect=None, flags=0):
    DAEMON_SEQNO[0] += 7
    seqno = DAEMON_SEQNO[0]
    v6 = family == "ipv6"
    args = {"key_hex": KEY32.hex(), "hash": int(hashtype), "auth": int(auth), "mode": mode,
            "request": ACTION_CODES[action], "domain": dom, "seqno": seqno, "flags": flags,
            "family": family, "group": GROUP_V6 if v6 else GROUP_V4, "port": 1229,
            "src": GUEST_V6 if v6 else GUEST_V4, "iface": "wvg0", "cb_port": 1229,
            "daemon": HOST_V4}
    p = lab.spawn_helper(lab.gns, "_client", args)
    cap = lab.finish_helper(p)
    ex = cap["exchange"]
    check_exchange(case, ex, KEY32, client_is_c=False)
    if auth != Hash.NONE and not ex.get("r1_ok"):
        note(case, "C daemon R1 did not match H(key||C1)")
    reply = bytes.fromhex(ex["reply_hex"])
    decoded = decoded_dict(unpack_request(bytes.fromhex(cap["request_hex"])))
    data = {
        "source": "Python client (tests/tools/capture_vectors.py) -> C fence_virtd %s "
                  "(Debian fence-virtd %s-1, %s listener, libvirt backend on the test driver)" % (
                      C_VERSION, C_VERSION, "multicast" if mode == "mcast" else "tcp"),
        "command": "Python client: %s request %r, domain %r, hash %s, auth %s" % (
            "multicast" if mode == "mcast" else "tcp", action, dom, hashtype.name.lower(),
            auth.name.lower()),
        "daemon_config": lab.daemon_conf,
        "daemon_command": "fence_virtd -F -d99 -f WORKDIR/<name>.conf -p WORKDIR/<name>.pid "
                          "(in the host namespace)",
        "transport": ("multicast-" + family) if mode == "mcast" else "tcp",
        "key_hex": KEY32.hex(),
        "request_hex": cap["request_hex"],
        "decoded": decoded,
        "hash": hashtype.name.lower(), "auth": auth.name.lower(),
        "exchange": {k: v for k, v in ex.items() if k not in ("r1_ok",)},
        "exchange_roles": "c1/r2 and the request sent by the Python client; "
                          "r1/c2/reply sent by C fence_virtd",
    }
    if action == "list":
        recs, term, tail = parse_hostlist_stream(reply)
        want = [{"name": n[:63], "uuid": u, "state": s} for n, u, _, s in
                sorted(DOMAINS, key=lambda d: d[0].lower())]
        expect_equal(case, "host list", [{k: r[k] for k in ("name", "uuid", "state")}
                                         for r in recs], want)
        expect_equal(case, "terminator", term, bytes(130))
        expect_equal(case, "final byte", tail, b"\x00")
        data["hostlist_stream_hex"] = reply.hex()
        data["hostlist"] = want
        data["hostlist_garbage_hex"] = [r["garbage_hex"] for r in recs]
        data["final_result"] = tail[0] if tail else None
    else:
        expect_equal(case, "result", list(reply), [expect])
        data["result"] = reply[0] if reply else None
    write_case(case, data)


def capture_daemon(lab):
    # multicast, default hash/auth sha256
    p = start_c_daemon(lab, "mc", daemon_conf(lab, "multicast", ""), "udp")
    try:
        run_client(lab, "virtd_list", "mcast", "list", "")
        run_client(lab, "virtd_status_running", "mcast", "status", "wv-alpha", expect=0)
        run_client(lab, "virtd_status_off", "mcast", "status", "wv-beta", expect=2)
        run_client(lab, "virtd_status_paused", "mcast", "status", "Wv-Gamma", expect=0)
        run_client(lab, "virtd_status_missing", "mcast", "status", "wv-nope", expect=2)
        run_client(lab, "virtd_status_uuid", "mcast", "status",
                   "11111111-1111-4111-8111-111111111111", expect=0)
        run_client(lab, "virtd_status_hash_sha512", "mcast", "status", "wv-alpha",
                   hashtype=Hash.SHA512, expect=0)
        run_client(lab, "virtd_monitor", "mcast", "monitor", "", expect=0)
        run_client(lab, "virtd_null", "mcast", "null", "wv-alpha", expect=1)
        run_client(lab, "virtd_off_missing", "mcast", "off", "wv-nope", expect=1)
    finally:
        stop_c_daemon(lab, p)
    for auth in ("sha1", "sha512"):
        p = start_c_daemon(lab, "mc-" + auth,
                           daemon_conf(lab, "multicast", '\t\tauth = "%s";\n' % auth), "udp")
        try:
            run_client(lab, "virtd_status_auth_%s" % auth, "mcast", "status", "wv-alpha",
                       auth=Hash[auth.upper()], expect=0)
        finally:
            stop_c_daemon(lab, p)
    p = start_c_daemon(lab, "mc-none", daemon_conf(
        lab, "multicast", '\t\tauth = "none";\n\t\thash = "none";\n'), "udp")
    try:
        run_client(lab, "virtd_status_auth_none_hash_none", "mcast", "status", "wv-alpha",
                   hashtype=Hash.NONE, auth=Hash.NONE, expect=0)
    finally:
        stop_c_daemon(lab, p)
    p = start_c_daemon(lab, "mc6", daemon_conf(lab, "multicast", "", family="ipv6"), "udp")
    try:
        run_client(lab, "virtd_ipv6_status", "mcast", "status", "wv-alpha", family="ipv6",
                   expect=0)
        run_client(lab, "virtd_ipv6_list", "mcast", "list", "", family="ipv6")
    finally:
        stop_c_daemon(lab, p)
    p = start_c_daemon(lab, "tcp", daemon_conf(lab, "tcp", ""), "tcp")
    try:
        run_client(lab, "virtd_tcp_list", "tcp", "list", "")
        run_client(lab, "virtd_tcp_status_running", "tcp", "status", "wv-alpha", expect=0)
    finally:
        stop_c_daemon(lab, p)


def capture_packets():
    os.makedirs(PACKET_DIR, exist_ok=True)
    lab = Lab()
    try:
        lab.up()
        print("namespaces %s %s" % (lab.hns, lab.gns))
        for spec in xvm_cases():
            print(spec[0])
            capture_xvm(lab, spec)
        for case, action, dom in (("virt_tcp_status_sha256", "status", "wv-alpha"),
                                  ("virt_tcp_list_sha256", "list", "")):
            print(case)
            capture_virt_tcp(lab, case, action, dom)
        for case, action, dom in (("virt_serial_status", "status", "wv-alpha"),
                                  ("virt_serial_list", "list", "")):
            print(case)
            capture_virt_serial(lab, case, action, dom)
        print("C fence_virtd captures")
        capture_daemon(lab)
    finally:
        lab.down()


# ====================================================================================
# 5. Config cases against C fence_virtd
# ====================================================================================

EXPECT_RE = re.compile(r"^# expect: (ok|line (\d+))\s*$")


def c_config_verdict(lab, text_bytes, name):
    """Run C fence_virtd -F -d4 on a copy; return (verdict, dump-or-None, output)."""
    path = os.path.join(lab.work, "case-" + name)
    with open(path, "wb") as f:
        f.write(text_bytes)
    pid = os.path.join(lab.work, "case.pid")
    # A config that parses may go on to start: keep it in our namespace and hide any real
    # libvirtd socket behind a private tmpfs (e.g. the Debian default's qemu:///system).
    inner = "mount -t tmpfs wvcfg /run/libvirt && exec ip netns exec %s stdbuf -oL -eL " \
            "fence_virtd -F -d4 -f '%s' -p '%s'" % (lab.hns, path, pid)
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lab.procs.append(p)
    try:
        out, _ = p.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        stop_pid(p)
        out, _ = p.communicate()
    lab.procs.remove(p)
    out = out.decode("utf-8", "replace")
    m = re.search(r"syntax error on line (\d+)", out)
    if m:
        if "Failed to parse" not in out or p.returncode != 255:
            note(name, "syntax error without 'Failed to parse'/255: rc %s" % p.returncode)
        return "line %s" % m.group(1), None, out, p.returncode
    if "Failed to parse" in out:
        return "failed-to-parse", None, out, p.returncode
    marker = "Debugging threshold is now 4\n"
    start = out.find(marker)
    dump = None
    if start >= 0:
        rest = out[start + len(marker):]
        ends = [rest.find(s) for s in ("Backend plugin:", "Failed to determine backend.")]
        ends = [e for e in ends if e >= 0]
        dump = rest[:min(ends)] if ends else rest
    return "ok", dump, out, p.returncode


def check_config_cases():
    names = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".conf"))
    lab = Lab()
    results = []
    try:
        os.makedirs(lab.work, exist_ok=True)
        lab.sh("ip", "netns", "add", lab.hns)
        lab.made.append(lab.hns)
        lab.sh("ip", "-n", lab.hns, "link", "set", "lo", "up")
        extra = [("(empty file)", b"", "line 1")]
        for name in names:
            raw = open(os.path.join(CONFIG_DIR, name), "rb").read()
            first = raw.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
            m = EXPECT_RE.match(first)
            if not m:
                note(name, "first line is not '# expect: ...'")
                continue
            extra.append((name, raw, m.group(1)))
        for name, raw, want in extra:
            verdict, dump, out, rc = c_config_verdict(lab, raw, name.replace(" ", "_").strip("()"))
            text = raw.decode("utf-8")
            try:
                cfg = parse_config(text, name)
                ref = "ok"
            except ConfigError as e:
                ref = "line %s" % re.search(r"line (\d+)", str(e)).group(1)
                cfg = None
            if verdict != want:
                note(name, "C says %s, case file expects %s" % (verdict, want))
            if ref != verdict:
                note(name, "reference parser says %s, C says %s" % (ref, verdict))
            if verdict == "ok" and dump is None:
                note(name, "no -d4 dump found in the C output:\n" + out)
            if cfg is not None and dump is not None:
                cfg.set("fence_virtd/@debug", "4")
                if cfg.dump() != dump:
                    note(name, "dump differs:\n--- C\n%s\n--- reference\n%s" % (dump, cfg.dump()))
            last = [l for l in out.splitlines() if l.strip()][-1:]
            results.append((name, want, verdict, last))
            print("  %-40s expect %-8s C %-8s ref %-8s rc %s, last line %r" % (
                name, want, verdict, ref, rc, last[0] if last else ""))
    finally:
        lab.down()
    return results


# ====================================================================================
# 6. Self test of the reference code (no root)
# ====================================================================================

def selftest():
    # protocol.md §2.2 walk-through
    key = bytes.fromhex("f87456a38fb3a95d16c059e5425af25049e6a9259df05e8f74622d110e3b3d23")
    req = FenceReq(4, 2, 4, 0, "pr-alpha", socket.inet_aton("198.19.0.2") + bytes(24), 1229,
                   bytes.fromhex("e094e31ee08c"), 875464, 2, bytes(64))
    pkt = sign_request(pack_request(req), Hash.SHA256, key)
    assert pkt[112:144].hex() == ("9aad90018e476577ccc9f49812d7cb10"
                                  "88b41513031ec8acc201523b5cd4032e"), pkt[112:144].hex()
    assert verify_request(pkt, key, Hash.SHA256).domain == "pr-alpha"
    s = pack_serial_request(4, "pr-alpha", 0x01020304)
    assert s.hex() == "6162626104" + "00" + "70722d616c706861" + "00" * 56 + "04030201", s.hex()
    cfg = parse_config('a { b = "1"; b = "2"; }\na { c = "x"; }\n', "t")
    assert cfg.get("a/@b") is None and cfg.get("a/@c") == "x"
    for bad, line in (("", 1), ("a = b;", 1), ("a {\n};\n", 2), ('a = "x"\nb = "y";', 2)):
        try:
            parse_config(bad, "t")
        except ConfigError as e:
            assert "line %d" % line in str(e), (bad, str(e))
        else:
            raise AssertionError(bad)
    print("selftest ok")


def main(argv):
    if len(argv) > 1 and argv[1] in HELPERS:
        HELPERS[argv[1]](json.loads(argv[2]))
        return 0
    what = argv[1] if len(argv) > 1 else "all"
    if what == "selftest":
        selftest()
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    selftest()
    if what in ("all", "packets"):
        capture_packets()
    if what in ("all", "config"):
        check_config_cases()
    if CONTRADICTIONS:
        print("\n%d contradiction(s):" % len(CONTRADICTIONS))
        for c in CONTRADICTIONS:
            print("  - " + c)
        return 2
    print("\nno contradictions with protocol.md or the reference code")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
