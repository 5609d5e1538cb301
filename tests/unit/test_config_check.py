"""check_config(): one case per class of problem, each with its line number; the configs
the C daemon takes (Debian's default, the HowTo's) pass clean; fence_virtd -c over a pipe.

Everything here is pure or touches only tmp_path: no root, no network.
"""

import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fencevirt  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "tests", "data", "config")
GOOD = """\
fence_virtd {
	listener = "multicast";
	backend = "libvirt";
}
listeners {
	multicast {
		key_file = "/etc/cluster/fence_xvm.key";
		address = "225.0.0.12";
		port = "1229";
		family = "ipv4";
		interface = "virbr0";
	}
}
backends {
	libvirt {
		uri = "qemu:///system";
	}
}
"""


def check(text):
    cfg = fencevirt.parse_config(text, "t.conf")
    return fencevirt.check_config(cfg, fencevirt.LISTENERS, fencevirt.BACKENDS)


def replace_line(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


# (case id, old text, new text, expected line, error?, words in the message)
CASES = [
    ("hash", 'family = "ipv4";', 'family = "ipv4"; hash = "md5";', 10, True, "hash = 'md5'"),
    ("auth", 'port = "1229";', 'port = "1229"; auth = "sha3";', 9, True, "auth = 'sha3'"),
    ("family", 'family = "ipv4";', 'family = "ipv5";', 10, True, "use ipv4 or ipv6"),
    ("port-zero", 'port = "1229";', 'port = "0";', 9, True, "out of range"),
    ("port-big", 'port = "1229";', 'port = "99999";', 9, True, "silently use 34463"),
    ("port-word", 'port = "1229";', 'port = "http";', 9, True, "not a number"),
    ("address-bad", 'address = "225.0.0.12";', 'address = "225.0.0";', 8, True,
     "not a numeric"),
    ("address-unicast", 'address = "225.0.0.12";', 'address = "10.0.0.1";', 8, True,
     "not a multicast group"),
    ("address-family", 'address = "225.0.0.12";', 'address = "ff05::3:1";', 8, True,
     "not an ipv4 address"),
    ("uri", 'uri = "qemu:///system";', 'uri = "qemu system";', 16, True, "not a libvirt URI"),
    ("listener", 'listener = "multicast";', 'listener = "carrier-pigeon";', 2, True,
     "unknown listener 'carrier-pigeon'"),
    ("backend", 'backend = "libvirt";', 'backend = "xen";', 3, True, "unknown backend 'xen'"),
    ("backend-missing", '\tbackend = "libvirt";\n', '', 1, True, "backend = \"...\"; } is missing"),
    ("backend-timeout", 'backend = "libvirt";', 'backend = "libvirt"; backend_timeout = "-1";',
     3, True, "backend_timeout"),
    ("check-source", 'family = "ipv4";', 'family = "ipv4"; check_source = "perhaps";', 10,
     True, "check_source"),
    ("unknown-key", 'family = "ipv4";', 'family = "ipv4"; famliy = "ipv4";', 10, False,
     "unknown key 'famliy'"),
    ("unknown-section", "backends {", "backend {\n}\nbackends {", 14, False,
     "unknown section 'backend'"),
    ("repeated-key", 'port = "1229";', 'port = "1229"; port = "1230";', 9, False, "repeated"),
    ("atoi-number", 'backend = "libvirt";', 'backend = "libvirt"; foreground = "yes";', 3, False,
     "read as 0"),
]


@pytest.mark.parametrize("name,old,new,line,error,words", CASES, ids=[c[0] for c in CASES])
def test_each_class_names_its_line(name, old, new, line, error, words):
    assert check(GOOD) == []
    problems = check(replace_line(GOOD, old, new))
    hits = [p for p in problems if words in p.text]
    assert hits, problems
    assert hits[0].line == line, problems
    assert hits[0].error is error
    assert re.search(r"^t\.conf: line %d: " % line, str(hits[0])), str(hits[0])


def test_syntax_error_names_its_line():
    with pytest.raises(fencevirt.ConfigError) as info:
        fencevirt.parse_config(replace_line(GOOD, 'port = "1229";', 'port = "1229"'), "t.conf")
    assert "line 10" in str(info.value)


def test_inactive_listener_block_only_warns():
    text = GOOD + 'listeners {\n\ttcp {\n\t\tport = "0";\n\t}\n}\n'
    problems = check(text)
    bad_port = [p for p in problems if "out of range" in p.text]
    assert bad_port and not bad_port[0].error and "not in use" in bad_port[0].text


@pytest.mark.parametrize("name", ["ok-debian-default.conf", "ok-howto.conf"])
def test_configs_the_c_daemon_takes_are_clean(name):
    with open(os.path.join(CONFIG_DIR, name)) as f:
        assert check(f.read()) == []


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "fencevirt.py")] + list(args),
                          capture_output=True, text=True, timeout=30)


