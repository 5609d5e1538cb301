"""Every registry entry is covered: a new listener, backend, command or option is tested
by default (style.md §3)."""

import subprocess
import sys

import pytest

from vectors import ROOT

sys.path.insert(0, ROOT)
import fencevirt  # noqa: E402

FENCEVIRT = f"{ROOT}/fencevirt.py"


@pytest.mark.parametrize("name", sorted(fencevirt.BACKENDS))
def test_backend_is_named_and_its_keys_are_known(name):
    assert fencevirt.BACKENDS[name].name == name
    assert f"backends/{name}" in fencevirt.KNOWN_KEYS


@pytest.mark.parametrize("name", sorted(fencevirt.LISTENERS))
def test_listener_is_named_and_its_keys_are_known(name):
    assert fencevirt.LISTENERS[name].name == name
    assert f"listeners/{name}" in fencevirt.KNOWN_KEYS


def test_unknown_listener_and_backend_are_config_errors_with_a_line():
    cfg = fencevirt.parse_config('fence_virtd {\n\tlistener = "nope";\n\tbackend = "nada";\n}\n',
                                 "x.conf")
    texts = [str(p) for p in fencevirt.check_config(cfg, fencevirt.LISTENERS,
                                                    fencevirt.BACKENDS)]
    assert any("line 2" in t and "nope" in t for t in texts), texts
    assert any("line 3" in t and "nada" in t for t in texts), texts


@pytest.mark.parametrize("name", sorted(fencevirt.COMMANDS))
def test_command_is_listed_by_help_and_refuses_a_bogus_option(name):
    fn = fencevirt.COMMANDS[name]
    assert (fn.__doc__ or "").strip(), f"{name} has no docstring for `help`"
    helped = subprocess.run([sys.executable, FENCEVIRT, "help"], capture_output=True,
                            text=True, timeout=30)
    assert helped.returncode == 0 and f"  {name} " in helped.stdout
    if name == "help":
        return
    p = subprocess.run([sys.executable, FENCEVIRT, name, "--no-such-option-xyz"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, (name, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert p.stderr.strip(), f"{name}: no message for a bogus option"


@pytest.mark.parametrize("role", ["xvm", "virt"])
def test_every_option_row_reaches_metadata_and_stdin(role):
    letter = fencevirt.ROLE_LETTER[role]
    meta = fencevirt.agent_metadata(role)
    for opt in fencevirt.AGENT_OPTIONS:
        if letter in opt.roles:
            assert f'<parameter name="{opt.name}"' in meta, opt.name
