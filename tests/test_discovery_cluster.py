"""Discovery with real workers: LocalCluster on loopback, and hosts in network namespaces."""

from __future__ import annotations

import json
import sys
import time

import pytest

from hyperlane_lab.discovery import DiscoveryManager
from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster, WorkerClient
from tests.netns import NetnsLab, netns_available

pytestmark = pytest.mark.multiprocess


def test_local_cluster_workers_are_discovered(tmp_path, hf_greedy):
    with LocalCluster(
        2, cache_dir=tmp_path / "c", advertise=True, extra_args=["--interfaces", "127.0.0.1"]
    ) as cl:
        dm = DiscoveryManager(interfaces=["127.0.0.1"])
        dm.start_discovery()
        try:
            found = {w.worker_id: w for w in dm.wait_for(2, timeout=30)}
            for addr, wid in zip(cl.addresses, cl.worker_ids):
                assert wid in found
                info = WorkerClient(addr).worker_info()
                txt = found[wid]
                assert (txt.grpc_port, txt.data_port) == (info.grpc_port, info.data_port)
                assert txt.device_kind == info.device_kind == "cpu"
                assert txt.total_memory == info.total_memory and not txt.shard_loaded
            with AutoDistributedModel.from_pretrained(None, discovery=dm, n_workers=2, progress=False) as m:
                assert m.generate("Once upon a time", max_tokens=16).token_ids == hf_greedy(
                    "Once upon a time", 16
                )
                # loading a shard re-announces the TXT record
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not all(w.shard_loaded for w in dm.workers()):
                    time.sleep(0.2)
                assert all(w.shard_loaded for w in dm.workers())
            cl.stop_worker(0)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and cl.worker_ids[0] in dm.discovered_workers:
                time.sleep(0.2)
            assert cl.worker_ids[0] not in dm.discovered_workers
            assert cl.worker_ids[1] in dm.discovered_workers
        finally:
            dm.stop_discovery()


CLIENT = r"""
import json, sys
from hyperlane_lab.discovery import DiscoveryManager
from hyperlane_lab.runtime import AutoDistributedModel
dm = DiscoveryManager()
dm.start_discovery()
workers = dm.wait_for(2, timeout=40)
with AutoDistributedModel.from_pretrained(None, discovery=dm, n_workers=2, progress=False) as m:
    r = m.generate("Once upon a time", max_tokens=24)
    print(json.dumps({"ids": r.token_ids, "hosts": sorted(w.host for w in workers)}))
dm.stop_discovery()
"""


@pytest.mark.netns
def test_discovery_and_generation_across_namespaces(tmp_path, hf_greedy):
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with NetnsLab(3) as lab:
        for i in range(2):
            lab.popen(
                i,
                [
                    sys.executable,
                    "-m",
                    "hyperlane_lab.cli.main",
                    "worker",
                    "50051",
                    "--host",
                    lab.ip(i),
                    "--device",
                    "cpu",
                    "--cache-dir",
                    str(tmp_path / f"c{i}"),
                    "--id",
                    f"ns-worker-{i}",
                ],
                env={"OMP_NUM_THREADS": "1"},
            )
        out = lab.python(2, CLIENT, timeout=150)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["hosts"] == [lab.ip(0), lab.ip(1)]
        assert result["ids"] == hf_greedy("Once upon a time", 24)
