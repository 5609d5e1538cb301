#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""fencevirt: fence_virtd, fence_xvm and fence_virt in one stdlib-only file.

The role is chosen by the name the file is run as:

    fence_virtd      host daemon (multicast/tcp/vsock listeners, libvirt backend)
    fence_xvm        guest fence agent over multicast with a TCP connect-back
    fence_virt       guest fence agent over tcp, vsock or serial
    libvirt          (in /usr/lib/stonith/plugins/external/) cluster-glue plugin

or by a subcommand: ``fencevirt.py virtd|xvm|virt|demo|keygen|check-config ...``.
Run ``fencevirt.py help`` for the list.

Contents (``grep -n '^# ====' -A1 fencevirt.py``): constants, errors, helpers,
config, wire, auth, backends, requests, listeners, daemon, client, agent, main.
"""
from __future__ import annotations

import collections
import enum
import errno
import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import sys
import syslog
import threading
import time

__version__ = "1.0.0"

# ============================================================================
# 1. Constants
# ============================================================================

DEFAULT_PORT = 1229
MCAST_IPV4 = "225.0.0.12"
MCAST_IPV6 = "ff05::3:1"
TCP_IPV4 = "127.0.0.1"
TCP_IPV6 = "::1"
CHANNEL_ADDRESS = "10.0.2.179"
DEFAULT_KEY_FILE = "/etc/cluster/fence_xvm.key"
DEFAULT_CONFIG = "/etc/fence_virt.conf"
DEFAULT_PIDFILE = "/run/fence_virtd.pid"
DEFAULT_MODULE_PATH = "/usr/lib/x86_64-linux-gnu/fence-virt"
DEFAULT_URI = "qemu:///system"
C_VERSION = "fence_xvm 1.9.0 / fence release 4.12.1"

MAX_DOMAIN_LEN = 64          # domain/uuid field size, NUL included
MAX_HASH_LEN = 64            # hash field and challenge size
MAX_KEY_LEN = 4096           # key bytes used from the key file
MIN_KEY_LEN = 16             # shorter keys get a warning
REQ_SIZE = 176
HOST_STATE_SIZE = 130
SERIAL_REQ_SIZE = 74
SERIAL_RESP_SIZE = 5
SERIAL_MAGIC = 0x61626261
MCAST_TTL = 2
HISTORY_SECONDS = 10.0       # C: (request, seqno, domain) served recently
REPLAY_SECONDS = 600.0       # ours: exact packets already served
REPLAY_MAX = 100000
CALLBACK_TIMEOUT = 5.0       # daemon: connect back to the client
AUTH_TIMEOUT = 10.0          # daemon: wait for the client's challenge / response
REQUEST_READ_TIMEOUT = 1.0   # daemon (tcp/vsock): the 176-byte request after accept
BACKEND_TIMEOUT = 20.0       # daemon: one fencing operation, end to end
OFF_VERIFY_TIMEOUT = 15.0    # C: reboot polls up to 15 s for SHUTOFF
MAX_WORKERS = 64
VMADDR_CID_ANY = 0xFFFFFFFF


class Request(enum.IntEnum):
    """Request codes (protocol.md §1.1)."""
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
    """Hash and auth types (protocol.md §1.2)."""
    NONE = 0
    SHA1 = 1
    SHA256 = 2
    SHA512 = 3

    @property
    def algorithm(self) -> str:
        return ("", "sha1", "sha256", "sha512")[self]

    @classmethod
    def parse(cls, word: str) -> Hash:
        try:
            return cls[word.strip().upper()]
        except KeyError:
            raise UsageError(f"unknown hash type {word!r} (use none, sha1, sha256 or sha512)") \
                from None


class Response(enum.IntEnum):
    """Result byte (protocol.md §1.3)."""
    SUCCESS = 0
    FAIL = 1
    OFF = 2
    DENIED = 3
    HOSTLIST = 253


class ExitCode(enum.IntEnum):
    """What C fence_xvm returns and Pacemaker reads."""
    OK = 0
    FAIL = 1
    OFF = 2
    DENIED = 3


class VirState(enum.IntEnum):
    """libvirt virDomainState, sent raw in host lists."""
    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


VIRSH_STATES = {
    "no state": VirState.NOSTATE, "running": VirState.RUNNING, "idle": VirState.BLOCKED,
    "blocked": VirState.BLOCKED, "paused": VirState.PAUSED, "in shutdown": VirState.SHUTDOWN,
    "shut off": VirState.SHUTOFF, "crashed": VirState.CRASHED,
    "pmsuspended": VirState.PMSUSPENDED,
}

# ============================================================================
# 2. Errors
# ============================================================================


class FenceError(Exception):
    """Base of every error a user can see; str(e) is the whole message."""
    exit_code = ExitCode.FAIL


class UsageError(FenceError):
    """Bad option, stdin line or parameter value."""


class ConfigError(FenceError):
    """Bad fence_virt.conf: the message names the file and line."""


class ProtocolError(FenceError):
    """Malformed or unexpected packet."""


class AuthError(FenceError):
    """Digest mismatch, hash too weak, replay."""


class DeniedError(FenceError):
    """Refused by the daemon's groups ACL."""
    exit_code = ExitCode.DENIED


class BackendError(FenceError):
    """libvirt refused or unreachable."""


class NoSuchDomain(BackendError):
    """The backend knows no domain of that name or UUID."""


class FenceTimeout(FenceError):
    """A wait ran out; the message says who we asked and what we heard."""


# ============================================================================
# 3. Helpers
# ============================================================================

log = logging.getLogger("fencevirt")


