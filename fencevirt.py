#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""fencevirt: fence_virtd, fence_xvm and fence_virt in one stdlib-only file.

The role is chosen by the name the file is run as:

    fence_virtd      host daemon: multicast/tcp/vsock/serial listeners; libvirt, cpg
                     and sim backends
    fence_xvm        guest fence agent over multicast with a TCP connect-back
                     (also straight to libvirtd with --hypervisor-uri)
    fence_virt       guest fence agent over tcp, vsock or serial
    any name in .../stonith/plugins/external/: the cluster-glue external/libvirt plugin

or by a subcommand: ``fencevirt.py virtd|xvm|virt|demo|keygen|check-config|install|
uninstall|doctor|host-map|stonith-plugin ...``. Run ``fencevirt.py help`` for the list.

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
DROP_LOG_BURST = 10          # drop lines logged per reason and window; the rest are counted
DROP_LOG_WINDOW = 10.0
MCAST_RCVBUF = 8 << 20       # bytes of queued datagrams the multicast listener may hold
CALLBACK_TIMEOUT = 5.0       # daemon: connect back to the client
AUTH_TIMEOUT = 10.0          # daemon: wait for the client's challenge / response
REQUEST_READ_TIMEOUT = 1.0   # daemon (tcp/vsock): the 176-byte request after accept
BACKEND_TIMEOUT = 20.0       # daemon: one fencing operation, end to end
OFF_VERIFY_TIMEOUT = 15.0    # C: reboot polls up to 15 s for SHUTOFF
MAX_WORKERS = 64
VMADDR_CID_ANY = 0xFFFFFFFF
CPG_GROUP = "fence-agents"   # the C cpg backend's group (PACKAGE_NAME), protocol.md §12
CPG_REPLY_TIMEOUT = 18.0     # cpg: wait for the owner's REPLY (C waits forever)
CPG_SETTLE = 3.0             # cpg: membership must be this old before no_owner = assume-off
CPG_POLL = 1.0               # cpg: re-read the local domains; reconnect to corosync
CPG_GRACE = 0.3              # cpg: wait for an owner's STORE_VM before "nobody owns it"
LIST_MERGE_WAIT = 0.25       # client: after the first list connect-back, wait for others
WATCH_AFTER = 0.3             # client: open the firewall check after this long


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


_OP = threading.local()


def set_op_deadline(deadline: Deadline | None) -> None:
    """Give this thread's backend calls a budget (the daemon sets one per request)."""
    _OP.deadline = deadline


def op_budget() -> Deadline | None:
    """This thread's request budget, or None (command-line use)."""
    return getattr(_OP, "deadline", None)


def op_deadline(default: float) -> Deadline:
    """This thread's request budget, or a fresh one of `default` seconds."""
    dl = op_budget()
    return dl if dl is not None else Deadline(default)


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
        out.append(f"{pad}{head}\n{dump_config(b, indent + 1)}{pad}}}\n\n")
    for a in (i for i in items if isinstance(i, Assign)):
        out.append(f'{pad}{a.name} = "{a.value}";\n')
    return "".join(out)


# Known keys, for check_config (ours and the C daemon's).
KNOWN_KEYS = {
    "fence_virtd": {"listener", "backend", "module_path", "foreground", "wait_for_init",
                    "wait_for_backend", "debug", "name_mode", "backend_timeout"},
    "listeners/multicast": {"key_file", "hash", "auth", "family", "address", "port",
                            "interface", "check_source", "owner_only", "peers", "hints"},
    "listeners/tcp": {"key_file", "hash", "auth", "family", "address", "port"},
    "listeners/vsock": {"key_file", "hash", "auth", "port"},
    "listeners/serial": {"uri", "path", "mode", "key_file"},
    "backends/libvirt": {"uri", "driver"},
    "backends/cpg": {"uri", "name_mode", "driver", "no_owner", "timeout", "settle", "local",
                     "group"},
    "backends/sim": {"domain", "delay", "state_file"},
    "groups/group": {"name", "ip", "uuid"},
}


class ConfigProblem(collections.namedtuple("ConfigProblem", "source line text error")):
    """One check_config finding. error=False is a warning: the C daemon takes the file."""

    __slots__ = ()

    def __str__(self) -> str:
        where = f"{self.source}: line {self.line}" if self.line else self.source
        return f"{where}: {'' if self.error else 'warning: '}{self.text}"


REPEATABLE_KEYS = {"ip", "uuid", "domain"}       # groups/group, backends/sim
HASH_WORDS = ("none", "sha1", "sha256", "sha512")


def c_atoi(text: str) -> int | None:
    """The integer C atoi() reads (leading sign and digits), or None when it reads none."""
    t = text.strip()
    end = 1 if t[:1] in "+-" else 0
    while end < len(t) and t[end].isdigit():
        end += 1
    digits = t[:end]
    return int(digits) if digits.lstrip("+-") else None


def check_config(cfg: Config, listeners=(), backends=()) -> list:
    """Every ConfigProblem in a parsed config, in line order; [] when clean.

    Errors are what stops a daemon (ours or C's) or makes it fence the wrong way;
    warnings are what the C daemon ignores silently (unknown keys, shadowed repeats).
    `listeners`/`backends`: the names that exist (the registries); empty = not checked.
    """
    problems = []

    def add(line: int, text: str, error: bool = True) -> None:
        problems.append(ConfigProblem(cfg.source, line, text, error))

    def warn(line: int, text: str) -> None:
        add(line, text, False)

    def repeats(blk: Block, path: str) -> None:
        seen: dict = {}
        for item in blk.items:
            key = (type(item).__name__, item.name.lower())
            if isinstance(item, Assign) and item.name.lower() in REPEATABLE_KEYS:
                continue
            if isinstance(item, Block) and item.name.lower() == "group":
                continue
            if key in seen:
                kind = "key" if isinstance(item, Assign) else "section"
                warn(seen[key], f"{kind} {item.name!r} in {path or 'the file'} is repeated on "
                                f"line {item.line}; only the last one is read")
            seen[key] = item.line

    fv = cfg.node("fence_virtd")
    active_listeners = listener_names_of(cfg)
    active_backend = (cfg.get("fence_virtd/@backend") or "").lower()

    # structure: unknown sections and keys, shadowed repeats
    top_known = {"fence_virtd", "listeners", "backends", "groups"}
    repeats(cfg.root, "")
    for item in cfg.root.items:
        if isinstance(item, Block) and item.name.lower() not in top_known:
            warn(item.line, f"unknown section {item.name!r} (the daemon ignores it)")
        elif isinstance(item, Assign):
            warn(item.line, f"{item.name!r} set outside any section (the daemon ignores it)")
    for sect in ("listeners", "backends", "groups"):
        blk = cfg.node(sect)
        if blk is not None:
            repeats(blk, sect)
            for item in blk.items:
                if isinstance(item, Assign):
                    warn(item.line, f"key {item.name!r} directly in {sect} is ignored")
    for path, keys in KNOWN_KEYS.items():
        head, _, leaf = path.rpartition("/")
        parents = [cfg.root] if not head else [b for b in [cfg.node(head)] if b is not None]
        for parent in parents:
            for blk in parent.blocks(leaf):
                repeats(blk, path)
                for item in blk.items:
                    lname = item.name.lower()
                    if isinstance(item, Assign) and lname not in keys \
                            and not (leaf in ("libvirt", "cpg") and lname[:3] == "uri"
                                     and lname[3:].isdigit()):
                        warn(item.line, f"unknown key {item.name!r} in {path} (known: "
                                        f"{', '.join(sorted(keys))})")
                    elif isinstance(item, Block):
                        warn(item.line, f"unknown section {item.name!r} in {path}")
    for sect, known in (("listeners", listeners), ("backends", backends)):
        blk = cfg.node(sect)
        for item in (blk.items if blk else []):
            if isinstance(item, Block) and known and item.name.lower() not in known:
                warn(item.line, f"unknown {sect[:-1]} section {item.name!r} (known: "
                                f"{', '.join(sorted(known))})")
    grp = cfg.node("groups")
    for g in (grp.blocks("group") if grp else []):
        if not g.values("ip") and not g.values("uuid"):
            warn(g.line, "group without ip or uuid entries is ignored")

    # fence_virtd: what is required, and the numbers C reads with atoi()
    fv_line = fv.line if fv is not None else 0
    for key, known, names in (("listener", listeners, active_listeners),
                              ("backend", backends, [active_backend] if active_backend else [])):
        a = fv.assign(key) if fv is not None else None
        if a is None:
            add(fv_line, f'fence_virtd {{ {key} = "..."; }} is missing (for example '
                         f'{key} = "{"multicast" if key == "listener" else "libvirt"}")')
            continue
        for name in names or [""]:
            if known and name not in known:
                add(a.line, f"unknown {key} {name!r} (known: {', '.join(sorted(known))})")
    for key in ("foreground", "wait_for_init", "wait_for_backend", "debug"):
        a = fv.assign(key) if fv is not None else None
        if a is not None and (c_atoi(a.value) is None or a.value.strip() != a.value
                              or str(c_atoi(a.value)) != a.value.lstrip("+")):
            n = c_atoi(a.value)
            warn(a.line, f"{key} = {a.value!r} is not a whole number; it is read as "
                         f"{n or 0}, as the C daemon's atoi() does")
    a = fv.assign("backend_timeout") if fv is not None else None
    if a is not None:
        try:
            if not float(a.value) > 0:
                raise ValueError
        except ValueError:
            add(a.line, f"backend_timeout = {a.value!r}: expected seconds > 0 (default "
                        f"{BACKEND_TIMEOUT:g})")

    # listener values: errors for the listeners in use, warnings for the other blocks
    for lname in ("multicast", "tcp", "vsock"):
        blk = cfg.node(f"listeners/{lname}")
        if blk is None:
            continue
        report = add if lname in active_listeners else warn
        unused = "" if lname in active_listeners else f" (listeners/{lname} is not in use)"
        for key in ("hash", "auth"):
            a = blk.assign(key)
            if a and a.value.lower() not in HASH_WORDS:
                report(a.line, f"{key} = {a.value!r}: use none, sha1, sha256 or sha512{unused}")
        a = blk.assign("family")
        fam_ok = True
        if a and a.value.lower() not in ("ipv4", "ipv6"):
            fam_ok = False
            report(a.line, f"family = {a.value!r}: use ipv4 or ipv6{unused}")
        a = blk.assign("port")
        if a:
            try:
                parse_port(a.value)
                if not a.value.strip().isdigit():
                    raise UsageError(f"port: {a.value!r} is not a decimal number")
            except UsageError as e:
                n = c_atoi(a.value)
                c_note = (f"; the C daemon would silently use {n & 0xFFFF}"
                          if n is not None and n > 65535 else "")
                report(a.line, f"{e}{c_note}{unused}")
        a = blk.assign("address")
        if a and lname != "vsock":
            try:
                fam = address_family(a.value)
                want = blk.get("family", "ipv4").lower()
                if fam_ok and family_name(fam) != want:
                    report(a.line, f"address {a.value!r} is not an {want} address (family = "
                                   f"{want!r}; set family = \"{family_name(fam)}\"){unused}")
                elif lname == "multicast" and not _is_multicast(a.value, fam):
                    report(a.line, f"address {a.value!r} is not a multicast group (use "
                                   f"{MCAST_IPV4} or {MCAST_IPV6}){unused}")
            except UsageError as e:
                report(a.line, f"address: {e}{unused}")
        a = blk.assign("check_source")
        if a:
            try:
                parse_bool(a.value, "check_source")
            except UsageError as e:
                report(a.line, f"{e}{unused}")
        a = blk.assign("key_file")
        if a and not a.value.startswith("/"):
            warn(a.line, f"key_file = {a.value!r} is not an absolute path; it is read "
                         f"relative to the daemon's working directory (/ once daemonized)")

    # backend values
    for bname in ("libvirt", "cpg"):
        blk = cfg.node(f"backends/{bname}")
        if blk is None:
            continue
        report = add if bname == active_backend else warn
        for item in blk.items:
            if isinstance(item, Assign) and item.name.lower().startswith("uri") \
                    and not _looks_like_uri(item.value):
                report(item.line, f"{item.name} = {item.value!r} is not a libvirt URI "
                                  f"(like {DEFAULT_URI} or qemu+tcp://host/system)")
        a = blk.assign("driver")
        if a and a.value.lower() not in ("auto", "python", "virsh"):
            report(a.line, f"driver = {a.value!r}: use auto, python or virsh")
        if bname == active_backend and not cfg.uris(bname) \
                and (blk.get("local") or "libvirt").lower() != "sim":
            add(blk.line, f'backends/{bname} has no uri (for example uri = "{DEFAULT_URI}")')
    if active_backend in ("libvirt", "cpg") and cfg.node(f"backends/{active_backend}") is None:
        add(fv_line, f'backends {{ {active_backend} {{ uri = "..."; }} }} is missing '
                     f'(for example uri = "{DEFAULT_URI}")')
    blk = cfg.node("backends/sim")
    if blk is not None:
        report = add if active_backend == "sim" else warn
        for item in blk.items:
            if isinstance(item, Assign) and item.name.lower() == "domain" and (
                    len(item.value.split()) != 3 or not is_uuid(item.value.split()[1])):
                report(item.line, f"domain = {item.value!r}: expected \"name uuid on|off\"")
        a = blk.assign("delay")
        if a:
            try:
                if float(a.value) < 0:
                    raise ValueError
            except ValueError:
                report(a.line, f"delay = {a.value!r}: expected seconds >= 0")
    return sorted(problems, key=lambda p: (p.line, not p.error))


def listener_names_of(cfg: Config) -> list:
    """fence_virtd/@listener as a list of lowercase names ("multicast, tcp" is ours)."""
    raw = cfg.get("fence_virtd/@listener") or ""
    return [n.lower() for n in raw.replace(",", " ").split()]


def _looks_like_uri(value: str) -> bool:
    """scheme[+transport]:rest with no whitespace, as libvirt URIs are."""
    scheme, colon, rest = value.partition(":")
    return bool(colon and scheme and scheme[0].isalpha() and rest
                and all(c.isalnum() or c in "+.-" for c in scheme)
                and not any(c.isspace() for c in value))


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


def request_name(code: int) -> str:
    """'off', 'hostlist', … for a request code; the number for an unknown one."""
    return Request(code).name.lower() if code in Request.__members__.values() else str(code)


def request_address(req: FenceReq) -> str | None:
    """The call-back address text by `family` (addrlen is ignored, as in C)."""
    if req.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, req.address[:4])
    if req.family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, req.address[:16])
    return None


KEY_TAG = b"fk"        # ours: bytes 18-27 of `address` carry the signer's key fingerprint


def tag_key(address: bytes, key: bytes) -> bytes:
    """The 28-byte address field with the key fingerprint in its unused tail.

    C reads only the first 4 (IPv4) or 16 (IPv6) bytes. The tag is the first 8 bytes of
    sha256(key), what key_fingerprint() prints; every signed packet already allows the
    same offline guess, so it reveals nothing new, and it lets a daemon say whose key
    signed a request it drops."""
    if not key:
        return address
    return address[:18].ljust(18, b"\0") + KEY_TAG + hashlib.sha256(key).digest()[:8]


def request_key_tag(packet: bytes) -> str | None:
    """The signer's key fingerprint from a (possibly unverified) packet, or None."""
    if len(packet) < REQ_SIZE:
        return None
    address = FENCE_REQ.unpack(packet[:REQ_SIZE])[5]
    if address[18:20] != KEY_TAG:
        return None
    return "sha256:" + address[20:28].hex()


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


# fencevirt extensions, ignored by the C programs (protocol.md has no such bytes):
# a note after the result byte on the authenticated connection says why it failed, and a
# UDP hint to the sender of a dropped multicast request says why it was dropped.
NOTE_MAGIC = b"fvnote1\0"
HINT_MAGIC = b"fvhint1\0"
MAX_NOTE_LEN = 512


def pack_note(text: str) -> bytes:
    """magic, u16 LE length, UTF-8 text (cut to MAX_NOTE_LEN); b"" for no text."""
    if not text:
        return b""
    data = text.encode("utf-8", "replace")[:MAX_NOTE_LEN]
    return NOTE_MAGIC + struct.pack("<H", len(data)) + data


def unpack_note(data: bytes) -> str:
    """The text of a note, "" when `data` is not one (a C daemon sends nothing)."""
    head = len(NOTE_MAGIC) + 2
    if len(data) < head or not data.startswith(NOTE_MAGIC):
        return ""
    size = min(struct.unpack_from("<H", data, len(NOTE_MAGIC))[0], MAX_NOTE_LEN)
    return data[head:head + size].decode("utf-8", "replace")


def pack_hint(reason: str, detail: str) -> bytes:
    """A drop hint no longer than a request (REQ_SIZE), so it cannot amplify."""
    data = HINT_MAGIC + reason.encode()[:32] + b"\0" + detail.encode("utf-8", "replace")
    return data[:REQ_SIZE]


def unpack_hint(data: bytes) -> tuple | None:
    """(reason, detail) of a drop hint, or None when `data` is not one."""
    if not data.startswith(HINT_MAGIC) or len(data) > REQ_SIZE:
        return None
    reason, _, detail = data[len(HINT_MAGIC):].partition(b"\0")
    return reason.decode("utf-8", "replace"), detail.decode("utf-8", "replace")


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


# corosync CPG messages of the C cpg backend (protocol.md §12): a 16-byte header
# {type, seqno, target, pad} and a 140-byte payload, host byte order (little-endian here).
CPG_HEADER = struct.Struct("<IIII")
CPG_FENCE_REQ = struct.Struct("<128siII")       # vm_name, request, seqno, response
CPG_VM_STATE = struct.Struct("<65s65s2xIi")     # v_name, v_uuid, pad, s_owner, s_state
CPG_MSG_SIZE = CPG_HEADER.size + CPG_FENCE_REQ.size
assert CPG_FENCE_REQ.size == CPG_VM_STATE.size == 140 and CPG_MSG_SIZE == 156   # layout
CPG_REQUEST, CPG_REPLY, CPG_STORE_VM = 0, 1, 2
CPG_TARGET_ALL = 0xFFFFFFFF
CPG_GONE = -1            # ours: s_state of a domain that left this host (C keeps it, harmless)
CpgFence = collections.namedtuple("CpgFence", "type seqno target domain request req_seqno "
                                              "response")
CpgVm = collections.namedtuple("CpgVm", "seqno target name uuid owner state")


def pack_cpg_fence(mtype: int, seqno: int, target: int, domain: str, request: int,
                   req_seqno: int = 0, response: int = 0) -> bytes:
    """REQUEST (target CPG_TARGET_ALL) or REPLY (target = the requester's nodeid)."""
    raw = domain.encode("utf-8")
    if len(raw) >= 128 or b"\0" in raw:
        raise ProtocolError(f"domain {domain!r} does not fit a CPG request (127 bytes)")
    return (CPG_HEADER.pack(mtype, seqno & 0xFFFFFFFF, target & 0xFFFFFFFF, 0)
            + CPG_FENCE_REQ.pack(raw, int(request), req_seqno & 0xFFFFFFFF,
                                 int(response) & 0xFFFFFFFF))


def pack_cpg_vm(name: str, uuid: str, owner: int, state: int, seqno: int = 0) -> bytes:
    """STORE_VM: one domain of `owner` (a nodeid); names are cut to 64 bytes."""
    return (CPG_HEADER.pack(CPG_STORE_VM, seqno & 0xFFFFFFFF, CPG_TARGET_ALL, 0)
            + CPG_VM_STATE.pack(name.encode("utf-8")[:64], uuid.encode("utf-8")[:64],
                                owner & 0xFFFFFFFF, int(state)))


def unpack_cpg_message(data: bytes):
    """CpgFence for REQUEST/REPLY, CpgVm for STORE_VM; ProtocolError otherwise."""
    if len(data) != CPG_MSG_SIZE:
        raise ProtocolError(f"CPG message of {len(data)} bytes, expected {CPG_MSG_SIZE}")
    mtype, seqno, target, _pad = CPG_HEADER.unpack_from(data)
    if mtype == CPG_STORE_VM:
        name, uuid, owner, state = CPG_VM_STATE.unpack_from(data, CPG_HEADER.size)
        return CpgVm(seqno, target, decode_cstr(name), decode_cstr(uuid).lower(), owner, state)
    if mtype in (CPG_REQUEST, CPG_REPLY):
        vm, request, req_seqno, response = CPG_FENCE_REQ.unpack_from(data, CPG_HEADER.size)
        return CpgFence(mtype, seqno, target, decode_cstr(vm), request, req_seqno, response)
    raise ProtocolError(f"CPG message type {mtype} unknown (0 request, 1 reply, 2 store_vm)")


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
        raise ConfigError(f"key file {path} cannot be reached: {e.strerror} (check the "
                          f"permissions of the directories above it)") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"key file {path} is {kind}; point key_file at the key itself, "
                          f"or {fix}")
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_LEN)
    except OSError as e:
        raise ConfigError(f"key file {path} is not readable by uid {os.geteuid()}: "
                          f"{e.strerror}; make it readable by the user this runs as "
                          f"(owner {st.st_uid}, mode {st.st_mode & 0o7777:04o}; for example "
                          f"chown {os.geteuid()} {path})") from None
    if not key:
        raise ConfigError(f"key file {path} is empty; {fix} (use --force to replace it)")
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

    def reset(self, info: HostInfo) -> None:
        """Hard reset (the reset button): the domain stays running, its guest restarts."""
        raise BackendError(f"the {self.name} backend cannot reset a domain")

    def route(self, code: int, domain: str, verify: float):
        """Multi-host backends: the Response of another host that owns `domain`, or None
        when the domain is handled here (then section 8 runs on this backend)."""
        return None

    def close(self) -> None:
        pass


