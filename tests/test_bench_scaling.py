"""tools/bench_scaling.py and the trainer's communication-bytes metrics it reads: the bytes
accounting (exact-collective formulas, DeepSpeed's collectives, per-step windows), the tool's case
selection and statistics, and the tool end to end on CPU (gloo): the TP x DP grid at TP, DP in {1, 2}
and a short loss match."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import DEMO_MAX_BYTES, REPO_ROOT, subprocess_env
from megaq.parallel.quantized_comm import (exact_wire_bytes, is_data_parallel_kind,
                                           record_exact_collective, track_comm)
from megaq.training.metrics import CommBytesPerStep, count_deepspeed_collectives

TOOL = REPO_ROOT / "tools" / "bench_scaling.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_scaling", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _tool()


# ---- bytes accounting ----------------------------------------------------------------------------

def test_exact_wire_bytes_formulas():
    assert exact_wire_bytes("all_gather", 100, 4) == 300            # (w-1) x shard
    assert exact_wire_bytes("reduce_scatter", 400, 4) == 300        # (w-1)/w x input
    assert exact_wire_bytes("all_to_all", 400, 4) == 300
    assert exact_wire_bytes("all_reduce", 400, 4) == 600            # 2 (w-1)/w x input
    assert exact_wire_bytes("broadcast", 400, 4) == 400
    assert exact_wire_bytes("all_reduce", 400, 1) == 0
    with pytest.raises(ValueError, match="barrier"):
        exact_wire_bytes("barrier", 0, 2)
    assert is_data_parallel_kind("grad_all_reduce[int8]") and is_data_parallel_kind("ds_all_gather[bf16]")
    assert not is_data_parallel_kind("all_gather[int8]")


def test_comm_bytes_per_step_windows_split_and_exclusion():
    meter = CommBytesPerStep()
    for _ in range(2):  # two steps: a TP all-reduce of 1000 bytes and a DP all-gather of 100 each
        record_exact_collective("all_reduce", 1000, torch.bfloat16, 2)
        record_exact_collective("all_gather", 100, torch.bfloat16, 2, prefix="ds_")
        meter.step_done()
    with meter.excluded():  # evaluation traffic is not a training step's
        record_exact_collective("all_gather", 5000, torch.bfloat16, 2)
    report = meter.report()
    assert report["comm/tp_bytes"] == 1000 and report["comm/dp_bytes"] == 100
    assert report["comm/bytes/all_reduce[bf16]"] == 1000 and report["comm/bytes/ds_all_gather[bf16]"] == 100
    assert "comm/bytes/all_gather[bf16]" not in report
    record_exact_collective("reduce_scatter", 800, torch.float32, 4)
    meter.step_done()
    assert meter.report() == {"comm/tp_bytes": 600, "comm/dp_bytes": 0, "comm/bytes/reduce_scatter[fp32]": 600}


class _FakeBackend:
    """Stands in for deepspeed.comm's backend: records what reached it."""

    def __init__(self):
        self.calls = []

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.calls.append("all_reduce")
        return "work"

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        self.calls.append("all_gather_into_tensor")

    def reduce_scatter(self, output, input_list, op=None, group=None, async_op=False):
        self.calls.append("reduce_scatter")


def test_count_deepspeed_collectives_counts_positional_and_keyword_calls(monkeypatch):
    from deepspeed.comm import comm as ds_comm

    backend = _FakeBackend()
    monkeypatch.setattr(ds_comm, "cdb", backend)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    count_deepspeed_collectives()
    count_deepspeed_collectives()  # idempotent: counted once
    with track_comm() as stats:
        assert backend.all_reduce(torch.zeros(100, dtype=torch.bfloat16), None, None, False) == "work"
        backend.all_gather_into_tensor(output_tensor=torch.zeros(400), input_tensor=torch.zeros(100))
        backend.reduce_scatter(torch.zeros(10), [torch.zeros(10, dtype=torch.float16)] * 4)
    assert backend.calls == ["all_reduce", "all_gather_into_tensor", "reduce_scatter"]
    assert stats.wire_bytes("ds_all_reduce[bf16]") == 2 * 200 * 3 // 4
    assert stats.wire_bytes("ds_all_gather[fp32]") == 3 * 400
    assert stats.wire_bytes("ds_reduce_scatter[fp16]") == 80 * 3 // 4


# ---- the tool's pieces ---------------------------------------------------------------------------