class SyslogHandler(logging.Handler):
    """logging -> syslog(3) through the syslog module (not UDP 514)."""

    PRIORITY = {logging.DEBUG: syslog.LOG_DEBUG, logging.INFO: syslog.LOG_INFO,
                logging.WARNING: syslog.LOG_WARNING, logging.ERROR: syslog.LOG_ERR,
                logging.CRITICAL: syslog.LOG_CRIT}

    def __init__(self, ident: str, facility: int = syslog.LOG_DAEMON):
        super().__init__()
        syslog.openlog(ident, syslog.LOG_PID, facility)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            syslog.syslog(self.PRIORITY.get(record.levelno, syslog.LOG_INFO),
                          self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


def setup_logging(ident: str, level: int = logging.WARNING, stderr: bool = True,
                  use_syslog: bool = False, syslog_level: int = logging.ERROR,
                  debug_file: str | None = None) -> None:
    """Route the fencevirt logger to stderr and/or syslog (and a debug file)."""
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    if stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(level)
        h.setFormatter(logging.Formatter(f"{ident}: %(message)s"))
        log.addHandler(h)
    if use_syslog:
        h = SyslogHandler(ident)
        h.setLevel(syslog_level)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    if debug_file:
        h = logging.FileHandler(debug_file)
        h.setLevel(logging.DEBUG)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(message)s"))
        log.addHandler(h)


class Deadline:
    """A point in monotonic time; remaining() never goes below zero."""

    __slots__ = ("end",)

    def __init__(self, seconds: float, now: float | None = None):
        self.end = (time.monotonic() if now is None else now) + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


def key_fingerprint(key: bytes) -> str:
    """Short, safe identifier of a key: sha256 of its bytes, first 16 hex digits."""
    if not key:
        return "none"
    return "sha256:" + hashlib.sha256(key).hexdigest()[:16]


def is_uuid(text: str) -> bool:
    """True for the canonical 8-4-4-4-12 hex form, either case (protocol.md §8.5)."""
    if len(text) != 36:
        return False
    for i, ch in enumerate(text):
        if i in (8, 13, 18, 23):
            if ch != "-":
                return False
        elif ch not in "0123456789abcdefABCDEF":
            return False
    return True


def decode_cstr(raw: bytes) -> str:
    """Bytes up to the first NUL, decoded as UTF-8 (invalid bytes escaped)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def parse_bool(value: str | None, name: str = "value") -> bool:
    """1/yes/on/true and 0/no/off/false; None (a bare key) means true."""
    if value is None:
        return True
    v = value.strip().lower()
    if v in ("1", "yes", "on", "true", "y"):
        return True
    if v in ("0", "no", "off", "false", "n", ""):
        return False
    raise UsageError(f"{name}: expected a boolean (1/yes/on/true or 0/no/off/false), "
                     f"got {value!r}")


def parse_port(value: str, name: str = "port") -> int:
    """A TCP/UDP port 1..65535 (decimal, or 0x.. as strtol base 0 accepts)."""
    try:
        port = int(value, 0)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: {value!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{name}: {port} is out of range 1-65535")
    return port


def address_family(address: str) -> int:
    """AF_INET or AF_INET6 for a numeric address; UsageError otherwise."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, address)
            return fam
        except (OSError, ValueError):
            continue
    raise UsageError(f"{address!r} is not a numeric IPv4 or IPv6 address")


def family_name(family: int) -> str:
    return {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(family, str(family))


def recv_exact(sock: socket.socket, size: int, deadline: Deadline, what: str) -> bytes:
    """Read exactly `size` bytes before `deadline`; FenceTimeout or ProtocolError on EOF."""
    chunks = []
    got = 0
    while got < size:
        left = deadline.remaining()
        if left <= 0:
            raise FenceTimeout(f"timed out reading {what} ({got} of {size} bytes arrived)")
        sock.settimeout(left)
        try:
            data = sock.recv(size - got)
        except socket.timeout:
            raise FenceTimeout(f"timed out reading {what} ({got} of {size} bytes arrived)") \
                from None
        except OSError as e:
            raise ProtocolError(f"connection error while reading {what}: "
                                f"{e.strerror or e}") from None
        if not data:
            raise ProtocolError(f"connection closed while reading {what} "
                                f"({got} of {size} bytes arrived)")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def send_all(sock: socket.socket, data: bytes, deadline: Deadline, what: str) -> None:
    """sendall with a deadline."""
    sock.settimeout(max(0.001, deadline.remaining()))
    try:
        sock.sendall(data)
    except socket.timeout:
        raise FenceTimeout(f"timed out sending {what}") from None
    except OSError as e:
        raise ProtocolError(f"connection error while sending {what}: {e.strerror or e}") \
            from None


# ============================================================================
# 4. Config: tokenizer -> parser -> Config (protocol.md §9)
# ============================================================================

Token = collections.namedtuple("Token", "kind value line")   # kind: { } ; = id str eof
Assign = collections.namedtuple("Assign", "name value line")


class Block:
    """A config block: name, optional value, items in file order."""

    __slots__ = ("name", "value", "items", "line")

    def __init__(self, name: str, value: str | None = None, line: int = 0):
        self.name = name
        self.value = value
        self.items: list = []
        self.line = line

    # C lookup: case-insensitive, the LAST match in the file wins.
    def block(self, name: str) -> Block | None:
        for item in reversed(self.items):
            if isinstance(item, Block) and item.name.lower() == name.lower():
                return item
        return None

    def blocks(self, name: str) -> list:
        """All blocks of that name, in file order."""
        return [i for i in self.items if isinstance(i, Block) and i.name.lower() == name.lower()]

    def assign(self, name: str) -> Assign | None:
        for item in reversed(self.items):
            if isinstance(item, Assign) and item.name.lower() == name.lower():
                return item
        return None

    def values(self, name: str) -> list:
        """Every value of a repeated key, in file order."""
        return [i.value for i in self.items
                if isinstance(i, Assign) and i.name.lower() == name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:
        a = self.assign(name)
        return default if a is None else a.value


_PUNCT = "{};="


def tokenize_config(text: str, source: str):
    """Yield Tokens from config text (protocol.md §9.1); lazily, so that a syntax
    error is reported before a lexical error further down (as the C parser does)."""
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch in " \t\r":
            i += 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch in _PUNCT:
            yield Token(ch, ch, line)
            i += 1
        elif ch == '"' and text[i + 1:i + 2] == '"':
            i += 1          # C compat: a lone '"' is skipped (so '""x"' reads as "x")
        elif ch == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ConfigError(f"{source}: line {line}: unterminated string")
            value = text[i + 1:end]
            yield Token("str", value, line)
            line += value.count("\n")
            i = end + 1
        else:
            start = i
            while i < n and text[i] not in ' \t\r\n{};="':
                i += 1
            yield Token("id", text[start:i], line)
    yield Token("eof", "", line)


class _Lookahead:
    """Index access to a token generator, filled on demand."""

    def __init__(self, gen):
        self.gen, self.buf = gen, []

    def __getitem__(self, i: int) -> Token:
        while len(self.buf) <= i:
            self.buf.append(next(self.gen))
        return self.buf[i]


def parse_config(text: str, source: str = DEFAULT_CONFIG) -> Config:
    """Parse fence_virt.conf text; ConfigError names `source` and the line."""
    tokens = _Lookahead(tokenize_config(text, source))
    pos = 0

    def fail(tok: Token, what: str):
        got = "end of file" if tok.kind == "eof" else repr(tok.value)
        raise ConfigError(f"{source}: line {tok.line}: {what}, found {got}")

    def items(block: Block, closing: bool) -> None:
        nonlocal pos
        while True:
            tok = tokens[pos]
            if tok.kind == "}":
                if not closing:
                    fail(tok, "unexpected '}'")
                pos += 1
                return
            if tok.kind == "eof":
                if closing:
                    fail(tok, f"missing '}}' to close block {block.name!r} "
                              f"opened on line {block.line}")
                return
            if tok.kind != "id":
                fail(tok, "expected a name")
            pos += 1
            nxt = tokens[pos]
            if nxt.kind == "{":
                pos += 1
                child = Block(tok.value, None, tok.line)
                block.items.append(child)
                items(child, True)
                continue
            if nxt.kind != "=":
                fail(nxt, f"expected '=' or '{{' after {tok.value!r}")
            pos += 1
            val = tokens[pos]
            if val.kind != "str":
                fail(val, f'expected a quoted value after "{tok.value} =" '
                          f'(values must be written as "...")')
            pos += 1
            end = tokens[pos]
            if end.kind == ";":
                pos += 1
                block.items.append(Assign(tok.value, val.value, tok.line))
            elif end.kind == "{":
                pos += 1
                child = Block(tok.value, val.value, tok.line)
                block.items.append(child)
                items(child, True)
            else:
                fail(end, f"expected ';' after the value of {tok.value!r}")

    root = Block("", None, 0)
    items(root, False)
    if not root.items:
        raise ConfigError(f"{source}: line {tokens[pos].line}: the file holds no settings")
    return Config(root, source)


class Config:
    """Parsed fence_virt.conf with C lookup semantics and typed getters."""

    __slots__ = ("root", "source")

    def __init__(self, root: Block, source: str):
        self.root = root
        self.source = source

    def node(self, path: str) -> Block | None:
        """Block at 'a/b/c' (last of each name wins), or None."""
        cur = self.root
        for part in [p for p in path.split("/") if p]:
            cur = cur.block(part) if cur is not None else None
        return cur

    def get(self, path: str, default: str | None = None) -> str | None:
        """C path lookup: 'fence_virtd/@listener', 'groups/group[1]/@uuid[2]'."""
        found = self._walk(path)
        return default if found is None else found

    def get_all(self, path: str) -> list:
        """Every value of a repeated key ('backends/libvirt/@uri'), in file order."""
        head, _, key = path.rpartition("/@")
        blk = self._walk(head) if head else self.root
        return blk.values(key) if isinstance(blk, Block) else []

    def _walk(self, path: str):
        cur = self.root
        parts = [p for p in path.split("/") if p]
        for idx, part in enumerate(parts):
            if cur is None:
                return None
            name, sel = part, None
            if "[" in part and part.endswith("]"):
                name, sel = part[:-1].split("[", 1)
            if name.startswith("@"):
                if idx != len(parts) - 1:
                    return None
                vals = cur.values(name[1:])
                if not vals:
                    return None
                n = int(sel) if sel else 1
                # C keeps items reversed: [1] is the last in the file
                return vals[-n] if 1 <= n <= len(vals) else None
            blocks = cur.blocks(name)
            if sel is None:
                cur = blocks[-1] if blocks else None
            elif sel.startswith("@"):
                cur = next((b for b in reversed(blocks)
                            if (b.value or "").lower() == sel[1:].lower()), None)
            else:
                n = int(sel)
                cur = blocks[-n] if 1 <= n <= len(blocks) else None
        return cur

    def line_of(self, path: str) -> int:
        """Line number of the assignment at 'a/b/@key' (0 when absent)."""
        head, _, key = path.rpartition("/@")
        blk = self.node(head) if head else self.root
        a = blk.assign(key) if blk is not None else None
        return a.line if a else 0

    def where(self, path: str) -> str:
        line = self.line_of(path)
        return f"{self.source}: line {line}" if line else self.source

    def uris(self, backend: str) -> list:
        """uri, uri1, uri2, ... until the first missing index (protocol.md §8.4)."""
        blk = self.node(f"backends/{backend}")
        if blk is None:
            return []
        out = []
        first = blk.get("uri")
        if first is not None:
            out.append(first)
        i = 1
        while blk.get(f"uri{i}") is not None:
            out.append(blk.get(f"uri{i}"))
            i += 1
        return out


def dump_config(block: Block, indent: int = 0) -> str:
    """Config text in C dump order: reversed, blocks before assignments (§9.3)."""
    out = []
    pad = "\t" * indent
    items = list(reversed(block.items))
    for b in (i for i in items if isinstance(i, Block)):
        head = f'{b.name} = "{b.value}" {{' if b.value is not None else f"{b.name} {{"
        out.append(f"{pad}{head}\n{dump_config(b, indent + 1)}{pad}}}\n")
        out.append("\n" if indent == 0 else "")
    for a in (i for i in items if isinstance(i, Assign)):
        out.append(f'{pad}{a.name} = "{a.value}";\n')
    return "".join(out)


# Known keys, for check_config (ours and the C daemon's).
KNOWN_KEYS = {
    "fence_virtd": {"listener", "backend", "module_path", "foreground", "wait_for_init",
                    "wait_for_backend", "debug", "name_mode", "backend_timeout"},
    "listeners/multicast": {"key_file", "hash", "auth", "family", "address", "port",
                            "interface", "check_source"},
    "listeners/tcp": {"key_file", "hash", "auth", "family", "address", "port"},
    "listeners/vsock": {"key_file", "hash", "auth", "port"},
    "listeners/serial": {"uri", "path", "mode", "key_file"},
    "backends/libvirt": {"uri", "driver"},
    "backends/cpg": {"uri", "name_mode", "driver"},
    "backends/sim": {"domain", "delay"},
    "groups/group": {"name", "ip", "uuid"},
}


def check_config(cfg: Config, listeners=(), backends=()) -> list:
    """Problems in a parsed config, each 'file: line N: text'; [] when clean."""
    problems = []

    def bad(line: int, text: str):
        problems.append(f"{cfg.source}: line {line}: {text}" if line else f"{cfg.source}: {text}")

    top_known = {"fence_virtd", "listeners", "backends", "groups"}
    for item in cfg.root.items:
        if isinstance(item, Block) and item.name.lower() not in top_known:
            bad(item.line, f"unknown section {item.name!r}")
    for path, keys in KNOWN_KEYS.items():
        head, _, leaf = path.rpartition("/")
        parents = [cfg.root] if not head else [b for b in [cfg.node(head)] if b is not None]
        for parent in parents:
            for blk in parent.blocks(leaf):
                for item in blk.items:
                    if isinstance(item, Assign) and item.name.lower() not in keys \
                            and not (leaf in ("libvirt", "cpg")
                                     and item.name.lower()[:3] == "uri"
                                     and item.name[3:].isdigit()):
                        bad(item.line, f"unknown key {item.name!r} in {path}")
                    elif isinstance(item, Block):
                        bad(item.line, f"unknown section {item.name!r} in {path}")
    for sect, known in (("listeners", listeners), ("backends", backends)):
        blk = cfg.node(sect)
        for item in (blk.items if blk else []):
            if isinstance(item, Block) and known and item.name.lower() not in known:
                bad(item.line, f"unknown {sect[:-1]} {item.name!r} "
                               f"(known: {', '.join(sorted(known))})")
    fv = cfg.node("fence_virtd")
    for key, known in (("listener", listeners), ("backend", backends)):
        a = fv.assign(key) if fv else None
        if a is None:
            bad(0, f"fence_virtd {{ {key} = \"...\"; }} is missing")
        elif known and a.value.lower() not in known:
            bad(a.line, f"unknown {key} {a.value!r} (known: {', '.join(sorted(known))})")
    for lname in ("multicast", "tcp", "vsock"):
        blk = cfg.node(f"listeners/{lname}")
        if blk is None:
            continue
        for key in ("hash", "auth"):
            a = blk.assign(key)
            if a and a.value.lower() not in ("none", "sha1", "sha256", "sha512"):
                bad(a.line, f"{key} = {a.value!r}: use none, sha1, sha256 or sha512")
        a = blk.assign("family")
        if a and a.value.lower() not in ("ipv4", "ipv6"):
            bad(a.line, f"family = {a.value!r}: use ipv4 or ipv6")
        a = blk.assign("port")
        if a:
            try:
                parse_port(a.value)
            except UsageError as e:
                bad(a.line, str(e))
        a = blk.assign("address")
        if a:
            try:
                fam = address_family(a.value)
                want = blk.get("family", "ipv4").lower()
                if want in ("ipv4", "ipv6") and family_name(fam) != want:
                    bad(a.line, f"address {a.value!r} is not an {want} address "
                                f"(family = {want!r})")
                elif lname == "multicast" and not _is_multicast(a.value, fam):
                    bad(a.line, f"address {a.value!r} is not a multicast address")
            except UsageError as e:
                bad(a.line, str(e))
    for bname in ("libvirt", "cpg"):
        blk = cfg.node(f"backends/{bname}")
        for item in (blk.items if blk else []):
            if isinstance(item, Assign) and item.name.lower().startswith("uri") \
                    and ":" not in item.value:
                bad(item.line, f"{item.name} = {item.value!r} is not a libvirt URI "
                               f"(like qemu:///system)")
    return problems


def _is_multicast(address: str, family: int) -> bool:
    packed = socket.inet_pton(family, address)
    return 224 <= packed[0] <= 239 if family == socket.AF_INET else packed[0] == 0xFF


def load_config(path: str) -> Config:
    """Read and parse a config file; ConfigError when missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, path)


# ============================================================================
# 5. Wire format: pack/unpack (pure: bytes in, bytes out)
# ============================================================================

FENCE_REQ = struct.Struct("<BBBB64s28sH6sII64s")        # protocol.md §2 (fence_req_t)
HOST_STATE = struct.Struct("<64s64sBB")                 # protocol.md §4.4 (host_state_t)
SERIAL_REQ = struct.Struct("<IBB64sI")                  # protocol.md §6.1 (serial_req_t)
SERIAL_RESP = struct.Struct("<IB")
HASH_OFFSET = 112
assert FENCE_REQ.size == REQ_SIZE and HOST_STATE.size == HOST_STATE_SIZE  # layout, not input
assert SERIAL_REQ.size == SERIAL_REQ_SIZE and SERIAL_RESP.size == SERIAL_RESP_SIZE

FenceReq = collections.namedtuple(
    "FenceReq", "request hashtype addrlen flags domain address port random seqno family hash")
SerialReq = collections.namedtuple("SerialReq", "magic request flags domain seqno")
HostInfo = collections.namedtuple("HostInfo", "name uuid state")
RF_UUID = 0x01


def encode_domain(domain: str) -> bytes:
    """Domain text for the 64-byte field; ProtocolError when 64 bytes or more."""
    raw = domain.encode("utf-8")
    if len(raw) >= MAX_DOMAIN_LEN:
        raise ProtocolError(f"domain name {domain!r} is {len(raw)} bytes; "
                            f"at most {MAX_DOMAIN_LEN - 1} fit in a request")
    if b"\0" in raw:
        raise ProtocolError("domain name contains a NUL byte")
    return raw


def pack_request(req: FenceReq) -> bytes:
    """176 bytes, little-endian; the hash field is packed as given."""
    return FENCE_REQ.pack(req.request, req.hashtype, req.addrlen, req.flags,
                          encode_domain(req.domain), req.address, req.port, req.random,
                          req.seqno, req.family, req.hash)


def unpack_request(data: bytes) -> FenceReq:
    """Decode a request; longer data is cut to 176 bytes as the C daemon does."""
    if len(data) < REQ_SIZE:
        raise ProtocolError(f"short request: {len(data)} bytes, expected {REQ_SIZE}")
    f = FENCE_REQ.unpack(data[:REQ_SIZE])
    return FenceReq(f[0], f[1], f[2], f[3], decode_cstr(f[4]), f[5], f[6], f[7], f[8],
                    f[9], f[10])


def make_request(request: int, domain: str = "", *, address: bytes = b"", family: int = 0,
                 port: int = 0, seqno: int = 0, flags: int = 0,
                 random: bytes = b"\0" * 6) -> FenceReq:
    """An unsigned FenceReq; address is the packed in_addr/in6_addr (or empty)."""
    return FenceReq(int(request), 0, len(address), flags, domain,
                    address.ljust(28, b"\0"), port, random, seqno, family, b"\0" * 64)


def request_address(req: FenceReq) -> str | None:
    """The call-back address text by `family` (addrlen is ignored, as in C)."""
    if req.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, req.address[:4])
    if req.family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, req.address[:16])
    return None


def pack_host_state(name: str, uuid: str, state: int) -> bytes:
    """130-byte list record; names are cut to 63 bytes, zeros where C sends garbage."""
    return HOST_STATE.pack(name.encode("utf-8")[:63], uuid.encode("utf-8")[:63],
                           int(state) & 0xFF, 0)


def unpack_host_state(data: bytes) -> HostInfo:
    """Decode a list record, cutting each field at the first NUL within it."""
    if len(data) != HOST_STATE_SIZE:
        raise ProtocolError(f"host record of {len(data)} bytes, expected {HOST_STATE_SIZE}")
    name, uuid, state, _pad = HOST_STATE.unpack(data)
    # byte 63 of each field is never written by C (stack garbage): ignore it
    return HostInfo(decode_cstr(name[:63]), decode_cstr(uuid[:63]), state)


def pack_hostlist(hosts) -> bytes:
    """0xFD, the records, the zero terminator and the final result byte 0."""
    body = b"".join(pack_host_state(h.name, h.uuid, h.state) for h in hosts)
    return bytes([Response.HOSTLIST]) + body + b"\0" * HOST_STATE_SIZE + b"\0"


def pack_serial_request(request: int, domain: str, seqno: int, flags: int = 0) -> bytes:
    return SERIAL_REQ.pack(SERIAL_MAGIC, int(request), flags, encode_domain(domain),
                           seqno & 0xFFFFFFFF)


def unpack_serial_request(data: bytes) -> SerialReq:
    if len(data) != SERIAL_REQ_SIZE:
        raise ProtocolError(f"serial request of {len(data)} bytes, expected {SERIAL_REQ_SIZE}")
    magic, request, flags, domain, seqno = SERIAL_REQ.unpack(data)
    return SerialReq(magic, request, flags, decode_cstr(domain), seqno)


def pack_serial_response(response: int) -> bytes:
    return SERIAL_RESP.pack(SERIAL_MAGIC, int(response) & 0xFF)


# ============================================================================
# 6. Auth: keyed digests, challenge/response (pure), then read_key_file()
# ============================================================================


def keyed_digest(hashtype: Hash, key: bytes, data: bytes) -> bytes:
    """hash(key || data), as simple_auth.c computes it. It is not HMAC: don't 'fix' it."""
    return hashlib.new(Hash(hashtype).algorithm, key + data).digest()


def sign_request(packet: bytes, hashtype: Hash, key: bytes) -> bytes:
    """Packet with hashtype set and the hash field = H(key || pkt[:112] || 0*64) (§2.1)."""
    pkt = bytearray(packet[:REQ_SIZE])
    pkt[1] = int(hashtype)
    pkt[HASH_OFFSET:] = b"\0" * MAX_HASH_LEN
    if hashtype != Hash.NONE:
        pkt[HASH_OFFSET:] = keyed_digest(hashtype, key, bytes(pkt)).ljust(MAX_HASH_LEN, b"\0")
    return bytes(pkt)


def verify_request(packet: bytes, key: bytes, min_hash: Hash) -> FenceReq:
    """Decode and check a signed request (protocol.md §2.1 order); AuthError if refused."""
    req = unpack_request(packet)
    packet = packet[:REQ_SIZE]
    if req.hashtype > Hash.SHA512:
        raise AuthError(f"unknown hash type {req.hashtype}")
    if req.hashtype < min_hash:
        raise AuthError(f"hash too weak: request signed with {Hash(req.hashtype).name.lower()},"
                        f" this daemon requires at least {Hash(min_hash).name.lower()}")
    if req.hashtype == Hash.NONE:
        return req
    if not key:
        raise AuthError(f"request signed with {Hash(req.hashtype).name.lower()} but this "
                        f"daemon runs without a key (hash and auth are none)")
    if not hmac.compare_digest(sign_request(packet, Hash(req.hashtype), key), packet):
        raise AuthError(f"key mismatch: {Hash(req.hashtype).name.lower()} digest does not "
                        f"match our key {key_fingerprint(key)}")
    return req


def challenge_response(hashtype: Hash, key: bytes, challenge: bytes) -> bytes:
    """H(key || challenge) zero-filled to 64 bytes (§4.2)."""
    return keyed_digest(hashtype, key, challenge).ljust(MAX_HASH_LEN, b"\0")


def check_response(hashtype: Hash, key: bytes, challenge: bytes, response: bytes) -> bool:
    """All 64 bytes compared, in constant time."""
    return hmac.compare_digest(challenge_response(hashtype, key, challenge), response)


def make_challenge(random=os.urandom) -> bytes:
    return random(MAX_HASH_LEN)


def read_key_file(path: str, *, strict: bool = True) -> bytes:
    """Key bytes (first 4096, newline included); BackendError-free: ConfigError/UsageError.

    strict: refuse missing, unreadable, empty or non-regular files with a fix in the message.
    """
    import stat
    fix = f"create one with `fencevirt.py keygen {path}` and copy it to every guest"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist; {fix}") from None
    except OSError as e:
        raise ConfigError(f"key file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"key file {path} is not a regular file; {fix}")
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_LEN)
    except OSError as e:
        raise ConfigError(f"key file {path} is not readable: {e.strerror} "
                          f"(check its owner and mode)") from None
    if not key:
        raise ConfigError(f"key file {path} is empty; {fix}")
    if len(key) < MIN_KEY_LEN:
        log.warning("key file %s holds only %d bytes; use at least %d random bytes",
                    path, len(key), MIN_KEY_LEN)
    if strict and st.st_mode & 0o077:
        log.warning("key file %s is readable by group or others (mode %04o)",
                    path, st.st_mode & 0o7777)
    return key


# ============================================================================
# 7. Backends: Backend base, sim, libvirt (python binding or virsh), registry
# ============================================================================


def register(table: dict, name: str):
    """Decorator: file a class or function in `table` under `name`."""
    def add(obj):
        if name in table:
            raise RuntimeError(f"{name!r} registered twice")
        table[name] = obj
        return obj
    return add


BACKENDS: dict = {}


class Backend:
    """Domain access for the daemon; fencing semantics live in section 8.

    lookup() takes a name or UUID and raises NoSuchDomain; state() raises NoSuchDomain
    when the domain vanished; destroy()/create() raise BackendError on failure.
    """

    name = "?"
    driver = ""

    def __init__(self, cfg: Config | None):
        self.cfg = cfg

    def describe(self) -> str:
        return self.name

    def ping(self) -> None:
        """Raise BackendError when the hypervisor cannot be reached."""

    def domains(self) -> list:
        raise NotImplementedError

    def lookup(self, domain: str) -> HostInfo:
        want = domain.lower() if is_uuid(domain) else domain
        for h in self.domains():
            if (h.uuid.lower() == want) if is_uuid(domain) else (h.name == want):
                return h
        raise NoSuchDomain(f"no domain named {domain!r} on {self.describe()}")

    def state(self, info: HostInfo) -> int:
        return self.lookup(info.uuid or info.name).state

    def destroy(self, info: HostInfo) -> None:
        raise NotImplementedError

    def create(self, info: HostInfo) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@register(BACKENDS, "sim")
class SimBackend(Backend):
    """In-memory domains: the README demo and the dispatcher's tests.

    backends { sim { domain = "name uuid on|off"; delay = "0.1"; } }
    """

    name = "sim"
    driver = "memory"
    DEFAULT = (("sim-1", "5a5a5a5a-0000-4000-8000-000000000001", "on"),
               ("sim-2", "5a5a5a5a-0000-4000-8000-000000000002", "on"),
               ("sim-3", "5a5a5a5a-0000-4000-8000-000000000003", "on"),
               ("sim-4", "5a5a5a5a-0000-4000-8000-000000000004", "off"))

    def __init__(self, cfg: Config | None):
        super().__init__(cfg)
        blk = cfg.node("backends/sim") if cfg else None
        lines = blk.values("domain") if blk else []
        specs = [tuple(line.split()) for line in lines] or self.DEFAULT
        self.delay = float(blk.get("delay", "0")) if blk else 0.0
        self.lock = threading.Lock()
        self.doms: dict = {}
        for spec in specs:
            if len(spec) != 3:
                raise ConfigError(f"backends/sim domain {' '.join(spec)!r}: "
                                  f"expected \"name uuid on|off\"")
            name, uuid, st = spec
            state = VirState.RUNNING if st in ("on", "running", "1") else VirState.SHUTOFF
            self.doms[uuid.lower()] = HostInfo(name, uuid.lower(), int(state))

    def domains(self) -> list:
        with self.lock:
            return list(self.doms.values())

    def _set(self, info: HostInfo, state: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if info.uuid not in self.doms:
                raise NoSuchDomain(f"domain {info.name!r} vanished")
            self.doms[info.uuid] = self.doms[info.uuid]._replace(state=state)

    def destroy(self, info: HostInfo) -> None:
        self._set(info, VirState.SHUTOFF)

    def create(self, info: HostInfo) -> None:
        self._set(info, VirState.RUNNING)


class LibvirtPython:
    """libvirt-python driver: one persistent connection per URI, reopened when dead."""

    name = "python"

    def __init__(self, uris: list):
        try:
            import libvirt
        except ImportError as e:
            raise BackendError(f"libvirt-python not importable: {e}") from None
        self.libvirt = libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.uris = uris
        self.conns: list = [None] * len(uris)
        self.retry_at = [0.0] * len(uris)
        self.backoff = [0.5] * len(uris)
        self.errors: list = [""] * len(uris)
        self.lock = threading.Lock()

    def _conn(self, i: int):
        """The i-th connection, opened or reopened with a bounded back-off."""
        with self.lock:
            conn = self.conns[i]
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except self.libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s is dead; reconnecting", self.uris[i])
                try:
                    conn.close()
                except self.libvirt.libvirtError:
                    pass
                self.conns[i] = None
            now = time.monotonic()
            if now < self.retry_at[i]:
                raise BackendError(f"libvirt at {self.uris[i]} unreachable: {self.errors[i]} "
                                   f"(next retry in {self.retry_at[i] - now:.1f} s)")
            try:
                conn = self.libvirt.open(self.uris[i])
            except self.libvirt.libvirtError as e:
                self.errors[i] = str(e)
                self.retry_at[i] = now + self.backoff[i]
                self.backoff[i] = min(self.backoff[i] * 2, 10.0)
                raise BackendError(f"cannot connect to libvirt at {self.uris[i]}: {e}") \
                    from None
            self.backoff[i] = 0.5
            self.retry_at[i] = 0.0
            self.conns[i] = conn
            return conn

    def _each(self):
        """(index, conn) for every reachable URI; BackendError when none is."""
        errors = []
        for i in range(len(self.uris)):
            try:
                yield i, self._conn(i)
            except BackendError as e:
                errors.append(str(e))
        if len(errors) == len(self.uris):
            raise BackendError("; ".join(errors))

    def _err(self, e, what: str) -> BackendError:
        if e.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
            return NoSuchDomain(f"{what}: domain not found")
        return BackendError(f"{what}: libvirt: {e}")

    def ping(self) -> None:
        for _i, conn in self._each():
            try:
                conn.getLibVersion()
            except self.libvirt.libvirtError as e:
                raise self._err(e, "ping") from None

    def domains(self) -> list:
        out = []
        for i, conn in self._each():
            try:
                stats = conn.getAllDomainStats(self.libvirt.VIR_DOMAIN_STATS_STATE)
                out.extend(HostInfo(d.name(), d.UUIDString(), s.get("state.state", 0))
                           for d, s in stats)
            except self.libvirt.libvirtError as e:
                if e.get_error_code() != self.libvirt.VIR_ERR_NO_SUPPORT:
                    raise self._err(e, f"list domains on {self.uris[i]}") from None
                out.extend(HostInfo(d.name(), d.UUIDString(), d.state()[0])
                           for d in conn.listAllDomains(0))
        return out

    def _dom(self, domain: str):
        for _i, conn in self._each():
            try:
                if is_uuid(domain):
                    return conn.lookupByUUIDString(domain)
                return conn.lookupByName(domain)
            except self.libvirt.libvirtError as e:
                if e.get_error_code() != self.libvirt.VIR_ERR_NO_DOMAIN:
                    raise self._err(e, f"look up {domain!r}") from None
        raise NoSuchDomain(f"no domain {domain!r} at {', '.join(self.uris)}")

    def lookup(self, domain: str) -> HostInfo:
        dom = self._dom(domain)
        try:
            return HostInfo(dom.name(), dom.UUIDString(), dom.state()[0])
        except self.libvirt.libvirtError as e:
            raise self._err(e, f"state of {domain!r}") from None

    def call(self, info: HostInfo, op: str) -> None:
        dom = self._dom(info.uuid)
        try:
            getattr(dom, op)()
        except self.libvirt.libvirtError as e:
            raise self._err(e, f"{op} {info.name!r}") from None

    def close(self) -> None:
        for c in self.conns:
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass


class LibvirtVirsh:
    """virsh driver: one `virsh -c URI` process per call (LC_ALL=C, bounded by a timeout)."""

    name = "virsh"
    TIMEOUT = 15.0

    def __init__(self, uris: list):
        import shutil
        self.virsh = shutil.which("virsh") or ("/usr/bin/virsh" if os.path.exists(
            "/usr/bin/virsh") else None)
        if not self.virsh:
            raise BackendError("virsh not found (install libvirt-clients)")
        self.uris = uris

    def run(self, uri: str, *args: str) -> str:
        import subprocess
        env = dict(os.environ, LC_ALL="C", LANG="C")
        try:
            p = subprocess.run([self.virsh, "-q", "-c", uri, *args], capture_output=True,
                               text=True, timeout=self.TIMEOUT, env=env,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BackendError(f"virsh -c {uri} {args[0]} did not answer within "
                               f"{self.TIMEOUT:.0f} s (libvirtd hung?)") from None
        if p.returncode != 0:
            err = " ".join(p.stderr.split()) or f"exit status {p.returncode}"
            if "failed to get domain" in err or "Domain not found" in err:
                raise NoSuchDomain(f"virsh -c {uri}: {err}")
            raise BackendError(f"virsh -c {uri} {args[0]}: {err}")
        return p.stdout

    def _each(self, fn):
        errors = []
        for uri in self.uris:
            try:
                yield fn(uri)
            except NoSuchDomain:
                raise
            except BackendError as e:
                errors.append(str(e))
        if len(errors) == len(self.uris):
            raise BackendError("; ".join(errors))

    def ping(self) -> None:
        for _ in self._each(lambda uri: self.run(uri, "version")):
            pass

    def domains(self) -> list:
        out = []
        for text in self._each(lambda uri: self.run(
                uri, "list --all --uuid --name; domstats --state --raw")):
            names, states, current = {}, {}, None
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("Domain: '") and line.endswith("'"):
                    current = line[9:-1]
                elif line.startswith("state.state=") and current is not None:
                    states[current] = int(line.split("=", 1)[1])
                elif len(line) > 37 and is_uuid(line[:36]) and line[36] == " ":
                    names[line[37:]] = line[:36]
            out.extend(HostInfo(n, u, states.get(n, 0)) for n, u in names.items())
        return out

    def lookup(self, domain: str) -> HostInfo:
        for uri in self.uris:
            try:
                text = self.run(uri, "dominfo", "--domain", domain)
            except NoSuchDomain:
                continue
            f = {}
            for line in text.splitlines():
                k, _, v = line.partition(":")
                f[k.strip()] = v.strip()
            return HostInfo(f.get("Name", domain), f.get("UUID", ""),
                            int(VIRSH_STATES.get(f.get("State", ""), VirState.NOSTATE)))
        raise NoSuchDomain(f"no domain {domain!r} at {', '.join(self.uris)}")

    def call(self, info: HostInfo, op: str) -> None:
        cmd = {"destroy": "destroy", "create": "start"}[op]
        for uri in self.uris:
            try:
                self.run(uri, "dominfo", "--domain", info.uuid)
            except NoSuchDomain:
                continue
            self.run(uri, cmd, "--domain", info.uuid)
            return
        raise NoSuchDomain(f"domain {info.name!r} vanished")

    def close(self) -> None:
        pass


LIBVIRT_DRIVERS = {"python": LibvirtPython, "virsh": LibvirtVirsh}


def open_libvirt_driver(uris: list, want: str = "auto"):
    """The python binding, else virsh (sshuttle's get_auto_method); BackendError names both."""
    want = (os.environ.get("FENCEVIRT_LIBVIRT_DRIVER") or want or "auto").lower()
    if want != "auto":
        if want not in LIBVIRT_DRIVERS:
            raise ConfigError(f"unknown libvirt driver {want!r} (use auto, python or virsh)")
        return LIBVIRT_DRIVERS[want](uris)
    tried = []
    for name, cls in LIBVIRT_DRIVERS.items():
        try:
            return cls(uris)
        except BackendError as e:
            tried.append(f"{name}: {e}")
    raise BackendError("no libvirt driver usable: " + "; ".join(tried))


@register(BACKENDS, "libvirt")
class LibvirtBackend(Backend):
    """backends { libvirt { uri = "qemu:///system"; uri1 = "..."; driver = "auto"; } }"""

    name = "libvirt"

    def __init__(self, cfg: Config | None, uris: list | None = None, driver: str = "auto"):
        super().__init__(cfg)
        if uris is None:
            uris = cfg.uris(self.name) if cfg else []
            driver = (cfg.get(f"backends/{self.name}/@driver") if cfg else None) or driver
        if not uris:
            raise ConfigError(f"backends {{ {self.name} {{ uri = \"...\"; }} }} is missing "
                              f"(for example uri = \"{DEFAULT_URI}\")")
        self.uris = uris
        self.impl = open_libvirt_driver(uris, driver)
        self.driver = self.impl.name

    def describe(self) -> str:
        return f"libvirt ({self.driver}) at {', '.join(self.uris)}"

    def ping(self) -> None:
        self.impl.ping()

    def domains(self) -> list:
        return self.impl.domains()

    def lookup(self, domain: str) -> HostInfo:
        return self.impl.lookup(domain)

    def state(self, info: HostInfo) -> int:
        return self.impl.lookup(info.uuid).state

    def destroy(self, info: HostInfo) -> None:
        self.impl.call(info, "destroy")

    def create(self, info: HostInfo) -> None:
        self.impl.call(info, "create")

    def close(self) -> None:
        self.impl.close()


def open_backend(cfg: Config) -> Backend:
    name = (cfg.get("fence_virtd/@backend") or "").lower()
    if not name:
        raise ConfigError(f"{cfg.source}: fence_virtd {{ backend = \"libvirt\"; }} is missing")
    if name not in BACKENDS:
        raise ConfigError(f"{cfg.where('fence_virtd/@backend')}: unknown backend {name!r} "
                          f"(known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name](cfg)


# ============================================================================
# 8. Requests: groups ACL and the fencing semantics, backend calls only
# ============================================================================


class Acl:
    """groups { group { name ip uuid } } (protocol.md §8.3)."""

    __slots__ = ("groups",)

    def __init__(self, groups: list):
        self.groups = groups          # [(name, {ip...}, {uuid or name...})], lowercased

    @classmethod
    def from_config(cls, cfg: Config | None) -> Acl:
        groups = []
        blk = cfg.node("groups") if cfg else None
        for n, g in enumerate(blk.blocks("group") if blk else [], 1):
            ips = {v.lower()[:127] for v in g.values("ip")}
            uuids = {v.lower()[:127] for v in g.values("uuid")}
            if ips or uuids:
                groups.append((g.get("name") or f"unnamed-{n}", ips, uuids))
        return cls(groups)

    def active(self) -> bool:
        return bool(self.groups)

    def _mine(self, source: str) -> list:
        src = source.lower()
        key = 2 if is_uuid(source) else 1
        return [g for g in self.groups if src in g[key]]

    def allows(self, source: str, domain: str) -> bool:
        """on/off/reboot/status: the request's domain string exactly as sent."""
        if not self.groups:
            return True
        return any(domain.lower() in g[2] for g in self._mine(source))

    def allows_host(self, source: str, host: HostInfo) -> bool:
        """list: the VM's UUID or its name."""
        if not self.groups:
            return True
        return any(host.uuid.lower() in g[2] or host.name.lower() in g[2]
                   for g in self._mine(source))


class DomainLocks:
    """One lock per domain, so two reboots of one VM cannot interleave."""

    def __init__(self):
        self.lock = threading.Lock()
        self.locks: dict = {}

    def get(self, key: str) -> threading.Lock:
        with self.lock:
            return self.locks.setdefault(key.lower(), threading.Lock())


def sorted_hosts(hosts) -> list:
    return sorted(hosts, key=lambda h: (h.name.lower(), h.name))


def wait_off(backend: Backend, info: HostInfo, timeout: float, sleep=time.sleep) -> bool:
    """Poll until the domain is SHUTOFF or gone; False when `timeout` runs out."""
    deadline = Deadline(timeout)
    delay = 0.05
    while True:
        try:
            if backend.state(info) == VirState.SHUTOFF:
                return True
        except NoSuchDomain:
            return True          # a transient domain disappears when destroyed
        if deadline.expired():
            return False
        sleep(min(delay, deadline.remaining()))
        delay = min(delay * 2, 1.0)


def do_off(backend: Backend, info: HostInfo, verify: float) -> Response:
    if info.state == VirState.SHUTOFF:
        log.info("%r is already off", info.name)
        return Response.SUCCESS
    backend.destroy(info)
    if not wait_off(backend, info, verify):
        log.error("%r: destroy returned but the domain is still not off after %.0f s",
                  info.name, verify)
        return Response.FAIL
    return Response.SUCCESS


def do_on(backend: Backend, info: HostInfo, verify: float) -> Response:
    if info.state != VirState.SHUTOFF:
        return Response.SUCCESS
    backend.create(info)
    return Response.SUCCESS


def do_reboot(backend: Backend, info: HostInfo, verify: float) -> Response:
    if info.state == VirState.SHUTOFF:
        # C compat: an off domain stays off and the reboot succeeds (it is fenced).
        log.info("reboot %r: the domain is off; nothing to do (left off)", info.name)
        return Response.SUCCESS
    if do_off(backend, info, verify) != Response.SUCCESS:
        return Response.FAIL
    try:
        backend.create(info)
    except BackendError as e:
        # The fence itself (the off part) succeeded: report success, but loudly.
        log.error("reboot %r: the domain was powered off but did not start again: %s",
                  info.name, e)
    return Response.SUCCESS


def do_status(backend: Backend, info: HostInfo, verify: float) -> Response:
    return Response.OFF if info.state == VirState.SHUTOFF else Response.SUCCESS


DOMAIN_ACTIONS = {Request.OFF: do_off, Request.ON: do_on, Request.REBOOT: do_reboot,
                  Request.STATUS: do_status}


def handle_request(req: FenceReq, backend: Backend, acl: Acl, source: str,
                   locks: DomainLocks | None = None,
                   verify: float = OFF_VERIFY_TIMEOUT) -> Response | list:
    """Decide and act: a Response, or the (ACL-filtered) host list for HOSTLIST."""
    try:
        code = Request(req.request)
    except ValueError:
        log.warning("unknown request code %d from %s", req.request, source)
        return Response.FAIL
    if code == Request.HOSTLIST:
        return [h for h in sorted_hosts(backend.domains()) if acl.allows_host(source, h)]
    if code == Request.DEVSTATUS:
        backend.ping()
        return Response.SUCCESS
    action = DOMAIN_ACTIONS.get(code)
    if action is None:                      # NULL, METADATA, VALIDATEALL: C answers 1
        return Response.FAIL
    if not acl.allows(source, req.domain):
        log.warning("denied: %s may not %s %r (groups)", source, code.name.lower(),
                    req.domain)
        return Response.DENIED
    try:
        info = backend.lookup(req.domain)
    except NoSuchDomain:
        log.info("%s %r: unknown domain on %s", code.name.lower(), req.domain,
                 backend.describe())
        return Response.OFF if code == Request.STATUS else Response.FAIL
    lock = (locks or DomainLocks()).get(info.uuid or info.name)
    if not lock.acquire(timeout=verify * 2 + 5):
        log.error("%s %r: another request for this domain is still running",
                  code.name.lower(), info.name)
        return Response.FAIL
    try:
        if code != Request.STATUS:
            info = backend.lookup(info.uuid or req.domain)   # fresh state under the lock
        return action(backend, info, verify)
    except NoSuchDomain:
        log.warning("%s %r: the domain vanished during the request", code.name.lower(),
                    req.domain)
        return Response.OFF if code == Request.STATUS else Response.FAIL
    finally:
        lock.release()


# ============================================================================
# 9. Listeners: multicast, tcp, vsock; each turns bytes into verified requests
# ============================================================================

LISTENERS: dict = {}


class History:
    """Requests served recently: (request, seqno, domain) for 10 s as the C daemon keeps
    them, plus the exact packets served (their digests) for REPLAY_SECONDS."""

    def __init__(self, window: float = HISTORY_SECONDS, replay: float = REPLAY_SECONDS):
        self.window = window
        self.replay = replay
        self.lock = threading.Lock()
        self.served: dict = {}
        self.inflight: set = set()
        self.packets: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def key(req: FenceReq) -> tuple:
        return (req.request, req.seqno, req.domain.lower())

    def _purge(self, now: float) -> None:
        for k in [k for k, t in self.served.items() if now - t > self.window]:
            del self.served[k]
        while self.packets and (now - next(iter(self.packets.values())) > self.replay
                                or len(self.packets) > REPLAY_MAX):
            self.packets.popitem(last=False)

    def begin(self, req: FenceReq, packet: bytes, now: float) -> str | None:
        """Reason to drop the request as a duplicate, or None (then it is in flight)."""
        k = self.key(req)
        digest = hashlib.sha256(packet[:REQ_SIZE]).digest()
        with self.lock:
            self._purge(now)
            if digest in self.packets:
                return "replay of a packet already served"
            if k in self.served:
                return "duplicate: we just did this request"
            if k in self.inflight:
                return "duplicate: this request is being served"
            self.inflight.add(k)
            return None

    def end(self, req: FenceReq, packet: bytes, served: bool, now: float) -> None:
        k = self.key(req)
        with self.lock:
            self.inflight.discard(k)
            if served:
                self.served[k] = now
                self.packets[hashlib.sha256(packet[:REQ_SIZE]).digest()] = now


class ListenerSettings:
    """key_file/hash/auth of one listener block, with the key read (fail closed)."""

    __slots__ = ("key", "key_file", "min_hash", "auth")

    def __init__(self, blk: Block | None, where: str, auth_sets_hash: bool = False):
        get = blk.get if blk is not None else (lambda _k, d=None: d)
        try:
            self.min_hash = Hash.parse(get("hash", "sha256"))
            self.auth = Hash.parse(get("auth", "sha256"))
        except UsageError as e:
            raise ConfigError(f"{where}: {e}") from None
        if auth_sets_hash and get("auth") is not None:
            # C compat: in tcp/vsock blocks `auth` sets the packet-hash minimum and the
            # challenge stays sha256 (protocol.md §5.3).
            log.warning("%s: auth = %r sets the packet hash minimum here, as in the C "
                        "daemon; the challenge/response stays sha256", where, get("auth"))
            self.min_hash, self.auth = self.auth, Hash.SHA256
        self.key_file = get("key_file", DEFAULT_KEY_FILE)
        if self.min_hash == Hash.NONE and self.auth == Hash.NONE:
            self.key = b""
            log.warning("%s: hash and auth are none: requests are NOT authenticated", where)
        else:
            fix_permissions(self.key_file)
            self.key = read_key_file(self.key_file)

    def describe(self) -> str:
        return (f"key {key_fingerprint(self.key)}, hash>={self.min_hash.name.lower()}, "
                f"auth {self.auth.name.lower()}")


def fix_permissions(path: str) -> None:
    """C compat: config and key files readable by others are made 0600, with a warning."""
    try:
        mode = os.stat(path).st_mode & 0o7777
        if mode & 0o077:
            log.warning("insecure permissions on %s: changing from %04o to 0600", path, mode)
            os.chmod(path, 0o600)
    except OSError:
        pass


class Listener:
    """Base: open() returns sockets for the loop; readable(sock) must never block."""

    name = "?"

    def __init__(self, server: Server, blk: Block | None, where: str):
        self.server = server
        self.blk = blk
        self.where = where
        self.history = History()

    def cfg(self, key: str, default: str | None = None) -> str | None:
        return self.blk.get(key, default) if self.blk is not None else default

    def open(self) -> list:
        raise NotImplementedError

    def readable(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        for s in getattr(self, "socks", []):
            s.close()


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise BackendError(f"interface {name!r} does not exist") from None


@register(LISTENERS, "multicast")
class MulticastListener(Listener):
    """UDP on the group; the daemon connects back to the address in the packet."""

    name = "multicast"

    def __init__(self, server, blk, where):
        super().__init__(server, blk, where)
        self.settings = ListenerSettings(blk, where)
        fam = (self.cfg("family", "ipv4") or "ipv4").lower()
        if fam not in ("ipv4", "ipv6"):
            raise ConfigError(f"{where}: family = {fam!r}: use ipv4 or ipv6")
        self.family = socket.AF_INET6 if fam == "ipv6" else socket.AF_INET
        self.address = self.cfg("address") or (MCAST_IPV6 if fam == "ipv6" else MCAST_IPV4)
        try:
            self.port = parse_port(self.cfg("port", str(DEFAULT_PORT)))
            if address_family(self.address) != self.family:
                raise UsageError(f"address {self.address!r} is not an {fam} address")
        except UsageError as e:
            raise ConfigError(f"{where}: {e}") from None
        self.interface = self.cfg("interface")
        if self.interface and self.interface.lower() == "none":
            self.interface = None
        self.check_source = parse_bool(self.cfg("check_source", "yes"), "check_source")

    def open(self) -> list:
        ifindex = interface_index(self.interface) if self.interface else 0
        s = socket.socket(self.family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        group = socket.inet_pton(self.family, self.address)
        try:
            if self.family == socket.AF_INET:
                s.bind(("0.0.0.0", self.port))
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                             struct.pack("4s4si", group, b"\0" * 4, ifindex))
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::", self.port))
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                             struct.pack("16sI", group, ifindex))
        except OSError as e:
            s.close()
            raise BackendError(f"multicast listener {self.address}:{self.port}"
                               f"{' on ' + self.interface if self.interface else ''}: "
                               f"{e.strerror}") from None
        s.setblocking(False)
        self.socks = [s]
        return self.socks

    def describe(self) -> str:
        return (f"multicast {self.address}:{self.port} on {self.interface or 'all interfaces'}"
                f" ({family_name(self.family)}; {self.settings.describe()})")

    def readable(self, sock: socket.socket) -> None:
        try:
            data, peer = sock.recvfrom(4096)
        except (BlockingIOError, InterruptedError):
            return
        src = peer[0]
        if len(data) < REQ_SIZE:
            self.server.drop(src, "malformed", f"short packet: {len(data)} bytes")
            return
        if len(data) > REQ_SIZE:
            log.debug("packet from %s is %d bytes; using the first %d (C compat)",
                      src, len(data), REQ_SIZE)
        try:
            req = verify_request(data, self.settings.key, self.settings.min_hash)
        except AuthError as e:
            reason = "hash too weak" if "too weak" in str(e) else "key mismatch"
            self.server.drop(src, reason, str(e))
            return
        if req.family not in (socket.AF_INET, socket.AF_INET6):
            self.server.drop(src, "malformed", f"unknown address family {req.family}")
            return
        target = request_address(req)
        if self.check_source and target != src.split("%", 1)[0]:
            self.server.drop(src, "source mismatch",
                             f"packet asks for a connect-back to {target}; set "
                             f"check_source = \"no\" if the guests are behind NAT")
            return
        if req.port == 0:
            self.server.drop(src, "malformed", "connect-back port 0")
            return
        why = self.history.begin(req, data, time.monotonic())
        if why:
            self.server.drop(src, "duplicate", why, level=logging.INFO)
            return
        self.server.spawn(self.callback, req, data, target)

    def callback(self, req: FenceReq, packet: bytes, target: str) -> None:
        served = False
        try:
            fam = socket.AF_INET6 if req.family == socket.AF_INET6 else socket.AF_INET
            try:
                conn = socket.create_connection((target, req.port), timeout=CALLBACK_TIMEOUT)
            except OSError as e:
                log.warning("drop from %s: connect-back to %s:%d failed: %s", target, target,
                            req.port, e.strerror or e)
                return
            del fam
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                served = self.server.serve(conn, req, target, self.settings, self.name)
        finally:
            self.history.end(req, packet, served, time.monotonic())


@register(LISTENERS, "tcp")
class TcpListener(Listener):
    """The client connects, sends the request, then the same exchange (§5.1)."""

    name = "tcp"
    family_default = "ipv4"

    def __init__(self, server, blk, where):
        super().__init__(server, blk, where)
        self.settings = ListenerSettings(blk, where, auth_sets_hash=True)
        fam = (self.cfg("family", "ipv4") or "ipv4").lower()
        if fam not in ("ipv4", "ipv6"):
            raise ConfigError(f"{where}: family = {fam!r}: use ipv4 or ipv6")
        self.family = socket.AF_INET6 if fam == "ipv6" else socket.AF_INET
        self.address = self.cfg("address") or (TCP_IPV6 if fam == "ipv6" else TCP_IPV4)
        try:
            self.port = parse_port(self.cfg("port", str(DEFAULT_PORT)))
        except UsageError as e:
            raise ConfigError(f"{where}: {e}") from None

    def open(self) -> list:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.address, self.port))
            s.listen(64)
        except OSError as e:
            s.close()
            raise BackendError(f"tcp listener {self.address}:{self.port}: {e.strerror}") \
                from None
        s.setblocking(False)
        self.socks = [s]
        return self.socks

    def describe(self) -> str:
        return f"tcp {self.address}:{self.port} ({self.settings.describe()})"

    def peer_source(self, peer) -> str:
        return peer[0]

    def readable(self, sock: socket.socket) -> None:
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s accept failed: %s", self.name, e)
            return
        self.server.spawn(self.session, conn, self.peer_source(peer))

    def session(self, conn: socket.socket, src: str) -> None:
        with conn:
            try:
                data = recv_exact(conn, REQ_SIZE, Deadline(REQUEST_READ_TIMEOUT), "request")
            except FenceError as e:
                self.server.drop(src, "malformed", f"no complete request: {e}")
                return
            try:
                req = verify_request(data, self.settings.key, self.settings.min_hash)
            except AuthError as e:
                reason = "hash too weak" if "too weak" in str(e) else "key mismatch"
                self.server.drop(src, reason, str(e))
                return
            why = self.history.begin(req, data, time.monotonic())
            if why:
                self.server.drop(src, "duplicate", why, level=logging.INFO)
                return
            served = False
            try:
                served = self.server.serve(conn, req, src, self.settings, self.name)
            finally:
                self.history.end(req, data, served, time.monotonic())


@register(LISTENERS, "vsock")
class VsockListener(TcpListener):
    """AF_VSOCK stream on VMADDR_CID_ANY:port; the ACL source is the peer CID (§5.2)."""

    name = "vsock"

    def __init__(self, server, blk, where):
        Listener.__init__(self, server, blk, where)
        self.settings = ListenerSettings(blk, where, auth_sets_hash=True)
        try:
            self.port = parse_port(self.cfg("port", str(DEFAULT_PORT)))
        except UsageError as e:
            raise ConfigError(f"{where}: {e}") from None

    def open(self) -> list:
        if not hasattr(socket, "AF_VSOCK"):
            raise BackendError("this Python has no AF_VSOCK support")
        try:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.bind((VMADDR_CID_ANY, self.port))
            s.listen(64)
        except OSError as e:
            raise BackendError(f"vsock listener port {self.port}: {e.strerror or e} "
                               f"(is the vsock kernel module loaded?)") from None
        s.setblocking(False)
        self.socks = [s]
        return self.socks

    def describe(self) -> str:
        return f"vsock port {self.port} ({self.settings.describe()})"

    def peer_source(self, peer) -> str:
        return str(peer[0])


# ============================================================================
# 10. Daemon: the loop, workers, signals, pidfile
# ============================================================================


def run_bounded(fn, timeout: float, what: str):
    """Run fn() in a thread; FenceTimeout when it does not return within `timeout`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise FenceTimeout(f"{what} did not finish within {timeout:.0f} s "
                           f"(libvirt hung or unreachable?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Server:
    """Holds the backend, ACL and listeners; runs the select loop on the main thread."""

    def __init__(self, cfg: Config, backend: Backend, listeners: list | None = None):
        self.cfg = cfg
        self.backend = backend
        self.acl = Acl.from_config(cfg)
        self.locks = DomainLocks()
        self.listeners = listeners or []
        self.slots = threading.BoundedSemaphore(MAX_WORKERS)
        self.stop = threading.Event()
        self.backend_timeout = float(cfg.get("fence_virtd/@backend_timeout",
                                             str(BACKEND_TIMEOUT)))
        self.drops = collections.Counter()

    # -- logging helpers
    def drop(self, src: str, reason: str, detail: str, level: int = logging.WARNING) -> None:
        self.drops[reason] += 1
        if not detail.startswith(reason):
            detail = f"{reason}: {detail}"
        log.log(level, "drop from %s: %s", src, detail)

    def spawn(self, fn, *args) -> None:
        if not self.slots.acquire(blocking=False):
            log.error("busy: %d requests in progress; dropping one", MAX_WORKERS)
            return

        def run():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one bad request never kills the daemon
                log.error("internal error serving a request: %s: %s", type(e).__name__, e)
                log.debug("traceback", exc_info=True)
            finally:
                self.slots.release()
        threading.Thread(target=run, daemon=True).start()

    # -- one authenticated exchange, daemon side (protocol.md §4.2)
    def serve(self, conn: socket.socket, req: FenceReq, src: str,
              settings: ListenerSettings, via: str) -> bool:
        """Auth, decide, reply. True when the client passed auth (the request is served)."""
        t0 = time.monotonic()
        op = Request(req.request).name.lower() if req.request in Request.__members__.values() \
            else str(req.request)
        try:
            if settings.auth != Hash.NONE:
                dl = Deadline(AUTH_TIMEOUT)
                c1 = recv_exact(conn, MAX_HASH_LEN, dl, "client challenge")
                send_all(conn, challenge_response(settings.auth, settings.key, c1), dl,
                         "challenge response")
                c2 = make_challenge()
                send_all(conn, c2, dl, "challenge")
                r2 = recv_exact(conn, MAX_HASH_LEN, Deadline(AUTH_TIMEOUT), "client response")
                if not check_response(settings.auth, settings.key, c2, r2):
                    self.drop(src, "auth failed", f"client failed our {settings.auth.name.lower()}"
                              f" challenge (key or auth type differs; our key "
                              f"{key_fingerprint(settings.key)})")
                    return False
        except FenceError as e:
            self.drop(src, "auth failed", str(e))
            return False
        try:
            result = run_bounded(lambda: handle_request(req, self.backend, self.acl, src,
                                                        self.locks),
                                 self.backend_timeout, f"{op} {req.domain!r}")
        except FenceError as e:
            log.error("%s %r from %s failed: %s", op, req.domain, src, e)
            result = Response.FAIL
        except Exception as e:  # noqa: BLE001 - never a false success
            log.error("%s %r from %s: internal error %s: %s", op, req.domain, src,
                      type(e).__name__, e)
            result = Response.FAIL
        try:
            if isinstance(result, list):
                send_all(conn, pack_hostlist(result), Deadline(5.0), "host list")
                shown = f"list ({len(result)} domains)"
            else:
                send_all(conn, bytes([int(result)]), Deadline(5.0), "result")
                shown = Response(result).name.lower()
        except (FenceError, OSError) as e:
            log.warning("%s %r from %s: could not send the result: %s", op, req.domain, src, e)
            shown = "unsent"
        log.info("audit: src=%s via=%s op=%s domain=%r result=%s ms=%d", src, via, op,
                 req.domain, shown, (time.monotonic() - t0) * 1000)
        return True

    def run(self, wakeup: socket.socket, tick=lambda: None) -> None:
        """The loop: listeners' readable() on the main thread, until self.stop is set."""
        import selectors
        sel = selectors.DefaultSelector()
        for lst in self.listeners:
            for s in lst.socks:
                sel.register(s, selectors.EVENT_READ, lst)
        sel.register(wakeup, selectors.EVENT_READ, None)
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=1.0):
                if key.data is None:
                    try:
                        wakeup.recv(64)
                    except OSError:
                        pass
                    continue
                try:
                    key.data.readable(key.fileobj)
                except Exception as e:  # noqa: BLE001 - one bad packet never kills the loop
                    log.error("listener %s: %s: %s", key.data.name, type(e).__name__, e)
                    log.debug("traceback", exc_info=True)
            tick()
        sel.close()


def listener_names(cfg: Config) -> list:
    raw = cfg.get("fence_virtd/@listener") or ""
    return [n.lower() for n in raw.replace(",", " ").split()]


def open_listeners(cfg: Config, server: Server) -> list:
    names = listener_names(cfg)
    if not names:
        raise ConfigError(f"{cfg.source}: fence_virtd {{ listener = \"multicast\"; }} "
                          f"is missing")
    out = []
    for name in names:
        if name not in LISTENERS:
            raise ConfigError(f"{cfg.where('fence_virtd/@listener')}: unknown listener "
                              f"{name!r} (known: {', '.join(sorted(LISTENERS))})")
        blk = cfg.node(f"listeners/{name}")
        where = f"{cfg.source}: listeners/{name}"
        out.append(LISTENERS[name](server, blk, where))
    return out


class PidFile:
    """An flock-ed pidfile: a second daemon gets the holder's PID in its error."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot open pidfile {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"another fence_virtd (pid {other}) holds {self.path}; stop it "
                             f"or use -p to name another pidfile") from None
        self.fd = fd

    def write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


def daemonize() -> None:
    """Classic double fork; stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def start_server(cfg: Config, stop: threading.Event, wait: bool) -> Server:
    """Open backend and listeners, retrying every 5 s with -w (wait_for_init)."""
    while True:
        try:
            backend = open_backend(cfg)
            if wait:
                backend.ping()
            server = Server(cfg, backend)
            server.listeners = open_listeners(cfg, server)
            for lst in server.listeners:
                lst.open()
            return server
        except BackendError as e:
            if not wait:
                raise
            log.warning("not ready (%s); retrying in 5 s", e)
            if stop.wait(5.0):
                raise FenceError("stopped while waiting for initialisation") from None


def run_daemon(opts: dict) -> int:
    import signal
    path = opts["config"]
    cfg = load_config(path)
    problems = check_config(cfg, LISTENERS, BACKENDS)
    for p in problems:
        log.warning("%s", p)
    fix_permissions(path)
    fv = cfg.node("fence_virtd")
    foreground = opts["foreground"] or bool(int((fv.get("foreground", "0") if fv else "0")
                                                or "0"))
    wait = opts["wait"] or any(int((fv.get(k, "0") if fv else "0") or "0")
                               for k in ("wait_for_init", "wait_for_backend"))
    pidfile = PidFile(opts["pidfile"])
    pidfile.acquire()
    stop = threading.Event()
    try:
        if not foreground:
            daemonize()
            setup_logging("fence_virtd", stderr=False, use_syslog=True,
                          syslog_level=logging.DEBUG if opts["debug"] else logging.INFO)
        wakeup_r, wakeup_w = socket.socketpair()
        wakeup_w.setblocking(False)
        signal.set_wakeup_fd(wakeup_w.fileno())
        reload_flag = threading.Event()

        def on_stop(_sig, _frame):
            stop.set()

        def on_hup(_sig, _frame):
            reload_flag.set()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        server = start_server(cfg, stop, wait)
        server.stop = stop
        pidfile.write()
        log.info("ready: pid %d, listeners: %s; backend %s; config %s", os.getpid(),
                 "; ".join(lst.describe() for lst in server.listeners),
                 server.backend.describe(), path)
        notify_systemd("READY=1")
        def tick():
            if reload_flag.is_set():
                reload_flag.clear()
                reload_config(server, path)
        server.run(wakeup_r, tick)
        log.info("exiting on signal")
        for lst in server.listeners:
            lst.close()
        server.backend.close()
        return ExitCode.OK
    finally:
        pidfile.release()


def reload_config(server: Server, path: str) -> None:
    """SIGHUP: new groups ACL and backend; a broken config keeps the old one."""
    try:
        cfg = load_config(path)
        problems = check_config(cfg, LISTENERS, BACKENDS)
        if problems:
            raise ConfigError("; ".join(problems))
        backend = open_backend(cfg)
    except FenceError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        return
    old, server.backend = server.backend, backend
    server.acl = Acl.from_config(cfg)
    server.cfg = cfg
    old.close()
    log.info("reloaded %s: backend %s, %d groups (listener changes need a restart)",
             path, backend.describe(), len(server.acl.groups))


def notify_systemd(state: str) -> None:
    """sd_notify through NOTIFY_SOCKET, when systemd set one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


# ============================================================================
# 11. Client: send a request over a transport, collect the reply or host list
# ============================================================================

IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000
SIOCGIFFLAGS, SIOCGIFADDR = 0x8913, 0x8915

LocalAddr = collections.namedtuple("LocalAddr", "ifname ifindex address")


def interface_flags(name: str) -> int:
    import fcntl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", name.encode()[:15], 0, b"")
        return struct.unpack_from("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]


def local_addresses(family: int, interface: str | None = None) -> list:
    """Addresses to send from: every UP multicast interface's, or one interface's.

    IPv6 skips ::1 and link-local addresses, as the C client does. With no multicast
    interface at all, loopback is used (a daemon on this machine can still hear it).
    """
    import fcntl
    found = []
    if family == socket.AF_INET:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for idx, name in socket.if_nameindex():
                try:
                    res = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                      struct.pack("16sH14s", name.encode()[:15], 0, b""))
                except OSError:
                    continue
                found.append(LocalAddr(name, idx, socket.inet_ntoa(res[20:24])))
    else:
        try:
            with open("/proc/net/if_inet6") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split()
            if len(parts) < 6:
                continue
            addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(parts[0]))
            if addr == "::1" or addr.lower()[:4] in ("fe80", "fe90", "fea0", "feb0"):
                continue
            found.append(LocalAddr(parts[5], int(parts[1], 16), addr))
    if interface:
        mine = [a for a in found if a.ifname == interface]
        if not mine:
            raise UsageError(f"interface {interface!r} has no {family_name(family)} address")
        return mine
    usable, loop = [], []
    for a in found:
        try:
            flags = interface_flags(a.ifname)
        except OSError:
            continue
        if not flags & IFF_UP:
            continue
        if flags & IFF_LOOPBACK and not flags & IFF_MULTICAST:
            loop.append(a)
        elif flags & IFF_MULTICAST:
            usable.append(a)
    return usable or loop


def send_multicast(packet: bytes, src: LocalAddr, family: int, group: str, port: int) -> None:
    """One datagram from `src` to the group, TTL 2, loopback on (protocol.md §3.1)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(src.address))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MCAST_TTL)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            s.bind((src.address, 0))
            s.sendto(packet, (group, port))
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, src.ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MCAST_TTL)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            s.bind((src.address, 0, 0, src.ifindex))
            s.sendto(packet, (group, port, 0, src.ifindex))