@register(BACKENDS, "sim")
class SimBackend(Backend):
    """In-memory domains: the README demo and the dispatcher's tests.

    backends { sim { domain = "name uuid on|off"; delay = "0.1"; } }

    state_file = "/path": the domains live in that file instead, one "name uuid on|off" a
    line ('#' comments). It is re-read on every call and rewritten on every change, so a
    test can move a domain between two daemons' files to simulate a migration.
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
        self.state_file = blk.get("state_file") if blk else None
        self.lock = threading.Lock()
        self.doms: dict = {}
        if self.state_file:
            self._read_state()
            return
        for spec in specs:
            if len(spec) != 3:
                raise ConfigError(f"backends/sim domain {' '.join(spec)!r}: "
                                  f"expected \"name uuid on|off\"")
            name, uuid, st = spec
            state = VirState.RUNNING if st in ("on", "running", "1") else VirState.SHUTOFF
            self.doms[uuid.lower()] = HostInfo(name, uuid.lower(), int(state))

    def _read_state(self) -> None:
        """state_file -> self.doms (call with self.lock held, or from __init__)."""
        try:
            with open(self.state_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise BackendError(f"sim state_file {self.state_file}: {e.strerror}") from None
        doms = {}
        for n, line in enumerate(lines, 1):
            spec = line.split("#", 1)[0].split()
            if not spec:
                continue
            if len(spec) != 3 or not is_uuid(spec[1]):
                raise BackendError(f"sim state_file {self.state_file}: line {n}: expected "
                                   f"\"name uuid on|off\", found {line.strip()!r}")
            state = VirState.RUNNING if spec[2] in ("on", "running", "1") else VirState.SHUTOFF
            doms[spec[1].lower()] = HostInfo(spec[0], spec[1].lower(), int(state))
        self.doms = doms

    def _write_state(self) -> None:
        text = "".join(f"{h.name} {h.uuid} {'off' if h.state == VirState.SHUTOFF else 'on'}\n"
                       for h in self.doms.values())
        tmp = f"{self.state_file}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.state_file)
        except OSError as e:
            raise BackendError(f"sim state_file {self.state_file}: cannot write: "
                               f"{e.strerror}") from None

    def domains(self) -> list:
        with self.lock:
            if self.state_file:
                self._read_state()
            return list(self.doms.values())

    def _set(self, info: HostInfo, state: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.state_file:
                self._read_state()
            if info.uuid not in self.doms:
                raise NoSuchDomain(f"domain {info.name!r} vanished")
            self.doms[info.uuid] = self.doms[info.uuid]._replace(state=state)
            if self.state_file:
                self._write_state()

    def destroy(self, info: HostInfo) -> None:
        self._set(info, VirState.SHUTOFF)

    def create(self, info: HostInfo) -> None:
        self._set(info, VirState.RUNNING)


class _ConnectionLost(BackendError):
    """libvirtd went away during a call; the driver reconnects and retries in budget."""


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
        self.backoff = [self.BACKOFF_MIN] * len(uris)
        self.errors: list = [""] * len(uris)
        self.lock = threading.Lock()

    BACKOFF_MIN, BACKOFF_MAX = 0.25, 2.0

    def _conn(self, i: int):
        """The i-th connection, opened or reopened with a bounded back-off.

        Waits for libvirtd within this thread's request budget (op_deadline); without
        one (command-line use) it tries once.
        """
        deadline = op_deadline(0.0)
        if not self.lock.acquire(timeout=max(0.01, deadline.remaining())):
            raise BackendError(f"libvirt at {self.uris[i]}: another request is still "
                               f"connecting (libvirtd hung?)")
        try:
            conn = self.conns[i]
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except self.libvirt.libvirtError:
                    pass
                self._drop(i, "the connection is dead")
            attempts, t0 = 0, time.monotonic()
            while True:
                wait = self.retry_at[i] - time.monotonic()
                if wait > 0:
                    if wait > deadline.remaining():
                        raise BackendError(f"cannot connect to libvirt at {self.uris[i]}: "
                                           f"{self.errors[i]} (next retry in {wait:.1f} s, "
                                           f"after this request's time budget)")
                    time.sleep(wait)
                attempts += 1
                try:
                    conn = self.libvirt.open(self.uris[i])
                    break
                except self.libvirt.libvirtError as e:
                    first = not self.errors[i]
                    self.errors[i] = " ".join(str(e).split())
                    self.retry_at[i] = time.monotonic() + self.backoff[i]
                    (log.warning if first else log.debug)(
                        "cannot connect to libvirt at %s: %s; retrying in %.2f s",
                        self.uris[i], self.errors[i], self.backoff[i])
                    self.backoff[i] = min(self.backoff[i] * 2, self.BACKOFF_MAX)
                    if deadline.remaining() <= 0:
                        raise BackendError(f"cannot connect to libvirt at {self.uris[i]}: "
                                           f"{self.errors[i]} ({attempts} attempt(s) in "
                                           f"{time.monotonic() - t0:.1f} s)") from None
            if self.errors[i]:
                log.info("reconnected to libvirt at %s (%d attempt(s), %.1f s)",
                         self.uris[i], attempts, time.monotonic() - t0)
            self.backoff[i] = self.BACKOFF_MIN
            self.retry_at[i] = 0.0
            self.errors[i] = ""
            self.conns[i] = conn
            return conn
        finally:
            self.lock.release()

    def _drop(self, i: int, why: str) -> None:
        """Forget connection i (the caller holds the lock or knows it is dead)."""
        conn, self.conns[i] = self.conns[i], None
        if conn is None:
            return
        log.warning("lost the libvirt connection to %s (%s); reconnecting", self.uris[i], why)
        self.errors[i] = why
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is dead already
            pass

    def _lost(self, i: int, conn, e) -> bool:
        """True (and the connection dropped) when e means libvirtd went away."""
        lv = self.libvirt
        codes = {getattr(lv, n, -1) for n in ("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC",
                                               "VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN")}
        try:
            alive = conn.isAlive()
        except lv.libvirtError:
            alive = False
        if alive and e.get_error_code() not in codes and "socket is closed" not in str(e):
            return False
        with self.lock:
            if self.conns[i] is conn:
                self._drop(i, " ".join(str(e).split()))
        return True

    def _retry(self, fn, what: str):
        """fn(), redone after a lost connection while this request's budget lasts."""
        deadline = op_deadline(0.0)
        while True:
            try:
                return fn()
            except _ConnectionLost as e:
                if deadline.expired():
                    raise BackendError(f"{what}: {e}; libvirtd was not back within this "
                                       f"request's time budget") from None

    def _fail(self, i: int, conn, e, what: str) -> BackendError:
        if self._lost(i, conn, e):
            return _ConnectionLost(f"lost the connection to {self.uris[i]} "
                                   f"({' '.join(str(e).split())})")
        return self._err(e, what)

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
        def once():
            for i, conn in self._each():
                try:
                    conn.getLibVersion()
                except self.libvirt.libvirtError as e:
                    raise self._fail(i, conn, e, "ping") from None
        self._retry(once, "ping")

    def domains(self) -> list:
        def once():
            out = []
            for i, conn in self._each():
                try:
                    try:
                        stats = conn.getAllDomainStats(self.libvirt.VIR_DOMAIN_STATS_STATE)
                        out.extend(HostInfo(d.name(), d.UUIDString(), s.get("state.state", 0))
                                   for d, s in stats)
                    except self.libvirt.libvirtError as e:
                        if e.get_error_code() != self.libvirt.VIR_ERR_NO_SUPPORT:
                            raise
                        out.extend(HostInfo(d.name(), d.UUIDString(), d.state()[0])
                                   for d in conn.listAllDomains(0))
                except self.libvirt.libvirtError as e:
                    raise self._fail(i, conn, e, f"list domains on {self.uris[i]}") from None
            return out
        return self._retry(once, "list domains")

    def _dom(self, domain: str):
        """(index, conn, virDomain); _ConnectionLost when libvirtd went away."""
        for i, conn in self._each():
            try:
                if is_uuid(domain):
                    return i, conn, conn.lookupByUUIDString(domain)
                return i, conn, conn.lookupByName(domain)
            except self.libvirt.libvirtError as e:
                if e.get_error_code() != self.libvirt.VIR_ERR_NO_DOMAIN:
                    raise self._fail(i, conn, e, f"look up {domain!r}") from None
        raise NoSuchDomain(f"no domain {domain!r} at {', '.join(self.uris)}")

    def lookup(self, domain: str) -> HostInfo:
        def once():
            i, conn, dom = self._dom(domain)
            try:
                return HostInfo(dom.name(), dom.UUIDString(), dom.state()[0])
            except self.libvirt.libvirtError as e:
                raise self._fail(i, conn, e, f"state of {domain!r}") from None
        return self._retry(once, f"look up {domain!r}")

    def call(self, info: HostInfo, op: str) -> None:
        done = {"destroy": lambda st: st == VirState.SHUTOFF,
                "create": lambda st: st != VirState.SHUTOFF}.get(op, lambda st: False)
        tries = []

        def once():
            i, conn, dom = self._dom(info.uuid)
            try:
                if tries and done(dom.state()[0]):
                    return      # the call before the connection broke did it
                if op_deadline(0.0).expired() and tries:
                    raise BackendError(f"{op} {info.name!r}: not done, the request's time "
                                       f"budget ran out")
                tries.append(op)
                getattr(dom, op)()
            except self.libvirt.libvirtError as e:
                raise self._fail(i, conn, e, f"{op} {info.name!r}") from None
        self._retry(once, f"{op} {info.name!r}")

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

    # virsh messages that mean libvirtd is down, restarting or went away mid-call
    LOST = ("failed to connect to the hypervisor", "End of file while reading data",
            "Cannot recv data", "client socket is closed", "Cannot write data",
            "Connection reset by peer")

    def run(self, uri: str, *args: str, retry: bool = True) -> str:
        """One virsh call. While libvirtd cannot be reached it is retried with a bounded
        back-off inside this thread's request budget (op_deadline; none: one try)."""
        budget = op_budget()
        deadline = budget or Deadline(self.TIMEOUT)     # no budget: one try of TIMEOUT
        retry = retry and budget is not None
        delay, attempts, t0 = 0.25, 0, time.monotonic()
        while True:
            attempts += 1
            try:
                out = self._run_once(uri, *args, timeout=min(
                    self.TIMEOUT, max(1.0, deadline.remaining())))
                if attempts > 1:
                    log.info("libvirt at %s answers again (%d attempt(s), %.1f s)", uri,
                             attempts, time.monotonic() - t0)
                return out
            except _ConnectionLost as e:
                if not retry or deadline.remaining() < delay:
                    raise BackendError(f"{e}" + (f" ({attempts} attempt(s) in "
                                                 f"{time.monotonic() - t0:.1f} s)"
                                                 if attempts > 1 else "")) from None
                (log.warning if attempts == 1 else log.debug)(
                    "%s; retrying in %.2f s", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _run_once(self, uri: str, *args: str, timeout: float) -> str:
        import subprocess
        env = dict(os.environ, LC_ALL="C", LANG="C")
        try:
            p = subprocess.run([self.virsh, "-q", "-c", uri, *args], capture_output=True,
                               text=True, timeout=timeout, env=env,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BackendError(f"virsh -c {uri} {args[0]} did not answer within "
                               f"{timeout:.0f} s (libvirtd hung?)") from None
        if p.returncode != 0:
            err = " ".join(p.stderr.split()) or f"exit status {p.returncode}"
            if "failed to get domain" in err or "Domain not found" in err:
                raise NoSuchDomain(f"virsh -c {uri}: {err}")
            if any(m in err for m in self.LOST):
                raise _ConnectionLost(f"cannot reach libvirt at {uri}: {err}")
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
        cmd = {"destroy": "destroy", "create": "start", "reset": "reset"}[op]
        for uri in self.uris:
            try:
                self.run(uri, "dominfo", "--domain", info.uuid)
            except NoSuchDomain:
                continue
            try:
                self.run(uri, cmd, "--domain", info.uuid, retry=False)
            except BackendError:
                # the connection may have broken after libvirtd acted: look before failing
                st = self.lookup(info.uuid).state
                if not ((op == "destroy" and st == VirState.SHUTOFF)
                        or (op == "create" and st != VirState.SHUTOFF)):
                    raise
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

    def reset(self, info: HostInfo) -> None:
        self.impl.call(info, "reset")

    def close(self) -> None:
        self.impl.close()


CS_ERRORS = {2: "CS_ERR_LIBRARY: is corosync running in this network namespace?",
             6: "CS_ERR_TRY_AGAIN", 9: "CS_ERR_BAD_HANDLE", 11: "CS_ERR_ACCESS",
             13: "CS_ERR_NAME_TOO_LONG", 14: "CS_ERR_EXIST"}


class CpgLink:
    """libcpg.so.4 through ctypes (imported here, lazily): one handle joined to one group.

    Callbacks run in the thread that calls dispatch(). CS_OK is 1, not 0; 6 (TRY_AGAIN) is
    retried for up to 1 s. Every prototype is declared: a handle is a uint64.
    """

    def __init__(self, group: str, on_deliver, on_confchg):
        try:
            import ctypes as C
            lib = C.CDLL("libcpg.so.4")
        except (ImportError, OSError) as e:
            raise BackendError(f"cannot load libcpg.so.4 ({e}); install libcpg4") from None

        class Name(C.Structure):
            _fields_ = [("length", C.c_uint32), ("value", C.c_char * 128)]

        class Addr(C.Structure):
            _fields_ = [("nodeid", C.c_uint32), ("pid", C.c_uint32), ("reason", C.c_uint32)]

        class IoVec(C.Structure):
            _fields_ = [("iov_base", C.c_void_p), ("iov_len", C.c_size_t)]

        addrs = C.POINTER(Addr)
        deliver_t = C.CFUNCTYPE(None, C.c_uint64, C.POINTER(Name), C.c_uint32, C.c_uint32,
                                C.c_void_p, C.c_size_t)
        confchg_t = C.CFUNCTYPE(None, C.c_uint64, C.POINTER(Name), addrs, C.c_size_t,
                                addrs, C.c_size_t, addrs, C.c_size_t)

        class Callbacks(C.Structure):
            _fields_ = [("deliver", deliver_t), ("confchg", confchg_t)]

        for fname, args in {"cpg_initialize": [C.POINTER(C.c_uint64), C.POINTER(Callbacks)],
                            "cpg_fd_get": [C.c_uint64, C.POINTER(C.c_int)],
                            "cpg_local_get": [C.c_uint64, C.POINTER(C.c_uint)],
                            "cpg_join": [C.c_uint64, C.POINTER(Name)],
                            "cpg_leave": [C.c_uint64, C.POINTER(Name)],
                            "cpg_mcast_joined": [C.c_uint64, C.c_int, C.POINTER(IoVec),
                                                 C.c_uint],
                            "cpg_dispatch": [C.c_uint64, C.c_int],
                            "cpg_finalize": [C.c_uint64]}.items():
            fn = getattr(lib, fname)
            fn.argtypes, fn.restype = args, C.c_int
        raw = group.encode()
        if len(raw) > 128:
            raise ConfigError(f"CPG group name {group!r} is longer than 128 bytes")
        self.C, self.lib, self.IoVec = C, lib, IoVec
        self.name = Name(len(raw), raw)
        self.error = None

        def deliver(_h, _g, nodeid, pid, msg, length):
            try:
                on_deliver(nodeid, pid, C.string_at(msg, length))
            except Exception as e:  # noqa: BLE001 - ctypes would swallow it; dispatch() logs
                self.error = self.error or e

        def confchg(_h, _g, mem, n_mem, left, n_left, joined, n_joined):
            try:
                on_confchg([(mem[i].nodeid, mem[i].pid) for i in range(n_mem)],
                           [(left[i].nodeid, left[i].pid, left[i].reason)
                            for i in range(n_left)],
                           [(joined[i].nodeid, joined[i].pid) for i in range(n_joined)])
            except Exception as e:  # noqa: BLE001
                self.error = self.error or e

        # The CFUNCTYPE objects must live as long as the handle: keep them on self.
        self.callbacks = Callbacks(deliver_t(deliver), confchg_t(confchg))
        self.handle = None
        self.fd = -1
        self.nodeid = 0
        self.send_lock = threading.Lock()

    def _call(self, what: str, fn, *args) -> None:
        for _ in range(100):
            rc = fn(*args)
            if rc != 6:
                break
            time.sleep(0.01)
        if rc != 1:
            raise BackendError(f"{what} failed: cs_error {rc}"
                               f"{' (' + CS_ERRORS[rc] + ')' if rc in CS_ERRORS else ''}")

    def connect(self) -> None:
        C = self.C
        handle, fd, nodeid = C.c_uint64(), C.c_int(), C.c_uint()
        self._call("cpg_initialize", self.lib.cpg_initialize, C.byref(handle),
                   C.byref(self.callbacks))
        try:
            self._call("cpg_fd_get", self.lib.cpg_fd_get, handle, C.byref(fd))
            self._call("cpg_local_get", self.lib.cpg_local_get, handle, C.byref(nodeid))
            self._call(f"cpg_join {self.name.value.decode()!r}", self.lib.cpg_join, handle,
                       C.byref(self.name))
        except BackendError:
            self.lib.cpg_finalize(handle)
            raise
        self.handle, self.fd, self.nodeid = handle, fd.value, nodeid.value

    def send(self, data: bytes) -> None:
        if self.handle is None:
            raise BackendError("not connected to corosync")
        C = self.C
        buf = C.create_string_buffer(data, len(data))
        iov = self.IoVec(C.cast(buf, C.c_void_p), len(data))
        with self.send_lock:
            self._call("cpg_mcast_joined", self.lib.cpg_mcast_joined, self.handle, 2,  # AGREED
                       C.byref(iov), 1)

    def dispatch(self) -> None:
        """Run the callbacks for everything pending; BackendError when corosync is gone."""
        rc = self.lib.cpg_dispatch(self.handle, 2)            # CS_DISPATCH_ALL
        err, self.error = self.error, None
        if err is not None:
            log.error("cpg: error in a callback: %s: %s", type(err).__name__, err)
        if rc not in (1, 6):
            raise BackendError(f"cpg_dispatch failed: cs_error {rc}"
                               f"{' (' + CS_ERRORS[rc] + ')' if rc in CS_ERRORS else ''}")

    def close(self) -> None:
        if self.handle is not None:
            self.lib.cpg_leave(self.handle, self.C.byref(self.name))
            self.lib.cpg_finalize(self.handle)
            self.handle, self.fd = None, -1


ROUTED = (Request.OFF, Request.ON, Request.REBOOT, Request.STATUS)


@register(BACKENDS, "cpg")
class CpgBackend(Backend):
    """Hosts joined in one corosync CPG group route each request to the domain's owner.

    backends { cpg { uri = "qemu:///system"; name_mode = "name|uuid";
                     no_owner = "fail|assume-off"; timeout = "18"; settle = "3";
                     local = "libvirt|sim"; } }

    Wire: the C cpg backend's group ("fence-agents") and messages (protocol.md §12), so C
    and fencevirt daemons can share a group. Each daemon multicasts STORE_VM for its local
    domains on join, on every membership change and whenever its list changes (polled every
    CPG_POLL s; a domain that left is sent with state -1). A request for a local domain is
    served here through section 8; for any other, a REQUEST goes to the group and the answer
    counts only when it comes from a member that stores the domain (its STORE_VM precedes
    its REPLY in the agreed order). When a domain is defined on several hosts, the running
    copy is the one fenced; two running copies (a name clash) fail: use name_mode = uuid.

    No live owner (an answer from a member that does not store the domain, the owner left
    during the request, or only an "unknown" answer): no_owner = "fail" (the default)
    answers FAIL to every request, status included. no_owner = "assume-off" is C's rule
    (off/reboot succeed, status says off, on fails), on the assumption that a host cluster
    fenced the missing host, and only once the membership has been stable for `settle` s.
    Both are logged every time. The wait for a REPLY is bounded by `timeout`; corosync is
    reconnected every CPG_POLL s when it goes away (local domains are still served).
    """

    name = "cpg"

    def __init__(self, cfg: Config | None):
        super().__init__(cfg)
        blk = cfg.node("backends/cpg") if cfg else None
        where = f"{cfg.source if cfg else 'config'}: backends/cpg"

        def get(key, default=None):
            return blk.get(key, default) if blk is not None else default
        self.name_mode = (get("name_mode") or (cfg.get("fence_virtd/@name_mode") if cfg
                                               else None) or "name").lower()
        self.no_owner = (get("no_owner") or "fail").lower()
        local = (get("local") or "libvirt").lower()
        for key, value, allowed in (("name_mode", self.name_mode, ("name", "uuid")),
                                    ("no_owner", self.no_owner, ("fail", "assume-off")),
                                    ("local", local, ("libvirt", "sim"))):
            if value not in allowed:
                raise ConfigError(f"{where}: {key} = {value!r}: use {' or '.join(allowed)}")
        try:
            self.timeout = float(get("timeout", str(CPG_REPLY_TIMEOUT)))
            self.settle = float(get("settle", str(CPG_SETTLE)))
        except ValueError as e:
            raise ConfigError(f"{where}: timeout and settle are seconds: {e}") from None
        self.group = get("group", CPG_GROUP)
        if local == "sim":
            self.local = SimBackend(cfg)
        else:
            uris = cfg.uris("cpg") if cfg else []
            if not uris:
                raise ConfigError(f'{where}: uri is missing (for example uri = "{DEFAULT_URI}")')
            self.local = LibvirtBackend(cfg, uris=uris, driver=get("driver") or "auto")
        self.driver = self.local.driver
        self.cond = threading.Condition()
        self.members: list = []       # (nodeid, pid) of every group member
        self.remote: dict = {}        # (uuid, nodeid) -> (HostInfo, (nodeid, pid) that sent it)
        self.replies: dict = {}       # our seqno -> [(response, nodeid)]
        self.seqno = struct.unpack("<I", os.urandom(4))[0] >> 1
        self.changed_at = time.monotonic()
        self.connected = False
        self.last_error = ""
        self.announced: dict = {}
        self.announce_lock = threading.Lock()
        self.locks = DomainLocks()
        self.stopping = threading.Event()
        self.link = CpgLink(self.group, self._deliver, self._confchg)
        self.link.connect()           # BackendError: no corosync here (the C daemon exits too)
        self._joined()
        self.wake_r, self.wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._loop, name="cpg", daemon=True)
        self.thread.start()

    def describe(self) -> str:
        state = (f"node {self.link.nodeid}, {len(self.members)} members" if self.connected
                 else f"disconnected: {self.last_error}")
        return (f"cpg group {self.group!r} ({state}; name_mode {self.name_mode}, no_owner "
                f"{self.no_owner}) over {self.local.describe()}")

    # -- the CPG thread: dispatch, poll the local list, reconnect
    def _loop(self) -> None:
        next_poll = 0.0
        while not self.stopping.is_set():
            if not self.connected:
                if self.stopping.wait(CPG_POLL):
                    break
                try:
                    self.link.connect()
                except BackendError as e:
                    log.debug("cpg: reconnect failed: %s", e)
                    continue
                self._joined()
                continue
            try:
                ready = select.select([self.link.fd, self.wake_r], [], [], CPG_POLL)[0]
                if self.link.fd in ready:
                    self.link.dispatch()
            except (BackendError, OSError, ValueError) as e:
                self._lost(str(e))
                continue
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CPG_POLL
                threading.Thread(target=self._announce, daemon=True).start()

    def _joined(self) -> None:
        with self.cond:
            self.connected, self.changed_at = True, time.monotonic()
        log.info("cpg: joined group %r as node %d", self.group, self.link.nodeid)

    def _lost(self, why: str) -> None:
        log.error("cpg: lost corosync (%s); domains of other hosts cannot be fenced until it "
                  "is back; reconnecting every %.0f s", why, CPG_POLL)
        self.link.close()
        with self.cond:
            self.connected, self.last_error = False, why
            self.members, self.remote, self.announced = [], {}, {}
            self.changed_at = time.monotonic()
            self.cond.notify_all()

    def _deliver(self, nodeid: int, pid: int, data: bytes) -> None:
        try:
            msg = unpack_cpg_message(data)
        except ProtocolError as e:
            log.debug("cpg: ignoring a message from node %d: %s", nodeid, e)
            return
        me = (nodeid, pid) == (self.link.nodeid, os.getpid())
        if isinstance(msg, CpgVm):
            if me:
                return
            with self.cond:
                for key in [k for k in self.remote if k[0] == msg.uuid and k[1] == nodeid]:
                    del self.remote[key]
                if msg.state != CPG_GONE:
                    self.remote[(msg.uuid, nodeid)] = (HostInfo(msg.name, msg.uuid, msg.state),
                                                       (nodeid, pid))
        elif msg.type == CPG_REQUEST:
            threading.Thread(target=self._serve, args=(msg, nodeid), daemon=True).start()
        elif msg.target == self.link.nodeid:
            with self.cond:
                if msg.seqno in self.replies:
                    self.replies[msg.seqno].append((msg.response, nodeid))
                    self.cond.notify_all()

    def _confchg(self, members: list, left: list, joined: list) -> None:
        with self.cond:
            self.members = members
            alive = set(members)
            gone = {k: v for k, v in self.remote.items() if v[1] not in alive}
            for k in gone:
                del self.remote[k]
            self.changed_at = time.monotonic()
            self.cond.notify_all()
        log.info("cpg: members %s; left %s; joined %s%s", sorted(members), left, joined,
                 f"; forgot {len(gone)} domains of departed members" if gone else "")
        threading.Thread(target=self._announce, args=(True,), daemon=True).start()

    def _announce(self, force: bool = False, wait: bool = False) -> None:
        """STORE_VM for local domains that changed (all of them when forced)."""
        if not self.announce_lock.acquire(timeout=5 if force or wait else 0):
            return
        try:
            try:
                doms = {h.uuid: h for h in self.local.domains() if h.name != "Domain-0"}
            except FenceError as e:
                log.warning("cpg: cannot list local domains: %s", e)
                return
            msgs = [pack_cpg_vm(h.name, h.uuid, self.link.nodeid, h.state)
                    for u, h in doms.items() if force or self.announced.get(u) != h]
            msgs += [pack_cpg_vm(h.name, h.uuid, self.link.nodeid, CPG_GONE)
                     for u, h in self.announced.items() if u not in doms]
            for m in msgs:
                self.link.send(m)
            self.announced = doms
        except BackendError as e:
            log.debug("cpg: STORE_VM not sent: %s", e)
        finally:
            self.announce_lock.release()

    # -- matching
    def _local_lookup(self, domain: str) -> HostInfo:
        if self.name_mode == "uuid" and not is_uuid(domain):
            raise NoSuchDomain(f"name_mode = uuid: {domain!r} is not a UUID (use -u)")
        return self.local.lookup(domain)

    def _copies(self, domain: str) -> list:
        """(nodeid, HostInfo) of live remote copies (call with self.cond held)."""
        want = domain.lower()
        uuid = is_uuid(domain)
        return [(k[1], h) for k, (h, _p) in self.remote.items()
                if (h.uuid == want if uuid or self.name_mode == "uuid"
                    else h.name.lower() == want)]

    def _highest(self) -> bool:
        with self.cond:
            return bool(self.members) and max(n for n, _p in self.members) == self.link.nodeid

    # -- the owner's side: every member handles every REQUEST (C does the same)
    def _serve(self, msg: CpgFence, sender: int) -> None:
        try:
            info = self._local_lookup(msg.domain)
        except NoSuchDomain:
            info = None
        except FenceError as e:
            log.warning("cpg: request %d %r from node %d: cannot read local domains (%s); "
                        "staying silent", msg.request, msg.domain, sender, e)
            return
        if info is not None and info.state == VirState.SHUTOFF:
            with self.cond:
                elsewhere = [n for n, h in self._copies(msg.domain)
                             if h.state != VirState.SHUTOFF]
            if elsewhere:
                log.info("cpg: %r is off here but runs on node(s) %s: they answer",
                         msg.domain, elsewhere)
                return
        if info is not None:
            t0 = time.monotonic()
            self.link.send(pack_cpg_vm(info.name, info.uuid, self.link.nodeid, info.state))
            try:
                result = handle_request(make_request(msg.request, msg.domain), self.local,
                                        Acl([]), f"cpg node {sender}", self.locks)
            except FenceError as e:
                log.error("cpg: request %d %r from node %d failed: %s", msg.request,
                          msg.domain, sender, e)
                result = Response.FAIL
            if isinstance(result, list):
                result = Response.FAIL
            try:
                fresh = self.local.lookup(info.uuid)
                self.link.send(pack_cpg_vm(fresh.name, fresh.uuid, self.link.nodeid,
                                           fresh.state))
            except FenceError:
                self.link.send(pack_cpg_vm(info.name, info.uuid, self.link.nodeid, info.state))
            self.link.send(pack_cpg_fence(CPG_REPLY, msg.seqno, sender, msg.domain,
                                          msg.request, msg.req_seqno, int(result)))
            log.info("audit: src=cpg-node-%d via=cpg op=%d domain=%r result=%s ms=%d", sender,
                     msg.request, msg.domain, Response(result).name.lower(),
                     (time.monotonic() - t0) * 1000)
            return
        with self.cond:
            owned = bool(self._copies(msg.domain))
        if owned or not self._highest():
            return                                  # the owner (or the highest node) answers
        time.sleep(CPG_GRACE)                       # an owner's STORE_VM may be on its way
        with self.cond:
            if self._copies(msg.domain):
                return
        try:
            result = self._no_owner(msg.request, msg.domain, f"asked by node {sender}; no "
                                    f"member lists it")
        except FenceError:
            result = Response.FAIL
        self.link.send(pack_cpg_fence(CPG_REPLY, msg.seqno, sender, msg.domain, msg.request,
                                      msg.req_seqno, int(result)))

    def _no_owner(self, code: int, domain: str, why: str) -> Response:
        """The documented rule for a domain that no live member owns (logged each time)."""
        op = request_name(code)
        age = time.monotonic() - self.changed_at
        if self.no_owner == "assume-off" and age >= self.settle and code in (
                Request.OFF, Request.REBOOT, Request.STATUS):
            result = Response.OFF if code == Request.STATUS else Response.SUCCESS
            log.warning("cpg: no live member owns %r (%s); no_owner = assume-off answers %s "
                        "to %s, trusting that the host cluster fenced the missing host",
                        domain, why, result.name.lower(), op)
            return result
        rule = (f"no_owner = assume-off, but the membership changed {age:.1f} s ago "
                f"(settle = {self.settle:g} s)" if self.no_owner == "assume-off"
                else f"no_owner = {self.no_owner}")
        msg = (f"no live member of CPG group {self.group!r} owns {domain!r} ({why}); "
               f"{op} answers FAIL ({rule})")
        log.error("cpg: %s", msg)
        raise BackendError(msg)

    # -- the requester's side
    def route(self, code: int, domain: str, verify: float):
        if code not in ROUTED:
            return None
        for _attempt in range(3):           # the owner's copy may vanish while we ask
            result = self._route_once(code, domain)
            if result is not self.AGAIN:
                return result
        raise BackendError(f"{domain!r} kept moving between hosts while we asked; try again")

    AGAIN = object()

    def _route_once(self, code: int, domain: str):
        try:
            mine = self._local_lookup(domain)
        except NoSuchDomain:
            mine = None
        except FenceError as e:
            log.warning("cpg: local lookup of %r failed (%s); asking the group", domain, e)
            mine = None
        with self.cond:
            copies = self._copies(domain)
            connected, why = self.connected, self.last_error
        running = [(n, h) for n, h in copies if h.state != VirState.SHUTOFF]
        if mine is not None:
            clash = sorted({n for n, h in running if h.uuid != mine.uuid})
            if clash and mine.state != VirState.SHUTOFF:
                raise BackendError(f"{domain!r} runs here and on node(s) {clash} as different "
                                   f"domains; set name_mode = \"uuid\" and fence by UUID")
            if mine.state != VirState.SHUTOFF or not running:
                return None                         # ours: section 8 acts here
        if len({h.uuid for _n, h in running}) > 1:
            raise BackendError(f"{domain!r} runs on nodes {sorted(n for n, _h in running)} "
                               f"as different domains; set name_mode = \"uuid\" and fence by "
                               f"UUID")
        if not connected:
            raise BackendError(f"{domain!r} is not a domain of this host, and corosync is "
                               f"unreachable ({why}): only this host's domains can be fenced")
        return self._ask(code, domain, {n for n, _h in running} or None)

    def _ask(self, code: int, domain: str, want):
        """Multicast a REQUEST; wait (bounded) for an owner's REPLY."""
        op = Request(code).name.lower()
        with self.cond:
            self.seqno = (self.seqno + 1) & 0xFFFFFFFF or 1
            seq = self.seqno
            self.replies[seq] = []
        t0 = time.monotonic()
        try:
            # As C does: our list changes first, so that in the agreed order every member
            # knows what left this host before it sees the REQUEST (migration).
            self._announce(wait=True)
            self.link.send(pack_cpg_fence(CPG_REQUEST, seq, CPG_TARGET_ALL, domain, code))
            deadline = Deadline(self.timeout)
            seen = 0
            unowned = None            # (node, Deadline): an answer for the group came first
            with self.cond:
                while True:
                    for response, sender in self.replies[seq][seen:]:
                        seen += 1
                        owner = (sender in want) if want else any(
                            n == sender for n, _h in self._copies(domain))
                        if not owner and not want and unowned is None:
                            unowned = (sender, Deadline(CPG_GRACE))
                        if owner:
                            log.info("cpg: %s %r answered by node %d in %.1f ms: %d", op,
                                     domain, sender, (time.monotonic() - t0) * 1000, response)
                            if response in (Response.SUCCESS, Response.OFF, Response.DENIED):
                                return Response(response)
                            raise BackendError(f"{op} {domain!r}: its owner, node {sender}, "
                                               f"answered {response} (fail); see its log")
                        log.debug("cpg: node %d answered %r but does not own it", sender,
                                  domain)
                    if unowned is not None and not want:
                        # An owner sends STORE_VM as soon as it sees the REQUEST: wait a
                        # moment for one before the group's "nobody has it" counts.
                        stored = {n for n, _h in self._copies(domain)}
                        if stored:
                            want, unowned = stored, None
                        elif unowned[1].expired():
                            return self._no_owner(code, domain, f"node {unowned[0]} answered "
                                                  f"for the group; no member stores it")
                    live = {n for n, _p in self.members}
                    if want and want & live and not want & {n for n, _h in
                                                             self._copies(domain)}:
                        log.info("cpg: %r left node(s) %s while we asked; asking again",
                                 domain, sorted(want))
                        return self.AGAIN
                    if want and not want & live:
                        return self._no_owner(code, domain, f"its owner, node(s) "
                                              f"{sorted(want)}, left the group during the "
                                              f"request")
                    if not self.connected:
                        raise BackendError(f"{op} {domain!r}: lost corosync while waiting for "
                                           f"the owner's answer; the outcome is unknown")
                    if deadline.expired():
                        raise FenceTimeout(
                            f"{op} {domain!r}: no answer over CPG within {self.timeout:g} s "
                            f"(owner {'node(s) ' + str(sorted(want)) if want else 'unknown'}; "
                            f"members {sorted(live)}); the owner's daemon may hang")
                    self.cond.wait(min(deadline.remaining(), 0.02 if unowned else 1.0))
        finally:
            with self.cond:
                self.replies.pop(seq, None)

    # -- Backend API: list = local + live remote copies; everything else is local
    def ping(self) -> None:
        self.local.ping()
        if not self.connected:
            raise BackendError(f"not connected to corosync ({self.last_error}); only this "
                               f"host's domains can be fenced")

    def domains(self) -> list:
        out = {h.uuid: h for h in self.local.domains()}
        with self.cond:
            remote = [h for h, _p in self.remote.values()]
        for h in remote:
            if h.uuid not in out or (out[h.uuid].state == VirState.SHUTOFF
                                     and h.state != VirState.SHUTOFF):
                out[h.uuid] = h
        return list(out.values())

    def lookup(self, domain: str) -> HostInfo:
        return self._local_lookup(domain)

    def state(self, info: HostInfo) -> int:
        return self.local.state(info)

    def destroy(self, info: HostInfo) -> None:
        self.local.destroy(info)

    def create(self, info: HostInfo) -> None:
        self.local.create(info)

    def close(self) -> None:
        self.stopping.set()
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        self.thread.join(5.0)
        self.link.close()
        self.wake_r.close()
        self.wake_w.close()
        self.local.close()


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
        """Load the groups as static_map.c does: groups/group[1], [2], ... (the last group
        in the file first), each entry cut to 127 bytes.

        C compat: loading stops at the first group with neither `ip` nor `uuid`, so that
        group and every group above it in the file are ignored (and with none loaded
        the ACL is open). We keep the C result for the same file, and say so loudly.
        """
        groups = []
        blk = cfg.node("groups") if cfg else None
        found = list(reversed(blk.blocks("group"))) if blk else []
        subs = [i for i in blk.items if isinstance(i, Block)] if blk else []
        # C quirk: sc_get("groups/group[n]") tests the value of the groups block's last
        # sub-block; when it has one, an empty group is skipped instead of ending the load.
        skip_empty = bool(subs) and subs[-1].value is not None
        for n, g in enumerate(found, 1):
            ips = {v.lower()[:127] for v in g.values("ip")}
            uuids = {v.lower()[:127] for v in g.values("uuid")}
            name = g.value or g.get("name") or f"unnamed-{n}"
            if ips or uuids:
                groups.append((name, ips, uuids))
                continue
            if skip_empty:
                log.warning("%s: line %d: group %r has no ip and no uuid; it is ignored",
                            cfg.source, g.line, name)
                continue
            ignored = [f"{h.value or h.get('name') or 'unnamed'} (line {h.line})"
                       for h in found[n:]]
            log.warning("%s: line %d: group %r has no ip and no uuid. As in the C daemon, "
                        "loading the groups stops there: %s. Give it an ip/uuid or remove it",
                        cfg.source, g.line, name,
                        (f"ignoring {', '.join(ignored)} above it" if ignored else
                         "nothing above it is ignored") +
                        ("" if groups else "; NO group is in effect, so every guest may "
                         "fence every domain"))
            break
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
    routed = backend.route(code, req.domain, verify)    # cpg: another host owns it
    if routed is not None:
        return routed
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
# 9. Listeners: multicast, tcp, vsock, serial; each turns bytes into verified requests
# ============================================================================

LISTENERS: dict = {}


class History:
    """Requests served recently: (request, seqno, domain) for 10 s as the C daemon keeps
    them, plus the exact packets served (their digests) for REPLAY_SECONDS.

    Why these windows: the 10 s key drops the retransmissions and per-address copies of
    one fence_xvm run (same seqno, new random bytes each). A legitimate client never
    sends the same bytes twice (6 fresh random bytes are signed into every packet), so
    a byte-identical packet is always a replay and the digest store has no false
    positives; it is bounded by REPLAY_MAX entries (~10 MB) and kept 600 s, longer than
    any fence_xvm -t or Pacemaker stonith-timeout. A replay older than that still has
    to pass the challenge-response, which needs the key, unless auth = "none"; with
    check_source it must also come from the address it names. Only packets that passed
    auth are recorded, so unauthenticated traffic cannot fill the store.
    """

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
            try:
                self.key = read_key_file(self.key_file)
            except ConfigError as e:
                # fail closed: C drops an unreadable key to no authentication; we refuse
                raise ConfigError(f"{where}: {e}. Refusing to start without the key (only "
                                  f"hash = \"none\" and auth = \"none\" together run "
                                  f"without one)") from None

    def describe(self) -> str:
        return (f"key {key_fingerprint(self.key)}, hash>={self.min_hash.name.lower()}, "
                f"auth {self.auth.name.lower()}")


def fix_permissions(path: str) -> None:
    """C compat: config and key files readable by others are made 0600, with a warning."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        return                    # the reader reports a missing file, with the fix
    if mode & 0o077:
        log.warning("insecure permissions on %s: changing from %04o to 0600", path, mode)
        try:
            os.chmod(path, 0o600)
        except OSError as e:
            log.warning("could not change the mode of %s: %s; run chmod 600 %s as its owner",
                        path, e.strerror, path)


def auth_drop_reason(e: AuthError, packet: bytes) -> tuple:
    """(reason, detail) for a request that failed verification, naming the signer's key."""
    reason = "hash too weak" if "too weak" in str(e) else "key mismatch"
    detail = str(e)
    signer = request_key_tag(packet)
    if reason == "key mismatch" and signer:
        detail += f"; the request was signed with key {signer}"
    if reason == "key mismatch":
        detail += "; copy the same key file to the host and every guest"
    return reason, detail


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
    """UDP on the group; the daemon connects back to the address in the packet.

    Several hosts on one group and key (no host cluster): owner_only = "auto|yes|no" and
    peers = "hostB hostC" (the other hypervisors that share the group). With owner-only
    answers, an on/off/reboot/status request for a domain that this host's backend does
    not know (or cannot look up) is dropped silently before the connect-back, so the
    owner's answer is the only one; list and monitor are still answered by every host.
    "auto" (the default) turns it on when `peers` names at least one host: a daemon cannot
    see other daemons on the group, so the configuration is how it knows it is not alone.
    The cpg backend routes requests itself, so "auto" leaves it off there. The cost: a
    request for a domain that no host knows gets no answer (the client times out, rc 1)
    instead of "fail", or "off" for status.
    """

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
        self.hints = parse_bool(self.cfg("hints", "yes"), "hints")
        self.hinted: dict = {}
        self.owner_only = (self.cfg("owner_only", "auto") or "auto").lower()
        if self.owner_only not in ("auto", "yes", "no"):
            try:
                self.owner_only = "yes" if parse_bool(self.owner_only, "owner_only") else "no"
            except UsageError:
                raise ConfigError(f"{where}: owner_only = {self.owner_only!r}: use auto, "
                                  f"yes or no") from None
        self.peers = (self.cfg("peers") or "").replace(",", " ").split()

    def owner_only_now(self) -> bool:
        """Whether this daemon answers only for its own domains (see the class doc)."""
        if self.owner_only != "auto":
            return self.owner_only == "yes"
        return bool(self.peers) and self.server.backend.name != "cpg"

    def not_owner(self, req: FenceReq) -> str | None:
        """Why to stay silent in owner-only mode, or None to answer."""
        if req.request not in (Request.OFF, Request.ON, Request.REBOOT, Request.STATUS,
                               Request.NULL) or not self.owner_only_now():
            return None
        try:
            run_bounded(lambda: self.server.backend.lookup(req.domain), CALLBACK_TIMEOUT,
                        "owner-only lookup")
        except NoSuchDomain:
            return f"{req.domain!r} is not one of this host's domains (owner_only)"
        except FenceError as e:
            return f"cannot tell whether {req.domain!r} is ours ({e}); owner_only"
        return None

    def open(self) -> list:
        ifindex = interface_index(self.interface) if self.interface else 0
        s = socket.socket(self.family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A deep queue: during a flood of bad packets, a legitimate one waits its turn
        # (~50 us per bad packet) instead of being dropped by the kernel.
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, MCAST_RCVBUF)       # SO_RCVBUFFORCE (root)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MCAST_RCVBUF)
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
        self.strays: dict = {}                 # packet socket -> PacketWatch
        self.stray_seen: dict = {}
        if ifindex:
            # Diagnosis only: see requests for our group arriving on other interfaces
            # (the kernel drops them before our socket), to log "wrong interface". One
            # watch per other interface; bridge and bond ports are left out (their master
            # is watched), so the guests' own traffic to us is never read twice.
            for idx, name in socket.if_nameindex()[:64]:
                if idx == ifindex or os.path.exists(f"/sys/class/net/{name}/master"):
                    continue
                watch = PacketWatch("udp", self.port, ifname=name)
                if watch.open() is None:
                    log.debug("no wrong-interface diagnosis: %s", watch.why)
                    break
                self.strays[watch.sock] = watch
                self.socks.append(watch.sock)
        return self.socks

    def stray_readable(self, watch: PacketWatch) -> None:
        """Requests for our group seen on another interface: one drop line per source
        every 10 s. Nothing is answered: the listener is bound elsewhere on purpose."""
        group = socket.inet_pton(self.family, self.address)
        now = time.monotonic()
        for src, ifname, data in watch.drain():
            dst = data[16:20] if data[0] >> 4 == 4 else data[24:40]
            if dst != group or now - self.stray_seen.get(src, -60.0) < 10.0:
                continue
            if len(self.stray_seen) > 1024:
                self.stray_seen.clear()
            self.stray_seen[src] = now
            detail = (f"request for {self.address}:{self.port} arrived on {ifname}, but this "
                      f"listener only joined the group on {self.interface} "
                      f"(interface = \"{self.interface}\" in {self.where.split(':')[0]})")
            self.server.drop(src, "wrong interface", detail)
            sport = udp_source_port(data)
            if sport:
                self.hint(self.socks[0], (src, sport), "wrong interface", detail)

    def describe(self) -> str:
        owner = (f"; owner-only answers (peers: {' '.join(self.peers) or 'none'})"
                 if self.owner_only_now() else "")
        return (f"multicast {self.address}:{self.port} on {self.interface or 'all interfaces'}"
                f" ({family_name(self.family)}; {self.settings.describe()}{owner})")

    def readable(self, sock: socket.socket) -> None:
        watch = self.strays.get(sock)
        if watch is not None:
            self.stray_readable(watch)
            return
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
            reason, detail = auth_drop_reason(e, data)
            self.server.drop(src, reason, detail)
            self.hint(sock, peer, reason, detail)
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

    def hint(self, sock: socket.socket, peer, reason: str, detail: str) -> None:
        """Tell the sender why its request was dropped: one small UDP datagram to the
        packet's source, at most one per source a second (`hints = "no"` turns it off).
        Clients only print it; it never ends their wait, so a forged one changes nothing."""
        if not self.hints:
            return
        now = time.monotonic()
        if now - self.hinted.get(peer[0], -10.0) < 1.0:
            return
        if len(self.hinted) > 1024:
            self.hinted.clear()
        self.hinted[peer[0]] = now
        if reason == "key mismatch":
            detail = f"its key {key_fingerprint(self.settings.key)}"
        elif reason == "hash too weak":
            detail = f"it requires hash {self.settings.min_hash.name.lower()} or stronger"
        try:
            sock.sendto(pack_hint(reason, detail), peer)
        except OSError as e:
            log.debug("hint to %s failed: %s", peer[0], e)

    def callback(self, req: FenceReq, packet: bytes, target: str) -> None:
        served = False
        try:
            why = self.not_owner(req)       # before the connect-back: the owner answers
            if why:
                self.server.drop(target, "not owner", why, level=logging.INFO)
                return
            try:
                conn = socket.create_connection((target, req.port), timeout=CALLBACK_TIMEOUT)
            except OSError as e:
                self.server.drop(target, "connect-back failed",
                                 f"TCP {target}:{req.port}: {e.strerror or e} (a firewall on "
                                 f"the guest blocking TCP {req.port}, or the client gave up)")
                return
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
                self.server.drop(src, *auth_drop_reason(e, data))
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
        except OSError as e:
            raise BackendError(f"vsock listener: no AF_VSOCK sockets here: "
                               f"{e.strerror or e} (load the vsock/vhost_vsock modules)") \
                from None
        try:
            s.bind((VMADDR_CID_ANY, self.port))
            s.listen(64)
        except OSError as e:
            s.close()
            raise BackendError(f"vsock listener port {self.port}: {e.strerror or e} "
                               f"(port in use, or no vsock transport loaded?)") from None
        s.setblocking(False)
        self.socks = [s]
        return self.socks

    def describe(self) -> str:
        return f"vsock port {self.port} ({self.settings.describe()})"

    def peer_source(self, peer) -> str:
        return str(peer[0])


SERIAL_MAGIC_BYTES = struct.pack("<I", SERIAL_MAGIC)    # b"abba"
SERIAL_RESCAN = 2.0          # ours: C reacts to libvirt events; we poll the running domains
SERIAL_CONNECT_TIMEOUT = 3.0
SERIAL_WRITE_TIMEOUT = 5.0


def in_directory(directory: str, path: str) -> bool:
    """True when `path` sits directly in `directory` (virt-serial.c is_in_directory)."""
    d = directory.strip("/")
    p = path.lstrip("/")
    if not d or "/" not in p:
        return False
    parent = p.rsplit("/", 1)[0].rstrip("/")
    return bool(parent) and parent == d


def serial_socket_paths(xml_text: str, vmchannel: bool, directory: str | None) -> list:
    """Unix socket paths of <serial type='unix'> (or <channel type='unix'> with
    vmchannel) whose <source mode='bind' path=...>; filtered by `directory`."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise BackendError(f"unreadable domain XML from libvirt: {e}") from None
    want = "channel" if vmchannel else "serial"
    paths = []
    for dev in root.findall(f"./devices/{want}"):
        if dev.get("type") != "unix":
            continue
        for src in dev.findall("source"):
            path = src.get("path")
            if src.get("mode") != "bind" or not path:
                continue
            if directory and not in_directory(directory, path):
                continue
            if path not in paths:
                paths.append(path)
    return paths


def split_serial_stream(buf: bytes) -> tuple:
    """(requests, rest, skipped): whole 74-byte requests that start with the magic,
    the bytes to keep for later, and how many bytes without a magic were skipped.

    Ours: C reads blind 74-byte blocks, so stray bytes desynchronise it for good
    (protocol.md §6.2); we resynchronise on the magic instead.
    """
    reqs, skipped = [], 0
    while True:
        i = buf.find(SERIAL_MAGIC_BYTES)
        if i < 0:
            keep = 0       # a magic may be cut at the end: keep its longest possible prefix
            for n in (3, 2, 1):
                if buf.endswith(SERIAL_MAGIC_BYTES[:n]):
                    keep = n
                    break
            skipped += len(buf) - keep
            return reqs, buf[len(buf) - keep:], skipped
        skipped += i
        buf = buf[i:]
        if len(buf) < SERIAL_REQ_SIZE:
            return reqs, buf, skipped
        reqs.append(buf[:SERIAL_REQ_SIZE])
        buf = buf[SERIAL_REQ_SIZE:]


def pack_serial_reply(result) -> bytes:
    """serial_resp_t, or for a list: abba FD, the records, the terminator, abba 00."""
    if isinstance(result, list):
        return (pack_serial_response(Response.HOSTLIST) + pack_hostlist(result)[1:-1] +
                pack_serial_response(Response.SUCCESS))
    return pack_serial_response(int(result))


class SerialChan:
    """One connected domain socket: its owner, the partial request, a write lock."""

    __slots__ = ("sock", "uuid", "name", "path", "buf", "since", "wlock")

    def __init__(self, sock: socket.socket, uuid: str, name: str, path: str):
        self.sock, self.uuid, self.name, self.path = sock, uuid, name, path
        self.buf = b""
        self.since = 0.0
        self.wlock = threading.Lock()


@register(LISTENERS, "serial")
class SerialListener(Listener):
    """serial { uri path mode }: the daemon connects to the unix socket that qemu binds
    for each running domain's <serial> (mode serial) or <channel> (mode vmchannel, also
    the guestfwd 10.0.2.179:1229 channel) and answers serial_req_t (protocol.md §6).

    There is no key and no challenge on this path: whoever can write to the guest's
    port is trusted, and the groups ACL source is the domain's UUID.
    """

    name = "serial"

    def __init__(self, server, blk, where):
        super().__init__(server, blk, where)
        # C compat: a serial request carries no random bytes, so only the C 10 s
        # (request, seqno, domain) window applies; no long exact-packet replay window.
        self.history = History(replay=0.0)
        mode = (self.cfg("mode", "serial") or "serial").strip().lower()
        if mode in ("serial", "vmchannel"):
            self.vmchannel = mode == "vmchannel"
        else:
            try:
                self.vmchannel = int(mode) > 0            # C: atoi(), non-zero = vmchannel
            except ValueError:
                raise ConfigError(f"{where}: mode = {mode!r}: use \"serial\" (the domains' "
                                  f"<serial type='unix'>) or \"vmchannel\" (their "
                                  f"<channel type='unix'>)") from None
        self.path = self.cfg("path")
        backend_uris = getattr(server.backend, "uris", None) or []
        self.uri = self.cfg("uri") or (backend_uris[0] if backend_uris else DEFAULT_URI)
        self.driver = None
        self.chans: dict = {}          # fileno -> SerialChan
        self.known: dict = {}          # uuid -> (name, [paths]) of running domains
        self.failed: dict = {}         # path -> last connect error (logged once)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        self.threads: list = []
        self.socks = []

    # -- libvirt side: which sockets should be connected
    def running_domains(self) -> dict:
        """uuid -> name of the running domains at self.uri (BackendError if unreachable)."""
        impl = self.driver
        out = {}
        if impl.name == "python":
            lv = impl.libvirt
            try:
                for d in impl._conn(0).listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    if d.state()[0] not in (VirState.SHUTOFF, VirState.CRASHED):
                        out[d.UUIDString().lower()] = d.name()
            except lv.libvirtError as e:
                raise BackendError(f"serial listener: list domains at {self.uri}: {e}") \
                    from None
        else:
            for line in impl.run(self.uri, "list", "--uuid", "--name").splitlines():
                if len(line) > 37 and is_uuid(line[:36]):
                    out[line[:36].lower()] = line[37:].strip()
        return out

    def domain_xml(self, uuid: str) -> str:
        impl = self.driver
        if impl.name == "python":
            lv = impl.libvirt
            try:
                return impl._conn(0).lookupByUUIDString(uuid).XMLDesc(0)
            except lv.libvirtError as e:
                raise BackendError(f"serial listener: XML of {uuid}: {e}") from None
        return impl.run(self.uri, "dumpxml", "--domain", uuid)

    def rescan(self) -> None:
        """Forget stopped domains, read the XML of new ones, connect missing sockets."""
        running = self.running_domains()
        with self.lock:
            gone = [c for c in self.chans.values() if c.uuid not in running]
        for c in gone:
            self.detach(c, "the domain is no longer running")
        for uuid in [u for u in self.known if u not in running]:
            del self.known[uuid]
        for uuid, name in running.items():
            if uuid not in self.known:
                try:
                    paths = serial_socket_paths(self.domain_xml(uuid), self.vmchannel,
                                                self.path)
                except NoSuchDomain:
                    continue               # stopped between the list and the XML
                self.known[uuid] = (name, paths)
                if not paths:
                    log.debug("serial: domain %r has no <%s type='unix'> socket%s", name,
                              "channel" if self.vmchannel else "serial",
                              f" in {self.path}" if self.path else "")
        with self.lock:
            connected = {c.path for c in self.chans.values()}
        for uuid, (name, paths) in self.known.items():
            for path in paths:
                if path not in connected:
                    self.connect(uuid, name, path)

    def connect(self, uuid: str, name: str, path: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(SERIAL_CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            why = e.strerror or str(e)
            if self.failed.get(path) != why:
                log.warning("serial: cannot connect to %s of domain %r: %s (does qemu "
                            "bind it? retrying every %.0f s)", path, name, why, SERIAL_RESCAN)
            self.failed[path] = why
            return
        self.failed.pop(path, None)
        self.attach(s, uuid, name, path)

    # -- the reader thread
    def attach(self, sock: socket.socket, uuid: str, name: str, path: str) -> SerialChan:
        """Serve requests arriving on `sock` as coming from domain `uuid`."""
        sock.setblocking(False)
        chan = SerialChan(sock, uuid.lower(), name, path)
        with self.lock:
            self.chans[sock.fileno()] = chan
        log.info("serial: listening on %s for domain %r (%s)", path, name, uuid)
        self._wake()
        return chan

    def detach(self, chan: SerialChan, why: str) -> None:
        with self.lock:
            if self.chans.get(chan.sock.fileno()) is not chan:
                return
            del self.chans[chan.sock.fileno()]
        log.info("serial: closed %s of domain %r: %s", chan.path, chan.name, why)
        chan.sock.close()
        self._wake()

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def start_reader(self) -> None:
        t = threading.Thread(target=self._read_loop, name="serial-reader", daemon=True)
        t.start()
        self.threads.append(t)

    def open(self) -> list:
        self.driver = open_libvirt_driver([self.uri])
        self.rescan()           # libvirt unreachable: fail start-up (or retry with -w)
        self.start_reader()
        t = threading.Thread(target=self._scan_loop, name="serial-scan", daemon=True)
        t.start()
        self.threads.append(t)
        return self.socks

    def _scan_loop(self) -> None:
        while not self.stopping.wait(SERIAL_RESCAN):
            try:
                self.rescan()
            except FenceError as e:
                log.warning("serial: rescan of the domains at %s failed: %s", self.uri, e)
            except Exception as e:  # noqa: BLE001 - the scanner must keep running
                log.error("serial: rescan: internal error %s: %s", type(e).__name__, e)

    def _read_loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                chans = list(self.chans.values())
            try:
                ready, _, _ = select.select([self.wake_r] + [c.sock for c in chans], [], [],
                                            0.25)
            except (OSError, ValueError):
                continue             # a socket was closed under us; take a fresh list
            now = time.monotonic()
            for sock in ready:
                if sock is self.wake_r:
                    try:
                        self.wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                chan = next((c for c in chans if c.sock is sock), None)
                if chan is not None:
                    self.readable_chan(chan, now)
            for chan in chans:
                if chan.buf and now - chan.since > REQUEST_READ_TIMEOUT:
                    self.server.drop(chan.uuid, "malformed",
                                     f"incomplete serial request on {chan.path}: "
                                     f"{len(chan.buf)} of {SERIAL_REQ_SIZE} bytes within "
                                     f"{REQUEST_READ_TIMEOUT:g} s; discarded")
                    chan.buf = b""

    def readable_chan(self, chan: SerialChan, now: float) -> None:
        try:
            data = chan.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.detach(chan, f"read error: {e.strerror or e}")
            return
        if not data:
            self.detach(chan, "qemu closed the socket (domain stopped?)")
            return
        if not chan.buf:
            chan.since = now
        reqs, chan.buf, skipped = split_serial_stream(chan.buf + data)
        if skipped:
            self.server.drop(chan.uuid, "malformed", f"{skipped} bytes without the serial "
                             f"magic skipped on {chan.path}", level=logging.INFO)
        if chan.buf and reqs:
            chan.since = now
        for raw in reqs:
            try:
                req = unpack_serial_request(raw)
            except ProtocolError as e:
                self.server.drop(chan.uuid, "malformed", str(e))
                continue
            why = self.history.begin(req, raw, now)
            if why:
                self.server.drop(chan.uuid, "duplicate", why, level=logging.INFO)
                continue
            self.server.spawn(self.answer, chan, req, raw)

    def answer(self, chan: SerialChan, req, raw: bytes) -> None:
        """Decide (no auth on this path) and write the serial reply; audit like serve()."""
        t0 = time.monotonic()
        server = self.server
        op = request_name(req.request)
        # As Server.serve() after its auth step, but the serial framing has no room for
        # the note after the result: it goes to the audit line only.
        try:
            result, note = server.decide(req, chan.uuid)
            data = pack_serial_reply(result)
            shown = (f"list ({len(result)} domains)" if isinstance(result, list)
                     else Response(result).name.lower() + (f" ({note})" if note else ""))
            try:
                with chan.wlock:
                    self.write_all(chan.sock, data, Deadline(SERIAL_WRITE_TIMEOUT))
            except (FenceError, OSError) as e:
                log.warning("%s %r from %s: could not send the result on %s: %s", op,
                            req.domain, chan.uuid, chan.path, e)
                shown = "unsent"
            log.info("audit: src=%s via=serial op=%s domain=%r result=%s ms=%d", chan.uuid,
                     op, req.domain, shown, (time.monotonic() - t0) * 1000)
        finally:
            self.history.end(req, raw, True, time.monotonic())   # C: recorded even unsent

    @staticmethod
    def write_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
        """Write on a non-blocking socket (the reader thread shares it) before deadline."""
        view = memoryview(data)
        while view:
            _, w, _ = select.select([], [sock], [], deadline.remaining())
            if not w:
                raise FenceTimeout(f"timed out writing the reply ({len(data) - len(view)} "
                                   f"of {len(data)} bytes sent; is the guest reading?)")
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, InterruptedError):
                continue

    def describe(self) -> str:
        with self.lock:
            n = len(self.chans)
        kind = "channel" if self.vmchannel else "serial"
        where = f" in {self.path}" if self.path else ""
        return (f"serial ({'vmchannel' if self.vmchannel else 'serial'} mode): <{kind} "
                f"type='unix'> sockets{where} of the running domains at {self.uri}, "
                f"{n} connected; no key or auth on this path (groups source = domain UUID)")

    def close(self) -> None:
        self.stopping.set()
        self._wake()
        for t in self.threads:
            t.join(2.0)
        with self.lock:
            chans, self.chans = list(self.chans.values()), {}
        for c in chans:
            c.sock.close()
        self.wake_r.close()
        self.wake_w.close()
        if self.driver is not None:
            self.driver.close()


# ============================================================================
# 10. Daemon: the loop, workers, signals, pidfile
# ============================================================================


class Workers:
    """Reusable daemon threads, so a request does not pay for creating two threads.

    submit(fn) hands fn to an idle worker, or starts a new one when none is idle. A
    worker takes new work only after fn has returned, so a call that hangs keeps its
    thread to itself and never delays another request. Idle workers exit after IDLE s.
    """

    IDLE = 60.0

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.idle: list = []              # inboxes (queue.SimpleQueue) of idle workers

    def submit(self, fn) -> None:
        with self.lock:
            inbox = self.idle.pop() if self.idle else None
        if inbox is None:
            import queue
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name=self.name,
                             daemon=True).start()
        inbox.put(fn)

    def _work(self, inbox) -> None:
        import queue
        while True:
            try:
                fn = inbox.get(timeout=self.IDLE)
            except queue.Empty:
                with self.lock:
                    if inbox in self.idle:
                        self.idle.remove(inbox)
                        return
                continue                  # handed work just as the wait ended: take it
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - fn handles its own; never lose a worker
                log.error("%s worker: %s: %s", self.name, type(e).__name__, e)
            with self.lock:
                self.idle.append(inbox)


_BACKEND_WORKERS = Workers("backend call")


def run_bounded(fn, timeout: float, what: str, gate: threading.Semaphore | None = None):
    """Run fn() on a worker thread; FenceTimeout when it does not return within `timeout`.

    A call that times out keeps running (Python cannot cancel it) and holds its worker
    and one `gate` slot until it returns, so hung libvirt calls cannot pile up threads
    without bound.
    """
    box: dict = {}
    if gate is not None and not gate.acquire(blocking=False):
        raise BackendError(f"{what}: refused, {MAX_WORKERS} earlier backend calls are still "
                           f"running or hung (libvirtd stopped?); they are released as they "
                           f"return")
    done = threading.Lock()
    done.acquire()

    def target():
        try:
            # backend calls stop retrying a little before the caller gives up
            set_op_deadline(Deadline(max(timeout * 0.8, timeout - 1.0)))
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
        finally:
            set_op_deadline(None)         # the worker is reused: no stale budget
            if gate is not None:
                gate.release()
            done.release()

    try:
        _BACKEND_WORKERS.submit(target)
    except BaseException:
        if gate is not None:
            gate.release()
        raise
    if not done.acquire(timeout=timeout):
        log.warning("%s still running after %.0f s; answering FAIL (if the call completes "
                    "later, its effect stands but nobody is told)", what, timeout)
        raise FenceTimeout(f"{what} did not finish within {timeout:g} s "
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
        self.drop_lock = threading.Lock()
        self.drop_windows: dict = {}           # reason -> (window start, shown, hidden)
        self.backend_gate = threading.BoundedSemaphore(MAX_WORKERS)
        self.workers = Workers("request")
        self.active = 0                        # requests being served (spawned workers)
        self.idle = threading.Condition()
        self.recent = collections.deque(maxlen=self.RECENT)
        self.state_path: str | None = None     # where `doctor` reads recent drops
        self.state_saved = 0.0
        self.state_dirty = True

    RECENT = 20                # drops and failures kept for `fencevirt.py doctor`

    # -- logging helpers
    def drop(self, src: str, reason: str, detail: str, level: int = logging.WARNING) -> None:
        self.drops[reason] += 1
        if not detail.startswith(reason):
            detail = f"{reason}: {detail}"
        if self.drop_log_allowed(reason, time.monotonic()):
            log.log(level, "drop from %s: %s", src, detail)
        self.note_event("drop", src, reason, detail)

    def drop_log_allowed(self, reason: str, now: float) -> bool:
        """At most DROP_LOG_BURST lines per reason and DROP_LOG_WINDOW; the rest are
        counted and summed up in one line, so a flood cannot fill the disk with logs."""
        with self.drop_lock:
            start, shown, hidden = self.drop_windows.get(reason, (now, 0, 0))
            if now - start >= DROP_LOG_WINDOW:
                self._log_suppressed(reason, hidden, now - start)
                start, shown, hidden = now, 0, 0
            allowed = shown < DROP_LOG_BURST
            self.drop_windows[reason] = (start, shown + allowed, hidden + (not allowed))
            return allowed

    def flush_drop_log(self, now: float, force: bool = False) -> None:
        """Log the suppressed-drop counts of windows that have ended (all when `force`)."""
        with self.drop_lock:
            for reason, (start, _shown, hidden) in list(self.drop_windows.items()):
                if force or now - start >= DROP_LOG_WINDOW:
                    self._log_suppressed(reason, hidden, now - start)
                    del self.drop_windows[reason]

    @staticmethod
    def _log_suppressed(reason: str, hidden: int, seconds: float) -> None:
        if hidden:
            log.warning("suppressed %d more %r drops in the last %.0f s (total counts are in "
                        "the state file)", hidden, reason, seconds)

    def note_event(self, kind: str, src: str, reason: str, detail: str) -> None:
        """Remember a drop or failure for the state file (`doctor` shows the last ones)."""
        self.recent.append({"time": time.time(), "kind": kind, "src": src,
                            "reason": reason, "detail": detail})
        self.state_dirty = True

    def save_state(self, force: bool = False) -> None:
        """Write the state file (JSON, atomically), at most once a second unless forced."""
        if not self.state_path or not (self.state_dirty or force):
            return
        now = time.monotonic()
        if not force and now - self.state_saved < 1.0:
            return
        import json
        state = {"pid": os.getpid(), "updated": time.time(),
                 "listeners": [lst.describe() for lst in self.listeners],
                 "interfaces": [getattr(lst, "interface", None) for lst in self.listeners],
                 "backend": self.backend.describe(), "drops": dict(self.drops),
                 "recent": list(self.recent)}
        tmp = f"{self.state_path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.warning("cannot write the state file %s: %s (doctor will not see recent "
                        "drops)", self.state_path, e.strerror)
            self.state_path = None
        self.state_saved, self.state_dirty = now, False

    def spawn(self, fn, *args) -> None:
        """Run fn(*args) on a worker thread, at most MAX_WORKERS at once (else drop it)."""
        if not self.slots.acquire(blocking=False):
            self.drop("-", "busy", f"{MAX_WORKERS} requests in progress; dropping one (the "
                      f"client retransmits)")
            return
        with self.idle:
            self.active += 1

        def run():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one bad request never kills the daemon
                log.error("internal error serving a request: %s: %s", type(e).__name__, e)
                log.debug("traceback", exc_info=True)
            finally:
                self.slots.release()
                with self.idle:
                    self.active -= 1
                    self.idle.notify_all()
        try:
            self.workers.submit(run)
        except BaseException:
            self.slots.release()
            with self.idle:
                self.active -= 1
            raise

    def drain(self, timeout: float) -> int:
        """On shutdown: wait up to `timeout` for requests in progress; the number left."""
        deadline = Deadline(timeout)
        with self.idle:
            if self.active:
                log.info("waiting up to %.0f s for %d request(s) in progress", timeout,
                         self.active)
            while self.active and not deadline.expired():
                self.idle.wait(deadline.remaining())
            if self.active:
                log.error("exiting with %d request(s) still in progress: their clients get "
                          "no result and report a failure", self.active)
            return self.active

    # -- one authenticated exchange, daemon side (protocol.md §4.2)
    def serve(self, conn: socket.socket, req: FenceReq, src: str,
              settings: ListenerSettings, via: str) -> bool:
        """Auth, decide, reply. True when the client passed auth (the request is served)."""
        t0 = time.monotonic()
        op = request_name(req.request)
        try:
            if settings.auth != Hash.NONE:
                dl = Deadline(AUTH_TIMEOUT)
                c1 = recv_exact(conn, MAX_HASH_LEN, dl, "client challenge")
                send_all(conn, challenge_response(settings.auth, settings.key, c1), dl,
                         "challenge response")
                c2 = make_challenge()
                send_all(conn, c2, dl, "challenge")
                ours = (f"our auth {settings.auth.name.lower()}, key "
                        f"{key_fingerprint(settings.key)}")
                try:
                    r2 = recv_exact(conn, MAX_HASH_LEN, Deadline(AUTH_TIMEOUT),
                                    "client response")
                except ProtocolError:
                    self.drop(src, "auth mismatch", f"the client hung up instead of answering "
                              f"our challenge: it rejected our response, so its auth type or "
                              f"key differs ({ours})")
                    return False
                if not check_response(settings.auth, settings.key, c2, r2):
                    self.drop(src, "auth mismatch", f"client failed our challenge: its auth "
                              f"type or key differs ({ours})")
                    return False
        except FenceError as e:
            self.drop(src, "auth failed", str(e))
            return False
        result, note = self.decide(req, src)
        try:
            if isinstance(result, list):
                send_all(conn, pack_hostlist(result), Deadline(5.0), "host list")
                shown = f"list ({len(result)} domains)"
            else:
                # After the result byte, a note says why (the C client reads 1 byte only).
                send_all(conn, bytes([int(result)]) + pack_note(note), Deadline(5.0), "result")
                shown = Response(result).name.lower() + (f" ({note})" if note else "")
        except (FenceError, OSError) as e:
            log.warning("%s %r from %s: could not send the result: %s", op, req.domain, src, e)
            shown = "unsent"
        log.info("audit: src=%s via=%s op=%s domain=%r result=%s ms=%d", src, via, op,
                 req.domain, shown, (time.monotonic() - t0) * 1000)
        return True

    def decide(self, req: FenceReq, src: str) -> tuple:
        """(Response or host list, note): handle_request() within the backend budget.

        The note says why a request failed (it follows the result byte to our client);
        failures are kept for `doctor`. An exception is a FAIL, never a success."""
        op = request_name(req.request)
        try:
            result = run_bounded(lambda: handle_request(req, self.backend, self.acl, src,
                                                        self.locks),
                                 self.backend_timeout, f"{op} {req.domain!r}",
                                 gate=self.backend_gate)
            note = ""
        except FenceError as e:
            log.error("%s %r from %s failed: %s", op, req.domain, src, e)
            result, note = Response.FAIL, str(e)
            self.note_event("failure", src, "backend failed" if isinstance(e, BackendError)
                            else "failed", f"{op} {req.domain!r}: {e}")
        except Exception as e:  # noqa: BLE001 - never a false success
            log.error("%s %r from %s: internal error %s: %s", op, req.domain, src,
                      type(e).__name__, e)
            result, note = Response.FAIL, f"internal error {type(e).__name__}"
        if not note and not isinstance(result, list):
            note = self.why_not(req, result)
            if note and result == Response.FAIL:
                self.note_event("failure", src, "unknown domain" if note.startswith(
                    "unknown domain") else "failed", f"{op} {req.domain!r}: {note}")
        return result, note

    def why_not(self, req: FenceReq, result: int) -> str:
        """The reason behind a FAIL (or an OFF for an unknown domain), for the client."""
        if result not in (Response.FAIL, Response.OFF) or req.request not in DOMAIN_ACTIONS:
            return ""
        try:
            run_bounded(lambda: self.backend.lookup(req.domain), 5.0, "lookup")
        except NoSuchDomain:
            return f"unknown domain {req.domain!r} on {self.backend.describe()}"
        except FenceError as e:
            return str(e)
        return "" if result == Response.OFF else "see the fence_virtd log"

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
            self.save_state()
            self.flush_drop_log(time.monotonic())
        self.flush_drop_log(time.monotonic(), force=True)
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
            other = self._holder(fd) or os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"another fence_virtd (pid {other or '?'}) holds {self.path}; "
                             f"stop it (kill {other or '<pid>'}) or use -p to name another "
                             f"pidfile") from None
        # C compat: the C daemon does not flock; a live fence_virtd named in the file wins
        text = os.read(fd, 32).decode(errors="replace").strip()
        if text.isdigit() and int(text) != os.getpid() and _is_fence_virtd(int(text)):
            os.close(fd)
            raise UsageError(f"another fence_virtd (pid {text}) is named in {self.path} and "
                             f"still runs; stop it (kill {text}) or use -p to name another "
                             f"pidfile")
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        """PID holding the flock on fd's file, from /proc/locks ('' when unknown)."""
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks") as f:
                for line in f:
                    parts = line.split()
                    if "FLOCK" in parts and parts[-3] == want:
                        return parts[-4]
        except (OSError, IndexError):
            pass
        return ""

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