def test_grid_order_case_parsing_and_heads():
    cases = bench.grid_cases([1, 2, 4], [1, 2, 4], ["bf16", "int8"], 4, 1)
    assert [c.spec() for c in cases] == ["1x1", "1x4:bf16", "1x4:int8", "2x2:bf16", "2x2:int8", "4x1:bf16",
                                         "4x1:int8", "1x2:bf16", "1x2:int8", "2x1:bf16", "2x1:int8"]
    assert [c.spec() for c in bench.parse_cases("1x1,2x2:int8,1x2", ["bf16", "int8"], 1)] == [
        "1x1", "2x2:int8", "1x2:bf16", "1x2:int8"]
    for bad in ("2x", "2x2:fp8", "0x2"):
        with pytest.raises(SystemExit):
            bench.parse_cases(bad, ["bf16"], 1)
    assert bench.pick_n_head(25, 1600, [1, 2, 4]) == 20   # GPT-2 XL: 20 heads of 80
    assert bench.pick_n_head(12, 768, [1, 2, 4]) == 12
    assert bench.pick_n_head(25, 1600, [1]) == 25


def test_summary_scaling_and_byte_ratios():
    rows = [{"step": s, "perf/tokens_per_s": tps, "perf/step_time_s": 1 / tps, "train/loss": 5.0 - s,
             "comm/tp_bytes": 100.0, "comm/bytes/all_gather[int8]": 100.0, "comm/bytes/grad_all_reduce[int8]": 50.0,
             "comm/bytes/ds_all_gather[bf16]": 20.0} for s, tps in ((1, 10.0), (2, 100.0), (3, 102.0), (4, 98.0))]
    s = bench.summarize(rows, warmup=1)
    assert s["tokens_per_s"] == 100.0 and s["steps_measured"] == 3 and s["final_loss"] == 1.0
    assert (s["tp_bytes"], s["dp_grad_bytes"], s["dp_param_bytes"]) == (100.0, 50.0, 20.0)

    def case(tp, dp, comm, tps, tp_bytes, grad, param):
        return dict(tp=tp, dp=dp, world=tp * dp, comm=comm, tokens_per_s=tps, tp_bytes=tp_bytes,
                    dp_grad_bytes=grad, dp_param_bytes=param)
    cases = [case(1, 1, "-", 100.0, 0, 0, 0), case(1, 4, "bf16", 380.0, 0, 400.0, 100.0),
             case(1, 4, "int8", 390.0, 0, 206.0, 100.0), case(2, 1, "bf16", 150.0, 1000.0, 0, 0),
             {**case(2, 1, "int8", 0, 0, 0, 0), "tokens_per_s": None, "error": "out of memory"},
             case(1, 4, "int4", 370.0, 0, 110.0, 100.0)]
    bench.add_scaling(cases)
    assert cases[1]["scaling_efficiency"] == pytest.approx(0.95)
    assert cases[3]["per_gpu_vs_1gpu"] == pytest.approx(0.75) and "scaling_efficiency" not in cases[3]
    ratio, ratio4 = bench.byte_ratios(cases)  # 2x1 has no INT8 result
    assert (ratio["tp"], ratio["dp"], ratio["comm"], ratio["tp_bytes"]) == (1, 4, "int8", None)
    assert ratio["dp_grad_bytes"] == pytest.approx(0.515) and ratio["dp_bytes"] == pytest.approx(306 / 500)
    assert ratio4["comm"] == "int4" and ratio4["dp_grad_bytes"] == pytest.approx(0.275)
    assert ratio4["tokens_per_s"] == pytest.approx(370 / 380)


def test_loss_statistics_waves_and_budget():
    ref = [5.0, 4.0, 3.0, 2.0]
    s = bench.loss_stats([5.0, 4.1, 2.9, 2.2], ref, window=2)
    assert s["step1_delta"] == 0 and s["max_abs_delta"] == pytest.approx(0.2)
    assert s["mean_delta_last"] == pytest.approx(0.05) and s["mean_abs_delta_last"] == pytest.approx(0.15)
    Case = bench.Case
    reference, noise, multi = Case(1, 1, "-", 1), Case(1, 1, "-", 2), Case(2, 2, "int8", 1)
    cmp_ = bench.compare_losses({reference: ref, noise: [5.1, 4.2, 3.1, 2.1], multi: [5.0, 4.0, 3.05, 2.0]},
                                reference, [noise], [multi], window=2)
    assert cmp_["noise_band"] == pytest.approx(0.1) and cmp_["multi"]["2x2:int8"]["within_noise"] is True
    # Runs side by side on disjoint GPUs, in order; one at a time without GPUs.
    runs = [Case(1, 1, "-", s) for s in range(3)] + [Case(2, 2, "int8", 1), Case(1, 2, "bf16", 1)]
    assert [[c.world for c in w] for w in bench.waves(runs, 4)] == [[1, 1, 1], [4], [2]]
    assert len(bench.waves(runs, 0)) == 5
    budget = bench.Budget(100.0)
    assert budget.allows(4)
    budget.took(4, 60.0)
    assert budget.allows(2) and budget.allows(4)
    budget.took(2, 150.0)
    assert not budget.allows(2) and budget.allows(4)


def test_error_summary_names_the_cause_not_the_launcher():
    launcher = "Traceback (most recent call last):\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    assert bench.error_summary("  File x\nValueError: bad thing\n" + launcher) == "ValueError: bad thing"
    assert bench.error_summary("megaq: configuration error: model.n_head\n" + launcher).startswith("megaq:")
    assert "out of memory" in bench.error_summary("torch.OutOfMemoryError: CUDA out of memory. Tried\n" + launcher)
    assert bench.error_summary(launcher) == ""


