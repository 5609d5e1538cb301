"""cluster-glue external plugin mode (issue #7): the pure parts, and the ops that need
no hypervisor, run in-process through main() as cluster-glue runs them (argv + env).
"""

import os
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fencevirt  # noqa: E402
from fencevirt import UsageError  # noqa: E402

PLUGIN = fencevirt.GLUE_PLUGIN_DIR + "/fencevirt"

# ---------------------------------------------------------------------------
# hostlist


@pytest.mark.parametrize("text, want", [
    ("node1", [("node1", "node1")]),
    ("node1:vm1 node2", [("node1", "vm1"), ("node2", "node2")]),
    ("node1:vm1,node2:vm2", [("node1", "vm1"), ("node2", "vm2")]),
    (" a:A ,, b:B\tc ", [("a", "A"), ("b", "B"), ("c", "c")]),
    ("Node-A:TinyVM", [("Node-A", "TinyVM")]),                 # domain keeps its case
    ("n:qemu:odd", [("n", "qemu:odd")]),                      # node ends at the first ':'
    ("n:aaaaaaaa-0000-4000-8000-000000000001",
     [("n", "aaaaaaaa-0000-4000-8000-000000000001")]),
])
def test_parse_hostlist(text, want):
    assert fencevirt.parse_hostlist(text) == want


@pytest.mark.parametrize("text, message", [
    ("", "hostlist is empty"),
    (" , ", "hostlist is empty"),
    (":vm1", "node name before ':' is empty"),
    ("node1:", "domain after ':' is empty"),
    ("node1:a node1:b", "names node 'node1' twice"),
    ("Node1 node1:b", "case-insensitive"),
])
def test_parse_hostlist_rejects(text, message):
    with pytest.raises(UsageError, match=message):
        fencevirt.parse_hostlist(text)


def test_hostlist_domain_is_case_insensitive_for_nodes_only():
    hosts = fencevirt.parse_hostlist("Node-A:TinyVM node-b")
    # stonith(8) lowercases the node name it passes; the domain keeps its case
    assert fencevirt.hostlist_domain(hosts, "node-a") == "TinyVM"
    assert fencevirt.hostlist_domain(hosts, "NODE-B") == "node-b"
    with pytest.raises(UsageError, match=r"'node-c' is not in hostlist \(Node-A node-b\)"):
        fencevirt.hostlist_domain(hosts, "node-c")


# ---------------------------------------------------------------------------
# parameters from the environment

ENV = {"hostlist": "n1:vm1 n2", "hypervisor_uri": "qemu+tcp://198.18.0.1/system"}


def test_glue_params_defaults():
    p = fencevirt.glue_params(ENV)
    assert p == fencevirt.GlueParams([("n1", "vm1"), ("n2", "n2")],
                                     "qemu+tcp://198.18.0.1/system", "power_cycle")


@pytest.mark.parametrize("extra, method", [
    ({"reset_method": "reboot"}, "reboot"),
    ({"reset_method": "power_cycle"}, "power_cycle"),
    ({"reboot_method": "reboot"}, "reboot"),        # the name cluster-glue's script prints
    ({"reset_method": "Reboot", "reboot_method": "reboot"}, "reboot"),
    ({"reset_method": ""}, "power_cycle"),
])
def test_glue_params_reset_method(extra, method):
    assert fencevirt.glue_params(dict(ENV, **extra)).reset_method == method


@pytest.mark.parametrize("env, message", [
    ({"hypervisor_uri": "qemu:///system"}, "hostlist is missing"),
    ({"hostlist": "n1"}, "hypervisor_uri is missing"),
    (dict(ENV, hypervisor_uri="qemu+tcp//198.18.0.1/system"), "is not a libvirt URI"),
    (dict(ENV, hypervisor_uri="198.18.0.1"), "is not a libvirt URI"),
    (dict(ENV, reset_method="cycle"), "unrecognized reset_method 'cycle'"),
    (dict(ENV, reboot_method="hard"), "unrecognized reboot_method 'hard'"),
    (dict(ENV, reset_method="reboot", reboot_method="power_cycle"), "disagree"),
])
def test_glue_params_rejects(env, message):
    with pytest.raises(UsageError, match=message):
        fencevirt.glue_params(env)


def test_gethosts_needs_no_uri():
    assert fencevirt.glue_params({"hostlist": "n1"}, need_uri=False).uri == ""


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+tcp://198.18.0.1/system",
                                 "qemu+ssh://root@h:22/system?keyfile=/k", "test:///default",
                                 " xen://h/ "])
def test_check_hypervisor_uri_accepts(uri):
    assert fencevirt.check_hypervisor_uri(uri) == uri.strip()


# ---------------------------------------------------------------------------
# role and registry


@pytest.mark.parametrize("argv0, role", [
    (PLUGIN, "stonith-plugin"),
    ("/usr/lib/stonith/plugins/external/libvirt", "stonith-plugin"),
    ("/usr/lib64/stonith/plugins/external/fence_xvm", "stonith-plugin"),
    ("/usr/sbin/fence_xvm", "xvm"),
    ("/usr/lib/stonith/plugins/fencevirt", None),
    ("/tmp/external/fencevirt", None),
])
def test_role_of(argv0, role):
    assert fencevirt.role_of(argv0) == role