def _is_fence_virtd(pid: int) -> bool:
    """True when pid is alive and its command line names fence_virtd (ours or C)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"fence_virtd" in cmd or (b"fencevirt" in cmd and b"virtd" in cmd)


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
    """Open backend and listeners. With -w (wait_for_init) a missing interface or an
    unreachable libvirtd is retried (1 s, doubling to 5 s) until it appears or SIGTERM."""
    delay = 1.0
    while True:
        server = None
        try:
            backend = open_backend(cfg)
            server = Server(cfg, backend)
            server.listeners = open_listeners(cfg, server)    # reads keys: fails closed
            try:
                backend.ping()
            except BackendError as e:
                raise BackendError(f"backend {backend.describe()} is not reachable: {e}"
                                   + ("" if wait else "; start libvirtd first, or run "
                                      "fence_virtd -w to wait for it")) from None
            for lst in server.listeners:
                lst.open()
            return server
        except BackendError as e:
            if server is not None:
                for lst in server.listeners:
                    lst.close()
                server.backend.close()
            if not wait:
                raise
            log.warning("not ready, retrying in %.0f s: %s", delay, e)
            if stop.wait(delay):
                raise FenceError("stopped while waiting for initialisation") from None
            delay = min(delay * 2, 5.0)


def state_path_for(pidfile: str) -> str:
    """The daemon's state file (recent drops, for `doctor`): next to its pidfile,
    /run/fence_virtd.pid -> /run/fence_virtd.state.json."""
    base = pidfile[:-4] if pidfile.endswith(".pid") else pidfile
    return base + ".state.json"


def run_daemon(opts: dict) -> int:
    import signal
    path = opts["config"]
    cfg = checked_config(path)
    fix_permissions(path)
    foreground = opts["foreground"] or bool(c_atoi(cfg.get("fence_virtd/@foreground", "0")))
    wait = opts["wait"] or any(c_atoi(cfg.get(f"fence_virtd/@{k}", "0"))
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
        server.state_path = state_path_for(opts["pidfile"])
        log.info("ready: pid %d, listeners: %s; backend %s; config %s", os.getpid(),
                 "; ".join(lst.describe() for lst in server.listeners),
                 server.backend.describe(), path)
        notify_systemd("READY=1")
        server.save_state(force=True)
        def tick():
            if reload_flag.is_set():
                reload_flag.clear()
                reload_config(server, path)
        server.run(wakeup_r, tick)
        notify_systemd("STOPPING=1")
        log.info("exiting on signal")
        for lst in server.listeners:
            lst.close()
        # Requests already past auth finish and get their result (bounded like any call).
        server.drain(min(server.backend_timeout + 2.0, 30.0))
        try:      # a hung libvirtd must not hold up the exit
            run_bounded(server.backend.close, 0.5, "closing the backend")
        except FenceError as e:
            log.warning("%s; exiting anyway", e)
        return ExitCode.OK
    finally:
        pidfile.release()


def checked_config(path: str) -> Config:
    """load_config + check_config: warnings are logged, errors raise one ConfigError."""
    cfg = load_config(path)
    problems = check_config(cfg, LISTENERS, BACKENDS)
    for p in problems:
        if not p.error:
            log.warning("%s", p)
    errors = [str(p) for p in problems if p.error]
    if errors:
        raise ConfigError("\n".join(errors) + (
            f"\n{len(errors)} error(s) in {path}; fix them (`fencevirt.py check-config "
            f"{path}` lists every problem)" if len(errors) > 1 else ""))
    return cfg


def reload_config(server: Server, path: str) -> bool:
    """SIGHUP: new groups ACL, keys (key_file/hash/auth) and backend. A config or key
    that fails its checks keeps everything as it was, and says why. True when reloaded."""
    notify_systemd("RELOADING=1")
    try:
        cfg = checked_config(path)
        if listener_names(cfg) != [lst.name for lst in server.listeners]:
            log.warning("reload: fence_virtd/@listener changed; that needs a restart (the "
                        "running listeners stay)")
        settings = {}
        for lst in server.listeners:
            if hasattr(lst, "settings"):
                blk = cfg.node(f"listeners/{lst.name}")
                settings[lst.name] = ListenerSettings(
                    blk, f"{path}: listeners/{lst.name}",
                    auth_sets_hash=lst.name in ("tcp", "vsock"))
        same_backend = (_section_text(cfg, "backends") == _section_text(server.cfg, "backends")
                        and cfg.get("fence_virtd/@backend") ==
                        server.cfg.get("fence_virtd/@backend"))
        backend = server.backend if same_backend else open_backend(cfg)
        if not same_backend:
            try:
                backend.ping()
            except BackendError as e:
                backend.close()
                raise BackendError(f"new backend {backend.describe()} is not reachable: "
                                   f"{e}") from None
    except FenceError as e:
        log.error("reload of %s failed, keeping the running configuration: %s", path, e)
        notify_systemd("READY=1")
        return False
    old, server.backend = server.backend, backend
    server.acl = Acl.from_config(cfg)
    server.cfg = cfg
    for lst in server.listeners:
        if lst.name in settings:
            lst.settings = settings[lst.name]
    if old is not backend:
        # requests in flight may still use the old backend: close it once they are done
        closer = threading.Timer(server.backend_timeout, old.close)
        closer.daemon = True
        closer.start()
    log.info("reloaded %s: backend %s%s, %d groups; %s", path, backend.describe(),
             "" if old is backend else " (new)", len(server.acl.groups),
             "; ".join(f"{n}: {st.describe()}" for n, st in settings.items()) or "no keys")
    notify_systemd("READY=1")
    return True


def _section_text(cfg: Config, name: str) -> str:
    blk = cfg.node(name)
    return dump_config(blk) if blk is not None else ""


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


def multicast_sender(src: LocalAddr, family: int) -> socket.socket:
    """A UDP socket bound to `src`, set up as protocol.md §3.1 says (TTL 2, loop on).

    It stays open while the client waits, so a drop hint from our daemon can reach it."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(src.address))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MCAST_TTL)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            s.bind((src.address, 0))
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, src.ifindex)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, MCAST_TTL)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
            s.bind((src.address, 0, 0, src.ifindex))
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


