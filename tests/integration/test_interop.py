"""All four pairings of daemon and client run the same scripted sequence.

C fence_virtd + C fence_xvm is the reference (test_c_reference.py and the expected values
in lab.SEQUENCE); here the other three pairings must give the same exit codes and the same
normalised output at every step:

* C fence_virtd + our fence_xvm,
* our fence_virtd + C fence_xvm,
* our fence_virtd + our fence_xvm,

with our daemon on the libvirt test driver through both libvirt-python builds (Debian's
python3-libvirt under /usr/bin/python3 and pip's libvirt-python in the test venv), and on a
real libvirtd with tiny qemu domains through both drivers (libvirt-python and virsh: the
test driver keeps its state per connection, so virsh, one process per call, is only
meaningful against a real libvirtd).
"""

import os
import sys

import pytest

from lab import (DEFAULT_DOMAINS, SEQUENCE, c_client, our_client, require, run_sequence,
                 sequence_confs, sequence_mismatches, start_c_daemon, start_our_daemon,
                 stop_all, wait_for)

SYSTEM_PYTHON = "/usr/bin/python3"
PLAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# (id, interpreter, env) for our daemon; both must import libvirt
DAEMON_PYTHONS = [
    ("debian-python3-libvirt", SYSTEM_PYTHON, {"FENCEVIRT_LIBVIRT_DRIVER": "python"}),
    ("pip-libvirt-python", sys.executable, {"FENCEVIRT_LIBVIRT_DRIVER": "python"}),
]


def _has_libvirt(python):
    import subprocess
    return subprocess.run([python, "-c", "import libvirt"], capture_output=True).returncode == 0


def ours_system_python(ns, args, stdin=None):
    """Our fence_xvm as Pacemaker runs it: /usr/bin/python3 and a plain PATH."""
    return our_client(ns, args, stdin=stdin, python=SYSTEM_PYTHON, env={"PATH": PLAIN_PATH})


def _check(results):
    assert [r.step.name for r in results] == [s.name for s in SEQUENCE]
    assert not sequence_mismatches(results), "\n".join(sequence_mismatches(results))


@pytest.fixture(autouse=True)
def _components():
    require("root", "netns", "c")


def test_c_daemon_our_client(lab, keyfile, node_xml, tmp_path):
    conf4, conf6 = sequence_confs(keyfile, node_xml)
    daemons = [start_c_daemon(lab.host, conf4, tmp_path / "v4")]
    try:
        daemons.append(start_c_daemon(lab.host, conf6, tmp_path / "v6"))
        results = run_sequence(lab, ours_system_python, *daemons)
    finally:
        stop_all(daemons)
    _check(results)


@pytest.mark.parametrize("client", [c_client, ours_system_python], ids=["C-client", "our-client"])
@pytest.mark.parametrize("pyid,python,env", DAEMON_PYTHONS, ids=[p[0] for p in DAEMON_PYTHONS])
def test_our_daemon(lab, keyfile, node_xml, tmp_path, client, pyid, python, env):
    if not _has_libvirt(python):
        pytest.fail(f"{python} cannot import libvirt ({pyid}); tests/run-all.sh installs it")
    conf4, conf6 = sequence_confs(keyfile, node_xml)
    daemons = [start_our_daemon(lab.host, conf4, tmp_path / "v4", python=python, env=env)]
    try:
        daemons.append(start_our_daemon(lab.host, conf6, tmp_path / "v6", python=python,
                                        env=env))
        results = run_sequence(lab, client, *daemons)

        def logs():
            return daemons[0].log() + daemons[1].log()
        # the audit line follows the reply, so the last one may lag the client's exit
        served = len(SEQUENCE) - 3            # all but wrong key, weak hash, wrong auth
        wait_for(lambda: logs().count("audit:") >= served, timeout=5,
                 what=f"{served} audit lines")
        logs = logs()
    finally:
        stop_all(daemons)
    _check(results)
    # every request was audited, and every dropped one says why and from where
    assert "drop from 198.18.0." in logs and "key mismatch" in logs, logs
    assert "hash too weak" in logs, logs
    assert "auth mismatch" in logs, logs


@pytest.mark.libvirtd
@pytest.mark.slow
@pytest.mark.parametrize("driver,client", [("virsh", c_client), ("python", ours_system_python),
                                           ("virsh", ours_system_python),
                                           ("python", c_client)],
                         ids=["virsh-C-client", "python-our-client", "virsh-our-client",
                              "python-C-client"])
def test_our_daemon_real_libvirtd(libvirtd, keyfile, tmp_path, driver, client):
    """The same sequence on real qemu domains (pcmk-1..4, pcmk-4 defined but off)."""
    for d in DEFAULT_DOMAINS:
        if d.name not in libvirtd.virsh("list", "--all", "--name").stdout.split():
            libvirtd.define(d.name, d.uuid, start=bool(d.running))
    lab_ = libvirtd.lab
    conf4, conf6 = sequence_confs(keyfile, libvirtd.URI)
    env = {"FENCEVIRT_LIBVIRT_DRIVER": driver}
    daemons = [start_our_daemon(lab_.host, conf4, tmp_path / "v4", python=SYSTEM_PYTHON,
                                env=env)]
    try:
        daemons.append(start_our_daemon(lab_.host, conf6, tmp_path / "v6",
                                        python=SYSTEM_PYTHON, env=env))
        assert f"libvirt ({driver})" in daemons[0].log()
        results = run_sequence(lab_, client, *daemons)
        states = {d.name: libvirtd.domstate(d.name) for d in DEFAULT_DOMAINS}
    finally:
        stop_all(daemons)
    _check(results)
    assert states == {"pcmk-1": "running", "pcmk-2": "running", "pcmk-3": "running",
                      "pcmk-4": "shut off"}, states


def test_demo_command_runs_on_loopback_without_root(tmp_path):
    """README command 1: the demo passes as an unprivileged user with no libvirt.

    It runs in a fresh network namespace that has only loopback, as user nobody, with
    the system Python: no root, and no packet can leave the machine.
    """
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            SYSTEM_PYTHON, os.path.join(repo, "fencevirt.py"), "demo"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       env={"PATH": PLAIN_PATH, "HOME": "/nonexistent"}, cwd="/")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "demo passed" in p.stdout, p.stdout
    assert "sim-2" in p.stdout and "Status: OFF" in p.stdout, p.stdout
