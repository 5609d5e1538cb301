"""Two hypervisor namespaces + one guest on a bridge, corosync per host (issue 8).

Namespaces are named i8<pid % 10000>-{br,h1,h2,g1}; addresses 198.18.8.0/24 exist only
inside them.  Every process is stopped by its PID.  See /work/shared/testlab.md
"Two-node corosync and CPG in namespaces" for the recipe this follows.
"""
import os
import subprocess
import time
from pathlib import Path

import lab

PREFIX = "i8%d" % (os.getpid() % 10000)
HOSTS = {"h1": "198.18.8.1", "h2": "198.18.8.2"}
GUEST = ("g1", "198.18.8.11")

COROSYNC_CONF = """totem {
	version: 2
	cluster_name: %(prefix)s
	transport: knet
	crypto_cipher: none
	crypto_hash: none
	token: 1000
	interface {
		linknumber: 0
		knet_ping_interval: 100
		knet_ping_timeout: 300
		knet_pong_count: 1
	}
}
logging {
	to_stderr: yes
	to_syslog: no
	timestamp: hires
}
quorum {
	provider: corosync_votequorum
	two_node: 1
}
system {
	state_dir: %(state)s
}
nodelist {
	node {
		name: %(prefix)s-h1
		nodeid: 1
		ring0_addr: 198.18.8.1
	}
	node {
		name: %(prefix)s-h2
		nodeid: 2
		ring0_addr: 198.18.8.2
	}
}
"""


class Topology(object):
    """netns br (bridge only), h1, h2 (hypervisors), g1 (guest); all eth0 on one bridge."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.ns = {}
        self.procs = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _add(self, name):
        full = "%s-%s" % (PREFIX, name)
        lab.run(None, ["ip", "netns", "del", full], timeout=20)        # stale, same prefix
        lab.run(None, ["ip", "netns", "add", full], timeout=20, check=True)
        self.ns[name] = full
        return full

    def _build(self):
        br = self._add("br")
        lines = ["link set lo up", "link add br0 type bridge mcast_snooping 0",
                 "link set br0 up"]
        members = list(HOSTS.items()) + [GUEST]
        for name, _addr in members:
            self._add(name)
        for i, (name, _addr) in enumerate(members):
            lines += ["link add p%d type veth peer name eth0 netns %s" % (i, self.ns[name]),
                      "link set p%d master br0" % i, "link set p%d up" % i]
        lab._ip_batch(br, lines)
        for name, addr in members:
            lab._ip_batch(self.ns[name], ["link set lo up", "addr add %s/24 dev eth0" % addr,
                                          "link set eth0 up",
                                          "route add 224.0.0.0/4 dev eth0"])

    @property
    def guest(self):
        return self.ns["g1"]

    def start_corosync(self, host):
        """corosync in host's netns with a private /run (bind mount) and state_dir."""
        d = self.workdir / ("corosync-" + host)
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(parents=True, exist_ok=True)
        conf = d / "corosync.conf"
        conf.write_text(COROSYNC_CONF % {"prefix": PREFIX, "state": d / "state"})
        log = d / "corosync.log"
        with open(str(log), "ab") as out:
            proc = subprocess.Popen(
                lab.ns_argv(self.ns[host], ["sh", "-c", "mount --bind %s /run && exec corosync "
                                            "-f -c %s" % (d / "run", conf)]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = log
        self.procs.append(proc)
        return proc

    def members(self, host):
        res = lab.run(self.ns[host], ["corosync-quorumtool", "-s"], timeout=10)
        for line in res.stdout.splitlines():
            if line.startswith("Nodes:"):
                return int(line.split()[1])
        return 0

    def wait_members(self, n, hosts=("h1", "h2"), timeout=15):
        for h in hosts:
            lab.wait_for(lambda: self.members(h) == n, timeout=timeout,
                         what="%d corosync members seen from %s" % (n, h))

    def stop(self, proc, timeout=10):
        lab.stop_by_pid(proc, timeout)
        # a SIGKILLed corosync leaves its libqb files in the shared /dev/shm
        for p in Path("/dev/shm").glob("qb-%d-*" % proc.pid):
            lab.run(None, ["rm", "-rf", str(p)], timeout=10)
        for p in Path("/dev/shm").glob("qb-corosync-%d-*" % proc.pid):
            lab.run(None, ["rm", "-rf", str(p)], timeout=10)

    def close(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                self.stop(proc)
        for name in ("g1", "h2", "h1", "br"):
            ns = self.ns.get(name)
            if not ns:
                continue
            res = lab.run(None, ["ip", "netns", "pids", ns], timeout=20)
            for pid in res.stdout.split():
                lab.stop_by_pid(int(pid), timeout=5)
            lab.run(None, ["ip", "netns", "del", ns], timeout=20)
        self.ns = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sim_conf(key_file, state_file, backend="sim", listener_extra="", cpg_extra=""):
    """fence_virt.conf for our daemon: multicast on eth0, sim domains from state_file."""
    return ('fence_virtd {\n\tlistener = "multicast";\n\tbackend = "%s";\n}\n'
            'listeners {\n\tmulticast {\n\t\tkey_file = "%s";\n\t\tinterface = "eth0";\n'
            '\t\taddress = "225.0.0.12";\n\t\tport = "1229";\n%s\t}\n}\n'
            'backends {\n\tsim {\n\t\tstate_file = "%s";\n\t}\n'
            '\tcpg {\n\t\tlocal = "sim";\n%s\t}\n}\n'
            % (backend, key_file, listener_extra, state_file, cpg_extra))


def write_state(path, domains):
    """domains: [(name, uuid, 'on'|'off')] -> the sim state_file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join("%s %s %s\n" % d for d in domains))
    os.replace(str(tmp), str(path))


def now_ms(t0):
    return (time.monotonic() - t0) * 1000