def test_every_cluster_glue_op_is_served():
    # the ops external.c runs (lib/plugins/stonith/external.c)
    ops = {"gethosts", "reset", "on", "off", "status", "getconfignames", "getinfo-devid",
           "getinfo-devname", "getinfo-devdescr", "getinfo-devurl", "getinfo-xml"}
    assert set(fencevirt.GLUE_OPS) == ops
    assert fencevirt.COMMANDS["stonith-plugin"] is fencevirt.cmd_stonith_plugin


def test_info_xml_is_well_formed_and_names_every_config_name():
    root = ET.fromstring(fencevirt.glue_info_xml())
    names = [p.get("name") for p in root.findall("parameter")]
    assert tuple(names) == fencevirt.GLUE_CONFIG_NAMES
    assert root.find("parameter[@name='reset_method']/content").get("default") == "power_cycle"


# ---------------------------------------------------------------------------
# ops without a hypervisor, in-process through main() with cluster-glue's calling shape


@pytest.fixture
def glue_env(monkeypatch):
    for k in ("hostlist", "hypervisor_uri", "reset_method", "reboot_method"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("hostlist", "Node-A:TinyVM,node-b")
    monkeypatch.setenv("hypervisor_uri", "qemu+tcp://198.18.0.1/system")
    return monkeypatch


def test_gethosts_and_info_ops(glue_env, capsys):
    assert fencevirt.main([PLUGIN, "gethosts"]) == 0
    assert capsys.readouterr().out == "Node-A\nnode-b\n"
    assert fencevirt.main([PLUGIN, "getconfignames"]) == 0
    assert capsys.readouterr().out == "hostlist hypervisor_uri reset_method\n"
    for op in ("getinfo-devid", "getinfo-devname", "getinfo-devdescr", "getinfo-devurl"):
        assert fencevirt.main([PLUGIN, op]) == 0
        assert capsys.readouterr().out.strip()
    assert fencevirt.main([PLUGIN, "getinfo-xml"]) == 0
    ET.fromstring(capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    ([], "unknown plugin operation ''"),
    (["bogus"], "unknown plugin operation 'bogus'"),
    (["reset"], "reset needs exactly one node name"),
    (["off", "a", "b"], "off needs exactly one node name"),
    (["off", "node-c"], "'node-c' is not in hostlist"),
])
def test_bad_calls_fail_before_any_action(glue_env, capsys, argv, message):
    assert fencevirt.main([PLUGIN] + argv) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert message in out.err


def test_bad_parameters_fail_before_any_action(glue_env, capsys):
    glue_env.setenv("hypervisor_uri", "qemu+tcp//198.18.0.1/system")
    assert fencevirt.main([PLUGIN, "off", "node-a"]) == 1
    assert "is not a libvirt URI" in capsys.readouterr().err
    glue_env.setenv("hostlist", "")
    assert fencevirt.main([PLUGIN, "gethosts"]) == 1
    assert "hostlist is missing or empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# fence_xvm --hypervisor-uri: the plan (no key is read in direct mode)


def _plan(*argv):
    a = fencevirt.AgentArgs("xvm")
    fencevirt.parse_argv(list(argv), a)
    return fencevirt.plan_agent(a)


def test_direct_mode_plan_needs_no_key():
    p = _plan("--hypervisor-uri", "qemu+tcp://198.18.0.1/system", "-o", "off", "-n", "vm1",
              "-k", "/nonexistent/key")
    assert (p.mode, p.uri, p.domain, p.action) == (
        "libvirt", "qemu+tcp://198.18.0.1/system", "vm1", "off")


def test_direct_mode_plan_from_stdin():
    a = fencevirt.AgentArgs("xvm")
    fencevirt.parse_stdin("action=reboot\nport=vm1\nhypervisor_uri=qemu:///system\n", a)
    p = fencevirt.plan_agent(a)
    assert (p.mode, p.uri, p.domain) == ("libvirt", "qemu:///system", "vm1")


def test_direct_mode_plan_rejects_a_uri_typo():
    with pytest.raises(UsageError, match="is not a libvirt URI"):
        _plan("--hypervisor-uri", "qemu+tcp:/198.18.0.1/system", "-o", "off", "-n", "vm1")


def test_hypervisor_uri_is_in_fence_xvm_metadata_after_the_c_parameters():
    root = ET.fromstring(fencevirt.agent_metadata("xvm"))
    names = [p.get("name") for p in root.iter("parameter")]
    assert names.index("hypervisor_uri") > names.index("domain")
    p = root.find(".//parameter[@name='hypervisor_uri']")
    assert p.find("getopt").get("mixed") == "--hypervisor-uri=[hypervisor_uri]"
    assert "hypervisor_uri" not in [p.get("name") for p in
                                    ET.fromstring(fencevirt.agent_metadata("virt"))
                                    .iter("parameter")]
