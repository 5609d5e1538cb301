"""The C fence-virt suite against itself: the reference every pairing is held to.

C fence_virtd + C fence_xvm / fence_virt (Debian 4.12.1), clients only inside
guest namespaces.  The expected values are the C results recorded in
/work/shared/protocol.md (sections 7 and 8.4) and kept in lab.SEQUENCE.
"""

import pytest

from lab import (SEQUENCE, c_client, expected_list, mcast_conf, norm_list, norm_status,
                 require, run_sequence, sequence_confs, sequence_mismatches, start_c_daemon,
                 stop_all, tcp_conf)


@pytest.fixture(autouse=True)
def _c_binaries():
    require("root", "netns", "c")


def test_sequence_c_daemon_c_client(lab, keyfile, node_xml, tmp_path):
    conf4, conf6 = sequence_confs(keyfile, node_xml)
    d4 = start_c_daemon(lab.host, conf4, tmp_path / "v4")
    d6 = None
    try:
        d6 = start_c_daemon(lab.host, conf6, tmp_path / "v6")
        results = run_sequence(lab, c_client, d4, d6)
    finally:
        stop_all([d4, d6])
    assert [r.step.name for r in results] == [s.name for s in SEQUENCE]
    assert not sequence_mismatches(results), "\n".join(sequence_mismatches(results))


def test_tcp_listener_fence_virt(lab, keyfile, node_xml, tmp_path):
    conf = tcp_conf(keyfile, node_xml, address=lab.host_ip)
    d = start_c_daemon(lab.host, conf, tmp_path)
    try:
        args = ["-T", lab.host_ip, "-k", keyfile, "-t", "3"]
        res = c_client(lab.guests[0], ["-o", "list"] + args, binary="fence_virt")
        assert res.rc == 0, res
        assert norm_list(res) == expected_list(), res
        res = c_client(lab.guests[1], ["-o", "off", "-n", "pcmk-1"] + args, binary="fence_virt")
        assert res.rc == 0, res
        res = c_client(lab.guests[0], ["-o", "status", "-n", "pcmk-1"] + args, binary="fence_virt")
        assert res.rc == 2, res
    finally:
        d.stop()


def test_daemon_start_failure_shows_its_log(lab, tmp_path):
    """A daemon that dies at start-up fails the test at once, with its own words."""
    with pytest.raises(AssertionError, match=r"(?s)exited with 255.*Failed to parse"):
        start_c_daemon(lab.host, "fence_virtd { listener = multicast; }\n", tmp_path)


TINY = ("fvtest-tiny1", "aaaaaaaa-0000-4000-8000-000000000001")


@pytest.mark.libvirtd
@pytest.mark.slow
def test_real_libvirtd_qemu_domain(libvirtd, keyfile, tmp_path):
    """C daemon on qemu:///system fences a real qemu TCG domain; virsh confirms."""
    the_lab = libvirtd.lab
    name, uuid = TINY
    libvirtd.define(name, uuid)
    assert libvirtd.domstate(name) == "running"
    d = start_c_daemon(the_lab.host, mcast_conf(keyfile, libvirtd.URI), tmp_path)
    g1, g2 = the_lab.guests
    xvm = ["-k", keyfile, "-t", "10"]
    try:
        res = c_client(g1, ["-o", "list"] + xvm)
        assert res.rc == 0 and (name, uuid, "on") in norm_list(res), res
        res = c_client(g1, ["-o", "off", "-H", name] + xvm)
        assert res.rc == 0, res
        assert libvirtd.domstate(name) == "shut off"
        res = c_client(g2, ["-o", "status", "-H", name] + xvm)
        assert (res.rc, norm_status(res)) == (2, ("Status: OFF",)), res
        res = c_client(g2, ["-o", "on", "-H", uuid, "-u"] + xvm)
        assert res.rc == 0, res
        assert libvirtd.domstate(name) == "running"
        res = c_client(g1, ["-o", "status", "-H", name] + xvm)
        assert (res.rc, norm_status(res)) == (0, ("Status: ON",)), res
        domid = libvirtd.virsh("domid", name, check=True).stdout.strip()
        res = c_client(g1, ["-o", "reboot", "-H", name] + xvm)
        assert res.rc == 0, res
        assert libvirtd.domstate(name) == "running"
        assert libvirtd.virsh("domid", name, check=True).stdout.strip() != domid, \
            "reboot did not restart the qemu domain"
    finally:
        d.stop()
