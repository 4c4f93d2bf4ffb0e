"""Three hosts (network namespaces, private directories each) quantize together: no shared output.

Each host runs its own `launch/multinode.sh` (torchrun --nnodes 3, c10d rendezvous on host 0),
gloo over the veth links. Every host sees its own directory at the same path, so the output and
work directories are per host, as on separate machines; rank 0 gathers the other ranks' shards
and the checkpoint must equal modelopt's single-process reference tensor for tensor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_tensors, read_json, tensor_differences, write_config
from netns import IFNAME, Hosts, why_namespaces_unavailable

RDZV_PORT = 29400


@pytest.fixture
def hosts(request):
    reason = why_namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(3)
    request.addfinalizer(hosts.close)
    return hosts


@pytest.mark.parametrize("transfer", ["process_group", "rsync"])
def test_three_hosts_without_shared_output(transfer, hosts, smol_dir, token_file, reference, tmp_path):
    local = tmp_path / "local"  # the same path on every host, a different directory behind it
    local.mkdir()
    host_dirs = [tmp_path / f"host{i}" for i in range(3)]
    config = write_config(
        tmp_path / "run.yaml", model=str(smol_dir), output=str(local / "out"), format="modelopt",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
        pipeline={"layers": [10, 12, 8], "backend": "gloo", "timeout_s": 300},
        gather={"transfer": transfer, "shared": "auto"},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": IFNAME,
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "NVFP4_PP_LOG": "INFO"}
    names = [f"host{i}" for i in range(3)]
    etc_hosts = hosts.hosts_file(tmp_path, names)
    procs = []
    for i, host_dir in enumerate(host_dirs):  # own hostname, /etc/hosts and directory at `local`
        host_dir.mkdir()
        argv = [str(REPO / "launch" / "multinode.sh"), str(config), "3", f"{names[0]}:{RDZV_PORT}"]
        binds = [(host_dir, local), (etc_hosts, Path("/etc/hosts"))]
        procs.append(subprocess.Popen(hosts.command(i, argv, binds=binds, hostname=names[i]), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # torchrun and its workers: the process group we started
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(log[-3000:] for log in logs)

    # Rank 0 did not see the others' work directories and pulled their shards.
    assert f"gather ({transfer}): received" in logs[0], logs[0][-3000:]
    out = host_dirs[0] / "out"
    assert not (host_dirs[1] / "out").exists() and not (host_dirs[2] / "out").exists()
    for host_dir in host_dirs:  # every host cleaned up its own work directory
        assert not (host_dir / "out.nvfp4_pp-work").exists(), list(host_dir.rglob("*"))
    assert list(local.iterdir()) == []  # nothing leaked through to the shared path

    ours = load_tensors(out)
    assert tensor_differences(ours, load_tensors(reference)) == []
    index = read_json(out / "model.safetensors.index.json")
    assert sorted(index["weight_map"]) == sorted(ours) and len(set(index["weight_map"].values())) == 3
    assert read_json(out / "config.json")["quantization_config"]["quant_algo"] == "NVFP4"
