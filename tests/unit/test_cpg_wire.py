"""Issue 8, pure parts: the C cpg backend's message layout (protocol.md §12), list merging,
the sim state_file, and the config checks of the cpg backend and owner-only answers."""
import struct

import pytest

import fencevirt as fv

UUID = "bbbbbbbb-0000-4000-8000-000000000001"


def test_request_layout_matches_c():
    m = fv.pack_cpg_fence(fv.CPG_REQUEST, 7, fv.CPG_TARGET_ALL, "vm-1", fv.Request.OFF,
                          req_seqno=0x01020304)
    assert len(m) == 156
    assert struct.unpack_from("<4I", m) == (0, 7, 0xFFFFFFFF, 0)
    assert m[16:20] == b"vm-1" and m[20:144] == b"\0" * 124
    assert struct.unpack_from("<iII", m, 144) == (1, 0x01020304, 0)
    assert fv.unpack_cpg_message(m) == fv.CpgFence(0, 7, 0xFFFFFFFF, "vm-1", 1, 0x01020304, 0)


def test_reply_carries_target_and_response():
    m = fv.pack_cpg_fence(fv.CPG_REPLY, 7, 2, "vm-1", fv.Request.STATUS, response=2)
    msg = fv.unpack_cpg_message(m)
    assert (msg.type, msg.seqno, msg.target, msg.response) == (1, 7, 2, 2)


def test_store_vm_layout_matches_c():
    m = fv.pack_cpg_vm("web", UUID.upper(), 3, fv.VirState.SHUTOFF)
    assert len(m) == 156
    assert struct.unpack_from("<4I", m)[0] == 2
    assert m[16:19] == b"web" and m[16 + 65:16 + 65 + 36] == UUID.upper().encode()
    assert m[146:148] == b"\0\0"                               # the 2 pad bytes
    assert struct.unpack_from("<Ii", m, 148) == (3, 5)          # s_owner, s_state
    assert fv.unpack_cpg_message(m) == fv.CpgVm(0, 0xFFFFFFFF, "web", UUID, 3, 5)
    gone = fv.unpack_cpg_message(fv.pack_cpg_vm("web", UUID, 3, fv.CPG_GONE))
    assert gone.state == -1


def test_store_vm_cuts_long_names_to_64_bytes():
    msg = fv.unpack_cpg_message(fv.pack_cpg_vm("x" * 100, UUID, 1, 1))
    assert msg.name == "x" * 64


@pytest.mark.parametrize("data,text", [
    (b"\0" * 155, "155 bytes"),
    (struct.pack("<4I", 9, 0, 0, 0) + b"\0" * 140, "type 9 unknown"),
])
def test_bad_messages_are_protocol_errors(data, text):
    with pytest.raises(fv.ProtocolError, match=text):
        fv.unpack_cpg_message(data)


def test_domain_too_long_for_a_request():
    with pytest.raises(fv.ProtocolError, match="127 bytes"):
        fv.pack_cpg_fence(fv.CPG_REQUEST, 1, fv.CPG_TARGET_ALL, "d" * 128, 1)


def test_merge_host_lists_running_copy_wins_and_sorted():
    H = fv.HostInfo
    a = [H("web", UUID, 5), H("db", "dddddddd-0000-4000-8000-000000000001", 1)]
    b = [H("web", UUID.upper(), 1), H("app", "eeeeeeee-0000-4000-8000-000000000001", 5)]
    merged = fv.merge_host_lists([a, b])
    assert [h.name for h in merged] == ["app", "db", "web"]
    assert merged[2].state == 1


def conf(text):
    return fv.parse_config(text, "test.conf")


def test_sim_state_file(tmp_path):
    st = tmp_path / "doms"
    st.write_text("# comment\na1 %s on\n" % UUID)
    b = fv.SimBackend(conf('backends { sim { state_file = "%s"; } }' % st))
    info = b.lookup("a1")
    b.destroy(info)
    assert st.read_text() == "a1 %s off\n" % UUID
    st.write_text("")                                  # "migrated away"
    with pytest.raises(fv.NoSuchDomain):
        b.lookup("a1")
    st.write_text("a1 not-a-uuid on\n")
    with pytest.raises(fv.BackendError, match="line 1: expected"):
        b.domains()
    st.unlink()
    with pytest.raises(fv.BackendError, match="No such file"):
        b.domains()


@pytest.mark.parametrize("body,text", [
    ('name_mode = "label";', "name_mode = 'label': use name or uuid"),
    ('no_owner = "succeed";', "no_owner = 'succeed': use fail or assume-off"),
    ('local = "xen";', "local = 'xen': use libvirt or sim"),
    ('timeout = "soon";', "timeout and settle are seconds"),
    ('name_mode = "uuid";', "uri is missing"),
])
def test_cpg_config_errors(body, text):
    with pytest.raises(fv.ConfigError, match=text):
        fv.CpgBackend(conf('fence_virtd { backend = "cpg"; } backends { cpg { %s } }' % body))


def test_cpg_keys_are_known_to_check_config(tmp_path):
    c = conf('fence_virtd { listener = "multicast"; backend = "cpg"; }\n'
             'listeners { multicast { key_file = "/k"; owner_only = "yes"; peers = "h2"; } }\n'
             'backends { cpg { local = "sim"; no_owner = "fail"; timeout = "5"; settle = "1";'
             ' name_mode = "uuid"; } sim { state_file = "/s"; } }')
    texts = [p.text for p in fv.check_config(c, fv.LISTENERS, fv.BACKENDS)]
    assert not [t for t in texts if "unknown key" in t or "uri" in t], texts


class _Server(object):
    def __init__(self, backend_name):
        self.backend = type("B", (), {"name": backend_name})()


@pytest.mark.parametrize("body,backend,on", [
    ('', "sim", False),
    ('peers = "198.18.8.2";', "sim", True),
    ('peers = "198.18.8.2";', "cpg", False),
    ('owner_only = "yes";', "sim", True),
    ('owner_only = "no"; peers = "h2 h3";', "libvirt", False),
])
def test_owner_only_rule(body, backend, on):
    blk = conf('listeners { multicast { hash = "none"; auth = "none"; %s } }'
               % body).node("listeners/multicast")
    lst = fv.MulticastListener(_Server(backend), blk, "test.conf")
    assert lst.owner_only_now() is on


def test_owner_only_bad_value():
    blk = conf('listeners { multicast { hash = "none"; auth = "none"; owner_only = "maybe"; '
               '} }').node("listeners/multicast")
    with pytest.raises(fv.ConfigError, match="owner_only = 'maybe': use auto, yes or no"):
        fv.MulticastListener(_Server("sim"), blk, "test.conf")
