"""Pure tests of the discovery pieces that need no network: TXT codec, address choice, static discovery, CLI output."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperlane_lab.cli.discover import format_table, workers_to_json
from hyperlane_lab.discovery import Discovery, DiscoveryManager, StaticDiscovery
from hyperlane_lab.discovery.advertise import instance_label
from hyperlane_lab.discovery.net import choose_address, to_zeroconf_interfaces
from hyperlane_lab.discovery.static import parse_address
from hyperlane_lab.discovery.txt import KEYS, SERVICE_TYPE, decode_txt, encode_txt, parse_txt_wire, txt_serial
from hyperlane_lab.types import WorkerInfo

H100 = WorkerInfo(
    worker_id="gpu-box-0",
    host="10.0.0.5",
    grpc_port=50051,
    data_port=50052,
    device_kind="cuda",
    gpu_name="NVIDIA H100 80GB HBM3",
    total_memory=85_520_809_984,
    free_memory=84_000_000_000,
    compute_capability="9.0",
    host_ram=540_000_000_000,
    flops=7.56e14,
    mem_bw=3.35e12,
    shard_loaded=True,
    auth_required=True,
    protocol_version=1,
    device="cuda:0",
)


def _wire(props: dict[str, str]) -> bytes:
    """TXT RDATA per RFC 6763 §6: each 'key=value' string prefixed by its length byte (independent packer)."""
    out = b""
    for k, v in props.items():
        entry = f"{k}={v}".encode()
        out += bytes([len(entry)]) + entry
    return out


@st.composite
def worker_infos(draw: st.DrawFn) -> WorkerInfo:
    total = draw(st.integers(0, 2**50))
    free = draw(st.integers(0, total)) if total else draw(st.integers(0, 2**50))
    rate = st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False)
    return WorkerInfo(
        worker_id=draw(st.text(min_size=1, max_size=40)),
        host=draw(st.sampled_from(["10.0.0.1", "192.168.1.77", "127.0.0.1", "fe80::1"])),
        grpc_port=draw(st.integers(1, 65535)),
        data_port=draw(st.integers(0, 65535)),
        device_kind=draw(st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True)),
        gpu_name=draw(st.text(max_size=60)),
        total_memory=total,
        free_memory=free,
        compute_capability=draw(st.text(max_size=8)),
        host_ram=draw(st.integers(0, 2**50)),
        flops=draw(rate),
        mem_bw=draw(rate),
        shard_loaded=draw(st.booleans()),
        auth_required=draw(st.booleans()),
        protocol_version=1,
        device=draw(st.text(min_size=1, max_size=12)),
    )


@settings(max_examples=150, deadline=None)
@given(worker_infos())
def test_txt_round_trip_through_wire_format(info: WorkerInfo) -> None:
    props = encode_txt(info)
    assert set(props) == set(KEYS)
    assert decode_txt(props, info.host, srv_port=info.grpc_port) == info
    # through bytes, as received from the network
    assert decode_txt(parse_txt_wire(_wire(props)), info.host, srv_port=info.grpc_port) == info


def test_txt_round_trip_through_zeroconf_packing() -> None:
    from zeroconf import ServiceInfo

    si = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=H100.grpc_port, properties=encode_txt(H100))
    assert decode_txt(parse_txt_wire(si.text), H100.host, srv_port=si.port) == H100
    assert decode_txt(si.properties, H100.host, srv_port=si.port) == H100


def test_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    props = {k.upper(): v for k, v in encode_txt(H100).items()}
    props["future_field"] = "whatever"
    assert decode_txt(props, H100.host) == H100


GOOD = encode_txt(H100)


# ids are prefixed: a bare "gpu" id would match conftest's `"gpu" in item.keywords` skip
@pytest.mark.parametrize("key", sorted(KEYS), ids=lambda k: f"key-{k}")
def test_missing_key_is_rejected(key: str) -> None:
    props = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ValueError, match=repr(key)):
        decode_txt(props, H100.host)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("v", "2", "protocol version 2"),
        ("v", "0", "protocol version 0"),
        ("v", "one", "decimal int"),
        ("gp", "70000", "bad grpc port"),
        ("gp", "0", "bad grpc port"),
        ("gp", "-5", "decimal int"),
        ("dp", "5e3", "decimal int"),
        ("mt", "lots", "decimal int"),
        ("mf", "99999999999999", "exceeds total"),
        ("mf", " 12", "decimal int"),
        ("ram", "1.5", "decimal int"),
        ("fl", "nan", "finite"),
        ("fl", "inf", "finite"),
        ("bw", "-1.0", "finite and >= 0"),
        ("bw", "fast", "must be a float"),
        ("sh", "yes", "'0' or '1'"),
        ("au", "true", "'0' or '1'"),
        ("id", "", "empty"),
        ("dv", "", "empty"),
        ("dk", "CUDA!", "device kind"),
    ],
)
def test_garbage_values_are_rejected(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_txt({**GOOD, key: value}, H100.host)


def test_undecodable_and_valueless_entries_are_rejected() -> None:
    raw = {k.encode(): v.encode() for k, v in GOOD.items()}
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_txt({**raw, b"gpu": b"\xff\xfe"}, H100.host)
    with pytest.raises(ValueError, match="no value"):
        decode_txt({**raw, b"mt": None}, H100.host)
    with pytest.raises(ValueError, match="SRV port"):
        decode_txt(raw, H100.host, srv_port=H100.grpc_port + 1)
    with pytest.raises(ValueError, match="no address"):
        decode_txt(raw, "")


def test_encode_rejects_what_cannot_be_announced() -> None:
    with pytest.raises(ValueError, match="255-byte"):
        encode_txt(dataclasses.replace(H100, gpu_name="G" * 300))
    with pytest.raises(ValueError, match="free_memory"):
        encode_txt(dataclasses.replace(H100, free_memory=-1))
    with pytest.raises(ValueError, match="flops"):
        encode_txt(dataclasses.replace(H100, flops=math.nan))
    with pytest.raises(ValueError, match="device_kind"):
        encode_txt(dataclasses.replace(H100, device_kind="Cuda GPU"))


def test_txt_serial_reads_the_announcement_serial() -> None:
    def wire(*entries: bytes) -> bytes:
        return b"".join(bytes([len(e)]) + e for e in entries)

    assert txt_serial(wire(b"v=1", b"n=1795770948123")) == 1795770948123
    assert txt_serial(wire(b"N=7")) == 7  # keys are case-insensitive (RFC 6763 §6.4)
    assert txt_serial(wire(b"n=7", b"n=9")) == 7  # the first of a repeated key wins
    assert txt_serial(wire(b"v=1")) is None
    assert txt_serial(wire(b"n")) is None and txt_serial(wire(b"n=")) is None
    assert txt_serial(wire(b"n=-3")) is None and txt_serial(wire(b"n=1e3")) is None
    assert txt_serial(b"") is None


def test_parse_txt_wire_follows_rfc6763() -> None:
    data = b"\x03a=1" + b"\x01b" + b"\x02c=" + b"\x03a=2" + b"\x00"
    assert parse_txt_wire(data) == {b"a": b"1", b"b": None, b"c": b""}
    assert parse_txt_wire(b"") == {}


def test_choose_address_prefers_shared_subnet_then_non_loopback() -> None:
    addrs = ["172.17.0.1", "192.168.1.20", "10.77.0.3"]
    assert choose_address(addrs, ["192.168.1.5"]) == "192.168.1.20"
    assert choose_address(addrs, ["10.77.0.9"]) == "10.77.0.3"
    assert choose_address(["127.0.0.1", "10.0.0.2"]) == "10.0.0.2"
    assert choose_address(["127.0.0.1"], ["10.1.1.1"]) == "127.0.0.1"
    assert choose_address(["fe80::1"]) == "fe80::1"
    assert choose_address([]) == ""


def test_interfaces_argument_is_validated() -> None:
    from zeroconf import InterfaceChoice

    assert to_zeroconf_interfaces("all") is InterfaceChoice.All
    assert to_zeroconf_interfaces("Default") is InterfaceChoice.Default
    assert to_zeroconf_interfaces("127.0.0.1") == ["127.0.0.1"]
    assert to_zeroconf_interfaces("10.0.0.1, 10.0.0.2") == ["10.0.0.1", "10.0.0.2"]  # worker's --interfaces
    with pytest.raises(ValueError, match="neither 'all', 'default' nor an IP"):
        to_zeroconf_interfaces("eth0")
    with pytest.raises(ValueError, match="interfaces is empty"):
        to_zeroconf_interfaces([])


def test_instance_label_is_dns_safe_and_keeps_ids_distinct() -> None:
    assert instance_label("gpu-box_0") == "gpu-box_0"
    labels = {instance_label(x) for x in ("a.b", "a-b", "a b", "a/b", "x" * 100, "x" * 101)}
    assert len(labels) == 6
    for label in labels:
        assert len(label.encode()) <= 63
        assert all(c.isalnum() or c in "-_" for c in label)


# ---------------------------------------------------------------- static discovery


def _info(i: int) -> WorkerInfo:
    return WorkerInfo(worker_id=f"w{i}", host="10.0.0.1", grpc_port=50000 + i, data_port=51000 + i)


def test_static_discovery_reports_reachable_workers() -> None:
    table = {"10.0.0.1:50001": _info(1), "10.0.0.1:50000": _info(0)}

    def fetch(address: str) -> WorkerInfo:
        if address not in table:
            raise ConnectionError(f"connection refused: {address}")
        return table[address]

    sd = StaticDiscovery(["10.0.0.1:50001", "10.0.0.1:50000", "10.0.0.9:50051"], fetch)
    assert isinstance(sd, Discovery)
    assert sd.workers() == [_info(0), _info(1)]  # sorted by id, the unreachable one left out
    assert "refused" in sd.last_errors["10.0.0.9:50051"]
    assert sd.wait_for(2, timeout=1.0) == [_info(0), _info(1)]
    with pytest.raises(TimeoutError, match=r"found 2 of 3.*10\.0\.0\.9:50051: ConnectionError"):
        sd.wait_for(3, timeout=0.3)


def test_static_discovery_waits_for_a_worker_that_comes_up() -> None:
    calls = {"n": 0}

    def fetch(address: str) -> WorkerInfo:
        calls["n"] += 1
        if calls["n"] < 4:
            raise ConnectionError("not up yet")
        return _info(7)

    sd = StaticDiscovery(["localhost:50007"], fetch, poll_interval_s=0.01)
    assert sd.wait_for(1, timeout=5.0) == [_info(7)]
    assert calls["n"] == 4


def test_static_discovery_validates_input() -> None:
    with pytest.raises(ValueError, match="host:port"):
        StaticDiscovery(["10.0.0.1"], lambda a: _info(0))
    with pytest.raises(ValueError, match="at least one"):
        StaticDiscovery([], lambda a: _info(0))
    with pytest.raises(ValueError, match="duplicate"):
        StaticDiscovery(["h:1", "h:1"], lambda a: _info(0))
    with pytest.raises(ValueError, match="never succeed"):
        StaticDiscovery(["h:1"], lambda a: _info(0)).wait_for(2, 1.0)
    assert parse_address("[fe80::1]:50051") == ("fe80::1", 50051)
    sd = StaticDiscovery(["a:1", "b:2"], lambda a: _info(0))  # both answer with the same id
    assert sd.workers() == [_info(0)]
    assert "duplicate worker_id" in sd.last_errors["b:2"]


def test_discovery_manager_satisfies_protocol() -> None:
    assert isinstance(DiscoveryManager(interfaces="127.0.0.1"), Discovery)


# ---------------------------------------------------------------- CLI output


def test_cli_json_and_table() -> None:
    cpu = dataclasses.replace(_info(3), worker_id="a-cpu")
    text = workers_to_json([H100, cpu])
    items = json.loads(text)
    assert [d["worker_id"] for d in items] == ["a-cpu", "gpu-box-0"]
    assert items[1]["address"] == "10.0.0.5:50051"
    assert WorkerInfo(**{k: v for k, v in items[1].items() if k != "address"}) == H100
    table = format_table([H100, cpu]).splitlines()
    assert len(table) == 3 and table[0].startswith("ID")
    assert "10.0.0.5:50051" in table[2] and "78.2/79.6" in table[2] and "756.0" in table[2]
    assert "loaded" in table[2] and "NVIDIA H100 80GB HBM3" in table[2]


# ---------------------------------------------------------------- gRPC InfoReply -> WorkerInfo


def test_worker_info_from_reply_duck_typed_and_protobuf() -> None:
    from types import SimpleNamespace

    from hyperlane_lab.discovery import worker_info_from_reply

    fields = dataclasses.asdict(H100)
    reply = SimpleNamespace(**fields, versions="hyperlane_lab=0.1", sessions=3)
    assert worker_info_from_reply(reply) == H100
    assert worker_info_from_reply(reply, host="10.9.9.9") == dataclasses.replace(H100, host="10.9.9.9")
    with pytest.raises(ValueError, match="grpc_port"):
        worker_info_from_reply(SimpleNamespace(worker_id="x", host="h", data_port=1))
    pb = pytest.importorskip("hyperlane_lab.runtime.proto_gen.hyperlane_pb2")
    assert worker_info_from_reply(pb.InfoReply(**fields, versions="v", sessions=1)) == H100