class ClientConfig:
    """What a client needs: key, hash/auth, timeout, names for messages."""

    __slots__ = ("key", "hash", "auth", "timeout", "retrans", "key_file")

    def __init__(self, key: bytes, hash_: Hash, auth: Hash, timeout: float,
                 retrans: float = 2.0, key_file: str = ""):
        self.key, self.hash, self.auth = key, hash_, auth
        self.timeout, self.retrans, self.key_file = timeout, retrans, key_file


def client_exchange(conn: socket.socket, cc: ClientConfig, peer: str,
                    deadline: Deadline) -> Response | list:
    """Client side of §4.2 on a connected socket: a Response, or a list of HostInfo."""
    fp = key_fingerprint(cc.key)
    if cc.auth != Hash.NONE:
        c1 = make_challenge()
        send_all(conn, c1, deadline, "challenge")
        try:
            r1 = recv_exact(conn, MAX_HASH_LEN, deadline, "the daemon's challenge response")
        except ProtocolError:
            raise AuthError(f"fence_virtd at {peer} closed the connection instead of "
                            f"answering our {cc.auth.name.lower()} challenge: it probably "
                            f"runs with auth = \"none\" (use -C none) or dropped us; see "
                            f"its log") from None
        if not check_response(cc.auth, cc.key, c1, r1):
            raise AuthError(f"fence_virtd at {peer} failed our {cc.auth.name.lower()} "
                            f"challenge: its key or auth type differs from ours (our key "
                            f"{fp}); compare the key fingerprint fence_virtd logs at start-up")
        c2 = recv_exact(conn, MAX_HASH_LEN, deadline, "the daemon's challenge")
        send_all(conn, challenge_response(cc.auth, cc.key, c2), deadline, "response")
    try:
        first = recv_exact(conn, 1, deadline, "the result")
    except ProtocolError:
        raise AuthError(f"fence_virtd at {peer} closed the connection without a result: "
                        f"it rejected our challenge response (key or auth type mismatch; "
                        f"our key {fp}, auth {cc.auth.name.lower()})") from None
    except FenceTimeout:
        hint = (" It may expect challenge-response auth while ours is none."
                if cc.auth == Hash.NONE else "")
        raise FenceTimeout(f"timed out waiting for the result from fence_virtd at {peer}."
                           f"{hint}") from None
    if first[0] != Response.HOSTLIST:
        return first[0]
    hosts = []
    while True:
        try:
            rec = recv_exact(conn, HOST_STATE_SIZE, deadline, "a host list record")
        except FenceError as e:
            log.warning("host list from %s ended early: %s", peer, e)
            break
        if rec[0] == 0 and rec[64] == 0:
            break
        hosts.append(unpack_host_state(rec))
    try:
        conn.settimeout(0.2)
        conn.recv(1)          # final result byte; clients ignore it (C compat)
    except OSError:
        pass
    return hosts


