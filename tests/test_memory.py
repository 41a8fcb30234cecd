"""The one RSS reader of host benchmarks and the device (exporters/device/memory.py)."""

import mmap

import pytest

from exporters.device import memory

needs_vmrss = pytest.mark.skipif(memory.rss_kib() is None, reason="no VmRSS in /proc/self/status (not Linux)")


@needs_vmrss
def test_vmrss_reader_sees_touched_memory():
    """64 MiB of fresh anonymous pages (mmap, not malloc: the heap may hold freed pages already
    resident, more so after hero_train.allocator's settings), every page written: resident by
    construction."""
    before = memory.reading()
    block = mmap.mmap(-1, 64 << 20)
    block.write(b"\x01" * (64 << 20))
    assert memory.resident_delta_kib(before) >= 60 << 10
    block.close()


def test_without_vmrss_readings_are_none_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "STATUS", str(tmp_path / "no-such-status"))
    assert memory.rss_kib() is None and memory.reading() is None
    assert memory.resident_delta_kib(None) is None
    assert "Linux only" in memory.unavailable_reason()
