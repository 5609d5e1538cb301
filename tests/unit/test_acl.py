"""The groups ACL (protocol.md §8.3, static_map.c): pure, from config text to answers.

The C daemon's answers on the same configs are checked live in
tests/integration/test_listeners.py (test_groups_acl_matches_c_daemon).
"""

import logging

import pytest

import fencevirt as fv

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
U3 = "33333333-3333-4333-8333-333333333333"
H1 = fv.HostInfo("pcmk-1", U1, 1)
H2 = fv.HostInfo("pcmk-2", U2, 1)
H3 = fv.HostInfo("pcmk-3", U3, 5)
G1, G2 = "198.18.0.11", "198.18.0.12"


def acl(groups_text):
    return fv.Acl.from_config(fv.parse_config(
        'fence_virtd { listener = "tcp"; }\ngroups {\n%s}\n' % groups_text, "acl.conf"))


TWO_GROUPS = """
    group { name = "one"; ip = "198.18.0.11"; uuid = "pcmk-1"; uuid = "%s"; }
    group { ip = "198.18.0.12"; uuid = "PCMK-3"; }
    group { name = "serial-guest"; uuid = "%s"; uuid = "pcmk-2"; }
""" % (U2, U1.upper())


@pytest.mark.parametrize("source, domain, allowed", [
    (G1, "pcmk-1", True),
    (G1, "PCMK-1", True),          # case-insensitive (libvirt then fails the lookup)
    (G1, U2, True),                # listed by UUID: allowed by UUID...
    (G1, "pcmk-2", False),         # ...but not by name (the string as sent)
    (G1, U2.upper(), True),
    (G1, "pcmk-3", False),
    (G2, "pcmk-3", True),
    (G2, "pcmk-1", False),
    ("198.18.0.13", "pcmk-1", False),   # unknown source: no group
    ("198.18.0.1", "pcmk-1", False),
    (U1, "pcmk-2", True),          # a serial guest: the source is its UUID
    (U1.upper(), "pcmk-2", True),
    (U1, "pcmk-1", False),
    (U2, "pcmk-2", False),
    ("3", "pcmk-1", False),        # a vsock CID with no group
])
def test_fencing_checks_the_domain_string_as_sent(source, domain, allowed):
    assert acl(TWO_GROUPS).allows(source, domain) is allowed


def test_list_matches_name_or_uuid():
    a = acl(TWO_GROUPS)
    pick = lambda src: [h.name for h in (H1, H2, H3) if a.allows_host(src, h)]  # noqa: E731
    assert pick(G1) == ["pcmk-1", "pcmk-2"]
    assert pick(G2) == ["pcmk-3"]
    # a serial guest's own UUID sits among the group's uuid entries, so it lists itself
    assert pick(U1) == ["pcmk-1", "pcmk-2"]
    assert pick("198.18.0.99") == []


def test_ip_entries_are_not_searched_for_a_uuid_source_and_back():
    a = acl('group { ip = "%s"; uuid = "pcmk-1"; }\ngroup { uuid = "198.18.0.11"; '
            'uuid = "pcmk-2"; }\n' % U3)
    assert not a.allows(U3, "pcmk-1")          # a UUID source looks at uuid entries only
    assert not a.allows(G1, "pcmk-2")          # an IP source looks at ip entries only


def test_vsock_cid_source():
    a = acl('group { ip = "3"; uuid = "pcmk-1"; }\n')
    assert a.allows("3", "pcmk-1")
    assert not a.allows("4", "pcmk-1")
    lst = fv.VsockListener.__new__(fv.VsockListener)
    assert lst.peer_source((3, 51234)) == "3"


def test_no_groups_means_open():
    a = fv.Acl.from_config(fv.parse_config('fence_virtd { listener = "tcp"; }\n', "x.conf"))
    assert not a.active()
    assert a.allows("203.0.113.9", "anything") and a.allows_host("x", H1)