def mcast_request(cc: ClientConfig, request: int, domain: str, *, family: int, group: str,
                  port: int, interface: str | None = None, flags: int = 0):
    """fence_xvm: multicast the request, accept the connect-back, run the exchange."""
    addrs = local_addresses(family, interface)
    if not addrs:
        raise FenceError(f"no {family_name(family)} address to send from "
                         f"(no interface is up with multicast enabled)")
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    lsock = socket.socket(family, socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((wildcard, port))
            lsock.listen(10)
        except OSError as e:
            raise FenceError(f"cannot listen for the connect-back on TCP port {port}: "
                             f"{e.strerror} (another fence_xvm running? use -p)") from None
        seqno = struct.unpack("<I", os.urandom(4))[0]
        deadline = Deadline(cc.timeout)
        rounds = 0
        send_errors = []
        while True:
            rounds += 1
            for src in addrs:
                packed = socket.inet_pton(family, src.address)
                req = make_request(request, domain, address=packed, family=family, port=port,
                                   seqno=seqno, flags=flags,
                                   random=os.urandom(6) if cc.hash != Hash.NONE else b"\0" * 6)
                pkt = sign_request(pack_request(req), cc.hash, cc.key)
                try:
                    send_multicast(pkt, src, family, group, port)
                except OSError as e:
                    send_errors.append(f"{src.address}: {e.strerror or e}")
            log.debug("round %d: sent %s to %s:%d from %s", rounds,
                      Request(request).name.lower(), group, port,
                      ", ".join(f"{a.address} ({a.ifname})" for a in addrs))
            wait = min(cc.retrans, deadline.remaining())
            ready, _, _ = select.select([lsock], [], [], wait)
            if ready:
                conn, peer = lsock.accept()
                with conn:
                    log.debug("fence_virtd connected back from %s", peer[0])
                    return client_exchange(conn, cc, peer[0], deadline)
            if deadline.expired():
                sources = ", ".join(f"{a.address} ({a.ifname})" for a in addrs)
                extra = f"; send errors: {'; '.join(sorted(set(send_errors)))}" \
                    if send_errors else ""
                raise FenceTimeout(
                    f"timed out after {cc.timeout:g} s: no fence_virtd connected back to TCP "
                    f"port {port} ({rounds} round(s) sent to {group}:{port} from {sources}"
                    f"{extra}). Likely causes, in order: the daemon is not running or listens "
                    f"on another interface or group; it dropped the request for a key or "
                    f"hash mismatch (our key {key_fingerprint(cc.key)}, hash "
                    f"{cc.hash.name.lower()}; its log says which); a firewall on this guest "
                    f"blocks TCP {port}. Run `fence_xvm doctor` to tell them apart.")
    finally:
        lsock.close()


def stream_request(cc: ClientConfig, request: int, domain: str, sock: socket.socket,
                   peer: str):
    """fence_virt -T / -S: send the request on a connected socket, then the exchange."""
    deadline = Deadline(cc.timeout)
    req = make_request(request, domain,
                       random=os.urandom(6) if cc.hash != Hash.NONE else b"\0" * 6,
                       seqno=struct.unpack("<I", os.urandom(4))[0])
    pkt = sign_request(pack_request(req), cc.hash, cc.key)
    with sock:
        send_all(sock, pkt, deadline, "request")
        return client_exchange(sock, cc, peer, deadline)


def tcp_request(cc: ClientConfig, request: int, domain: str, address: str, port: int):
    try:
        sock = socket.create_connection((address, port), timeout=min(3.0, cc.timeout))
    except OSError as e:
        raise FenceError(f"unable to connect to fence_virtd at {address}:{port}: "
                         f"{e.strerror or e} (is a tcp listener configured there?)") from None
    return stream_request(cc, request, domain, sock, f"{address}:{port}")


def vsock_request(cc: ClientConfig, request: int, domain: str, cid: int, port: int):
    if not hasattr(socket, "AF_VSOCK"):
        raise FenceError("this Python has no AF_VSOCK support")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.settimeout(min(3.0, cc.timeout))
    try:
        sock.connect((cid, port))
    except OSError as e:
        sock.close()
        raise FenceError(f"unable to connect to fence_virtd at vsock CID {cid} port {port}: "
                         f"{e.strerror or e}") from None
    return stream_request(cc, request, domain, sock, f"vsock:{cid}:{port}")


# ============================================================================
# 12. Agent: one option table -> argv/stdin parsing, actions, metadata XML
# ============================================================================

Opt = collections.namedtuple(
    "Opt", "name short long arg mtype default help roles aliases shown",
    defaults=((), None))
# roles: x = fence_xvm, v = fence_virt. `default` is what runs; `shown` (when not None)
# is what metadata and help print instead, as the C agents do (ipaddr, serial_device).
AGENT_OPTIONS = (
    Opt("debug", "d", "debug", False, "boolean", 0,
        "Specify (stdin) or increment (command line) debug level", "xv"),
    Opt("ip_family", "i", "ip-family", True, "string", "auto",
        "IP Family ([auto], ipv4, ipv6)", "x"),
    Opt("multicast_address", "a", "multicast-address", True, "string", None,
        "Multicast address (default=225.0.0.12 / ff05::3:1)", "x"),
    Opt("serial_device", "D", "serial-device", True, "string", None,
        "Serial device (default=/dev/ttyS1)", "v", shown="/dev/ttyS1"),
    Opt("serial_params", "P", "serial-params", True, "string", "115200,8N1",
        "Serial Parameters (default=115200,8N1)", "v"),
    Opt("channel_address", "A", "channel-address", True, "string", CHANNEL_ADDRESS,
        "VM Channel IP address (default=10.0.2.179)", "v"),
    Opt("ipport", "p", "ipport", True, "string", str(DEFAULT_PORT),
        "TCP, Multicast, VMChannel, or VM socket port (default=1229)", "xv"),
    Opt("retrans", "r", "retrans", True, "string", "20",
        "Multicast retransmit time (in 1/10sec; default=20)", "x"),
    Opt("auth", "C", "auth", True, "string", "sha256",
        "Authentication (none, sha1, [sha256], sha512)", "xv"),
    Opt("hash", "c", "hash", True, "string", "sha256",
        "Packet hash strength (none, sha1, [sha256], sha512)", "xv"),
    Opt("key_file", "k", "key-file", True, "string", DEFAULT_KEY_FILE,
        "Shared key file (default=/etc/cluster/fence_xvm.key)", "xv"),
    Opt("plug", "n", "plug", True, "string", None,
        "Virtual Machine (domain name) to fence", "xv"),
    Opt("port", "H", "port", True, "string", None,
        "Virtual Machine (domain name) to fence", "xv"),
    Opt("use_uuid", "u", "use-uuid", False, "string", "0",
        "Treat [domain] as UUID instead of domain name. This is provided for "
        "compatibility with older fence_xvmd installations.", "x"),
    Opt("action", "o", "action", True, "string", "reboot",
        "Fencing action (null, off, on, [reboot], status, list, list-status, monitor, "
        "validate-all, metadata)", "xv", aliases=("option",)),
    Opt("timeout", "t", "timeout", True, "string", "30",
        "Fencing timeout (in seconds; default=30)", "xv"),
    Opt("ipaddr", "T", "ipaddr", True, "string", None,
        "IP address to connect to in TCP mode (default=127.0.0.1 / ::1)", "v",
        shown="127.0.0.1"),
    Opt("vsock", "S", "vsock", True, "integer", None,
        "vm socket CID to connect to in vsock mode", "v", shown="2"),
    Opt("delay", "w", "delay", True, "string", "0",
        "Fencing delay (in seconds; default=0)", "xv"),
    Opt("domain", "", "", True, "string", None,
        "Virtual Machine (domain name) to fence (deprecated; use port)", "xv"),
    # fencevirt extensions (after the C parameters in metadata):
    Opt("interface", "I", "interface", True, "string", None,
        "Send the multicast request only from this interface (default: every "
        "multicast-capable interface that is up)", "x"),
)
C_GETOPT_ORDER = {"x": "d i a p r C c k n H u o t w", "v": "d D P A p n H o t T S C c k w"}
EXTRA_PARAMS = {"x": ("interface",), "v": ()}
LONG_ONLY = {"verbose": "debug", "quiet": None, "debug-file": None, "version": None,
             "help": None, "ip": "ipaddr"}
OPTS = {o.name: o for o in AGENT_OPTIONS}
IGNORED_STDIN = ("agent", "self", "nodename")
ACTIONS = ("null", "on", "off", "reboot", "metadata", "status", "monitor", "list",
           "list-status", "validate-all")
DELAYED_ACTIONS = ("null", "on", "off", "reboot")
NEEDS_DOMAIN = ("null", "on", "off", "reboot", "status")
ROLE_LETTER = {"xvm": "x", "virt": "v"}


def role_options(role: str) -> list:
    """The role's parameters in C getopt order, then `domain`, then our extensions."""
    letter = ROLE_LETTER[role]
    by_short = {o.short: o for o in AGENT_OPTIONS if o.short and letter in o.roles}
    order = [by_short[c] for c in C_GETOPT_ORDER[letter].split()]
    return order + [OPTS["domain"]] + [OPTS[n] for n in EXTRA_PARAMS[letter]]


class AgentArgs:
    """Per-run values, built from the option table (which is never mutated)."""

    __slots__ = ("role", "values", "debug", "quiet", "debug_file", "nodename", "given",
                 "show")

    def __init__(self, role: str):
        self.role = role
        self.values: dict = {}
        self.given: dict = {}         # name -> raw value, for the alias rule
        self.debug = 0
        self.quiet = False
        self.debug_file = None
        self.nodename = None
        self.show = None              # "help" | "version"

    def get(self, name: str):
        if name in self.values:
            return self.values[name]
        return OPTS[name].default

    def set(self, name: str, value) -> None:
        self.values[name] = value


def apply_option(a: AgentArgs, name: str, value: str | None, origin: str) -> None:
    """One option from argv or stdin; bare boolean keys (value None) mean 'on'."""
    if name == "debug":
        if value is None:
            a.debug += 1
        else:
            try:
                a.debug = int(value)
            except ValueError:
                a.debug = 1 if parse_bool(value, "debug") else 0
        return
    if name == "use_uuid":
        a.set("use_uuid", "1" if value is None or (value.isdigit() and int(value)) or
              (not value.isdigit() and parse_bool(value, "use_uuid")) else "0")
        return
    if value is None:
        raise UsageError(f"{name} needs a value ({origin})")
    if name in ("plug", "port", "domain"):
        a.given[name] = value
        return
    a.set(name, value)


def parse_stdin(text: str, a: AgentArgs) -> None:
    """FenceAgentAPI stdin: name=value lines, '#' comments, last value wins."""
    letter = ROLE_LETTER[a.role]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip().lower()
        value = value.strip() if eq else None
        if name == "nodename":
            a.nodename = value
            continue
        if name in IGNORED_STDIN:
            continue
        if name == "option":
            name = "action"
        opt = OPTS.get(name)
        if opt is None or letter not in opt.roles:
            log.warning("Parse error: Ignoring unknown option '%s' (stdin line %d)",
                        name, lineno)
            continue
        apply_option(a, name, value, f"stdin line {lineno}")


def parse_argv(argv: list, a: AgentArgs) -> None:
    """C short options plus fencing.py-style long options."""
    import getopt
    letter = ROLE_LETTER[a.role]
    mine = [o for o in AGENT_OPTIONS if letter in o.roles]
    shorts = "hV?v" + "".join(o.short + (":" if o.arg else "") for o in mine if o.short)
    longs = [o.long + ("=" if o.arg else "") for o in mine if o.long]
    longs += ["verbose", "quiet", "debug-file=", "version", "help"]
    if letter == "v":
        longs.append("ip=")
        # -S takes an optional attached argument in C: a bare -S means CID 2
        argv = ["-S2" if x == "-S" else x for x in argv]
    by_flag = {("-" + o.short): o.name for o in mine if o.short}
    by_flag.update({("--" + o.long): o.name for o in mine if o.long})
    try:
        pairs, rest = getopt.gnu_getopt(argv, shorts, longs)
    except getopt.GetoptError as e:
        raise UsageError(f"{e}; see --help") from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}; see --help")
    for flag, value in pairs:
        if flag in ("-h", "-?", "--help"):
            a.show = "help"
        elif flag in ("-V", "--version"):
            a.show = "version"
        elif flag in ("-v", "--verbose"):
            a.debug += 1
        elif flag == "--quiet":
            a.quiet = True
        elif flag == "--debug-file":
            a.debug_file = value
        elif flag == "--ip":
            a.set("ipaddr", value)
        else:
            name = by_flag[flag]
            apply_option(a, name, value if OPTS[name].arg else None, flag)


