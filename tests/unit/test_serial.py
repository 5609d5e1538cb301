"""Serial / VMChannel framing (protocol.md §6): pure helpers, and the listener and the
client reader over socket pairs with the in-memory `sim` backend (no libvirt, no root).

The same code against qemu-style unix sockets, a pty and the C binaries is in
tests/integration/test_listeners.py.
"""

import logging
import socket
import time

import pytest

import fencevirt as fv

U1 = "5a5a5a5a-0000-4000-8000-000000000001"
U2 = "5a5a5a5a-0000-4000-8000-000000000002"
REQ = fv.pack_serial_request(fv.Request.STATUS, "sim-2", 0x01020304)


def test_request_layout_matches_protocol_example():
    raw = fv.pack_serial_request(fv.Request.STATUS, "pr-alpha", 0x01020304)
    assert raw == (b"abba\x04\x00pr-alpha" + b"\0" * 56 + bytes.fromhex("04030201"))
    assert fv.unpack_serial_request(raw) == fv.SerialReq(fv.SERIAL_MAGIC, 4, 0, "pr-alpha",
                                                         0x01020304)


def test_list_reply_layout():
    hosts = [fv.HostInfo("sim-1", U1, 1)]
    data = fv.pack_serial_reply(hosts)
    assert data[:5] == b"abba\xfd" and data[-5:] == b"abba\x00"
    assert len(data) == 5 + 2 * fv.HOST_STATE_SIZE + 5
    assert fv.unpack_host_state(data[5:135]) == hosts[0]
    assert data[135:265] == b"\0" * 130
    assert fv.pack_serial_reply(fv.Response.DENIED) == b"abba\x03"


@pytest.mark.parametrize("stream, n_reqs, rest, skipped", [
    (REQ, 1, b"", 0),
    (REQ + REQ[:10], 1, REQ[:10], 0),
    (b"xyz" + REQ, 1, b"", 3),                  # C reads this as request 98 (desync)
    (b"xyzab" + REQ, 1, b"", 5),                # 'ab' before the magic: no backtrack trap
    (b"junk", 0, b"", 4),
    (b"junkab", 0, b"ab", 4),                   # a magic may be cut at the end
    (b"junkabb", 0, b"abb", 4),
    (REQ[:73], 0, REQ[:73], 0),
    (REQ + b"noise" + REQ, 2, b"", 5),
])
def test_split_serial_stream(stream, n_reqs, rest, skipped):
    reqs, left, n_skipped = fv.split_serial_stream(stream)
    assert (len(reqs), left, n_skipped) == (n_reqs, rest, skipped)
    assert all(r == REQ for r in reqs)


@pytest.mark.parametrize("directory, path, inside", [
    ("/var/run/fv", "/var/run/fv/dom.sock", True),
    ("/var/run/fv/", "/var/run/fv//dom.sock", True),
    ("var/run/fv", "/var/run/fv/dom.sock", True),
    ("/var/run/fv", "/var/run/fv/sub/dom.sock", False),     # directly inside only
    ("/var/run", "/var/run/fv/dom.sock", False),
    ("/var/run/fv", "/var/run/fvx/dom.sock", False),
    ("/", "/dom.sock", False),
    ("/var/run/fv", "dom.sock", False),
])
def test_in_directory(directory, path, inside):
    assert fv.in_directory(directory, path) is inside


DOM_XML = """<domain type='kvm'><name>g</name><devices>
  <serial type='pty'><target port='0'/></serial>
  <serial type='unix'><source mode='bind' path='/run/fv/g.serial'/><target port='1'/></serial>
  <serial type='unix'><source mode='connect' path='/run/fv/g.client'/></serial>
  <serial type='unix'><source mode='bind' path='/elsewhere/g.serial'/></serial>
  <console type='unix'><source mode='bind' path='/run/fv/g.serial'/></console>
  <channel type='unix'><source mode='bind' path='/run/fv/g.chan'/>
    <target type='guestfwd' address='10.0.2.179' port='1229'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
</devices></domain>"""