# ---- end to end on CPU ---------------------------------------------------------------------------

def _run_tool(args: list[str], tmp_path, demo_cache) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"), "--model", "tiny",
           "--seq", "64", "--micro-batch", "4", "--override", f"data.cache_dir={demo_cache}",
           "--override", f"data.demo_max_bytes={DEMO_MAX_BYTES}", "--json", str(tmp_path / "out.json"), *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _tiny_parameter_elements() -> int:
    """Elements DeepSpeed reduces for the tiny preset: every parameter, padded vocabulary rows included."""
    from megaq.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=257, seq_len=64, n_layer=2, n_head=2, n_embd=64), init_seed=0)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_grid_on_cpu_measures_bytes_and_scaling(tmp_path, demo_cache):
    """TP, DP in {1, 2}, 2 steps, both communication modes: every case runs, and the bytes per step
    are what the collectives' formulas give (FP32 on CPU: DeepSpeed's ZeRO-1 gradient all-reduce is
    2 (w-1)/w x 4N bytes, its parameter all-gather (w-1) x 4N/w; INT8 + block scales is ~0.26 of it)."""
    result = _run_tool(["--tp", "1,2", "--dp", "1,2", "--steps", "2", "--warmup", "1"], tmp_path, demo_cache)
    out = json.loads((tmp_path / "out.json").read_text())
    cases = {(c["tp"], c["dp"], c["comm"]): c for c in out["cases"]}
    assert set(cases) == {(1, 1, "-"), (1, 2, "bf16"), (1, 2, "int8"), (2, 1, "bf16"), (2, 1, "int8")}
    assert not [c["error"] for c in cases.values() if "error" in c]
    assert cases[(1, 1, "-")]["per_gpu_vs_1gpu"] == 1.0 and cases[(1, 1, "-")]["tp_bytes"] == 0

    n = _tiny_parameter_elements()
    dp_bf16, dp_int8 = cases[(1, 2, "bf16")], cases[(1, 2, "int8")]
    assert dp_bf16["dp_grad_bytes"] == pytest.approx(4 * n, rel=1e-3)
    assert dp_bf16["dp_param_bytes"] == dp_int8["dp_param_bytes"] == pytest.approx(2 * n, rel=1e-3)
    assert dp_int8["dp_grad_bytes"] == pytest.approx(n * (1 + 4 / 128), rel=1e-3)  # two INT8 steps, half each
    assert dp_bf16["tp_bytes"] == dp_int8["tp_bytes"] == 0
    tp_bf16, tp_int8 = cases[(2, 1, "bf16")], cases[(2, 1, "int8")]
    assert tp_bf16["tp_bytes"] > 0 and tp_bf16["dp_param_bytes"] == 0
    assert 0.2 < tp_int8["tp_bytes"] / tp_bf16["tp_bytes"] < 0.6  # vs FP32; the LayerNorm grads stay exact
    assert "all_gather[int8]" in tp_int8["bytes_by_kind"] and "all_gather[fp32]" in tp_bf16["bytes_by_kind"]
    assert {(r["tp"], r["dp"]) for r in out["byte_ratios"]} == {(1, 2), (2, 1)}
    table = (tmp_path / "out.md").read_text()
    assert table in result.stdout
    assert table.count("\n| ") == (1 + 5) + (1 + 2)  # header + rows of the grid, of the byte ratios


@pytest.mark.slow
def test_loss_match_on_cpu(tmp_path, demo_cache):
    """Same seed and global batch: DP=2 (exact) reproduces the one-process run's first loss exactly and
    TP=2 (INT8 collectives) to rounding; another seed starts elsewhere; the verdict is reported."""
    _run_tool(["--loss-match", "--global-batch", "8", "--steps", "4", "--window", "2", "--noise-seeds", "1",
               "--multi", "1x2:bf16,2x1:int8"], tmp_path, demo_cache)
    out = json.loads((tmp_path / "out.json").read_text())
    assert [(r["role"], r["tp"], r["dp"]) for r in out["runs"]] == [
        ("reference", 1, 1), ("noise", 1, 1), ("multi", 1, 2), ("multi", 2, 1)]
    cmp_ = out["comparison"]
    assert cmp_["multi"]["1x2:bf16"]["step1_delta"] == pytest.approx(0, abs=1e-5)
    assert cmp_["multi"]["2x1:int8"]["step1_delta"] == pytest.approx(0, abs=1e-2)
    assert abs(cmp_["noise"]["1235"]["step1_delta"]) > 1e-3
    assert all(isinstance(s["within_noise"], bool) for s in cmp_["multi"].values())
    assert all(len(r["losses"]) == 4 for r in out["runs"])
    assert "within noise" in (tmp_path / "out.md").read_text()