def resolve_target(a: AgentArgs) -> str | None:
    """plug > port > domain > nodename; a conflict warns and never fails."""
    g = a.given
    chosen = None
    for name in ("plug", "port", "domain"):
        if g.get(name):
            chosen = chosen or (name, g[name])
    if chosen:
        others = {n: v for n, v in g.items() if v and v != chosen[1]}
        if others:
            log.warning("%s=%s and %s disagree; using %s=%s (plug wins over port, port over "
                        "domain)", chosen[0], chosen[1],
                        ", ".join(f"{n}={v}" for n, v in sorted(others.items())),
                        chosen[0], chosen[1])
        return chosen[1]
    if a.nodename:
        log.info("no plug/port given; using nodename=%s as the domain", a.nodename)
        return a.nodename
    return None


class AgentPlan:
    """Validated values of one run: what to send, to whom, and how."""

    __slots__ = ("action", "domain", "cc", "timeout", "delay", "family", "group", "port",
                 "interface", "flags", "mode", "ipaddr", "cid", "serial_device",
                 "serial_params", "channel_address")


def number(value: str, name: str, minimum: float, allow_equal: bool = True) -> float:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: {value!r} is not a number") from None
    if n < minimum or (n == minimum and not allow_equal):
        raise UsageError(f"{name}: {value} must be {'at least' if allow_equal else 'more than'}"
                         f" {minimum:g}")
    return n


