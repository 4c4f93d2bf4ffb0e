"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs on a bridge.

Every address lives inside namespaces created here (10.77.0.0/24 on a bridge in the first
namespace); nothing is routed anywhere else. Each host can also get its own hostname and private
views of directories (bind mounts inside its own mount namespace), so files one host writes there
are invisible to the others, as on separate machines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SUBNET = "10.77.0"
IFNAME = "nv0"  # the interface joining the hosts, in every namespace (GLOO_SOCKET_IFNAME)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def why_namespaces_unavailable() -> str | None:
    """None if this machine lets us create and use a network namespace, else the reason."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing; .ci/run installs it"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"nvfp4pp-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"this machine forbids network namespaces: ip netns add: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """`count` namespaces `<prefix>0..`, host i at 10.77.0.(i+1) on interface nv0; `close()` removes all."""

    def __init__(self, count: int, prefix: str | None = None):
        self.prefix = prefix or f"nvpp{os.getpid() % 100000}h"
        self.names = [f"{self.prefix}{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.names:
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
        hub = self.names[0]
        _ip("link", "add", IFNAME, "type", "bridge", ns=hub)
        _ip("addr", "add", f"{self.addresses[0]}/24", "dev", IFNAME, ns=hub)
        _ip("link", "set", IFNAME, "up", ns=hub)
        for i, ns in enumerate(self.names[1:], 1):
            near, far = f"{self.prefix}a{i}", f"{self.prefix}b{i}"  # created in our namespace, moved at once
            _ip("link", "add", near, "netns", hub, "type", "veth", "peer", "name", far, "netns", ns)
            _ip("link", "set", near, "master", IFNAME, "up", ns=hub)
            _ip("link", "set", far, "name", IFNAME, ns=ns)
            _ip("addr", "add", f"{self.addresses[i]}/24", "dev", IFNAME, ns=ns)
            _ip("link", "set", IFNAME, "up", ns=ns)

    def hosts_file(self, directory: Path, names: list[str]) -> Path:
        """An /etc/hosts naming the hosts (bind it over /etc/hosts with `command(..., binds=...)`)."""
        path = Path(directory) / "hosts"
        path.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addresses, names)))
        return path

    def command(self, i: int, argv: list[str], binds: list[tuple[Path, Path]] = (), hostname: str = "") -> list[str]:
        """argv on host i: its network namespace, plus its own mount and UTS namespaces where each
        (source, target) of `binds` is bind-mounted (seen by this host only) and `hostname` is set.

        `nsenter --net` (not `ip netns exec`) keeps the machine's /sys, so cgroups stay visible.
        """
        script = ('set -e; name=$1; shift; while [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done; '
                  'shift; if [ -n "$name" ]; then hostname "$name"; fi; exec "$@"')
        pairs = [str(p) for pair in binds for p in pair]
        return ["nsenter", f"--net=/run/netns/{self.names[i]}", "unshare", "--mount", "--uts",
                "--propagation", "private", "sh", "-c", script, "sh", hostname, *pairs, "--", *argv]

    def close(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