def send_multicast(packet: bytes, src: LocalAddr, family: int, group: str, port: int) -> None:
    """One datagram from `src` to the group, TTL 2, loopback on (protocol.md §3.1)."""
    with multicast_sender(src, family) as s:
        s.sendto(packet, (group, port, 0, src.ifindex) if family == socket.AF_INET6
                 else (group, port))


BPF_PROTO = {"tcp": 6, "udp": 17}


def bpf_port_filter(proto: str, port: int, syn_only: bool = False) -> bytes:
    """Classic BPF for a SOCK_DGRAM packet socket (data starts at the IP header):
    IPv4 or IPv6 packets of `proto` to `port`; with syn_only, TCP SYNs without ACK."""
    ld_b, ld_h, ldx_msh, ld_h_ind, ld_b_ind = 0x30, 0x28, 0xB1, 0x48, 0x50
    and_k, jeq, jset, ja, ldx_imm, ret = 0x54, 0x15, 0x45, 0x05, 0x01, 0x06
    p = BPF_PROTO[proto]
    prog = [  # (code, jump-if-true label, jump-if-false label, k); labels: None = next
        (ld_b, None, None, 0), (and_k, None, None, 0xF0), (jeq, None, "v6", 0x40),
        (ld_b, None, None, 9), (jeq, None, "drop", p),
        (ld_h, None, None, 6), (jset, "drop", None, 0x1FFF),     # no fragments
        (ldx_msh, None, None, 0), (ja, "tail", None, 0),
        ("v6", jeq, None, "drop", 0x60), (ld_b, None, None, 6), (jeq, None, "drop", p),
        (ldx_imm, None, None, 40),
        ("tail", ld_h_ind, None, None, 2), (jeq, None, "drop", port),
    ]
    if syn_only:
        prog += [(ld_b_ind, None, None, 13), (and_k, None, None, 0x12),
                 (jeq, None, "drop", 0x02)]
    prog += [(ret, None, None, 128), ("drop", ret, None, None, 0)]
    labels, insns = {}, []
    for ins in prog:
        if isinstance(ins[0], str):
            labels[ins[0]] = len(insns)
            ins = ins[1:]
        insns.append(ins)
    out = []
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code == ja:
            k, jt = labels[jt] - pc - 1, None
        t = labels[jt] - pc - 1 if jt else 0
        f = labels[jf] - pc - 1 if jf else 0
        out.append(struct.pack("HBBI", code, t, f, k))
    return b"".join(out)