def test_check_config_command(tmp_path):
    good = os.path.join(CONFIG_DIR, "ok-debian-default.conf")
    res = run_cli("check-config", good)
    assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res
    bad = tmp_path / "bad.conf"
    bad.write_text(replace_line(replace_line(GOOD, 'port = "1229";', 'port = "0";'),
                                'backend = "libvirt";', 'backend = "xen";'))
    res = run_cli("check-config", str(bad))
    assert res.returncode == 1, res
    assert "bad.conf: line 3: unknown backend 'xen'" in res.stdout
    assert "bad.conf: line 9: port: 0 is out of range" in res.stdout
    assert "2 error(s), 0 warning(s)" in res.stdout
    syntax = tmp_path / "syntax.conf"
    syntax.write_text('fence_virtd {\n\tlistener = multicast;\n}\n')
    res = run_cli("virtd", "--check-config", "-f", str(syntax))
    assert res.returncode == 1 and "line 2" in res.stderr, res


# -- fence_virtd -c over a pipe (the pty run against both daemons is in integration)

def configure(path, answers):
    out = io.StringIO()
    rc = fencevirt.configure_interactive(str(path), io.StringIO(answers), out)
    return rc, out.getvalue()


def test_configure_from_scratch_takes_defaults(tmp_path):
    conf = tmp_path / "fence_virt.conf"
    rc, out = configure(conf, "y\n" + "\n" * 8 + "y\n")
    assert rc == 0, out
    assert "Parsing of %s failed." % conf in out
    for prompt in ("Module search path [/usr/lib/x86_64-linux-gnu/fence-virt/]: ",
                   "Listener module [multicast]: ", "Multicast IP Address [225.0.0.12]: ",
                   "Multicast IP Port [1229]: ", "Key File [/etc/cluster/fence_xvm.key]: ",
                   "Backend module [libvirt]: ", "Libvirt URI [qemu:///system]: ",
                   "Replace %s with the above [y/N]? " % conf):
        assert prompt in out
    assert oct(os.stat(str(conf)).st_mode & 0o777) == "0o600"
    text = conf.read_text()
    # the C daemon's dump order (protocol.md §9.3), byte for byte as C fence_virtd -c wrote it
    assert text.startswith('backends {\n\tlibvirt {\n\t\turi = "qemu:///system";\n\t}\n\n}\n\n'
                           'listeners {\n\tmulticast {\n\t\tkey_file = '), text
    assert check(text) == []


def test_configure_keeps_old_file_on_no_and_reprompts_bad_answers(tmp_path):
    conf = tmp_path / "fence_virt.conf"
    conf.write_text(GOOD)
    answers = ("\n" "\n"                       # module path, listener
               "10.1.2.3\n" "225.0.0.13\n"     # not multicast -> asked again
               "0\n" "1300\n"                  # port out of range -> asked again
               "none\n" "/k\n" "\n" "test:///default\n" "n\n")
    rc, out = configure(conf, answers)
    assert rc == 1
    assert "'10.1.2.3' is not a multicast address!" in out
    assert "Port value '0' is out of range" in out
    assert "Interface [virbr0]: " in out          # the current value is offered
    assert conf.read_text() == GOOD
    assert 'port = "1300";' in out and 'interface' not in out.split("=== Begin")[1]


def test_configure_end_of_input_in_a_loop_fails(tmp_path):
    with pytest.raises(fencevirt.UsageError) as info:
        configure(tmp_path / "x.conf", "y\n\nbogus\n")   # bogus listener, then EOF
    assert "Listener module" in str(info.value)
