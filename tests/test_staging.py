"""The staging pool's bookkeeping (CPU): size classes, reuse, the byte budget, thread safety.

Its CUDA use (an upload into a kept buffer, ordered before the compute stream's work) is tested in
tests/test_prompt_graphs.py and, through GPU workers, tests/test_gpu_wire.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hyperlane_lab.runtime.staging import MIN_BYTES, StagingPool


@pytest.mark.parametrize(
    ("nbytes", "size"),
    [(MIN_BYTES, MIN_BYTES), (MIN_BYTES + 1, 2 * MIN_BYTES), (3 << 20, 4 << 20), (4 << 20, 4 << 20)],
)
def test_size_classes_are_the_next_power_of_two(nbytes, size):
    assert StagingPool.size_class(nbytes) == size
    pool = StagingPool("cpu")
    buf = pool.take(nbytes)
    assert buf is not None and buf.numel() == size and buf.numel() >= nbytes


def test_small_uploads_and_a_full_budget_keep_the_allocating_path():
    pool = StagingPool("cpu", max_bytes=3 * MIN_BYTES)
    assert pool.take(MIN_BYTES - 1) is None  # below the minimum
    a, b = pool.take(MIN_BYTES), pool.take(2 * MIN_BYTES)
    assert a is not None and b is not None and pool.allocated == 3 * MIN_BYTES
    assert pool.take(MIN_BYTES) is None  # a new buffer would pass max_bytes
    pool.give(a)
    again = pool.take(MIN_BYTES)  # a freed buffer of the class is served again
    assert again is a and pool.reused == 1
    assert pool.take(2 * MIN_BYTES) is None  # b is still out
    pool.give(b)
    assert pool.take(2 * MIN_BYTES) is b and pool.free_bytes() == 0


def test_a_buffer_is_never_handed_out_twice_across_threads():
    pool = StagingPool("cpu", max_bytes=4 * MIN_BYTES)
    held: set[int] = set()
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            buf = pool.take(MIN_BYTES)
            if buf is None:
                time.sleep(0)
                continue
            with lock:
                if buf.data_ptr() in held:  # someone else holds it now
                    errors.append(f"buffer {buf.data_ptr():#x} handed out twice")
                held.add(buf.data_ptr())
            time.sleep(0)  # hold it while the other threads take and give
            with lock:
                held.discard(buf.data_ptr())
            pool.give(buf)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and not errors and not held
    assert pool.allocated == 4 * MIN_BYTES == pool.free_bytes() and pool.reused > 0


def test_free_buffers_of_other_sizes_make_room_and_clear_drops_them():
    pool = StagingPool("cpu", max_bytes=4 * MIN_BYTES)
    small, big = pool.take(MIN_BYTES), pool.take(2 * MIN_BYTES)
    assert small is not None and big is not None
    pool.give(small)
    pool.give(big)
    # a 4 x MIN_BYTES buffer needs the whole budget: both free buffers are dropped for it
    large = pool.take(4 * MIN_BYTES)
    assert large is not None and pool.allocated == 4 * MIN_BYTES and pool.free_bytes() == 0
    assert pool.take(MIN_BYTES) is None  # in use: nothing to drop
    pool.give(large)
    pool.clear()
    assert pool.allocated == 0 and pool.free_bytes() == 0
    assert pool.take(MIN_BYTES) is not None


def test_a_dropped_buffer_or_a_failed_allocation_returns_its_budget(monkeypatch):
    pool = StagingPool("cpu", max_bytes=2 * MIN_BYTES)
    buf = pool.take(2 * MIN_BYTES)
    assert buf is not None and pool.take(MIN_BYTES) is None
    pool.discard(buf)  # an error path: the buffer is not reused, its bytes are free again
    assert pool.allocated == 0 and pool.free_bytes() == 0

    def no_memory(*args: object, **kw: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.take(MIN_BYTES)
    assert pool.allocated == 0