class PacketWatch:
    """A root-only packet socket that sees packets before the firewall does.

    The client uses it to see a daemon's connect-back SYNs that never reach its listener
    (a firewall on the guest); the daemon to see requests arriving on an interface it does
    not listen on. open() returns None (and says why in `why`) without CAP_NET_RAW."""

    ETH_P_ALL, SO_ATTACH_FILTER, PACKET_OUTGOING = 0x0003, 26, 4

    def __init__(self, proto: str, port: int, syn_only: bool = False,
                 ifname: str | None = None):
        self.proto, self.port, self.syn_only = proto, port, syn_only
        self.ifname = ifname               # watch this interface only (default: all)
        self.sock = None
        self.why = ""
        self.seen: collections.Counter = collections.Counter()   # (src, ifname) -> count

    def open(self):
        import array
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(self.ETH_P_ALL))
        except (OSError, AttributeError) as e:
            self.why = f"cannot watch packets: {getattr(e, 'strerror', None) or e}"
            return None
        prog = array.array("B", bpf_port_filter(self.proto, self.port, self.syn_only))
        fprog = struct.pack("HP", len(prog) // 8, prog.buffer_info()[0])
        try:
            s.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER, fprog)
            if self.ifname:
                s.bind((self.ifname, self.ETH_P_ALL))
        except OSError as e:
            s.close()
            self.why = f"cannot set up the packet watch: {e.strerror}"
            return None
        s.setblocking(False)
        self.sock = s
        self.drain(record=False)      # packets that slipped in before the filter
        return s

    def drain(self, record: bool = True) -> list:
        """Read what is queued; returns the new (src, ifname, packet) triples."""
        new = []
        while self.sock is not None:
            try:
                data, addr = self.sock.recvfrom(256)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            ifname, pkttype = addr[0], addr[2]
            if not record or pkttype == self.PACKET_OUTGOING or len(data) < 20:
                continue
            if data[0] >> 4 == 4:
                src = socket.inet_ntop(socket.AF_INET, data[12:16])
            elif data[0] >> 4 == 6 and len(data) >= 40:
                src = socket.inet_ntop(socket.AF_INET6, data[8:24])
            else:
                continue
            self.seen[(src, ifname)] += 1
            new.append((src, ifname, data))
        return new

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ClientConfig:
    """What a client needs: key, hash/auth, timeout, names for messages."""

    __slots__ = ("key", "hash", "auth", "timeout", "retrans", "key_file")

    def __init__(self, key: bytes, hash_: Hash, auth: Hash, timeout: float,
                 retrans: float = 2.0, key_file: str = ""):
        self.key, self.hash, self.auth = key, hash_, auth
        self.timeout, self.retrans, self.key_file = timeout, retrans, key_file


class Reply(int):
    """A result byte, with the note our daemon may send after it (why it failed)."""

    note = ""


def client_exchange(conn: socket.socket, cc: ClientConfig, peer: str,
                    deadline: Deadline, trace: dict | None = None) -> Response | list:
    """Client side of §4.2 on a connected socket: a Reply, or a list of HostInfo.

    Each stage has its own error: the daemon closed before answering our challenge, it
    failed our challenge (different key or auth type), it closed after our response (it
    refused our response), or the result never came (a timeout names the stage)."""
    trace = {} if trace is None else trace
    fp = key_fingerprint(cc.key)
    auth = cc.auth.name.lower()
    trace["stage"] = "connected"
    if cc.auth != Hash.NONE:
        c1 = make_challenge()
        send_all(conn, c1, deadline, "challenge")
        try:
            r1 = recv_exact(conn, MAX_HASH_LEN, deadline, "the daemon's challenge response")
        except ProtocolError:
            raise AuthError(f"auth failed: fence_virtd at {peer} connected back but closed the "
                            f"connection instead of answering our {auth} challenge. Likely "
                            f"causes: it runs with auth = \"none\" (then use -C none); it "
                            f"dropped us (its log says why)") from None
        except FenceTimeout:
            raise FenceTimeout(f"timed out: fence_virtd at {peer} connected back but did not "
                               f"answer our {auth} challenge within {cc.timeout:g} s. Likely "
                               f"causes: it runs with auth = \"none\" (then use -C none); it "
                               f"is overloaded") from None
        if not check_response(cc.auth, cc.key, c1, r1):
            raise AuthError(f"auth mismatch: fence_virtd at {peer} connected back but failed "
                            f"our {auth} challenge. Likely causes: its auth type differs from "
                            f"ours (-C {auth}; compare `auth` in its fence_virt.conf); its key "
                            f"differs (our key {fp}; it logs its fingerprint at start-up)")
        trace["stage"] = "daemon authenticated"
        c2 = recv_exact(conn, MAX_HASH_LEN, deadline, "the daemon's challenge")
        send_all(conn, challenge_response(cc.auth, cc.key, c2), deadline, "response")
        trace["stage"] = "response sent"
    try:
        first = recv_exact(conn, 1, deadline, "the result")
    except ProtocolError:
        raise AuthError(f"auth mismatch: fence_virtd at {peer} closed the connection without "
                        f"a result: it rejected our {auth} response. Likely causes: its auth "
                        f"type differs (-C {auth}); its key differs (our key {fp})") from None
    except FenceTimeout:
        hint = (" It may expect challenge-response auth while ours is none (-C)."
                if cc.auth == Hash.NONE else " The hypervisor may be slow or hung; see "
                "the daemon's log.")
        raise FenceTimeout(f"timed out waiting for the result from fence_virtd at {peer} "
                           f"after {cc.timeout:g} s.{hint}") from None
    trace["stage"] = "result"
    if first[0] != Response.HOSTLIST:
        reply = Reply(first[0])
        if first[0] != Response.SUCCESS:
            reply.note = read_note(conn)
        return reply
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


def read_note(conn: socket.socket, timeout: float = 0.3) -> str:
    """Our daemon's note after a failed result; "" from a C daemon (it just closes)."""
    data = b""
    dl = Deadline(timeout)
    try:
        while len(data) < len(NOTE_MAGIC) + 2 + MAX_NOTE_LEN and not dl.expired():
            conn.settimeout(dl.remaining() or 0.001)
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
            if len(data) >= len(NOTE_MAGIC) + 2 and \
                    len(data) >= len(NOTE_MAGIC) + 2 + struct.unpack_from(
                        "<H", data, len(NOTE_MAGIC))[0]:
                break
    except OSError:
        pass
    return unpack_note(data)


def udp_source_port(packet: bytes) -> int:
    """Source port of a UDP datagram in a raw IPv4/IPv6 packet (0 if it is not one)."""
    if packet and packet[0] >> 4 == 4 and len(packet) >= 20 and packet[9] == 17:
        off = (packet[0] & 0x0F) * 4
    elif packet and packet[0] >> 4 == 6 and len(packet) >= 48 and packet[6] == 17:
        off = 40
    else:
        return 0
    return struct.unpack_from("!H", packet, off)[0] if len(packet) >= off + 8 else 0


def no_answer_message(cc: ClientConfig, port: int, group: str, rounds: int, addrs: list,
                      hints: dict, syns, send_errors: list) -> str:
    """The one-line diagnosis when no daemon completed a connect-back (pure)."""
    head = f"timed out after {cc.timeout:g} s"
    if hints:
        (src, reason), detail = next(iter(hints.items()))
        fix = {"key mismatch": "copy the host's key file to this guest (or the other way)",
               "hash too weak": "raise -c/hash here or lower `hash` in its fence_virt.conf",
               "wrong interface": "set `interface` in its fence_virt.conf to the bridge "
                                  "the guests are on"}
        return (f"{head}: {reason}: fence_virtd at {src} dropped our request ({detail}; ours: "
                f"key {key_fingerprint(cc.key)}, hash {cc.hash.name.lower()}); fix: "
                f"{fix.get(reason, 'see its log')}")
    if syns:
        who = ", ".join(f"{s} ({n}x on {i})" for (s, i), n in sorted(syns.items()))
        return (f"{head}: connect-back blocked: fence_virtd tried to connect back to TCP port "
                f"{port} from {who} but the connection never reached fence_xvm: a firewall on "
                f"this guest blocks TCP {port}; fix: allow it (check `nft list ruleset` or "
                f"`iptables -S INPUT`)")
    sources = ", ".join(f"{a.address} ({a.ifname})" for a in addrs)
    extra = f"; send errors: {'; '.join(sorted(set(send_errors)))}" if send_errors else ""
    causes = ["fence_virtd is not running", "it listens on another interface, group or port",
              "it dropped the request for a key mismatch (our key "
              f"{key_fingerprint(cc.key)})"]
    weak = f"it requires a stronger packet hash than our {cc.hash.name.lower()}"
    if cc.hash < Hash.SHA256:
        causes.insert(0, weak)
    else:
        causes.append(weak)
    return (f"{head}: no connect-back: no fence_virtd connected back to TCP port {port} "
            f"({rounds} round(s) sent to {group}:{port} from {sources}{extra}). Likely causes, "
            f"in order: {'; '.join(causes)}. Check: its log (`drop from <this guest>` or C's "
            f"`Key mismatch`), or `fence_xvm doctor --host <host address>`")


def merge_host_lists(lists) -> list:
    """One entry per UUID (name when there is none) across several hosts' lists, sorted by
    name; a running copy wins over a stopped one (a migrated domain may stay defined, shut
    off, on its old host)."""
    out: dict = {}
    for hosts in lists:
        for h in hosts:
            key = h.uuid.lower() or h.name
            old = out.get(key)
            if old is None or (old.state != VirState.RUNNING and h.state == VirState.RUNNING):
                out[key] = h
    return sorted(out.values(), key=lambda h: (h.name.lower(), h.name))


def collect_lists(first: list, lsock: socket.socket, cc: ClientConfig, deadline: Deadline,
                  t_first: float, trace: dict) -> list:
    """A list request reaches every daemon on the group and each connects back with its own
    domains: accept the connect-backs that arrive within LIST_MERGE_WAIT s of the first and
    merge the lists. This costs up to LIST_MERGE_WAIT (0.25 s) on every multicast list."""
    lists = [first]
    window = Deadline(LIST_MERGE_WAIT, now=t_first)
    while not window.expired():
        if not select.select([lsock], [], [], window.remaining())[0]:
            break
        conn, peer = lsock.accept()
        with conn:
            try:
                more = client_exchange(conn, cc, peer[0], deadline, {})
            except FenceError as e:
                log.warning("host list from %s left out: %s", peer[0], e)
                continue
        if isinstance(more, list):
            log.debug("merged %d domains from %s", len(more), peer[0])
            lists.append(more)
            trace.setdefault("merged", []).append(peer[0])
    return merge_host_lists(lists) if len(lists) > 1 else first


def mcast_request(cc: ClientConfig, request: int, domain: str, *, family: int, group: str,
                  port: int, interface: str | None = None, flags: int = 0,
                  trace: dict | None = None, unicast: str | None = None):
    """fence_xvm: multicast the request, accept the connect-back, run the exchange.

    `trace` (a dict) collects what happened for `doctor`; `unicast` also sends each round
    to that host address (a stopped daemon then shows as ICMP port unreachable)."""
    trace = {} if trace is None else trace
    addrs = local_addresses(family, interface)
    if not addrs:
        raise FenceError(f"no {family_name(family)} address to send from "
                         f"(no interface is up with multicast enabled)")
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    lsock = socket.socket(family, socket.SOCK_STREAM)
    watch = PacketWatch("tcp", port, syn_only=True)
    senders: dict = {}
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((wildcard, port))
            lsock.listen(10)
        except OSError as e:
            raise FenceError(f"cannot listen for the connect-back on TCP port {port}: "
                             f"{e.strerror} (another fence_xvm running? use -p)") from None
        # The packet watch (root only) looks for connect-backs a firewall here eats. It
        # costs ~8 ms to open and close, so it opens only when no daemon has connected
        # back within WATCH_AFTER s; the daemon's retries (SYN resends, the next round's
        # connect-back) are what it then sees.
        watch_at = Deadline(WATCH_AFTER)
        trace["watch"] = "not needed"
        for src in addrs:
            try:
                senders[src] = multicast_sender(src, family)
            except OSError as e:
                trace.setdefault("send_errors", []).append(f"{src.address}: {e.strerror or e}")
        ucast = None
        if unicast:
            ucast = socket.socket(address_family(unicast), socket.SOCK_DGRAM)
            ucast.setblocking(False)
            ucast.connect((unicast, port))
            senders[None] = ucast
        seqno = struct.unpack("<I", os.urandom(4))[0]
        deadline = Deadline(cc.timeout)
        rounds = 0
        send_errors = trace.setdefault("send_errors", [])
        hints = trace.setdefault("hints", {})
        trace["sent"] = 0
        while True:
            rounds += 1
            for src, s in senders.items():
                me = src if src is not None else addrs[0]
                packed = socket.inet_pton(family, me.address)
                req = make_request(request, domain, address=packed, family=family, port=port,
                                   seqno=seqno, flags=flags,
                                   random=os.urandom(6) if cc.hash != Hash.NONE else b"\0" * 6)
                req = req._replace(address=tag_key(req.address, cc.key))
                pkt = sign_request(pack_request(req), cc.hash, cc.key)
                try:
                    if src is None:
                        s.send(pkt)
                    else:
                        s.sendto(pkt, (group, port, 0, src.ifindex)
                                 if family == socket.AF_INET6 else (group, port))
                    trace["sent"] += 1
                except OSError as e:
                    send_errors.append(f"{me.address if src else unicast}: {e.strerror or e}")
            log.debug("round %d: sent %s to %s:%d from %s", rounds,
                      Request(request).name.lower(), group, port,
                      ", ".join(f"{a.address} ({a.ifname})" for a in addrs))
            round_end = Deadline(min(cc.retrans, deadline.remaining()))
            while True:
                if watch.sock is None and watch_at.expired() and trace["watch"] == "not needed":
                    watch.open()
                    trace["watch"] = watch.why or "on"
                wait_on = [lsock] + list(senders.values()) + ([watch.sock] if watch.sock else [])
                wait = round_end.remaining()
                if trace["watch"] == "not needed":
                    wait = min(wait, max(0.001, watch_at.remaining()))
                ready, _, _ = select.select(wait_on, [], [], wait)
                if lsock in ready:
                    conn, peer = lsock.accept()
                    trace["connected"] = peer[0]
                    t_first = time.monotonic()
                    with conn:
                        log.debug("fence_virtd connected back from %s", peer[0])
                        result = client_exchange(conn, cc, peer[0], deadline, trace)
                    if isinstance(result, list):      # several hosts: merge their lists
                        result = collect_lists(result, lsock, cc, deadline, t_first, trace)
                    return result
                for s in ready:
                    if s is watch.sock:
                        watch.drain()
                    elif s is not lsock:
                        read_hints(s, hints, send_errors, unicast)
                if round_end.expired() or (not ready and watch.sock is not None):
                    break
            if deadline.expired():
                watch.drain()
                trace["syns"] = dict(watch.seen)
                raise FenceTimeout(no_answer_message(cc, port, group, rounds, addrs, hints,
                                                     watch.seen, send_errors))
    finally:
        watch.close()
        for s in senders.values():
            s.close()
        lsock.close()


def read_hints(s: socket.socket, hints: dict, errors: list, unicast: str | None) -> None:
    """Drain a sender socket: drop hints from our daemon, ICMP errors of a unicast probe."""
    while True:
        try:
            data, peer = s.recvfrom(512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:       # ICMP port unreachable on the connected unicast probe
            errors.append(f"{unicast}: {e.strerror or e}")
            return
        hint = unpack_hint(data)
        if hint:
            log.info("fence_virtd at %s dropped our request: %s: %s", peer[0], *hint)
            hints.setdefault((peer[0], hint[0]), hint[1])


def stream_request(cc: ClientConfig, request: int, domain: str, sock: socket.socket,
                   peer: str):
    """fence_virt -T / -S: send the request on a connected socket, then the exchange."""
    deadline = Deadline(cc.timeout)
    req = make_request(request, domain,
                       random=os.urandom(6) if cc.hash != Hash.NONE else b"\0" * 6,
                       seqno=struct.unpack("<I", os.urandom(4))[0])
    req = req._replace(address=tag_key(req.address, cc.key))
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
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        raise FenceError(f"cannot create a vsock socket: {e.strerror or e} (this kernel "
                         f"has no vsock support; use -T for tcp)") from None
    sock.settimeout(min(3.0, cc.timeout))
    try:
        sock.connect((cid, port))
    except OSError as e:
        sock.close()
        raise FenceError(f"unable to connect to fence_virtd at vsock CID {cid} port {port}: "
                         f"{e.strerror or e} (is a vsock listener configured on that host?)") \
            from None
    return stream_request(cc, request, domain, sock, f"vsock:{cid}:{port}")


SERIAL_SPEEDS = (2400, 9600, 19200, 38400, 57600, 115200)


def parse_serial_params(text: str | None) -> tuple:
    """'115200,8N1' -> (speed, data_bits, parity 'N'|'E'|'O', stop_bits), as serial.c
    reads it: empty speed = 9600, empty DPS = 8N1, only the first 3 DPS characters."""
    speed_text, _, dps = (text or "").partition(",")
    speed_text = speed_text.strip()
    if not speed_text:
        speed = 9600
    elif speed_text.isdigit() and int(speed_text) in SERIAL_SPEEDS:
        speed = int(speed_text)
    else:
        raise UsageError(f"serial_params {text!r}: speed {speed_text!r} is not one of "
                         f"{', '.join(map(str, SERIAL_SPEEDS))}")
    bits, parity, stop = 8, "N", 1
    if dps:
        if len(dps) < 3:
            raise UsageError(f"serial_params {text!r}: expected data bits, parity and stop "
                             f"bits after the comma, like 8N1")
        for ch in dps[:3]:       # C compat: any order, the last of each kind wins
            if ch in "5678":
                bits = int(ch)
            elif ch.upper() in "NEO":
                parity = ch.upper()
            elif ch in "12":
                stop = int(ch)
            else:
                raise UsageError(f"serial_params {text!r}: {ch!r} is not a data bit count "
                                 f"(5-8), parity (N, E, O) or stop bit count (1, 2)")
    return speed, bits, parity, stop


class SerialChannel:
    """fence_virt's serial path: a tty (-D) or the VMChannel TCP socket (-A), as an fd
    read and written with deadlines (protocol.md §6.3)."""

    def __init__(self, fd: int, peer: str, is_tty: bool, owner=None):
        self.fd, self.peer, self.is_tty, self.owner = fd, peer, is_tty, owner

    @classmethod
    def open_tty(cls, device: str, params: str | None) -> SerialChannel:
        """Open and set up the port like serial.c: exclusive, write-locked, raw, flushed,
        then a 300 ms modem hang-up where the device supports modem control."""
        import fcntl
        import termios
        speed, bits, parity, stop = parse_serial_params(params)
        try:
            fd = os.open(device, os.O_RDWR | os.O_EXCL | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise FenceError(f"cannot open serial device {device}: {e.strerror} (is this "
                             f"the guest's fence_virtd port? see -D)") from None
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise FenceError(f"serial device {device} is locked by another process "
                                 f"(another fence_virt still running?)") from None
            try:
                attrs = termios.tcgetattr(fd)
            except termios.error as e:
                raise FenceError(f"{device} is not a terminal: {e.args[-1]} (give a serial "
                                 f"port with -D, or leave -D out for the VMChannel)") from None
            speed_const = getattr(termios, f"B{speed}")
            cflag = (speed_const | termios.CLOCAL | termios.CRTSCTS | termios.CREAD |
                     getattr(termios, f"CS{bits}") | (termios.CSTOPB if stop == 2 else 0) |
                     (termios.PARENB if parity != "N" else 0) |
                     (termios.PARODD if parity == "O" else 0))
            cc = list(attrs[6])
            cc[termios.VMIN], cc[termios.VTIME] = 0, 0
            termios.tcsetattr(fd, termios.TCSANOW,
                              [0, 0, cflag, 0, speed_const, speed_const, cc])
            termios.tcflush(fd, termios.TCIOFLUSH)
            cls._hangup(fd, device)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, device, True)

    @staticmethod
    def _hangup(fd: int, device: str, delay: float = 0.3) -> None:
        import fcntl
        import termios
        lines = (termios.TIOCM_DTR | termios.TIOCM_CTS | termios.TIOCM_RTS |
                 termios.TIOCM_DSR | termios.TIOCM_CD)
        try:
            bits = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCMGET, b"\0" * 4))[0]
            fcntl.ioctl(fd, termios.TIOCMSET, struct.pack("i", bits & ~lines))
            time.sleep(delay)
            fcntl.ioctl(fd, termios.TIOCMSET, struct.pack("i", bits | lines))
        except OSError as e:
            log.debug("%s has no modem control lines (%s); no hang-up", device,
                      e.strerror or e)

    @classmethod
    def open_vmchannel(cls, address: str, port: int, timeout: float) -> SerialChannel:
        try:
            sock = socket.create_connection((address, port), timeout=min(3.0, timeout))
        except OSError as e:
            raise FenceError(f"unable to connect to the VMChannel at {address}:{port}: "
                             f"{e.strerror or e} (fence_virtd needs listener \"serial\" with "
                             f"mode \"vmchannel\" and a guestfwd channel for this guest; "
                             f"or give -D, -T or -S)") from None
        sock.setblocking(False)
        return cls(sock.fileno(), f"{address}:{port}", False, sock)

    def write(self, data: bytes, deadline: Deadline, what: str) -> None:
        view = memoryview(data)
        while view:
            _, w, _ = select.select([], [self.fd], [], deadline.remaining())
            if not w:
                raise FenceTimeout(f"timed out writing {what} to {self.peer}")
            try:
                view = view[os.write(self.fd, view):]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                raise ProtocolError(f"cannot write {what} to {self.peer}: "
                                    f"{e.strerror or e}") from None

    def read(self, size: int, deadline: Deadline, what: str) -> bytes:
        """Up to `size` bytes; b"" at the end of a socket; FenceTimeout at the deadline."""
        while True:
            r, _, _ = select.select([self.fd], [], [], deadline.remaining())
            if not r:
                raise FenceTimeout(f"timed out waiting for {what} from fence_virtd on "
                                   f"{self.peer}")
            try:
                data = os.read(self.fd, size)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    return b""          # the other end of a pty went away
                raise ProtocolError(f"cannot read {what} from {self.peer}: "
                                    f"{e.strerror or e}") from None
            if data or not self.is_tty:
                return data

    def read_exact(self, size: int, deadline: Deadline, what: str) -> bytes:
        out = b""
        while len(out) < size:
            data = self.read(size - len(out), deadline, what)
            if not data:
                raise ProtocolError(f"{self.peer} closed while we read {what} "
                                    f"({len(out)} of {size} bytes arrived)")
            out += data
        return out

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()
        else:
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_serial_reply(chan: SerialChannel, deadline: Deadline) -> Response | list:
    """Scan for the magic, then the result byte; a 0xFD result brings a host list.

    Ours: the scan backtracks, so garbage ending in 'ab' cannot hide the magic the way
    it does from the C client (protocol.md §6.3).
    """
    window = b""
    while window != SERIAL_MAGIC_BYTES:
        byte = chan.read(1, deadline, "the serial reply")
        if not byte:
            raise ProtocolError(f"{chan.peer} closed without a reply (is fence_virtd's "
                                f"serial listener serving this guest?)")
        window = (window + byte)[-len(SERIAL_MAGIC_BYTES):]
    result = chan.read_exact(1, deadline, "the result byte")[0]
    if result != Response.HOSTLIST:
        return result
    hosts = []
    while True:
        try:
            rec = chan.read_exact(HOST_STATE_SIZE, deadline, "a host list record")
        except FenceError as e:
            log.warning("host list from %s ended early: %s", chan.peer, e)
            break
        if rec[0] == 0 and rec[64] == 0:
            break
        hosts.append(unpack_host_state(rec))
    # Ours: read the final 'abba <result>' too (the C client leaves it on the line, where
    # the next request on a shared channel could take it for its own answer).
    try:
        chan.read_exact(SERIAL_RESP_SIZE, Deadline(min(1.0, deadline.remaining())),
                        "the end of the host list")
    except FenceError as e:
        log.debug("host list from %s: no final result after the records: %s", chan.peer, e)
    return hosts