def test_serial_socket_paths_by_mode_and_directory():
    assert fv.serial_socket_paths(DOM_XML, False, None) == ["/run/fv/g.serial",
                                                           "/elsewhere/g.serial"]
    assert fv.serial_socket_paths(DOM_XML, False, "/run/fv") == ["/run/fv/g.serial"]
    assert fv.serial_socket_paths(DOM_XML, True, None) == ["/run/fv/g.chan"]
    with pytest.raises(fv.BackendError, match="unreadable domain XML"):
        fv.serial_socket_paths("<domain><devices>", False, None)


@pytest.mark.parametrize("text, parsed", [
    ("115200,8N1", (115200, 8, "N", 1)),
    ("9600", (9600, 8, "N", 1)),
    ("", (9600, 8, "N", 1)),
    (None, (9600, 8, "N", 1)),
    ("38400,7e2", (38400, 7, "E", 2)),
    ("57600,O15x", (57600, 5, "O", 1)),      # C reads the first three characters only
])
def test_parse_serial_params(text, parsed):
    assert fv.parse_serial_params(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("1200,8N1", "speed '1200' is not one of"),
    ("fast", "speed 'fast'"),
    ("9600,8N", "expected data bits, parity and stop bits"),
    ("9600,8X1", "'X' is not a data bit count"),
])
def test_parse_serial_params_errors(text, message):
    with pytest.raises(fv.UsageError, match=message):
        fv.parse_serial_params(text)


def chan_pair():
    a, b = socket.socketpair()
    b.setblocking(False)
    return a, fv.SerialChannel(b.fileno(), "pair", False, b)


def test_client_reader_backtracks_over_garbage():
    a, chan = chan_pair()
    with a, chan:
        a.sendall(b"xyzab" + b"abba" + b"\x02")       # the C client answers -1 here
        assert fv.read_serial_reply(chan, fv.Deadline(2)) == fv.Response.OFF


def test_client_reader_list_and_trailer():
    a, chan = chan_pair()
    with a, chan:
        a.sendall(b"\r\nlogin: " + fv.pack_serial_reply([fv.HostInfo("sim-1", U1, 1)]))
        assert fv.read_serial_reply(chan, fv.Deadline(2)) == [fv.HostInfo("sim-1", U1, 1)]


def test_client_reader_eof_and_timeout_say_what_happened():
    a, chan = chan_pair()
    with chan:
        a.sendall(b"abb")
        t0 = time.monotonic()
        with pytest.raises(fv.FenceTimeout, match="timed out waiting for the serial reply"):
            fv.read_serial_reply(chan, fv.Deadline(0.3))
        assert 0.25 < time.monotonic() - t0 < 2
        a.close()
        with pytest.raises(fv.ProtocolError, match="closed without a reply"):
            fv.read_serial_reply(chan, fv.Deadline(2))


SIM_CONF = """fence_virtd { listener = "serial"; backend = "sim"; }
listeners { serial { mode = "serial"; } }
groups { group { uuid = "%s"; uuid = "sim-1"; uuid = "sim-2"; } }
""" % U1


@pytest.fixture
def serial_listener():
    cfg = fv.parse_config(SIM_CONF, "sim.conf")
    server = fv.Server(cfg, fv.SimBackend(cfg))
    lst = fv.SerialListener(server, cfg.node("listeners/serial"), "sim.conf: serial")
    lst.start_reader()
    try:
        yield lst
    finally:
        lst.close()


def attach(lst, uuid, name):
    a, b = socket.socketpair()
    lst.attach(a, uuid, name, "pair-" + name)
    b.setblocking(False)
    return fv.SerialChannel(b.fileno(), "pair-" + name, False, b)


def ask(chan, request, domain, seqno, timeout=2.0):
    chan.write(fv.pack_serial_request(request, domain, seqno), fv.Deadline(1), "request")
    return fv.read_serial_reply(chan, fv.Deadline(timeout))


