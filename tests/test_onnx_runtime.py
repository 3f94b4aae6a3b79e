"""The onnxruntime engine through the distributed runtime: shipped ONNX shards, mixed engines."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster, WorkerClient
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

pytestmark = pytest.mark.multiprocess

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(3, cache_dir=tmp_path_factory.mktemp("blobs")) as c:
        yield c


def test_onnx_engine_equals_torch_over_three_workers(cluster, hf_greedy):
    with AutoDistributedModel.from_pretrained(
        None, workers=cluster.addresses, engine="onnxruntime", progress=False
    ) as m:
        assert [r["engine"] for r in m.stage_table()] == ["onnxruntime"] * 3
        assert m.generate(PROMPT, max_tokens=40).token_ids == hf_greedy(PROMPT, 40)
    mixed = ["torch", "onnxruntime", "torch"]
    with AutoDistributedModel.from_pretrained(
        None, workers=cluster.addresses, engine=mixed, progress=False
    ) as m:
        assert [r["engine"] for r in m.stage_table()] == mixed
        assert m.generate(PROMPT, max_tokens=40).token_ids == hf_greedy(PROMPT, 40)


def test_bad_onnx_uploads_are_rejected(cluster, hf_greedy):
    from hyperlane_lab.onnx import export_stage
    from hyperlane_lab.types import LayerSpan

    c = WorkerClient(cluster.addresses[0])
    good = export_stage(None, LayerSpan(0, 2)).path.read_bytes()
    config = c.upload_blob(b'{"model_type": "llama"}')
    # 1. bytes that do not match the declared hash never enter the cache
    chunk = pb.BlobChunk(sha256="0" * 64, size=len(good), data=good)
    with pytest.raises(grpc.RpcError) as e:
        c.stub.PutBlob(iter([chunk]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "corrupted" in e.value.details()
    # 2. a valid shard loaded for the wrong span
    digest = c.upload_blob(good)
    req = pb.LoadShardRequest(start=2, end=4, engine="onnxruntime", config_sha256=config, onnx_sha256=digest)
    with pytest.raises(grpc.RpcError) as e:
        c.stub.LoadShard(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "span" in e.value.details()
    # 3. garbage that is not ONNX at all
    junk = c.upload_blob(b"not an onnx file" * 100)
    req = pb.LoadShardRequest(start=0, end=2, engine="onnxruntime", config_sha256=config, onnx_sha256=junk)
    with pytest.raises(grpc.RpcError) as e:
        c.stub.LoadShard(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hashlib.sha256(good).hexdigest() == digest
    c.close()
    # the workers survive and still serve
    with AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m:
        assert m.generate(PROMPT, max_tokens=12).token_ids == hf_greedy(PROMPT, 12)