def test_entries_are_cut_to_127_bytes():
    long_ip = "1" * 200
    a = acl('group { ip = "%s"; uuid = "%s"; }\n' % (long_ip, "d" * 127 + "TAIL"))
    assert a.allows("1" * 127, "d" * 127)
    assert not a.allows(long_ip, "d" * 127)


def test_empty_group_last_in_file_stops_loading_and_opens_the_acl(caplog):
    """C compat (static_map.c): group[1] is the last group in the file; an empty one ends
    the load, so nothing is loaded and the ACL is open. We say so loudly."""
    with caplog.at_level(logging.WARNING, logger="fencevirt"):
        a = acl('group { ip = "%s"; uuid = "pcmk-1"; }\ngroup { name = "empty"; }\n' % G1)
    assert not a.active()
    assert a.allows(G2, "pcmk-1")
    assert "NO group is in effect" in caplog.text and "'empty'" in caplog.text
    assert "line 2" in caplog.text or "line 3" in caplog.text


def test_empty_group_first_in_file_hides_nothing_below_it(caplog):
    with caplog.at_level(logging.WARNING, logger="fencevirt"):
        a = acl('group { name = "empty"; }\ngroup { ip = "%s"; uuid = "pcmk-1"; }\n' % G1)
    assert [g[0] for g in a.groups] == ["unnamed-1"]
    assert a.allows(G1, "pcmk-1") and not a.allows(G2, "pcmk-1")
    assert "nothing above it is ignored" in caplog.text


def test_empty_group_in_the_middle_hides_the_groups_above_it(caplog):
    with caplog.at_level(logging.WARNING, logger="fencevirt"):
        a = acl('group { name = "top"; ip = "%s"; uuid = "pcmk-2"; }\n'
                'group { name = "hole"; }\n'
                'group { name = "bottom"; ip = "%s"; uuid = "pcmk-1"; }\n' % (G2, G1))
    assert [g[0] for g in a.groups] == ["bottom"]
    assert not a.allows(G2, "pcmk-2")
    assert "ignoring top" in caplog.text


def test_valued_last_block_makes_c_skip_empty_groups(caplog):
    """C quirk: when the groups block's last sub-block carries a value, sc_get() of
    every group[n] succeeds, so an empty group is skipped instead of ending the load."""
    with caplog.at_level(logging.WARNING, logger="fencevirt"):
        a = acl('group { ip = "%s"; uuid = "pcmk-2"; }\ngroup { name = "hole"; }\n'
                'group = "valued" { ip = "%s"; uuid = "pcmk-1"; }\n' % (G2, G1))
    assert sorted(g[0] for g in a.groups) == ["unnamed-3", "valued"]
    assert a.allows(G2, "pcmk-2") and a.allows(G1, "pcmk-1")


def test_last_groups_block_wins():
    a = acl('group { ip = "%s"; uuid = "pcmk-1"; }\n}\ngroups {\n'
            'group { ip = "%s"; uuid = "pcmk-2"; }\n' % (G1, G2))
    assert not a.allows(G1, "pcmk-1") and a.allows(G2, "pcmk-2")


def test_handle_request_denies_without_calling_the_backend():
    backend = fv.SimBackend(None)
    a = acl('group { ip = "%s"; uuid = "sim-1"; }\n' % G1)
    req = fv.make_request(fv.Request.OFF, "sim-2")
    assert fv.handle_request(req, backend, a, G1, verify=1) == fv.Response.DENIED
    assert backend.lookup("sim-2").state == fv.VirState.RUNNING
    listed = fv.handle_request(fv.make_request(fv.Request.HOSTLIST), backend, a, G1, verify=1)
    assert [h.name for h in listed] == ["sim-1"]
    # null / devstatus are not checked against the ACL (C compat)
    assert fv.handle_request(fv.make_request(fv.Request.DEVSTATUS), backend, a, G2,
                             verify=1) == fv.Response.SUCCESS