def plan_agent(a: AgentArgs) -> AgentPlan:
    """Check every value (validate-all runs exactly this) and build the plan."""
    p = AgentPlan()
    p.action = (a.get("action") or "").lower()
    if p.action not in ACTIONS:
        raise UsageError(f"Unrecognised action '{a.get('action')}' "
                         f"(use one of: {', '.join(ACTIONS)})")
    p.domain = resolve_target(a)
    if p.domain is not None:
        try:
            encode_domain(p.domain)
        except ProtocolError as e:
            raise UsageError(f"Invalid domain name: {e}") from None
    p.timeout = number(a.get("timeout"), "timeout", 0, allow_equal=False)
    p.delay = number(a.get("delay"), "delay", 0)
    p.port = parse_port(a.get("ipport"), "ipport")
    try:
        hash_ = Hash.parse(a.get("hash"))
        auth = Hash.parse(a.get("auth"))
    except UsageError as e:
        raise UsageError(f"hash/auth: {e}") from None
    key = b""
    key_file = a.get("key_file")
    if hash_ != Hash.NONE or auth != Hash.NONE:
        try:
            key = read_key_file(key_file, strict=False)
        except ConfigError as e:
            raise UsageError(f"key_file: {e}") from None
    retrans = 2.0
    if a.role == "xvm":
        retrans = number(a.get("retrans"), "retrans", 0, allow_equal=False) / 10.0
        fam = (a.get("ip_family") or "auto").lower()
        if fam not in ("auto", "ipv4", "ipv6"):
            raise UsageError(f"Unsupported family: '{a.get('ip_family')}' "
                             f"(use auto, ipv4 or ipv6)")
        group = a.get("multicast_address")
        if group:
            gfam = address_family(group)
            if not _is_multicast(group, gfam):
                raise UsageError(f"multicast_address {group!r} is not a multicast address")
            if fam != "auto" and family_name(gfam) != fam:
                raise UsageError(f"multicast_address {group!r} is not an {fam} address "
                                 f"(ip_family={fam})")
            p.family = gfam
        else:
            p.family = socket.AF_INET6 if fam == "ipv6" else socket.AF_INET
            group = MCAST_IPV6 if fam == "ipv6" else MCAST_IPV4
        p.group = group
        p.interface = a.get("interface")
        p.flags = RF_UUID if a.get("use_uuid") not in (None, "0") else 0
        p.mode = "multicast"
    else:
        p.ipaddr = a.get("ipaddr")
        vsock = a.get("vsock")
        p.cid = None
        if vsock not in (None, "", "0"):
            try:
                p.cid = int(vsock, 0)
            except ValueError:
                raise UsageError(f"vsock: {vsock!r} is not a CID number") from None
            if not 2 <= p.cid <= 0xFFFFFFFE:
                raise UsageError(f"vsock: CID {p.cid} out of range 2-4294967294")
        if p.ipaddr:
            address_family(p.ipaddr)
        p.mode = "vsock" if p.cid else "tcp" if p.ipaddr else "serial"
        p.serial_device = a.get("serial_device")
        p.serial_params = a.get("serial_params")
        p.channel_address = a.get("channel_address")
    p.cc = ClientConfig(key, hash_, auth, p.timeout, retrans, key_file)
    if p.action in NEEDS_DOMAIN and not p.domain:
        raise UsageError("No domain specified! (give plug=, port= or -n)")
    return p