def test_listener_serves_and_applies_the_acl_by_domain_uuid(serial_listener):
    guest1 = attach(serial_listener, U1, "sim-1")
    guest2 = attach(serial_listener, U2, "sim-2")
    with guest1, guest2:
        assert ask(guest1, fv.Request.STATUS, "sim-2", 1) == fv.Response.SUCCESS
        assert [h.name for h in ask(guest1, fv.Request.HOSTLIST, "", 2)] == ["sim-1", "sim-2"]
        assert ask(guest2, fv.Request.STATUS, "sim-1", 3) == fv.Response.DENIED
        assert ask(guest2, fv.Request.HOSTLIST, "", 4) == []
        assert ask(guest1, fv.Request.OFF, "sim-2", 5) == fv.Response.SUCCESS
        assert ask(guest1, fv.Request.STATUS, "sim-2", 6) == fv.Response.OFF


def test_listener_resyncs_drops_partial_requests_and_duplicates(serial_listener, caplog):
    caplog.set_level(logging.INFO, logger="fencevirt")
    guest = attach(serial_listener, U1, "sim-1")
    other = attach(serial_listener, U2, "sim-2")
    with guest, other:
        guest.write(b"xyz" + fv.pack_serial_request(fv.Request.STATUS, "sim-1", 7),
                    fv.Deadline(1), "garbage + request")
        assert fv.read_serial_reply(guest, fv.Deadline(2)) == fv.Response.SUCCESS
        # half a request, then silence: the other domain is served meanwhile
        guest.write(fv.pack_serial_request(fv.Request.OFF, "sim-1", 8)[:30], fv.Deadline(1),
                    "half")
        t0 = time.monotonic()
        assert ask(other, fv.Request.DEVSTATUS, "", 9) == fv.Response.SUCCESS
        assert time.monotonic() - t0 < 0.5
        deadline = time.monotonic() + 3
        while "incomplete serial request" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "30 of 74 bytes" in caplog.text
        # after the discard a whole request is read cleanly
        assert ask(guest, fv.Request.STATUS, "sim-1", 10) == fv.Response.SUCCESS
        # the same (request, seqno, domain) again within 10 s gets no answer (C compat)
        with pytest.raises(fv.FenceTimeout):
            ask(guest, fv.Request.STATUS, "sim-1", 10, timeout=0.5)
        assert "3 bytes without the serial magic" in caplog.text
        assert "duplicate" in caplog.text


def test_listener_forgets_a_closed_socket(serial_listener, caplog):
    caplog.set_level(logging.INFO, logger="fencevirt")
    a, b = socket.socketpair()
    serial_listener.attach(a, U1, "sim-1", "pair-x")
    b.close()
    deadline = time.monotonic() + 3
    while serial_listener.chans and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not serial_listener.chans
    assert "qemu closed the socket" in caplog.text


def test_listener_mode_values():
    cfg = fv.parse_config('fence_virtd { listener = "serial"; backend = "sim"; }\n', "m.conf")
    server = fv.Server(cfg, fv.SimBackend(cfg))
    for text, vmchannel in (("serial", False), ("VMChannel", True), ("1", True), ("0", False),
                            ("-3", False)):
        blk = fv.parse_config('listeners { serial { mode = "%s"; } }\n' % text,
                              "m.conf").node("listeners/serial")
        lst = fv.SerialListener(server, blk, "m.conf: serial")
        assert lst.vmchannel is vmchannel
        assert lst.uri == fv.DEFAULT_URI
        lst.close()
    blk = fv.parse_config('listeners { serial { mode = "vmchanel"; } }\n',
                          "m.conf").node("listeners/serial")
    with pytest.raises(fv.ConfigError, match="mode = 'vmchanel': use \"serial\""):
        fv.SerialListener(server, blk, "m.conf: serial")
