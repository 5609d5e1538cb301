"""Shared fixtures.  `import lab` works in every test (tests/ is put on sys.path).

Skip-or-fail policy: a missing component (not root, no `ip netns`, no C
binaries, no libvirtd) skips the test with its reason locally, but FAILS under
CI (env CI set): a green run that skipped everything proves nothing.
"""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
for _p in (TESTS, os.path.dirname(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import lab  # noqa: E402


require = lab.require


@pytest.fixture(name="lab")
def lab_fixture():
    """A host namespace with br0 and two guests (lab.Lab), removed afterwards.

    The fixture shadows the module inside a test: use `from lab import ...`.
    """
    require("root", "netns")
    with lab.Lab(n_guests=2) as the_lab:
        yield the_lab


@pytest.fixture
def loopback_lab():
    """A single namespace with only lo (lab.Lab.loopback())."""
    require("root", "netns")
    with lab.Lab.loopback() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def module_lab():
    """Like `lab`, shared by a whole module (the libvirtd fixture lives in it)."""
    require("root", "netns")
    with lab.Lab(n_guests=2) as the_lab:
        yield the_lab


@pytest.fixture
def keyfile(tmp_path):
    """A fresh 512-byte key, mode 0600."""
    return lab.make_key(tmp_path / "fence_xvm.key")


@pytest.fixture
def node_xml(tmp_path):
    """URI test:///.../node.xml of lab.DEFAULT_DOMAINS (pcmk-1..3 running, pcmk-4 off)."""
    return lab.write_node_xml(tmp_path / "node.xml")


@pytest.fixture(scope="module")
def libvirtd(module_lab, tmp_path_factory):
    """A real libvirtd in module_lab's host namespace (TCP 198.18.0.1:16509, auth none).

    Holds the machine-wide libvirtd lock for the whole module.  Define domains
    with libvirtd.define(name, uuid); they are destroyed and undefined at the end.
    """
    require("root", "netns", "libvirtd")
    d = lab.Libvirtd(module_lab.host, tmp_path_factory.mktemp("libvirtd"))
    d.lab = module_lab
    with d:
        yield d