def send_plan(p: AgentPlan, request: Request):
    if p.mode == "multicast":
        return mcast_request(p.cc, request, p.domain or "", family=p.family, group=p.group,
                             port=p.port, interface=p.interface, flags=p.flags)
    if p.mode == "tcp":
        return tcp_request(p.cc, request, p.domain or "", p.ipaddr, p.port)
    if p.mode == "vsock":
        return vsock_request(p.cc, request, p.domain or "", p.cid, p.port)
    return serial_request(p, request)


def serial_request(p: AgentPlan, request: Request):
    raise FenceError("serial/VMChannel mode is not available yet; use -T (tcp) or -S (vsock)")


def result_code(result: int, action: str) -> int:
    """Print what C prints for a result byte and return the exit code."""
    if result == Response.SUCCESS:
        if action == "status":
            print("Status: ON")
        return ExitCode.OK
    if result == Response.OFF:
        if action == "status":
            print("Status: OFF")
        return ExitCode.OFF
    if result == Response.DENIED:
        raise DeniedError(f"Permission denied: fence_virtd's groups ACL does not allow this "
                          f"guest to {action} that domain")
    if result == Response.FAIL:
        raise FenceError(f"Operation failed: fence_virtd could not {action} the domain "
                         f"(unknown domain or hypervisor error; see the daemon's log)")
    log.error("Unknown response (%d)", result)
    return result


PACEMAKER_NAME_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def print_hosts(hosts: list) -> None:
    for h in hosts:
        print(f"{h.name:<32} {h.uuid} {'on' if h.state == VirState.RUNNING else 'off'}")
        bad = set(h.name) - PACEMAKER_NAME_OK
        if bad or h.name.lower() in ("invalid", "variable") or len(h.name.encode()) > 63:
            log.warning("domain name %r may be cut short or dropped by Pacemaker's target "
                        "parser; map it with pcmk_host_map", h.name)


ACTION_REQUESTS = {"null": Request.NULL, "on": Request.ON, "off": Request.OFF,
                   "reboot": Request.REBOOT, "status": Request.STATUS,
                   "monitor": Request.DEVSTATUS, "list": Request.HOSTLIST,
                   "list-status": Request.HOSTLIST}


