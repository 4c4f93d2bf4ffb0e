"""launch/slurm/nvfp4_pp.sbatch under a real Slurm: slurmctld and three slurmd, one per namespace host.

Each node is a network namespace with its own hostname (node0..node2) and /etc/hosts; munged uses
a private key and socket; slurm.conf lives in a temporary directory (SLURM_CONF). Debian's Slurm
is built without multiple-slurmd, so each slurmd gets a host of its own instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import REPO, load_tensors, tensor_differences, write_config
from netns import IFNAME, Hosts, why_namespaces_unavailable

NODES = ["node0", "node1", "node2"]
SLURM_CONF = """\
ClusterName=nvfp4pp
SlurmctldHost=node0({ctld_address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge/socket
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld on node0 + one slurmd per node; `close()` stops what it started."""

    def __init__(self, hosts: Hosts):
        self.hosts = hosts
        # munged insists every directory above its socket is world-executable: not pytest's 0700 tmp.
        self.base = Path(tempfile.mkdtemp(prefix="nvfp4pp-slurm-"))
        self.base.chmod(0o755)
        self.procs: list[subprocess.Popen] = []
        munge = self.base / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for d in ["state", *(f"spool-{n}" for n in NODES)]:
            (self.base / d).mkdir()
        self.conf = self.base / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(
            base=self.base, ctld_address=hosts.addresses[0],
            nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs=1 State=UNKNOWN" for n, a in zip(NODES, hosts.addresses)),
        ))
        self.etc_hosts = hosts.hosts_file(self.base, NODES)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        try:
            self._start_daemons(munge, key)
        except BaseException:
            self.close()
            raise

    def _start_daemons(self, munge: Path, key: Path) -> None:
        self._start(["munged", "-F", f"--socket={munge / 'socket'}", f"--key-file={key}",
                     f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}", f"--log-file={munge / 'log'}"])
        self._start(self.on(0, ["slurmctld", "-D", "-c"]))
        for i in range(len(NODES)):
            self._start(self.on(i, ["slurmd", "-D"]))
        self._wait_idle()

    def on(self, i: int, argv: list[str]) -> list[str]:
        """argv on node i (its namespace, hostname and /etc/hosts)."""
        return self.hosts.command(i, argv, binds=[(self.etc_hosts, Path("/etc/hosts"))], hostname=NODES[i])

    def _start(self, argv: list[str]) -> None:
        with open(self.base / f"daemon-{len(self.procs)}.out", "w") as log:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _wait_idle(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            result = subprocess.run(self.on(0, ["sinfo", "-h", "-o", "%T %D"]), env=self.env,
                                    capture_output=True, text=True)
            out = result.stdout.strip() + result.stderr.strip()
            if out == f"idle {len(NODES)}":
                return
            time.sleep(0.5)
        logs = "\n".join(f.read_text()[-1500:] for f in sorted(self.base.glob("*.log")))
        raise RuntimeError(f"Slurm nodes not idle after {timeout_s:.0f} s (sinfo: {out!r})\n{logs}")

    def sbatch(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.on(0, ["sbatch", "--wait", *args]), cwd=REPO, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        subprocess.run(self.on(0, ["scancel", "--full", "--user=root"]), env=self.env, capture_output=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(request):
    reason = why_namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; .ci/run installs slurm-wlm and munge")
    hosts = Hosts(len(NODES), prefix=f"nvsl{os.getpid() % 100000}h")
    request.addfinalizer(hosts.close)
    cluster = SlurmCluster(hosts)
    request.addfinalizer(cluster.close)
    return cluster


def job_env(log_dir: Path) -> dict:
    return {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "GLOO_SOCKET_IFNAME": IFNAME,
            "CUDA_VISIBLE_DEVICES": "", "LOG_DIR": str(log_dir), "NVFP4_PP_LOG": "INFO"}


def test_sbatch_quantizes_on_three_nodes(slurm, smol_dir, token_file, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml", model=str(smol_dir), output=str(out), format="modelopt",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
        pipeline={"layers": "auto", "backend": "gloo", "timeout_s": 300},
    )
    logs = tmp_path / "logs"
    result = slurm.sbatch(["--nodes=3", f"--output={tmp_path}/slurm-%j.out",
                           str(REPO / "launch" / "slurm" / "nvfp4_pp.sbatch"), str(config)],
                          job_env(logs), timeout=600)
    node_logs = sorted(logs.glob("nvfp4_pp-*-node*.log")) if logs.is_dir() else []
    detail = result.stdout + result.stderr + "".join(f"\n== {f.name}\n" + f.read_text()[-2500:] for f in node_logs)
    assert result.returncode == 0, detail
    assert [f.name.rsplit("-", 1)[1] for f in node_logs] == ["node0.log", "node1.log", "node2.log"], detail
    job_log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "rendezvous node0:29500" in job_log and f"GLOO_SOCKET_IFNAME={IFNAME}" in job_log, job_log
    assert "nothing to copy" in node_logs[0].read_text()  # one shared filesystem: nothing is transferred

    assert tensor_differences(load_tensors(out), load_tensors(reference)) == []


def test_job_exit_status_is_the_runs(slurm, smol_dir, tmp_path):
    config = write_config(tmp_path / "bad.yaml", model=str(smol_dir), output=str(tmp_path / "out"),
                          calibration={"samples": 0})
    logs = tmp_path / "logs"
    result = slurm.sbatch(["--nodes=3", f"--output={tmp_path}/slurm-%j.out",
                           str(REPO / "launch" / "slurm" / "nvfp4_pp.sbatch"), str(config)],
                          job_env(logs), timeout=300)
    assert result.returncode != 0
    node0 = next(logs.glob("nvfp4_pp-*-node0.log")).read_text()
    assert "nvfp4_pp: error: config key 'calibration.samples' must be >= 1, got 0" in node0, node0[-3000:]
