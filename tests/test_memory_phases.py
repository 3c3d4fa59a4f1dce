"""megaq.training.memory: the peak of each phase of one step, and the run's peak across the resets
that measuring a phase makes. The CUDA allocator's counters are replaced by a fake one, so the
bookkeeping is checked on the CPU."""

import logging

import pytest
import torch

from megaq.training import memory


class FakeAllocator:
    """The counters of one process's caching allocator, which never gives memory back: reserved is
    the most ever allocated."""

    def __init__(self):
        self.allocated = self.peak = self.reserved = self.reserved_peak = 0

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)
        self.reserved_peak = max(self.reserved_peak, self.reserved)

    def free(self, n):
        self.allocated -= n

    def reset(self):
        self.peak = self.allocated
        self.reserved_peak = self.reserved


@pytest.fixture
def fake_cuda(monkeypatch):
    a = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: a.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: a.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: a.reserved_peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", a.reset)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [])
    monkeypatch.setattr(memory, "_peak_before_resets", 0)
    monkeypatch.setattr(memory, "_reserved_before_resets", 0)
    return a


def _micro_batch(a, phases, step, activations, grads_once, update):
    with phases.phase(step, "forward"):
        a.alloc(activations)
    with phases.phase(step, "backward"):
        a.alloc(grads_once)       # gradients appear in the first backward and stay
        a.free(activations)
    with phases.phase(step, "optimizer"):
        a.alloc(update)           # the update's temporaries
        a.free(update)


def test_each_phase_keeps_its_largest_peak_over_the_micro_batches(fake_cuda, caplog):
    G = memory._GIB
    a = fake_cuda
    a.alloc(10 * G)                                  # weights + optimizer state
    a.alloc(30 * G)                                  # step 1's one-off peak (e.g. a capture)...
    a.free(30 * G)                                   # ...gone before step 2
    phases = memory.MemoryPhases(at_step=2)
    _micro_batch(a, phases, 1, 3 * G, 0, 0)          # not the measured step: nothing recorded
    assert phases.report(1) == {}
    with caplog.at_level(logging.INFO, logger="megaq.training"):
        _micro_batch(a, phases, 2, 4 * G, 2 * G, 0)
        _micro_batch(a, phases, 2, 5 * G, 0, 7 * G)  # the update: grads 2 + temporaries 7
        values = phases.report(2)
    assert values == {"perf/memory_resident_gib": 10.0, "perf/memory_forward_peak_gib": 17.0,
                      "perf/memory_backward_peak_gib": 17.0, "perf/memory_optimizer_peak_gib": 19.0,
                      # the fake's segments never shrink: step 1's 40 GiB stay reserved in every phase
                      "perf/memory_forward_reserved_gib": 40.0, "perf/memory_backward_reserved_gib": 40.0,
                      "perf/memory_optimizer_reserved_gib": 40.0}
    assert "the step peaks in its optimizer" in caplog.text
    # the run's peaks survive the resets: step 1's 40 GiB, not the 19 of the last phase
    assert memory.peak_memory_gib() == pytest.approx(40.0)
    assert memory.peak_reserved_gib() == pytest.approx(40.0)
    a.free(a.allocated)
    a.reset()   # the allocated peak restarts from 0, the reserved one stays where the segments are
    assert memory.peak_memory_gib() == pytest.approx(40.0) and torch.cuda.max_memory_reserved() == 40 * G
    assert phases.report(3) == {}


def test_off_without_cuda_or_when_step_is_zero(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    phases = memory.MemoryPhases(at_step=2)
    with phases.phase(2, "forward"):
        pass
    assert phases.at_step == 0 and phases.report(2) == {}
    assert memory.peak_memory_gib() is None and memory.peak_reserved_gib() is None


@pytest.mark.parametrize("step", [1, 2])
def test_unknown_phase_is_named_in_any_step(fake_cuda, step):
    phases = memory.MemoryPhases(at_step=1)
    with pytest.raises(ValueError, match="memory phase must be one of"):
        with phases.phase(step, "fwd"):
            pass


def _segment(pool, total, blocks):
    return {"segment_pool_id": pool, "total_size": total,
            "allocated_size": sum(size for size, state in blocks if state == "active_allocated"),
            "blocks": [{"size": size, "state": state} for size, state in blocks]}


def test_pool_usage_sums_segments_by_pool_and_finds_the_largest_free_block():
    segments = [_segment((0, 0), 100, [(60, "active_allocated"), (40, "inactive")]),
                _segment((0, 0), 50, [(50, "inactive")]),
                _segment((1, 0), 300, [(100, "active_allocated"), (120, "inactive"), (80, "active_allocated")]),
                _segment((2, 0), 30, [(30, "inactive")])]      # a second private pool counts as graphs too
    assert memory.pool_usage(segments) == {
        "default": {"reserved": 150, "allocated": 60, "largest_free": 50},
        "graphs": {"reserved": 330, "allocated": 180, "largest_free": 120}}
    assert memory.pool_usage([]) == {}


def test_report_adds_the_pools_and_writes_the_snapshot_when_asked(fake_cuda, monkeypatch, tmp_path, caplog):
    import pickle
    G = memory._GIB
    segments = [_segment((0, 0), 3 * G, [(2 * G, "active_allocated"), (G, "inactive")]),
                _segment((7, 0), 4 * G, [(4 * G, "inactive")])]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"segments": segments})
    monkeypatch.setenv(memory.SNAPSHOT_ENV, str(tmp_path / "snap.pickle"))
    fake_cuda.alloc(2 * G)
    phases = memory.MemoryPhases(at_step=1)
    with caplog.at_level(logging.INFO, logger="megaq.training"):
        with phases.phase(1, "forward"):
            pass
        values = phases.report(1)
    assert values["perf/memory_pool_default_reserved_gib"] == 3.0
    assert values["perf/memory_pool_default_allocated_gib"] == 2.0
    assert values["perf/memory_pool_graphs_reserved_gib"] == 4.0
    assert values["perf/memory_pool_graphs_largest_free_gib"] == 4.0
    assert "graphs: reserved 4.00, allocated 0.00, largest free block 4.00" in caplog.text
    assert pickle.loads((tmp_path / "snap.pickle").read_bytes()) == {"segments": segments}