def run_agent(role: str, argv: list, stdin=None) -> int:
    a = AgentArgs(role)
    if argv:
        parse_argv(argv, a)
    else:
        stream = sys.stdin if stdin is None else stdin
        text = "" if stream is None or (hasattr(stream, "isatty") and stream.isatty()) \
            else stream.read()
        parse_stdin(text, a)
    level = logging.WARNING if a.debug == 0 else logging.INFO if a.debug == 1 \
        else logging.DEBUG
    if a.quiet:
        level = logging.ERROR
    setup_logging(f"fence_{role}", level, use_syslog=True, debug_file=a.debug_file)
    if a.show == "help":
        print(agent_usage(role))
        return ExitCode.OK
    if a.show == "version":
        print(f"fence_{role} (fencevirt {__version__}; compatible with {C_VERSION})")
        return ExitCode.OK
    action = (a.get("action") or "").lower()
    if action == "metadata":
        sys.stdout.write(agent_metadata(role))
        return ExitCode.OK
    p = plan_agent(a)
    if action == "validate-all":
        return ExitCode.OK
    log.info("key %s, hash %s, auth %s", key_fingerprint(p.cc.key), p.cc.hash.name.lower(),
             p.cc.auth.name.lower())
    if p.delay and action in DELAYED_ACTIONS:
        log.info("delay: waiting %g s before %s", p.delay, action)
        time.sleep(p.delay)
    result = send_plan(p, ACTION_REQUESTS[action])
    if isinstance(result, list):
        print_hosts(result)
        return ExitCode.OK
    return result_code(result, action)


def xml_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def agent_metadata(role: str) -> str:
    """Metadata XML in the C layout (protocol.md §11.3), valid against metadata.rng."""
    name = f"fence_{role}"
    out = ['<?xml version="1.0" ?>\n',
           f'<resource-agent name="{name}" shortdesc="Fence agent for virtual machines">\n',
           f"<longdesc>{name} is an I/O Fencing agent which can be used with virtual "
           f"machines.\n\nNOTE: reboot-action does not power on nodes that are powered off."
           f"</longdesc>\n",
           "<vendor-url>https://libvirt.org</vendor-url>\n<parameters>\n"]
    for o in role_options(role):
        default = o.shown if o.shown is not None else o.default
        if o.name == "debug":
            default = None
        required = "1" if o.name in ("plug", "port") else "0"
        extra = ' obsoletes="port"' if o.name == "plug" else \
            ' deprecated="1"' if o.name in ("port", "domain") else ""
        dflt = f' default="{xml_escape(str(default))}"' if default is not None else ""
        mixed = f"-{o.short}" if o.short and o.name != "domain" else ""
        out.append(f'\t<parameter name="{o.name}" unique="0" required="{required}"{extra}>\n'
                   f'\t\t<getopt mixed="{mixed}" />\n'
                   f'\t\t<content type="{o.mtype}"{dflt} />\n'
                   f'\t\t<shortdesc lang="en">{xml_escape(o.help)}</shortdesc>\n'
                   f'\t</parameter>\n')
    out.append("</parameters>\n<actions>\n")
    out.extend(f'\t<action name="{act}" />\n' for act in ACTIONS)
    out.append("</actions>\n</resource-agent>\n")
    return "".join(out)


def agent_usage(role: str) -> str:
    import textwrap
    lines = [f"usage: fence_{role} [args]", "",
             "NOTE: reboot-action does not power on nodes that are powered off.", ""]
    for o in role_options(role):
        if not o.short:
            continue
        flag = f"-{o.short}" + (f" <{o.name}>" if o.arg else "")
        if o.long:
            flag += f", --{o.long}"
        wrapped = textwrap.wrap(o.help, 55) or [""]
        lines.append(f"  {flag:<20}  {wrapped[0]}" if len(flag) <= 20 else f"  {flag}")
        if len(flag) > 20:
            lines.append(f"  {'':<20}  {wrapped[0]}")
        lines.extend(f"  {'':<20}  {w}" for w in wrapped[1:])
    lines += ["  -h, --help              Help", "  -V, --version           Display version and exit",
              "  -v, --verbose           More output (like -d)",
              "  --quiet                 Errors only", "  --debug-file <file>     Log to a file too",
              "", "With no command line argument, arguments are read from standard input.",
              "Arguments read from standard input take the form of:", "",
              "    arg1=value1", "    arg2=value2", ""]
    for o in role_options(role):
        lines.append(f"  {o.name:<20}  {o.help}")
    return "\n".join(lines)


# ============================================================================
# 13. Commands and main: role from argv[0], `fencevirt.py <command>`
# ============================================================================

COMMANDS: dict = {}


def cmd_virtd(argv: list) -> int:
    """fence_virtd: the host daemon (-F -f -d -p -w -c -l, --check-config)."""
    import getopt
    try:
        pairs, rest = getopt.gnu_getopt(argv, "Ff:d:cwlhp:V",
                                        ["check-config", "help", "version"])
    except getopt.GetoptError as e:
        raise UsageError(f"{e}; see -h") from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}; see -h")
    opts = {"config": DEFAULT_CONFIG, "foreground": False, "debug": 0, "wait": False,
            "pidfile": DEFAULT_PIDFILE, "mode": "run"}
    for flag, value in pairs:
        if flag == "-F":
            opts["foreground"] = True
        elif flag == "-f":
            opts["config"] = value
        elif flag == "-d":
            try:
                opts["debug"] = int(value)
            except ValueError:
                raise UsageError(f"-d {value!r}: expected a number") from None
        elif flag == "-w":
            opts["wait"] = True
        elif flag == "-p":
            opts["pidfile"] = value
        elif flag == "-c":
            opts["mode"] = "configure"
        elif flag == "-l":
            opts["mode"] = "plugins"
        elif flag == "--check-config":
            opts["mode"] = "check"
        elif flag in ("-V", "--version"):
            opts["mode"] = "version"
        else:
            opts["mode"] = "help"
    level = logging.DEBUG if opts["debug"] else logging.INFO
    setup_logging("fence_virtd", level, use_syslog=not opts["foreground"])
    if opts["mode"] == "help":
        print("usage: fence_virtd [options]\n"
              "  -F              Do not daemonize (log to stderr).\n"
              "  -f <file>       Use <file> as configuration file.\n"
              "  -d <level>      Set debugging level to <level>.\n"
              "  -c              Configuration mode.\n"
              "  -l              List plugins.\n"
              "  -w              Wait for initialization (interface, libvirtd).\n"
              "  -p <file>       Use <file> to record the active process id.\n"
              "  --check-config  Check the configuration file and exit.")
        return ExitCode.OK
    if opts["mode"] == "version":
        print(f"fence_virtd (fencevirt {__version__})")
        return ExitCode.OK
    if opts["mode"] == "plugins":
        print("Available backends:\n" + "".join(f"    {b}\n" for b in sorted(BACKENDS)) +
              "Available listeners:\n" + "".join(f"    {n}\n" for n in sorted(LISTENERS)),
              end="")
        return ExitCode.OK
    if opts["mode"] == "check":
        return cmd_check_config([opts["config"]])
    if opts["mode"] == "configure":
        return configure_interactive(opts["config"])
    return run_daemon(opts)


def configure_interactive(path: str) -> int:
    raise UsageError("fence_virtd -c is not available yet; copy fence_virt.conf.example")


def cmd_check_config(argv: list) -> int:
    """check-config [FILE]: report every problem with its line number."""
    setup_logging("fence_virtd", logging.INFO)
    path = argv[0] if argv else DEFAULT_CONFIG
    cfg = load_config(path)
    problems = check_config(cfg, LISTENERS, BACKENDS)
    for p in problems:
        print(p)
    if problems:
        return ExitCode.FAIL
    print(f"{path}: OK")
    return ExitCode.OK


def cmd_keygen(argv: list) -> int:
    """keygen [PATH] [--force] [--bytes N]: a random key, mode 0600."""
    import getopt
    setup_logging("fencevirt", logging.INFO)
    try:
        pairs, rest = getopt.gnu_getopt(argv, "fb:", ["force", "bytes="])
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    force = any(f in ("-f", "--force") for f, _ in pairs)
    size = 512
    for f, v in pairs:
        if f in ("-b", "--bytes"):
            size = int(number(v, "--bytes", MIN_KEY_LEN))
    path = rest[0] if rest else DEFAULT_KEY_FILE
    if os.path.exists(path) and not force:
        raise UsageError(f"{path} exists; refusing to overwrite it (use --force)")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(size))
    os.replace(tmp, path)
    with open(path, "rb") as f:
        print(f"{path}: {size} random bytes, mode 0600, fingerprint "
              f"{key_fingerprint(f.read(MAX_KEY_LEN))}")
    return ExitCode.OK


def free_port() -> int:
    """A port free for both UDP and TCP on loopback."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("0.0.0.0", port))
                except OSError:
                    continue
            return port
    raise FenceError("no free port found on loopback")


def cmd_demo(argv: list) -> int:
    """demo: our daemon (sim backend, loopback only) fenced by our client."""
    import subprocess
    import tempfile
    setup_logging("fencevirt", logging.INFO)
    me = os.path.abspath(__file__)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fencevirt-demo.") as tmp:
        key = os.path.join(tmp, "fence_xvm.key")
        cmd_keygen([key, "--bytes", "256"])
        conf = os.path.join(tmp, "fence_virt.conf")
        with open(conf, "w") as f:
            f.write(DEMO_CONFIG.format(key=key, port=port))
        os.chmod(conf, 0o600)
        logpath = os.path.join(tmp, "fence_virtd.log")
        print(f"--- starting fence_virtd (sim backend, multicast {MCAST_IPV4}:{port} on lo)")
        with open(logpath, "wb") as out:
            daemon = subprocess.Popen([sys.executable, me, "virtd", "-F", "-f", conf, "-p",
                                       os.path.join(tmp, "pid")], stdout=out, stderr=out)
        try:
            deadline = Deadline(10)
            while b"ready:" not in open(logpath, "rb").read():
                if daemon.poll() is not None or deadline.expired():
                    sys.stdout.write(open(logpath).read())
                    raise FenceError("the demo daemon did not start")
                time.sleep(0.02)
            base = [sys.executable, me, "xvm", "-I", "lo", "-p", str(port), "-k", key,
                    "-t", "5"]
            failures = 0
            for args, want in ((["-o", "list"], 0), (["-o", "status", "-H", "sim-2"], 0),
                               (["-o", "off", "-H", "sim-2"], 0),
                               (["-o", "status", "-H", "sim-2"], 2),
                               (["-o", "on", "-H", "sim-2"], 0),
                               (["-o", "reboot", "-H", "sim-3"], 0),
                               (["-o", "status", "-H", "no-such-vm"], 2),
                               (["-o", "list"], 0)):
                shown = "fence_xvm " + " ".join(args)
                t0 = time.monotonic()
                p = subprocess.run(base + args, capture_output=True, text=True, timeout=30)
                ms = (time.monotonic() - t0) * 1000
                print(f"$ {shown}    # rc={p.returncode}, {ms:.0f} ms")
                sys.stdout.write(p.stdout)
                sys.stdout.write("".join(f"  (stderr) {line}\n"
                                         for line in p.stderr.splitlines()))
                if p.returncode != want:
                    failures += 1
                    print(f"  !! expected rc {want}")
        finally:
            daemon.terminate()
            daemon.wait(10)
        print("--- fence_virtd log (audit lines):")
        for line in open(logpath).read().splitlines():
            if "audit:" in line or "ready:" in line:
                print("  " + line)
        print("demo " + ("passed" if not failures else f"FAILED ({failures} steps)"))
        return ExitCode.OK if not failures else ExitCode.FAIL


DEMO_CONFIG = """\
fence_virtd {{
	listener = "multicast";
	backend = "sim";
}}
listeners {{
	multicast {{
		key_file = "{key}";
		address = "225.0.0.12";
		port = "{port}";
		interface = "lo";
		family = "ipv4";
	}}
}}
backends {{
	sim {{
		domain = "sim-1 5a5a5a5a-0000-4000-8000-000000000001 on";
		domain = "sim-2 5a5a5a5a-0000-4000-8000-000000000002 on";
		domain = "sim-3 5a5a5a5a-0000-4000-8000-000000000003 on";
		domain = "sim-4 5a5a5a5a-0000-4000-8000-000000000004 off";
	}}
}}
"""


def cmd_help(argv: list) -> int:
    print(__doc__.strip())
    print("\ncommands:")
    for name, fn in COMMANDS.items():
        print(f"  {name:<14} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return ExitCode.OK


COMMANDS.update({
    "virtd": cmd_virtd,
    "xvm": lambda argv: run_agent("xvm", argv),
    "virt": lambda argv: run_agent("virt", argv),
    "demo": cmd_demo,
    "keygen": cmd_keygen,
    "check-config": cmd_check_config,
    "help": cmd_help,
})
COMMANDS["xvm"].__doc__ = "fence_xvm: the multicast fence agent (stdin or options)"
COMMANDS["virt"].__doc__ = "fence_virt: the tcp/vsock/serial fence agent"


def role_of(argv0: str) -> str | None:
    """Role from the program name: fence_virtd, fence_xvm (fence_*xvm*), fence_virt."""
    base = os.path.basename(argv0)
    if base.endswith(".py"):
        base = base[:-3]
    if base.startswith("fence_"):
        if "virtd" in base:
            return "virtd"
        if "xvm" in base:
            return "xvm"
        if "virt" in base:
            return "virt"
    return None


def run_role(argv: list) -> int:
    role = role_of(argv[0])
    args = argv[1:]
    if role is None:
        if not args:
            return cmd_help([])
        role, args = args[0], args[1:]
        if role not in COMMANDS:
            setup_logging("fencevirt")
            raise UsageError(f"unknown command {role!r}; see `fencevirt.py help`")
    return COMMANDS[role](args)


def main(argv: list | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if not log.handlers:
        setup_logging(os.path.basename(argv[0]) if argv else "fencevirt")
    try:
        return int(run_role(argv))
    except FenceError as e:
        log.error("%s", e)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.FAIL)
    except BrokenPipeError:
        return int(ExitCode.FAIL)
    except Exception as e:  # noqa: BLE001 - a bug: say so, never exit 0
        log.error("internal error: %s: %s (rerun with -d for the traceback)",
                  type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return int(ExitCode.FAIL)


if __name__ == "__main__":
    sys.exit(main())