def serial_request(request: int, domain: str, timeout: float, device: str | None,
                   params: str | None, address: str, port: int):
    """fence_virt without -T/-S: over the tty `device`, else the VMChannel TCP address."""
    if device:
        chan = SerialChannel.open_tty(device, params)
    else:
        chan = SerialChannel.open_vmchannel(address, port, timeout)
    with chan:
        pkt = pack_serial_request(request, domain, struct.unpack("<I", os.urandom(4))[0])
        chan.write(pkt, Deadline(min(3.0, timeout)), "the request")
        try:
            return read_serial_reply(chan, Deadline(timeout))
        except FenceTimeout:
            raise FenceTimeout(f"no reply on {chan.peer} within {timeout:g} s: is the host's "
                               f"fence_virtd running with listener \"serial\" (mode "
                               f"\"{'serial' if device else 'vmchannel'}\") and does its "
                               f"domain XML map this port to a unix socket?") from None


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
    Opt("hypervisor_uri", "", "hypervisor-uri", True, "string", None,
        "Fence directly through libvirt at this URI (e.g. qemu+tcp://HOST/system) "
        "instead of asking fence_virtd; no key or multicast needed", "x"),
    Opt("verbose", "v", "verbose", False, "boolean", None,
        "Verbose output on stderr (like -d)", "xv"),
    Opt("quiet", "q", "quiet", False, "boolean", None,
        "Only errors on stderr", "xv"),
    Opt("debug_file", "", "debug-file", True, "string", None,
        "Also write the debug output to this file", "xv"),
    Opt("json", "", "json", False, "boolean", "0",
        "Print the result of list, list-status and status as JSON on stdout", "xv"),
)
C_GETOPT_ORDER = {"x": "d i a p r C c k n H u o t w", "v": "d D P A p n H o t T S C c k w"}
EXTRA_PARAMS = {"x": ("interface", "hypervisor_uri", "json"), "v": ("json",)}
OPTS = {o.name: o for o in AGENT_OPTIONS}
STDIN_ALIASES = {alias: o.name for o in AGENT_OPTIONS for alias in o.aliases}
C_PARAMETERS = {r: tuple(next(o.name for o in AGENT_OPTIONS if r in o.roles and o.short == c)
                         for c in C_GETOPT_ORDER[r].split()) + ("domain",)
                for r in C_GETOPT_ORDER}      # what C's metadata lists, in its order
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
    order += [OPTS["domain"]] + [OPTS[n] for n in EXTRA_PARAMS[letter]]
    return order + [o for o in AGENT_OPTIONS if letter in o.roles and o not in order]


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
    if name == "verbose":
        a.debug += parse_bool(value, name)        # -v -v counts twice, like -d -d
        return
    if name == "quiet":
        a.quiet = parse_bool(value, name)
        return
    if name == "json":
        a.set("json", "1" if parse_bool(value, name) else "0")
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
    if name == "debug_file":
        a.debug_file = value
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
        name = STDIN_ALIASES.get(name, name)
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
    shorts = "hV?" + "".join(o.short + (":" if o.arg else "") for o in mine if o.short)
    longs = [o.long + ("=" if o.arg else "") for o in mine if o.long]
    longs += ["version", "help"]
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
                 "serial_params", "channel_address", "uri")


MAX_AGENT_SECONDS = 86400.0      # timeout, delay, retrans: a day is already absurd


def number(value: str, name: str, minimum: float, allow_equal: bool = True,
           maximum: float | None = None) -> float:
    """A finite decimal number in [minimum, maximum] (minimum excluded unless allow_equal)."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: {value!r} is not a number") from None
    if n != n or n in (float("inf"), float("-inf")):
        raise UsageError(f"{name}: {value!r} is not a finite number")
    if n < minimum or (n == minimum and not allow_equal):
        raise UsageError(f"{name}: {value} must be {'at least' if allow_equal else 'more than'}"
                         f" {minimum:g}")
    if maximum is not None and n > maximum:
        raise UsageError(f"{name}: {value} is out of range (at most {maximum:g})")
    return n


def parse_hash_option(a: AgentArgs, name: str) -> Hash:
    try:
        return Hash.parse(a.get(name) or "")
    except UsageError as e:
        raise UsageError(f"{name}: {e}") from None


def check_host(value: str, name: str) -> None:
    """A numeric IPv4/IPv6 address or a host name (syntax only: nothing is resolved)."""
    if ":" in value or value.replace(".", "").isdigit():
        try:
            address_family(value)
        except UsageError as e:
            raise UsageError(f"{name}: {e}") from None
        return
    labels = value.rstrip(".").split(".")
    if not value or len(value) > 253 or not all(
            0 < len(x) <= 63 and x[0] != "-" and x[-1] != "-" and
            all(c.isascii() and (c.isalnum() or c == "-") for c in x) for x in labels):
        raise UsageError(f"{name}: {value!r} is neither a numeric IPv4/IPv6 address nor a "
                         f"valid host name")


def check_interface(name: str) -> None:
    """The local network interface exists (reads the kernel's list; sends nothing)."""
    try:
        socket.if_nametoindex(name)
    except (OSError, ValueError):
        raise UsageError(f"interface: no network interface named {name!r} here "
                         f"(see `ip link`)") from None


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
            raise UsageError(f"Invalid domain name (plug/port): {e}") from None
    p.timeout = number(a.get("timeout"), "timeout", 0, allow_equal=False,
                       maximum=MAX_AGENT_SECONDS)
    p.delay = number(a.get("delay"), "delay", 0, maximum=MAX_AGENT_SECONDS)
    p.port = parse_port(a.get("ipport"), "ipport")
    hash_ = parse_hash_option(a, "hash")
    auth = parse_hash_option(a, "auth")
    key = b""
    key_file = a.get("key_file")
    p.uri = a.get("hypervisor_uri") if a.role == "xvm" else None
    # fence_virt's serial/VMChannel path has no key; C still checks a -k it was given
    keyless = (a.role == "virt" and not a.get("ipaddr") and a.get("vsock") in (None, "", "0")
               and "key_file" not in a.values)
    if p.uri is not None:
        p.uri = check_hypervisor_uri(p.uri)       # direct mode: no key is read
    elif (hash_ != Hash.NONE or auth != Hash.NONE) and not keyless:
        try:
            key = read_key_file(key_file, strict=False)
        except ConfigError as e:
            raise UsageError(f"key_file: {e}") from None
    retrans = 2.0
    if a.role == "xvm":
        retrans = number(a.get("retrans"), "retrans", 0, allow_equal=False,
                         maximum=MAX_AGENT_SECONDS * 10) / 10.0
        fam = (a.get("ip_family") or "auto").lower()
        if fam not in ("auto", "ipv4", "ipv6"):
            raise UsageError(f"Unsupported family: '{a.get('ip_family')}' "
                             f"(ip_family: use auto, ipv4 or ipv6)")
        group = a.get("multicast_address")
        if group:
            try:
                gfam = address_family(group)
            except UsageError as e:
                raise UsageError(f"multicast_address: {e}") from None
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
        if p.interface:
            check_interface(p.interface)
        p.flags = RF_UUID if a.get("use_uuid") not in (None, "0") else 0
        p.mode = "libvirt" if p.uri else "multicast"
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
            check_host(p.ipaddr, "ipaddr")
        check_host(a.get("channel_address"), "channel_address")
        p.mode = "vsock" if p.cid else "tcp" if p.ipaddr else "serial"
        p.serial_device = a.get("serial_device")
        p.serial_params = a.get("serial_params")
        p.channel_address = a.get("channel_address")
        if p.mode == "serial" and p.serial_device:
            parse_serial_params(p.serial_params)      # C checks it when -D is used only
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
    if p.mode == "libvirt":
        return libvirt_request(p, request)
    return serial_request(request, p.domain or "", p.timeout, p.serial_device,
                          p.serial_params, p.channel_address, p.port)


def libvirt_request(p: AgentPlan, request: Request):
    """Direct mode (--hypervisor-uri): section 8's semantics against libvirt, no daemon.

    Returns what a daemon would (a Response or the host list); an unknown domain or a
    failed action raises with the URI in the message instead of a bare FAIL.
    """
    set_op_deadline(Deadline(p.timeout))      # bounds every libvirt call of this run
    backend = LibvirtBackend(None, uris=[p.uri])
    verify = min(OFF_VERIFY_TIMEOUT, p.timeout)
    try:
        if request in (Request.OFF, Request.ON, Request.REBOOT):
            backend.lookup(p.domain)          # NoSuchDomain names the domain and the URI
        result = handle_request(make_request(request, p.domain or "", flags=p.flags),
                                backend, Acl([]), "local", verify=verify)
    finally:
        backend.close()
    if result == Response.FAIL and request != Request.NULL:
        raise BackendError(f"{request.name.lower()} {p.domain!r} at {p.uri} failed "
                           f"(see the messages above)")
    return result


def result_code(result: int, action: str, as_json: bool = False, domain: str = "") -> int:
    """Print what C prints for a result byte (or JSON) and return the exit code.

    A failure's message carries the reason our daemon sent after the result byte."""
    note = getattr(result, "note", "")
    if as_json and action == "status" and result in (Response.SUCCESS, Response.OFF):
        print_json({"domain": domain, "status": "on" if result == Response.SUCCESS else "off",
                    **({"note": note} if note else {})})
    if result == Response.SUCCESS:
        if action == "status" and not as_json:
            print("Status: ON")
        return ExitCode.OK
    if result == Response.OFF:
        if note:
            log.warning("fence_virtd: %s (reported as off, as the C daemon does)", note)
        if action == "status" and not as_json:
            print("Status: OFF")
        return ExitCode.OFF
    if result == Response.DENIED:
        raise DeniedError(f"Permission denied: fence_virtd's groups ACL does not allow this "
                          f"guest to {action} that domain")
    if result == Response.FAIL:
        if note:
            raise FenceError(f"Operation failed: fence_virtd could not {action} "
                             f"{domain or 'the domain'}: {note}")
        raise FenceError(f"Operation failed: fence_virtd could not {action} "
                         f"{domain or 'the domain'} (unknown domain or hypervisor error; see "
                         f"the daemon's log)")
    log.error("Unknown response (%d)", result)
    return result


def print_json(obj) -> None:
    """One JSON document on stdout (results only; messages stay on stderr)."""
    import json
    print(json.dumps(obj, indent=None, sort_keys=True))


def hosts_json(hosts: list) -> list:
    return [{"name": h.name, "uuid": h.uuid, "state": int(h.state),
             "status": "on" if h.state == VirState.RUNNING else "off"} for h in hosts]


PACEMAKER_NAME_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def pacemaker_name_problem(name: str) -> str | None:
    """Why Pacemaker's list parser (fenced_commands.c parse_host_line) would lose `name`.

    It skips a whole line containing "invalid" or "variable", splits at whitespace, ','
    and ';', keeps the leading run of [A-Za-z0-9_.-] of each word and drops "on"/"off".
    """
    if "invalid" in name or "variable" in name:
        return "contains 'invalid' or 'variable', so Pacemaker skips the whole line"
    if name in ("on", "off"):
        return "is 'on' or 'off', which Pacemaker drops as a state word"
    if len(name.encode("utf-8")) > MAX_DOMAIN_LEN - 1:
        return f"is longer than {MAX_DOMAIN_LEN - 1} bytes (cut short on the wire)"
    for i, ch in enumerate(name):
        if ch not in PACEMAKER_NAME_OK:
            if i == 0:
                return f"starts with {ch!r}, so Pacemaker drops it"
            return f"has {ch!r} at offset {i}, so Pacemaker cuts it to {name[:i]!r}"
    return None


def print_hosts(hosts: list) -> None:
    """C's list format `%-32s %s %s` (name, uuid, on|off); warnings go to stderr."""
    for h in hosts:
        print(f"{h.name:<32} {h.uuid} {'on' if h.state == VirState.RUNNING else 'off'}")
        problem = pacemaker_name_problem(h.name)
        if problem:
            log.warning("domain name %r %s; fence it through pcmk_host_map "
                        "(node:UUID) instead", h.name, problem)


ACTION_REQUESTS = {"null": Request.NULL, "on": Request.ON, "off": Request.OFF,
                   "reboot": Request.REBOOT, "status": Request.STATUS,
                   "monitor": Request.DEVSTATUS, "list": Request.HOSTLIST,
                   "list-status": Request.HOSTLIST}


def run_agent(role: str, argv: list, stdin=None) -> int:
    """The agent: options from argv, or from stdin when there are none (FenceAgentAPI)."""
    setup_logging(f"fence_{role}", logging.WARNING, use_syslog=True)   # parse warnings
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
    if level != logging.WARNING or a.debug_file:
        try:
            setup_logging(f"fence_{role}", level, use_syslog=True, debug_file=a.debug_file)
        except OSError as e:
            setup_logging(f"fence_{role}", level, use_syslog=True)
            raise UsageError(f"debug_file: cannot open {a.debug_file}: {e.strerror or e}") \
                from None
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
    as_json = a.get("json") not in (None, "0")
    if isinstance(result, list):
        if as_json:
            print_json(hosts_json(result))
        else:
            print_hosts(result)
        return ExitCode.OK
    return result_code(result, action, as_json, p.domain or "")


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
    c_names = C_PARAMETERS[ROLE_LETTER[role]]
    for o in role_options(role):
        default = o.shown if o.shown is not None else o.default
        if o.name == "debug":
            default = None
        required = "1" if o.name in ("plug", "port") else "0"
        extra = ' obsoletes="port"' if o.name == "plug" else \
            ' deprecated="1"' if o.name in ("port", "domain") else ""
        dflt = f' default="{xml_escape(str(default))}"' if default is not None else ""
        mixed = option_flags(o, c_param=o.name in c_names, meta=True)
        out.append(f'\t<parameter name="{o.name}" unique="0" required="{required}"{extra}>\n'
                   f'\t\t<getopt mixed="{mixed}" />\n'
                   f'\t\t<content type="{o.mtype}"{dflt} />\n'
                   f'\t\t<shortdesc lang="en">{xml_escape(o.help)}</shortdesc>\n'
                   f'\t</parameter>\n')
    out.append("</parameters>\n<actions>\n")
    out.extend(f'\t<action name="{act}" />\n' for act in ACTIONS)
    out.append("</actions>\n</resource-agent>\n")
    return "".join(out)


def option_flags(o: Opt, c_param: bool = False, meta: bool = False) -> str:
    """How an option is spelled: C parameters "-X" (as C's metadata), ours also long."""
    if c_param and meta:
        return f"-{o.short}" if o.short else ""
    flags = ([f"-{o.short}"] if o.short else []) + ([f"--{o.long}"] if o.long else [])
    value = (f"=[{o.name}]" if meta else f" <{o.name}>") if o.arg else ""
    return ", ".join(flags) + value if flags else ""


def agent_usage(role: str) -> str:
    """-h: every option with its flags, then the stdin names (C's two tables)."""
    import textwrap
    lines = [f"usage: fence_{role} [args]", "",
             "NOTE: reboot-action does not power on nodes that are powered off.", ""]
    rows = [(option_flags(o), o.help) for o in role_options(role) if o.short or o.long]
    rows += [("-h, -?, --help", "Help"), ("-V, --version", "Display version and exit")]
    for flags, help_ in rows:
        wrapped = textwrap.wrap(help_, 55) or [""]
        if len(flags) > 24:
            lines.append(f"  {flags}")
            wrapped.insert(0, "")
        else:
            lines.append(f"  {flags:<24}  {wrapped.pop(0)}")
        lines.extend(f"  {'':<24}  {w}" for w in wrapped if w)
    lines += ["", "With no command line argument, arguments are read from standard input.",
              "Arguments read from standard input take the form of:", "",
              "    arg1=value1", "    arg2=value2", ""]
    for o in role_options(role):
        wrapped = textwrap.wrap(o.help, 55) or [""]
        lines.append(f"  {o.name:<24}  {wrapped[0]}")
        lines.extend(f"  {'':<24}  {w}" for w in wrapped[1:])
    lines += [f"  {alias:<24}  Same as {name}" for alias, name in STDIN_ALIASES.items()]
    lines += [f"  {'nodename':<24}  Cluster node name; the domain when no plug, port or",
              f"  {'':<24}  domain is given (plug wins over port, port over domain)"]
    return "\n".join(lines)


# cluster-glue external plugin (a drop-in for external/libvirt): its parameters, pure.

GLUE_PLUGIN_DIR = "/usr/lib/stonith/plugins/external"
GLUE_CONFIG_NAMES = ("hostlist", "hypervisor_uri", "reset_method")
RESET_METHODS = ("power_cycle", "reboot")
GLUE_CONNECT_TIMEOUT = 3.0   # s, to reach libvirtd and find the domain (retries included)
GLUE_OP_TIMEOUT = 60.0       # s, then for the action itself (Pacemaker's stonith-timeout)
GLUE_INFO = {
    "getinfo-devid": "libvirt STONITH device (fencevirt)",
    "getinfo-devname": "libvirt STONITH external device (fencevirt)",
    "getinfo-devdescr": "libvirt-based fencing of guest domains through the hypervisor; "
                        "off is verified before success (drop-in for external/libvirt)",
    "getinfo-devurl": "https://libvirt.org/uri.html",
}
GlueParams = collections.namedtuple("GlueParams", "hosts uri reset_method")


def check_hypervisor_uri(uri: str) -> str:
    """The URI, stripped, if it has a libvirt URI's shape (driver[+transport]://...)."""
    uri = uri.strip()
    scheme, colon, rest = uri.partition(":")
    if not (colon and scheme and rest.startswith("//")
            and all(c.isascii() and (c.isalnum() or c in "+-.") for c in scheme)):
        raise UsageError(f"hypervisor_uri {uri!r} is not a libvirt URI: expected "
                         f"driver[+transport]://[host]/path, for example "
                         f"qemu+tcp://HOST/system or qemu:///system")
    return uri


def parse_hostlist(text: str) -> list:
    """hostlist "node[:domain] ..." (spaces or commas) -> [(node, domain)], in order.

    A node without ':domain' is its own domain; the node ends at the first ':'.
    Node names compare case-insensitively (stonith(8) lowercases them), domain names
    keep their case. UsageError on an empty list, node or domain, or a repeated node.
    """
    out = []
    seen: dict = {}
    for word in text.replace(",", " ").split():
        node, colon, domain = word.partition(":")
        if not colon:
            domain = node
        if not node:
            raise UsageError(f"hostlist entry {word!r}: the node name before ':' is empty")
        if not domain:
            raise UsageError(f"hostlist entry {word!r}: the domain after ':' is empty "
                             f"(write {node} or {node}:DOMAIN)")
        key = node.lower()
        if key in seen:
            raise UsageError(f"hostlist names node {node!r} twice ({seen[key]!r} and "
                             f"{word!r}; node names are case-insensitive)")
        seen[key] = word
        out.append((node, domain))
    if not out:
        raise UsageError("hostlist is empty: give node[:domain] entries separated by "
                         "spaces or commas, e.g. hostlist=\"node1:vm1 node2:vm2\"")
    return out


def hostlist_domain(hosts: list, node: str) -> str:
    """The domain that fences `node` (case-insensitive); UsageError when it is not listed."""
    want = node.lower()
    for n, domain in hosts:
        if n.lower() == want:
            return domain
    raise UsageError(f"node {node!r} is not in hostlist ({' '.join(n for n, _ in hosts)}); "
                     f"add {node}[:DOMAIN] to hostlist")


def glue_params(env, need_uri: bool = True) -> GlueParams:
    """The plugin's parameters from its environment (a mapping), checked.

    reboot_method is accepted as another name of reset_method: cluster-glue's own
    external/libvirt prints it from getconfignames by mistake.
    """
    if not env.get("hostlist", "").strip():
        raise UsageError("hostlist is missing or empty: set hostlist=\"node1[:domain1] "
                         "node2[:domain2] ...\" (spaces or commas between entries)")
    hosts = parse_hostlist(env["hostlist"])
    uri = env.get("hypervisor_uri", "").strip()
    if need_uri:
        if not uri:
            raise UsageError("hypervisor_uri is missing: set it to the libvirt URI of the "
                             "host that runs the guests, e.g. qemu+tcp://HOST/system")
        uri = check_hypervisor_uri(uri)
    given = {k: env[k].strip() for k in ("reset_method", "reboot_method")
             if env.get(k, "").strip()}
    if len({v.lower() for v in given.values()}) > 1:
        raise UsageError(f"reset_method={given['reset_method']} and reboot_method="
                         f"{given['reboot_method']} disagree; set only reset_method")
    method = next(iter(given.values()), "power_cycle")
    if method.lower() not in RESET_METHODS:
        name = next(iter(given))
        raise UsageError(f"unrecognized {name} {method!r} (use power_cycle or reboot)")
    return GlueParams(hosts, uri, method.lower())


def glue_info_xml() -> str:
    """getinfo-xml: the <parameters> block Pacemaker shows as the device's metadata."""
    rows = (("hostlist", ' unique="1" required="1"', "", "List of hostname[:domain_id]..",
             "Controlled nodes, separated by spaces or commas: hostname[:domain_id]. The "
             "domain (name or UUID) defaults to the hostname. Node names match "
             "case-insensitively; domain names keep their case."),
            ("hypervisor_uri", ' required="1"', "", "Hypervisor URI",
             "libvirt URI of the hypervisor, e.g. qemu+tcp://HOST/system or "
             "qemu+ssh://root@HOST/system. Reached through libvirt-python, else virsh."),
            ("reset_method", ' required="0"', ' default="power_cycle"',
             "How to reset a guest.",
             "power_cycle: destroy, verify off, start (the result is the off part's; a "
             "failed start is logged as an error). reboot: a hard reset "
             "(virDomainReset), which needs no help from the guest. reboot_method is "
             "accepted as another name."))
    out = ["<parameters>\n"]
    for name, attrs, default, short, long_ in rows:
        out.append(f'<parameter name="{name}"{attrs}>\n<content type="string"{default} />\n'
                   f'<shortdesc lang="en">{xml_escape(short)}</shortdesc>\n'
                   f'<longdesc lang="en">{xml_escape(long_)}</longdesc>\n</parameter>\n')
    out.append("</parameters>\n")
    return "".join(out)


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


class _Prompter:
    """C fence_virtd -c prompt helpers (config.c text_input/yesno); answers from a stream."""

    def __init__(self, inp, out):
        self.inp, self.out, self.eof = inp, out, False

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _line(self) -> str | None:
        line = self.inp.readline()
        if not line:
            self.eof = True
            return None
        return line.rstrip("\r\n")

    def text(self, prompt: str, default: str) -> str:
        """`Prompt [default]: `; an empty line or end of input takes the default."""
        self.say(f"{prompt} [{default}]: ")
        line = self._line()
        return line if line else default

    def yesno(self, prompt: str, default: bool) -> bool:
        self.say(f"{prompt} [{'Y' if default else 'y'}/{'n' if default else 'N'}]? ")
        line = self._line()
        if line and line[0] in "yY":
            return True
        if line and line[0] in "nN":
            return False
        return default

    def again(self, prompt: str) -> None:
        """Called before re-asking: at end of input that would loop forever (C does)."""
        if self.eof:
            raise UsageError(f"fence_virtd -c: no valid answer for {prompt!r} before the end "
                             f"of input")


def _conf_set(root: Block, path: str, value: str | None) -> None:
    """C sc_set: 'a/b/@key'. Missing blocks are created; None removes the key.

    New items go last in file order, which the C dump (reversed) prints first.
    """
    head, _, key = path.rpartition("/@")
    blk = root
    for part in [p for p in head.split("/") if p]:
        nxt = blk.block(part)
        if nxt is None:
            if value is None:
                return
            nxt = Block(part)
            blk.items.append(nxt)
        blk = nxt
    found = blk.assign(key)
    if value is None:
        blk.items = [i for i in blk.items
                     if not (isinstance(i, Assign) and i.name.lower() == key.lower())]
    elif found is not None:
        blk.items[blk.items.index(found)] = Assign(found.name, value, found.line)
    else:
        blk.items.append(Assign(key, value, 0))


def host_bridges() -> list:
    """Names of the bridges on this host (/sys/class/net/*/bridge), virbr0 first."""
    try:
        names = sorted(n for n in os.listdir("/sys/class/net")
                       if os.path.isdir(f"/sys/class/net/{n}/bridge"))
    except OSError:
        names = []
    return sorted(names, key=lambda n: (n != "virbr0", n))


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


_CONF_TEXT = {
    "listener": "\nListener modules are responsible for accepting requests\n"
                "from fencing clients.\n\n",
    "multicast": "\nThe multicast listener module is designed for use environments\n"
                 "where the guests and hosts may communicate over a network using\n"
                 "multicast.\n\n"
                 "The multicast address is the address that a client will use to\n"
                 "send fencing requests to fence_virtd.\n\n",
    "tcp": "\nThe TCP listener module is designed for use in environments\n"
           "where the guests and hosts communicate over viosproxy.\n\n"
           "The IP address is the address that a client will use to\n"
           "send fencing requests to fence_virtd.\n\n",
    "interface": "\nSetting a preferred interface causes fence_virtd to listen only\n"
                 "on that interface.  Normally, it listens on all interfaces.\n"
                 "In environments where the virtual machines are using the host\n"
                 "machine as a gateway, this *must* be set (typically to virbr0).\n"
                 "Set to 'none' for no interface.\n\n",
    "key": "\nThe key file is the shared key information which is used to\n"
           "authenticate fencing requests.  The contents of this file must\n"
           "be distributed to each physical host and virtual machine within\n"
           "a cluster.\n\n",
    "backend": "\nBackend modules are responsible for routing requests to\n"
               "the appropriate hypervisor or management layer.\n\n",
    "libvirt": "\nThe libvirt backend module is designed for single desktops or\n"
               "servers.  Do not use in environments where virtual machines\n"
               "may be migrated between hosts.\n\n",
    "cpg": "\nThe CPG backend module is designed for use in clusters\n"
           "running corosync and libvirt. It utilizes the CPG API to \n"
           "route fencing requests, finally utilizing libvirt to perform\n"
           "fencing actions.\n\n",
    "cpg_name": "\nThe name mode is how the cpg plugin stores and \n"
                "references virtual machines.  Since virtual machine names\n"
                "are not guaranteed to be unique cluster-wide, use of UUIDs\n"
                "is strongly recommended.  However, for compatibility with \n"
                "fence_xvmd, the use of 'name' mode is also supported.\n\n",
    "serial": "\nThe serial plugin allows fence_virtd to communicate with\n"
              "guests using serial or guest-forwarding VMChannel instead\n"
              "of using TCP/IP networking.\n\n"
              "Special configuration of virtual machines is required. See\n"
              "fence_virt.conf(5) for more details.\n\n",
}


def _ask_address(p: _Prompter, root: Block, lname: str, prompt: str, default: str,
                 multicast: bool) -> None:
    cur = Config(root, "").get(f"listeners/{lname}/@address") or default
    while True:
        addr = p.text(prompt, cur)
        try:
            fam = address_family(addr)
        except UsageError:
            p.say(f"'{addr}' is not a valid IP address!\n")
            p.again(prompt)
            continue
        if multicast and not _is_multicast(addr, fam):
            # ours: the C tool takes any address, and then its join fails at start-up
            p.say(f"'{addr}' is not a multicast address!\n")
            p.again(prompt)
            continue
        p.say(f"\nUsing {family_name(fam)} as family.\n\n")
        _conf_set(root, f"listeners/{lname}/@family", family_name(fam))
        _conf_set(root, f"listeners/{lname}/@address", addr)
        return


def _ask_port(p: _Prompter, root: Block, lname: str, prompt: str) -> None:
    cur = Config(root, "").get(f"listeners/{lname}/@port") or str(DEFAULT_PORT)
    while True:
        port = p.text(prompt, cur)
        if port.isdigit() and 1 <= int(port) <= 65535:
            _conf_set(root, f"listeners/{lname}/@port", str(int(port)))
            return
        p.say(f"Port value '{port}' is out of range\n")      # C prints the default here
        p.again(prompt)


def _ask_key_file(p: _Prompter, root: Block, lname: str) -> None:
    p.say(_CONF_TEXT["key"])
    cur = Config(root, "").get(f"listeners/{lname}/@key_file") or DEFAULT_KEY_FILE
    while True:
        key = p.text("Key File", cur)
        if key.lower() == "none":
            _conf_set(root, f"listeners/{lname}/@key_file", None)
            return
        if key.startswith("/"):
            break
        p.say(f"Invalid key file: {key}\n")
        if p.yesno("Use anyway", True):
            break
        p.again("Key File")
    _conf_set(root, f"listeners/{lname}/@key_file", key)


def _configure_listener(p: _Prompter, root: Block, name: str) -> None:
    cfg = Config(root, "")
    if name == "multicast":
        p.say(_CONF_TEXT["multicast"])
        _ask_address(p, root, name, "Multicast IP Address", MCAST_IPV4, True)
        _ask_port(p, root, name, "Multicast IP Port")
        p.say(_CONF_TEXT["interface"])
        bridges = host_bridges()
        if bridges:       # ours: offer what exists
            p.say(f"Bridges on this host: {' '.join(bridges)}\n")
        cur = cfg.get("listeners/multicast/@interface") or (
            "virbr0" if "virbr0" in bridges else "none")
        while True:
            iface = p.text("Interface", cur)
            if iface.lower() == "none" or _interface_exists(iface):
                break
            p.say(f"Invalid interface: {iface}\n")
            if p.yesno("Use anyway", True):
                break
            p.again("Interface")
        _conf_set(root, "listeners/multicast/@interface",
                  None if iface.lower() == "none" else iface)
        _ask_key_file(p, root, name)
    elif name == "tcp":
        p.say(_CONF_TEXT["tcp"])
        # C offers the multicast group here (a bug: the bind then fails); ours 127.0.0.1
        _ask_address(p, root, name, "TCP Listen IP Address", TCP_IPV4, False)
        _ask_port(p, root, name, "TCP Listen Port")
        _ask_key_file(p, root, name)
    elif name == "vsock":
        p.say("\nThe vsock listener accepts requests from guests over AF_VSOCK\n"
              "(fence_virt -S).\n\n")
        _ask_port(p, root, name, "Vsock Port")
        _ask_key_file(p, root, name)
    elif name == "serial":
        p.say(_CONF_TEXT["serial"])
        uri = p.text("Libvirt URI", cfg.get("listeners/serial/@uri") or DEFAULT_URI)
        _conf_set(root, "listeners/serial/@uri", uri)
        p.say("\nSetting a socket path prevents fence_virtd from taking\n"
              "hold of all Unix domain sockets created when the guest\n"
              "is started.  A value like /var/run/cluster/fence might\n"
              "be a good value.  Don't forget to create the directory!\n\n")
        path = p.text("Socket directory", cfg.get("listeners/serial/@path") or "none")
        _conf_set(root, "listeners/serial/@path", None if path.lower() == "none" else path)
        p.say("\nThe serial plugin allows two types of guest to host\n"
              "configurations.  One is via a serial port; the other is\n"
              "utilizing the newer VMChannel.\n\n")
        cur = cfg.get("listeners/serial/@mode") or "serial"
        while True:
            mode = p.text("Mode (serial or vmchannel)", cur)
            if mode.lower() in ("serial", "vmchannel"):
                break
            p.say(f"Invalid mode: {mode}\n")
            if p.yesno("Use anyway", True):
                break
            p.again("Mode")
        _conf_set(root, "listeners/serial/@mode", mode)
    else:
        p.say(f"Unable to configure unknown listener module '{name}'\n")


def _configure_backend(p: _Prompter, root: Block, name: str) -> None:
    cfg = Config(root, "")
    if name == "libvirt":
        p.say(_CONF_TEXT["libvirt"])
        uri = p.text("Libvirt URI", cfg.get("backends/libvirt/@uri") or DEFAULT_URI)
        _conf_set(root, "backends/libvirt/@uri", uri)
    elif name == "cpg":
        p.say(_CONF_TEXT["cpg"])
        uri = p.text("Libvirt URI", cfg.get("backends/cpg/@uri") or DEFAULT_URI)
        _conf_set(root, "backends/cpg/@uri", uri)
        p.say(_CONF_TEXT["cpg_name"])
        cur = cfg.get("backends/cpg/@name_mode") or "uuid"
        while True:
            mode = p.text("VM naming/tracking mode (name or uuid)", cur)
            if mode.lower() == "uuid":
                break
            if mode.lower() == "name":
                p.say("This can be dangerous if you do not take care to ensure that\n"
                      "virtual machine names are unique cluster-wide.\n")
                if p.yesno("Use name mode anyway", True):
                    break
            p.again("VM naming/tracking mode")
        _conf_set(root, "backends/cpg/@name_mode", mode)


def _pick_module(p: _Prompter, root: Block, kind: str, table: dict, default: str) -> str:
    cur = Config(root, "").get(f"fence_virtd/@{kind}") or default
    prompt = f"{kind.capitalize()} module"
    while True:
        name = p.text(prompt, cur)
        if name.lower() in table:
            return name
        p.say(f"No {kind} module named {name} found!\n")
        if p.yesno("Use this value anyway", False):
            return name
        p.again(prompt)


def write_atomically(path: str, data: bytes, what: str) -> None:
    """Write data to a new file beside path (mkstemp: mode 0600), fsync, rename over path."""
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=directory)
    except OSError as e:
        raise FenceError(f"cannot write {what} {path}: {e.strerror} (in {directory})") \
            from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FenceError(f"cannot write {what} {path}: {e.strerror}") from None


def configure_interactive(path: str, inp=None, out=None) -> int:
    """fence_virtd -c: the C prompt sequence (protocol.md §10.2), then write `path`.

    Answers come from `inp` (stdin: a tty or a pipe), prompts go to `out` (stdout).
    The file is written as path.XXXXXX (mode 0600) and renamed over `path`.
    """
    p = _Prompter(inp or sys.stdin, out or sys.stdout)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            root = parse_config(f.read(), path).root
    except (OSError, ConfigError) as e:
        log.debug("%s: %s", path, e)
        p.say(f"Parsing of {path} failed.\n")
        if not p.yesno("Start from scratch", False):
            return ExitCode.FAIL
        root = Block("")
    # module search path: only the C daemon uses it; ours has its modules built in
    cur = Config(root, "").get("fence_virtd/@module_path") or DEFAULT_MODULE_PATH + "/"
    module_path = p.text("Module search path", cur)
    p.say("\n")
    try:
        c_plugins = [n for n in os.listdir(module_path) if n.endswith(".so")]
    except OSError:
        c_plugins = []
    p.say("Available backends:\n" + "".join(f"    {n} {__version__}\n" for n in BACKENDS)
          + "Available listeners:\n" + "".join(f"    {n} {__version__}\n" for n in LISTENERS))
    if not c_plugins:
        p.say(f"(No C fence-virt modules in {module_path}: only fencevirt can use this "
              f"file.)\n")
    _conf_set(root, "fence_virtd/@module_path", module_path)

    p.say(_CONF_TEXT["listener"])
    listener = _pick_module(p, root, "listener", LISTENERS, "multicast")
    _conf_set(root, "fence_virtd/@listener", listener)
    _configure_listener(p, root, listener.lower())

    p.say(_CONF_TEXT["backend"])
    backend = _pick_module(p, root, "backend", BACKENDS, "libvirt")
    _conf_set(root, "fence_virtd/@backend", backend)
    _configure_backend(p, root, backend.lower())

    text = dump_config(root)
    p.say("\nConfiguration complete.\n\n=== Begin Configuration ===\n" + text +
          "=== End Configuration ===\n")
    if not p.yesno(f"Replace {path} with the above", False):
        return ExitCode.FAIL
    for problem in check_config(parse_config(text, path), LISTENERS, BACKENDS):
        log.warning("%s", problem)
    write_atomically(path, text.encode("utf-8", "surrogateescape"), "the config")
    for lname in listener_names_of(Config(root, path)):
        key = Config(root, path).get(f"listeners/{lname}/@key_file") or DEFAULT_KEY_FILE
        if not os.path.exists(key):
            log.warning("key file %s does not exist yet; create it with `fencevirt.py keygen "
                        "%s` and copy it to every guest", key, key)
    return ExitCode.OK


def cmd_check_config(argv: list) -> int:
    """check-config [FILE]: report every problem with its line number."""
    setup_logging("fence_virtd", logging.INFO)
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        raise UsageError("usage: fencevirt.py check-config [FILE] (default "
                         f"{DEFAULT_CONFIG})")
    path = argv[0] if argv else DEFAULT_CONFIG
    cfg = load_config(path)
    problems = check_config(cfg, LISTENERS, BACKENDS)
    for p in problems:
        print(p)
    if problems:
        errors = sum(1 for p in problems if p.error)
        print(f"{path}: {errors} error(s), {len(problems) - errors} warning(s)")
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
        raise UsageError(f"keygen: {e}; usage: keygen [PATH] [--force] [--bytes N]") from None
    if len(rest) > 1:
        raise UsageError(f"keygen: one key path only, got {' '.join(rest)}")
    force = any(f in ("-f", "--force") for f, _ in pairs)
    size = 512
    for f, v in pairs:
        if f in ("-b", "--bytes"):
            size = int(number(v, "--bytes", MIN_KEY_LEN))
            if size > MAX_KEY_LEN:
                raise UsageError(f"--bytes {size}: only the first {MAX_KEY_LEN} bytes of a "
                                 f"key are used; use at most {MAX_KEY_LEN}")
    path = rest[0] if rest else DEFAULT_KEY_FILE
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path} exists; refusing to overwrite it (a new key must be copied "
                         f"to every host and guest again; use --force to replace it)")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; name the key file itself")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o755)
        except OSError as e:
            raise FenceError(f"cannot create {directory} for the key: {e.strerror}") from None
        log.info("created %s", directory)
    key = os.urandom(size)
    write_atomically(path, key, "the key")
    print(f"{path}: {size} random bytes, mode 0600, fingerprint {key_fingerprint(key)}")
    return ExitCode.OK


SYSTEMD_UNIT = """\
# Written by `fencevirt.py install`; `fencevirt.py uninstall` removes it.
[Unit]
Description=Fence virtual machines on request of their cluster (fencevirt fence_virtd)
Documentation=man:fence_virtd(8) man:fence_virt.conf(5)
After=network-online.target libvirtd.service virtqemud.service
Wants=network-online.target

[Service]
Type={type}
{notify}ExecStart={python} {daemon} -F -w -f {config} -p {pidfile}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
TimeoutStopSec=5

[Install]
WantedBy=multi-user.target
"""

INSTALL_MANIFEST = "/var/lib/fencevirt/install.manifest"
LAUNCHER = """\
#!{python}
# Written by `fencevirt.py install --launcher`: run {source} from its cached bytecode.
# CPython compiles a script at every start (about 0.1 s for fencevirt.py) but caches
# the bytecode of an imported module; the role still comes from argv[0].
import sys
sys.path.insert(0, {directory!r})
import fencevirt
sys.exit(fencevirt.main())
"""
UNIT_NAME = "fence_virtd.service"


def _install_options(argv: list, install: bool) -> dict:
    import getopt
    longs = ["manifest="] + (["prefix=", "host", "unit-dir=", "unit-type=", "config=",
                              "pidfile=", "python=", "stonith", "stonith-dir=", "force",
                              "launcher="]
                             if install else [])
    try:
        pairs, rest = getopt.gnu_getopt(argv, "", longs)
    except getopt.GetoptError as e:
        raise UsageError(f"{'install' if install else 'uninstall'}: {e}; see "
                         f"`fencevirt.py help`") from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    o = {"prefix": "/usr/sbin", "host": False, "unit-dir": "/etc/systemd/system",
         "unit-type": "notify", "config": DEFAULT_CONFIG, "pidfile": DEFAULT_PIDFILE,
         "python": python, "stonith": False, "force": False,
         "stonith-dir": GLUE_PLUGIN_DIR, "manifest": INSTALL_MANIFEST,
         "launcher": None}
    for flag, value in pairs:
        key = flag[2:]
        o[key] = True if value == "" and key in ("host", "stonith", "force") else value
    if o["unit-type"] not in ("notify", "simple"):
        raise UsageError(f"--unit-type {o['unit-type']!r}: use notify or simple")
    for key in ("prefix", "unit-dir", "stonith-dir", "manifest", "config", "python",
                "launcher"):
        if o[key] is not None:
            o[key] = os.path.abspath(o[key])
    return o


def _read_manifest(path: str) -> dict:
    import json
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"entries": [], "saved": {}}
    except (OSError, ValueError) as e:
        raise FenceError(f"install manifest {path} is unreadable: {e}; remove it by hand "
                         f"after checking what it lists") from None
    return data


def _sha256_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def _is_ours(path: str, entry: dict) -> bool:
    """Does path still hold exactly what install put there?"""
    if entry["kind"] == "symlink":
        return os.path.islink(path) and os.readlink(path) == entry["target"]
    if entry["kind"] == "file":
        return (os.path.isfile(path) and not os.path.islink(path)
                and _sha256_file(path) == entry["sha256"])
    return os.path.isdir(path)


def install_launcher_plan(me: str, o: dict, plan: list) -> str:
    """--launcher DIR: byte-compile fencevirt.py for o["python"] and plan DIR/fencevirt,
    a small script that imports it; returns the launcher's path (the links' target)."""
    import subprocess
    if os.path.basename(me) != "fencevirt.py":
        raise UsageError(f"--launcher imports the file as module fencevirt: name it "
                         f"fencevirt.py (it is {os.path.basename(me)})")
    p = subprocess.run([o["python"], "-c", "import py_compile, sys; "
                        "py_compile.compile(sys.argv[1], doraise=True)", me],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise FenceError(f"cannot byte-compile {me} with {o['python']}: "
                         f"{' '.join(p.stderr.split()[-12:])}")
    text = LAUNCHER.format(python=o["python"], source=me, directory=os.path.dirname(me))
    path = os.path.join(o["launcher"], "fencevirt")
    plan.append({"path": path, "kind": "file", "mode": 0o755, "text": text,
                 "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return path


def cmd_install(argv: list) -> int:
    """install [--prefix /usr/sbin] [--host] [--stonith] ...: role links and systemd unit.

    Options: --prefix DIR (role symlinks fence_virtd, fence_xvm, fence_virt), --host (also
    the systemd unit, --unit-dir DIR, --unit-type notify|simple, --config, --pidfile,
    --python), --stonith (cluster-glue plugin link external/fencevirt, --stonith-dir DIR),
    --manifest FILE (what uninstall removes), --force (move other files aside; uninstall
    puts them back), --launcher DIR (link the roles to DIR/fencevirt, which imports the
    byte-compiled file: an agent starts about 0.1 s faster).
    """
    import json
    import tempfile
    setup_logging("fencevirt", logging.INFO)
    o = _install_options(argv, True)
    me = os.path.realpath(os.path.abspath(__file__))
    manifest = _read_manifest(o["manifest"])
    known = {e["path"]: e for e in manifest["entries"]}
    plan, target = [], me
    if o["launcher"]:
        target = install_launcher_plan(me, o, plan)
    plan += [{"path": os.path.join(o["prefix"], role), "kind": "symlink", "target": target}
             for role in ("fence_virtd", "fence_xvm", "fence_virt")]
    if o["stonith"]:
        plan.append({"path": os.path.join(o["stonith-dir"], "fencevirt"), "kind": "symlink",
                     "target": target})
        if os.stat(me).st_mode & 0o022:
            log.warning("%s is writable by group or others: cluster-glue refuses such "
                        "plugins; run chmod go-w %s", me, me)
    if o["host"]:
        text = SYSTEMD_UNIT.format(
            type=o["unit-type"], python=o["python"],
            daemon=os.path.join(o["prefix"], "fence_virtd"), config=o["config"],
            pidfile=o["pidfile"],
            notify="NotifyAccess=main\n" if o["unit-type"] == "notify" else "")
        plan.append({"path": os.path.join(o["unit-dir"], UNIT_NAME), "kind": "file",
                     "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text})
    conflicts = [e["path"] for e in plan
                 if os.path.lexists(e["path"]) and not _is_ours(e["path"], e)
                 and e["path"] not in known]
    if conflicts and not o["force"]:
        raise FenceError(f"not installed: {', '.join(conflicts)} exist(s) and were not "
                         f"installed by fencevirt; remove them, pick another --prefix, or use "
                         f"--force to move them aside (uninstall puts them back)")
    created_dirs = []
    for e in plan:
        d = os.path.dirname(e["path"])
        missing = []
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except OSError as err:
                raise FenceError(f"cannot create {d}: {err.strerror}") from None
            created_dirs.append({"path": d, "kind": "dir"})
            print(f"created directory {d}")
    for e in plan:
        path = e["path"]
        if os.path.lexists(path) and _is_ours(path, e):
            print(f"unchanged {path}")
            continue
        if path in conflicts:
            saved = path + ".fencevirt-saved"
            os.rename(path, saved)
            manifest["saved"][path] = saved
            print(f"moved {path} aside to {saved}")
        try:
            if e["kind"] == "symlink":
                tmp = f"{path}.fencevirt-tmp{os.getpid()}"
                os.symlink(e["target"], tmp)
                os.replace(tmp, path)
                print(f"linked {path} -> {e['target']}")
            else:
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fencevirt-")
                with os.fdopen(fd, "w") as f:
                    f.write(e.pop("text"))
                os.chmod(tmp, e.get("mode", 0o644))
                os.replace(tmp, path)
                print(f"wrote {path}")
        except OSError as err:
            raise FenceError(f"cannot install {path}: {err.strerror}") from None
        e.pop("text", None)
    for e in plan:
        e.pop("text", None)
        known[e["path"]] = e
    for e in created_dirs:
        known.setdefault(e["path"], e)
    manifest["entries"] = list(known.values())
    manifest["source"] = me
    os.makedirs(os.path.dirname(o["manifest"]), exist_ok=True)
    with open(o["manifest"] + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(o["manifest"] + ".tmp", o["manifest"])
    print(f"manifest {o['manifest']} ({len(manifest['entries'])} entries; "
          f"`fencevirt.py uninstall --manifest {o['manifest']}` removes them)")
    if o["host"]:
        print(f"next: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")
    return ExitCode.OK


def cmd_uninstall(argv: list) -> int:
    """uninstall [--manifest FILE]: remove exactly what install created."""
    setup_logging("fencevirt", logging.INFO)
    o = _install_options(argv, False)
    if not os.path.exists(o["manifest"]):
        raise UsageError(f"no install manifest at {o['manifest']}: nothing to uninstall "
                         f"(name another with --manifest)")
    manifest = _read_manifest(o["manifest"])
    left = []
    files = [e for e in manifest["entries"] if e["kind"] != "dir"]
    dirs = sorted((e for e in manifest["entries"] if e["kind"] == "dir"),
                  key=lambda e: -len(e["path"]))
    for e in files:
        path = e["path"]
        if not os.path.lexists(path):
            print(f"already gone {path}")
        elif _is_ours(path, e):
            os.unlink(path)
            print(f"removed {path}")
        else:
            left.append(path)
            log.warning("left %s alone: it changed since install", path)
            continue
        saved = manifest["saved"].get(path)
        if saved and os.path.lexists(saved):
            os.rename(saved, path)
            print(f"restored {path} from {saved}")
    for e in dirs:
        try:
            os.rmdir(e["path"])
            print(f"removed directory {e['path']}")
        except OSError:
            log.info("kept directory %s: not empty", e["path"])
    if left:
        raise FenceError(f"uninstall left {len(left)} changed file(s) in place: "
                         f"{', '.join(left)}; the manifest {o['manifest']} is kept")
    os.unlink(o["manifest"])
    print(f"removed {o['manifest']}")
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
    if argv:
        raise UsageError(f"demo takes no arguments (got {' '.join(argv)})")
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


def _glue_target(env, argv: list, op: str):
    """(params, node, backend, info) for reset/on/off HOST; NoSuchDomain names node+URI."""
    if len(argv) != 2 or not argv[1]:
        raise UsageError(f"{op} needs exactly one node name (stonith passes it), got "
                         f"{len(argv) - 1} arguments")
    prm = glue_params(env)
    node = argv[1]
    domain = hostlist_domain(prm.hosts, node)
    backend = LibvirtBackend(None, uris=[prm.uri])
    try:
        info = backend.lookup(domain)
    except NoSuchDomain as e:
        backend.close()
        raise NoSuchDomain(f"{op} {node}: {e}; nothing was done. Check hostlist "
                           f"({node}:DOMAIN) against `virsh -c {prm.uri} list --all`") from None
    except BackendError as e:
        backend.close()
        raise BackendError(f"{op} {node}: {e}; nothing was done. Check hypervisor_uri and "
                           f"that libvirtd listens there (virsh -c {prm.uri} version)") \
            from None
    except BaseException:
        backend.close()
        raise
    set_op_deadline(Deadline(GLUE_OP_TIMEOUT))
    return prm, node, backend, info


def _glue_off(backend: Backend, prm: GlueParams, node: str, info: HostInfo, op: str) -> None:
    """do_off (verified); raises when the domain is not confirmed off."""
    if do_off(backend, info, OFF_VERIFY_TIMEOUT) != Response.SUCCESS:
        raise BackendError(f"{op} {node}: domain {info.name!r} at {prm.uri} is still not "
                           f"off {OFF_VERIFY_TIMEOUT:.0f} s after destroy; NOT fenced")


def glue_reset(env, argv: list) -> int:
    import contextlib
    prm, node, backend, info = _glue_target(env, argv, "reset")
    with contextlib.closing(backend):
        if prm.reset_method == "reboot":
            if info.state == VirState.SHUTOFF:
                log.warning("reset %s: domain %r is off; reset_method=reboot leaves it off "
                            "(it is fenced)", node, info.name)
                print(f"reset {node}: domain {info.name} is off (left off)")
                return ExitCode.OK
            backend.reset(info)
            print(f"reset {node}: domain {info.name} hard-reset (virDomainReset)")
            return ExitCode.OK
        _glue_off(backend, prm, node, info, "reset")
        # FenceAgentAPI: the fence is the off part; a failed power-on is loud, not a failure.
        try:
            backend.create(info)
        except BackendError as e:
            try:
                running = backend.state(info) != VirState.SHUTOFF
            except BackendError:
                running = False
            if not running:
                log.error("reset %s: domain %r was powered off (fenced) but did NOT start "
                          "again: %s; start it by hand: virsh -c %s start %s", node,
                          info.name, e, prm.uri, info.name)
                print(f"reset {node}: domain {info.name} off (verified); power-on FAILED")
                return ExitCode.OK
        print(f"reset {node}: domain {info.name} off (verified) and started again")
        return ExitCode.OK


def glue_off(env, argv: list) -> int:
    import contextlib
    prm, node, backend, info = _glue_target(env, argv, "off")
    with contextlib.closing(backend):
        _glue_off(backend, prm, node, info, "off")
        print(f"off {node}: domain {info.name} is off (verified)")
        return ExitCode.OK


def glue_on(env, argv: list) -> int:
    import contextlib
    prm, node, backend, info = _glue_target(env, argv, "on")
    with contextlib.closing(backend):
        do_on(backend, info, OFF_VERIFY_TIMEOUT)
        if backend.state(info) == VirState.SHUTOFF:
            raise BackendError(f"on {node}: domain {info.name!r} at {prm.uri} is still off "
                               f"after start")
        print(f"on {node}: domain {info.name} is running")
        return ExitCode.OK


def glue_status(env, argv: list) -> int:
    """The device's status: the hypervisor answers. Missing hostlist domains only warn
    (a guest may have migrated to another host)."""
    import contextlib
    prm = glue_params(env)
    with contextlib.closing(LibvirtBackend(None, uris=[prm.uri])) as backend:
        try:
            backend.ping()
            hosts = backend.domains()
        except BackendError as e:
            raise BackendError(f"status: hypervisor_uri={prm.uri} cannot be reached: {e}; "
                               f"check that libvirtd listens there (virsh -c {prm.uri} "
                               f"version)") from None
        known = {h.name for h in hosts} | {h.uuid.lower() for h in hosts}
        missing = [f"{n}:{d}" for n, d in prm.hosts
                   if d not in known and d.lower() not in known]
        if missing:
            log.warning("status: %s answers, but these hostlist domains are not defined "
                        "there: %s (fencing those nodes will fail)", prm.uri,
                        " ".join(missing))
        print(f"status: {prm.uri} reachable ({backend.driver}), "
              f"{len(prm.hosts) - len(missing)} of {len(prm.hosts)} hostlist domains found")
        return ExitCode.OK


def glue_gethosts(env, argv: list) -> int:
    for node, _domain in glue_params(env, need_uri=False).hosts:
        print(node)
    return ExitCode.OK


GLUE_OPS = {
    "gethosts": glue_gethosts,
    "reset": glue_reset,
    "off": glue_off,
    "on": glue_on,
    "status": glue_status,
    "getconfignames": lambda env, argv: print(" ".join(GLUE_CONFIG_NAMES)) or ExitCode.OK,
    "getinfo-xml": lambda env, argv: print(glue_info_xml(), end="") or ExitCode.OK,
}
GLUE_OPS.update({op: (lambda env, argv, text=text: print(text) or ExitCode.OK)
                 for op, text in GLUE_INFO.items()})


def cmd_stonith_plugin(argv: list) -> int:
    """stonith-plugin OP [NODE]: cluster-glue external plugin (external/libvirt drop-in)."""
    setup_logging(os.environ.get("HA_LOGTAG") or "external/fencevirt", logging.INFO,
                  use_syslog=True)
    # cluster-glue sets no time limit: fail fast while libvirtd cannot be reached (status
    # is a monitor), then give the action itself up to GLUE_OP_TIMEOUT (_glue_target)
    set_op_deadline(Deadline(GLUE_CONNECT_TIMEOUT))
    op = argv[0] if argv else ""
    fn = GLUE_OPS.get(op)
    if fn is None:
        raise UsageError(f"unknown plugin operation {op!r} (cluster-glue calls: "
                         f"{', '.join(GLUE_OPS)}); parameters come in the environment")
    return fn(os.environ, argv)


class Checklist:
    """doctor's report: one `OK`/`WARN`/`FAIL` line per check, each failure with a fix."""

    def __init__(self):
        self.failed = 0

    def add(self, status: str, name: str, finding: str, fix: str = "") -> None:
        if status == "FAIL":
            self.failed += 1
        print(f"{status:<4} {name}: {finding}" + (f" -> fix: {fix}" if fix else ""),
              flush=True)


def igmp_groups(family: int) -> dict:
    """{interface name: {group text}} from /proc/net/igmp or /proc/net/igmp6."""
    groups: dict = {}
    try:
        if family == socket.AF_INET:
            dev = None
            with open("/proc/net/igmp") as f:
                for line in f.read().splitlines()[1:]:
                    if line[:1].isdigit():
                        dev = line.split()[1]
                    elif dev and line.strip():
                        raw = struct.pack("<I", int(line.split()[0], 16))
                        groups.setdefault(dev, set()).add(socket.inet_ntoa(raw))
        else:
            with open("/proc/net/igmp6") as f:
                for line in f.read().splitlines():
                    p = line.split()
                    if len(p) >= 3:
                        groups.setdefault(p[1], set()).add(
                            socket.inet_ntop(socket.AF_INET6, bytes.fromhex(p[2])))
    except (OSError, ValueError):
        pass
    return groups


def interface_ipv4(name: str) -> str | None:
    import fcntl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                              struct.pack("16sH14s", name.encode()[:15], 0, b""))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


DROP_FIXES = {
    "key mismatch": "copy this host's key file to every guest (compare fingerprints)",
    "hash too weak": "use a stronger -c/hash on the guest, or lower `hash` here",
    "auth mismatch": "use the same -C/auth and key on the guest as `auth` here",
    "auth failed": "the guest gave up during the challenge; check its timeout and key",
    "connect-back failed": "open TCP 1229 (the client's -p port) in the guest's firewall",
    "source mismatch": "set check_source = \"no\" if the guests are behind NAT",
    "malformed": "a non-fence_xvm sender uses this port; check what sends to it",
    "wrong interface": "set `interface` to the bridge the guests are on",
    "backend failed": "start libvirtd or fix the uri in backends { libvirt { } }",
    "unknown domain": "fix the guest's port/plug or pcmk_host_map (fencevirt.py host-map)",
}


def doctor_host(argv: list) -> int:
    """fence_virtd doctor [-f CONF] [-p PIDFILE]: walk the host side of the path."""
    import getopt
    try:
        pairs, rest = getopt.gnu_getopt(argv, "f:p:", ["config=", "pidfile="])
    except getopt.GetoptError as e:
        raise UsageError(f"{e}; usage: fence_virtd doctor [-f CONF] [-p PIDFILE]") from None
    opts = dict(pairs)
    path = opts.get("-f") or opts.get("--config") or DEFAULT_CONFIG
    pidfile = opts.get("-p") or opts.get("--pidfile") or DEFAULT_PIDFILE
    ck = Checklist()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        ck.add("FAIL", "config", str(e), f"fix the file, then `fencevirt.py check-config {path}`")
        return ExitCode.FAIL
    problems = check_config(cfg, LISTENERS, BACKENDS)
    ck.add("FAIL" if problems else "OK", "config", "; ".join(problems) or f"{path} is valid",
           "fix the lines named" if problems else "")
    for name in listener_names(cfg):
        blk = cfg.node(f"listeners/{name}")
        get = blk.get if blk is not None else (lambda _k, d=None: d)
        key_file = get("key_file", DEFAULT_KEY_FILE)
        if (get("hash", "sha256") or "").lower() == "none" and \
                (get("auth", "sha256") or "").lower() == "none":
            ck.add("WARN", f"{name} key", "hash and auth are none: no authentication")
        else:
            try:
                key = read_key_file(key_file, strict=False)
                ck.add("OK", f"{name} key", f"{key_file}: {len(key)} bytes, fingerprint "
                       f"{key_fingerprint(key)} (guests must show the same)")
            except FenceError as e:
                ck.add("FAIL", f"{name} key", str(e), f"fencevirt.py keygen {key_file}")
        if name != "multicast":
            continue
        fam = socket.AF_INET6 if (get("family", "ipv4") or "").lower() == "ipv6" \
            else socket.AF_INET
        group = get("address") or (MCAST_IPV6 if fam == socket.AF_INET6 else MCAST_IPV4)
        ifname = get("interface")
        joined = igmp_groups(fam)
        if ifname:
            try:
                socket.if_nametoindex(ifname)
            except OSError:
                ck.add("FAIL", "interface", f"{ifname!r} does not exist here",
                       "set `interface` to the bridge the guests are on (ip link)")
                ifname = None
            if ifname:
                flags = interface_flags(ifname)
                addr = interface_ipv4(ifname) if fam == socket.AF_INET else \
                    next((a.address for a in local_addresses(fam) if a.ifname == ifname), None)
                bad = [w for w, f in (("down", IFF_UP), ("no MULTICAST flag", IFF_MULTICAST))
                       if not flags & f] + ([] if addr else ["no address"])
                ck.add("FAIL" if bad else "OK", "interface",
                       f"{ifname}: {', '.join(bad) if bad else f'up, multicast, address {addr}'}",
                       f"ip link set {ifname} up multicast on; give it an address on the "
                       f"guests' network" if bad else "")
        else:
            ck.add("WARN", "interface", "not set: the group is joined on the interface the "
                   "route to it picks", "set `interface` to the bridge the guests are on")
        where = [d for d, g in joined.items() if group in g]
        if ifname and ifname in where:
            ck.add("OK", "group", f"{group} joined on {ifname}")
        elif where:
            ck.add("FAIL" if ifname else "OK", "group", f"{group} joined on {', '.join(where)}"
                   + (f", not on {ifname}" if ifname else ""),
                   "restart fence_virtd after fixing `interface`" if ifname else "")
        else:
            ck.add("FAIL", "group", f"{group} is joined on no interface: fence_virtd is not "
                   f"running in this network namespace, or its listener failed",
                   "start fence_virtd (fence_virtd -F -d1 shows why it stops)")
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        ck.add("OK", "daemon", f"pid {pid} from {pidfile} is running")
    except (OSError, ValueError, IndexError) as e:
        ck.add("FAIL", "daemon", f"no running fence_virtd per {pidfile} "
               f"({getattr(e, 'strerror', None) or e})", "start fence_virtd (or pass -p PIDFILE)")
    try:
        backend = open_backend(cfg)
        try:
            run_bounded(backend.ping, 10.0, "libvirt ping")
            ck.add("OK", "backend", f"{backend.describe()} reachable")
            doms = run_bounded(backend.domains, 10.0, "list domains")
            ck.add("OK" if doms else "WARN", "domains", f"{len(doms)} listed" + (
                ": " + ", ".join(h.name for h in sorted_hosts(doms)[:8]) if doms else ""),
                "" if doms else "define the guests on this hypervisor")
        finally:
            backend.close()
    except FenceError as e:
        ck.add("FAIL", "backend", str(e), DROP_FIXES["backend failed"])
    import json
    state_path = state_path_for(pidfile)
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        ck.add("WARN", "drops", f"no state file {state_path} ({getattr(e, 'strerror', e)}); "
               f"fencevirt's fence_virtd writes it next to its pidfile")
        state = {}
    recent = state.get("recent", [])
    if state and not recent:
        ck.add("OK", "drops", f"no dropped requests recorded since pid {state.get('pid')} "
               f"started")
    now = time.time()
    for ev in recent[-10:]:
        ck.add("FAIL", f"recent {ev.get('kind', 'drop')}",
               f"{now - ev.get('time', now):.0f} s ago from {ev.get('src')}: {ev.get('detail')}",
               DROP_FIXES.get(ev.get("reason"), "see the daemon log"))
    return ExitCode.FAIL if ck.failed else ExitCode.OK


def doctor_guest(role: str, argv: list) -> int:
    """fence_xvm doctor [agent options] [--host ADDR]: walk the guest side of the path."""
    host = None
    rest = []
    it = iter(argv)
    for x in it:
        if x == "--host":
            host = next(it, None)
        elif x.startswith("--host="):
            host = x.split("=", 1)[1]
        else:
            rest.append(x)
    a = AgentArgs(role)
    parse_argv(rest, a)
    if "timeout" not in a.values:
        a.set("timeout", "3")
    a.set("action", "list")
    setup_logging(f"fence_{role}", logging.ERROR)
    ck = Checklist()
    key_file = a.get("key_file")
    try:
        key = read_key_file(key_file, strict=False)
        ck.add("OK", "key", f"{key_file}: {len(key)} bytes, fingerprint {key_fingerprint(key)} "
               f"(the host's fence_virtd doctor must show the same)")
    except FenceError as e:
        ck.add("FAIL", "key", str(e), f"copy the host's key to {key_file}")
        return ExitCode.FAIL
    p = plan_agent(a)
    if p.mode != "multicast":
        ck.add("WARN", "transport", f"{p.mode}: only the list probe below applies")
        try:
            hosts = send_plan(p, Request.HOSTLIST)
            ck.add("OK", "list", f"{len(hosts)} domains")
        except FenceError as e:
            ck.add("FAIL", "list", str(e), "see the message")
        return ExitCode.FAIL if ck.failed else ExitCode.OK
    try:
        addrs = local_addresses(p.family, p.interface)
    except FenceError as e:
        addrs, why = [], str(e)
    else:
        why = "no interface is up with multicast on"
    if addrs:
        ck.add("OK", "interface", ", ".join(f"{x.address} ({x.ifname})" for x in addrs))
    else:
        ck.add("FAIL", "interface", why, "ip link set eth0 up multicast on")
        return ExitCode.FAIL
    with socket.socket(p.family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((p.group, p.port))
            ck.add("OK", "route", f"{p.group} routes via {s.getsockname()[0]}")
        except OSError as e:
            ck.add("WARN", "route", f"no route to {p.group}: {e.strerror} (fence_xvm picks "
                   f"the interface itself; other senders may not)",
                   f"ip route add {'ff00::/8' if p.family == socket.AF_INET6 else '224.0.0.0/4'}"
                   f" dev {addrs[0].ifname}")

    def probe(unicast=None) -> tuple:
        trace: dict = {}
        try:
            return trace, mcast_request(p.cc, Request.HOSTLIST, "", family=p.family,
                                        group=p.group, port=p.port, interface=p.interface,
                                        trace=trace, unicast=unicast), None
        except FenceError as e:
            return trace, None, e

    trace, hosts, err = probe()
    ck.add("OK" if trace.get("sent") else "FAIL", "probe",
           f"sent {trace.get('sent', 0)} list request(s) to {p.group}:{p.port}"
           + (f"; errors: {'; '.join(trace.get('send_errors'))}"
              if trace.get("send_errors") else ""))
    for (src, reason), detail in trace.get("hints", {}).items():
        ck.add("FAIL", "daemon", f"fence_virtd at {src} dropped the probe: {reason} ({detail};"
               f" ours: key {key_fingerprint(p.cc.key)}, hash {p.cc.hash.name.lower()})",
               DROP_FIXES.get(reason, "see its log").replace("here", "on the host"))
    if trace.get("connected"):
        ck.add("OK", "connect-back", f"fence_virtd at {trace['connected']} connected to TCP "
               f"{p.port}")
    elif trace.get("syns"):
        who = ", ".join(sorted({s for s, _i in trace["syns"]}))
        ck.add("FAIL", "connect-back", f"fence_virtd at {who} tried to connect to TCP "
               f"{p.port} but a firewall on this guest blocked it",
               f"allow TCP {p.port} from {who} (nft list ruleset / iptables -S INPUT)")
    elif not trace.get("hints"):
        seen = "" if trace.get("watch") == "on" else f" (could not watch SYNs: {trace.get('watch')})"
        ck.add("FAIL", "connect-back", f"no fence_virtd tried to connect back{seen}",
               "see the daemon check below")
        if host:
            t2, h2, e2 = probe(unicast=host)
            refused = [x for x in t2.get("send_errors", []) if "refused" in x.lower()]
            if refused:
                ck.add("FAIL", "daemon", f"nothing listens on UDP {p.port} at {host} (ICMP port"
                       f" unreachable): fence_virtd is not running there",
                       "start fence_virtd on the host (fence_virtd doctor tells why it stops)")
            elif t2.get("connected"):
                ck.add("FAIL", "daemon", f"fence_virtd at {host} answers unicast but not "
                       f"{p.group}: it listens on another interface or group",
                       "set `interface` (and `address`) in the host's fence_virt.conf to the "
                       "bridge this guest is on")
            elif t2.get("hints"):
                (src, reason), detail = next(iter(t2["hints"].items()))
                ck.add("FAIL", "daemon", f"fence_virtd at {src} dropped the unicast probe: "
                       f"{reason} ({detail})", DROP_FIXES.get(reason, "see its log"))
            else:
                ck.add("FAIL", "daemon", f"no answer from {host} by unicast either: host "
                       f"unreachable, or a firewall drops UDP {p.port}",
                       f"ping {host}; check the host's firewall")
        else:
            ck.add("FAIL", "daemon", "silent: not running, on another interface or group, or "
                   "dropping for key/hash (a C daemon drops silently)",
                   "rerun with --host <host address> to tell these apart; on the host run "
                   "fence_virtd doctor")
    if err is not None and trace.get("connected"):
        ck.add("FAIL", "daemon answers", str(err), "see the message")
    elif hosts is not None and not isinstance(hosts, list):
        ck.add("OK", "daemon answers", "challenge-response auth passed")
        ck.add("FAIL", "list", f"fence_virtd answered failure ({int(hosts)}): "
               f"{getattr(hosts, 'note', '') or 'see its log'}",
               "on the host: fence_virtd doctor (libvirt reachable?)")
    elif hosts is not None:
        ck.add("OK", "daemon answers", "challenge-response auth passed")
        ck.add("OK" if hosts else "WARN", "list", f"{len(hosts)} domains" + (
            ": " + ", ".join(h.name for h in hosts[:8]) if hosts else ""),
            "" if hosts else "the daemon lists nothing: check its backend uri and groups ACL")
        if p.domain:
            want = p.domain.lower()
            if any(want in (h.name.lower(), h.uuid.lower()) for h in hosts):
                ck.add("OK", "domain", f"{p.domain!r} is listed")
            else:
                ck.add("FAIL", "domain", f"{p.domain!r} is not among the {len(hosts)} domains "
                       f"fence_virtd lists", "use a listed name or UUID (pcmk_host_map: "
                       "fencevirt.py host-map)")
    return ExitCode.FAIL if ck.failed else ExitCode.OK


def cmd_doctor(argv: list, role: str | None = None) -> int:
    """doctor: OK/FAIL checklist with fixes (fence_xvm doctor / fence_virtd doctor)."""
    if role is None:
        role = "virtd" if argv and argv[0] in ("virtd", "host") else \
            "virt" if argv and argv[0] == "virt" else "xvm" if argv and argv[0] in (
                "xvm", "guest") else None
        if role is not None:
            argv = argv[1:]
        else:
            role = "virtd" if any(x in ("-f", "--config") or x.startswith("--config=")
                                  for x in argv) else "xvm"
    setup_logging("fencevirt", logging.ERROR)
    if role == "virtd":
        return doctor_host(argv)
    return doctor_guest(role, argv)


def build_host_map(nodes: list, domains: list) -> tuple:
    """Pure: ([(node, target)], [warnings]) pairing cluster node names with domains.

    Matches exactly, then case-insensitively, then by short name (FQDN on either side).
    A domain name Pacemaker would mangle is mapped by UUID. `domains` are HostInfo."""
    pairs, warnings, used = [], [], set()

    def short(n: str) -> str:
        return n.split(".", 1)[0].lower()

    tests = (("exact", lambda n, d: n == d.name), ("case", lambda n, d: n.lower() ==
             d.name.lower()), ("short name", lambda n, d: short(n) == short(d.name)))
    for node in nodes:
        found = None
        for how, test in tests:
            hits = [d for d in domains if test(node, d) and id(d) not in used]
            if len(hits) > 1:
                warnings.append(f"node {node!r} matches {len(hits)} domains by {how}: "
                                f"{', '.join(d.name for d in hits)}; map it by hand")
                break
            if hits:
                found = hits[0]
                break
        if found is None:
            if not any(w.startswith(f"node {node!r}") for w in warnings):
                warnings.append(f"node {node!r} matches no domain; map it by hand "
                                f"({node}:<domain>)")
            continue
        used.add(id(found))
        target = found.uuid if pacemaker_name_problem(found.name) and found.uuid else found.name
        pairs.append((node, target))
    return pairs, warnings


def cmd_host_map(argv: list, role: str = "xvm") -> int:
    """host-map [--nodes a,b] [--domains x,y] [agent options]: print a pcmk_host_map."""
    import subprocess
    nodes = domains = None
    rest = []
    it = iter(argv)
    for x in it:
        if x in ("--nodes", "--domains"):
            val = next(it, None)
            if val is None:
                raise UsageError(f"{x} needs a value")
            x = f"{x}={val}"
        if x.startswith("--nodes="):
            nodes = [n for n in x.split("=", 1)[1].replace(",", " ").split() if n]
        elif x.startswith("--domains="):
            domains = [HostInfo(n, "", 1) for n in x.split("=", 1)[1].replace(",", " ").split()]
        else:
            rest.append(x)
    setup_logging(f"fence_{role}", logging.WARNING)
    if nodes is None:
        try:
            out = subprocess.run(["crm_node", "-l"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UsageError(f"crm_node -l failed ({e}); give the node names with --nodes "
                             f"a,b,c") from None
        if out.returncode != 0:
            raise UsageError(f"crm_node -l failed: {' '.join(out.stderr.split()) or out.returncode}"
                             f"; give the node names with --nodes a,b,c")
        nodes = [line.split()[1] for line in out.stdout.splitlines() if len(line.split()) >= 2]
    if domains is None:
        a = AgentArgs(role)
        parse_argv(rest, a)
        a.set("action", "list")
        hosts = send_plan(plan_agent(a), Request.HOSTLIST)
        domains = hosts if isinstance(hosts, list) else []
    pairs, warnings = build_host_map(nodes, domains)
    for w in warnings:
        log.warning("%s", w)
    print("pcmk_host_map=\"" + ";".join(f"{n}:{t}" for n, t in pairs) + "\"")
    return ExitCode.FAIL if len(pairs) < len(nodes) else ExitCode.OK


def cmd_help(argv: list) -> int:
    """help: this list."""
    print(__doc__.strip())
    print("\ncommands:")
    for name, fn in COMMANDS.items():
        print(f"  {name:<14} {((fn.__doc__ or '').strip().splitlines() or [''])[0]}")
    return ExitCode.OK


COMMANDS.update({
    "virtd": cmd_virtd,
    "xvm": lambda argv: run_agent("xvm", argv),
    "virt": lambda argv: run_agent("virt", argv),
    "demo": cmd_demo,
    "keygen": cmd_keygen,
    "check-config": cmd_check_config,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "stonith-plugin": cmd_stonith_plugin,
    "doctor": cmd_doctor,
    "host-map": cmd_host_map,
    "help": cmd_help,
})
COMMANDS["xvm"].__doc__ = "fence_xvm: the multicast fence agent (stdin or options)"
COMMANDS["virt"].__doc__ = "fence_virt: the tcp/vsock/serial fence agent"


def role_of(argv0: str) -> str | None:
    """Role from the program name: fence_virtd, fence_xvm (fence_*xvm*), fence_virt.

    Any name inside a `.../stonith/plugins/external/` directory (a symlink or copy
    that cluster-glue runs as external/<name>) is the stonith plugin.
    """
    if os.path.dirname(os.path.abspath(argv0)).endswith("/stonith/plugins/external"):
        return "stonith-plugin"
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


ROLE_COMMANDS = {"doctor": cmd_doctor, "host-map": cmd_host_map}   # `fence_xvm doctor`


def run_role(argv: list) -> int:
    role = role_of(argv[0])
    args = argv[1:]
    if role is not None and args and args[0] in ROLE_COMMANDS:
        return ROLE_COMMANDS[args[0]](args[1:], role=role)
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
