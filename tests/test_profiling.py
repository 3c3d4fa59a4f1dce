"""megaq.training.profiling: kernel categories, the per-step summary from a trace, the trainer's window."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import tiny_config
from distributed_utils import run_distributed
from megaq.training.config import config_from_dict
from megaq.training.profiling import (OTHER, StepProfiler, device_busy, device_events, format_summary,
                                      idle_by_phase, kernel_category, longest_gaps, runtime_calls,
                                      summarize)

# Kernel names as they appear in H100 traces of the trainer (torch 2.11, cuBLAS 13, Triton 3.6)
KERNELS = {
    "_scaled_mm_kernel": "int8/int4 gemm",
    "_sampled_mm_kernel": "int8/int4 gemm",
    "_quant_rows_resident_kernel": "quantize",
    "_quant_strip_kernel": "quantize",
    "_amax_partial_kernel": "quantize",
    "_dual_quant_kernel": "quantize",
    "_layernorm_quant_resident_kernel": "int8 data flow",
    "_gelu_backward_kernel": "int8 data flow",
    "_row_stats_kernel": "cross entropy",
    "_softmax_grad_kernel": "cross entropy",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>, false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT": "gemm (bf16/fp8)",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__"
    "5x_cublas": "gemm (bf16/fp8)",
    "triton_tem_fused_mm_0": "gemm (bf16/fp8)",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>"
    "(int, float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, "
    "c10::BFloat16*)": "layernorm",
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<c10::BFloat16, float, 32u, 32u, "
    "256u, false, true>": "layernorm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
    "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}, "
    "std::array<char*, 2ul> >(int, at::native::GeluCUDAKernelImpl)": "gelu",
    "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>, float, float>": "optimizer",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "triton_poi_fused_add_native_layer_norm_0": "layernorm",
    "triton_red_fused__to_copy_abs_amax_1": "fused (inductor)",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}>": "copy / cast",
    "Memcpy DtoD (Device -> Device)": "copy / cast",
    "Memset (Device)": "fill",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>>, unsigned int, float, 4>>": "reduction",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >": "elementwise",
    "void at::native::embedding_backward_feature_kernel<c10::BFloat16, float, long>": OTHER,
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_names_fall_into_their_category(name):
    assert kernel_category(name) == KERNELS[name]


def _trace(events) -> dict:
    return {"traceEvents": [{"ph": "X", "cat": cat, "name": name, "dur": dur, "ts": 0}
                            for cat, name, dur in events]}


def test_summary_counts_device_events_per_step_only():
    trace = _trace([("kernel", "_scaled_mm_kernel", 300.0), ("kernel", "_scaled_mm_kernel", 100.0),
                    ("kernel", "nvjet_tst_x", 500.0), ("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 100.0),
                    ("cpu_op", "aten::mm", 9999.0), ("cuda_runtime", "cudaLaunchKernel", 50.0)])
    trace["traceEvents"].append({"ph": "i", "cat": "kernel", "name": "marker"})   # not a duration event
    summary = summarize(device_events(trace), steps=2, top=2)
    assert summary["gpu_us_per_step"] == pytest.approx(500.0)
    categories = {c["name"]: c for c in summary["categories"]}
    assert set(categories) == {"int8/int4 gemm", "gemm (bf16/fp8)", "copy / cast"}
    assert categories["int8/int4 gemm"]["us_per_step"] == pytest.approx(200.0)
    assert categories["int8/int4 gemm"]["calls_per_step"] == pytest.approx(1.0)
    assert categories["gemm (bf16/fp8)"]["share"] == pytest.approx(0.5)
    assert [c["name"] for c in summary["categories"]] == ["gemm (bf16/fp8)", "int8/int4 gemm", "copy / cast"]
    assert [(k["name"], k["category"]) for k in summary["kernels"]] == [
        ("nvjet_tst_x", "gemm (bf16/fp8)"), ("_scaled_mm_kernel", "int8/int4 gemm")]
    text = format_summary(summary)
    assert "gemm (bf16/fp8)" in text and "0.25" in text and "50.0%" in text
    with pytest.raises(ValueError, match="steps must be positive"):
        summarize([], steps=0)


def test_busy_time_merges_overlapping_kernels_and_runtime_calls_are_totalled():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 5.0, "dur": 10.0},      # overlaps a (two streams)
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 30.0, "dur": 5.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 100.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 7.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 20.0, "dur": 3.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 25.0, "dur": 4.0}]}
    assert device_busy(trace) == (20.0, 35.0)          # 0-15 and 30-35 busy; 15-30 idle
    trace["traceEvents"] += [{"ph": "X", "cat": "user_annotation", "name": "megaq/backward", "ts": 12.0, "dur": 6.0},
                             {"ph": "X", "cat": "user_annotation", "name": "other", "ts": 14.0, "dur": 9.0},
                             {"ph": "X", "cat": "kernel", "name": "c", "ts": 40.0, "dur": 1.0}]
    assert idle_by_phase(trace) == {"backward": 15.0, "outside": 5.0}   # gaps 15-30 (in backward), 35-40
    # at the gap's midpoint (22.5) the host is inside aten::mm, "other" and a graph launch, outermost first
    assert longest_gaps(trace, top=1) == [{"us": 15.0, "host": ["aten::mm", "other", "cudaGraphLaunch"]}]
    assert device_busy({"traceEvents": []}) == (0.0, 0.0)
    assert runtime_calls(trace) == [{"name": "cudaGraphLaunch", "us": 10.0, "calls": 2},
                                    {"name": "cudaStreamSynchronize", "us": 4.0, "calls": 1}]


def test_step_profiler_writes_a_trace_and_a_summary_for_its_window_only(tmp_path):
    import torch

    profiler = StepProfiler((2, 3), str(tmp_path / "prof"), enabled=True)
    a = torch.randn(64, 64)
    for step in range(1, 5):
        profiler.step_begins(step)
        for _ in range(3):
            with profiler.phase("forward"):
                a = torch.tanh(a @ a)
        assert (profiler._profiler is not None) == (step in (2, 3))
        profiler.step_done(step)
    profiler.close()
    summary = profiler.summary
    assert summary["profiled_steps"] == [2, 3] and summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert set(summary["host_ms_per_step"]) == {"forward"} and summary["host_ms_per_step"]["forward"] > 0
    assert summary["gpu_idle_ms_per_step"] == 0.0 and isinstance(summary["runtime_calls"], list)  # CPU: no GPU
    trace_file, summary_file = (tmp_path / "prof" / "trace_steps_2-3.json.gz", tmp_path / "prof" / "kernels_steps_2-3.json")
    assert summary["files"] == [str(trace_file), str(summary_file)]
    with gzip.open(trace_file) as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "aten::tanh" in names and "aten::mm" in names
    assert json.loads(summary_file.read_text())["profiled_steps"] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == [summary_file.name, trace_file.name]


def test_step_profiler_disabled_or_cut_short_writes_nothing(tmp_path, caplog):
    off = StepProfiler((1, 1), str(tmp_path / "off"), enabled=False)     # another rank than 0
    off.step_begins(1)
    assert off.step_done(1) == 0.0 and off.summary is None and not (tmp_path / "off").exists()
    cut = StepProfiler((1, 5), str(tmp_path / "cut"), enabled=True)
    cut.step_begins(1)
    cut.step_done(1)
    with caplog.at_level("WARNING"):
        cut.close()   # training ended (error, signal, fewer steps) inside the window
    assert "no trace written" in caplog.text and cut.summary is None and not (tmp_path / "cut").exists()
    with pytest.raises(ValueError, match="logging.profile_dir"):
        StepProfiler((1, 1), None, enabled=True)


def test_profile_config_is_checked(demo_cache):
    base = tiny_config(demo_cache)
    for steps, dir_, message in (([0, 2], "/tmp/p", "1 <= first <= last"), ([3, 2], "/tmp/p", "1 <= first <= last"),
                                 ([1, 2], None, "logging.profile_dir is not")):
        with pytest.raises(ValueError, match=message):
            config_from_dict({**base, "logging": {"profile_steps": steps, "profile_dir": dir_}})
    cfg = config_from_dict({**base, "logging": {"profile_steps": [2, 2], "profile_dir": "/tmp/p"}})
    assert cfg.logging.profile_steps == (2, 2)


def _pretrain(rank, world_size, cfg_dict):
    from megaq.training.trainer import pretrain

    return pretrain(config_from_dict(cfg_dict))


def test_the_trainer_profiles_the_steps_it_is_told(demo_cache, tmp_path):
    cfg = tiny_config(demo_cache, train={"train_steps": 3},
                      logging={"log_interval": 1, "profile_steps": [2, 3], "profile_dir": str(tmp_path / "prof")})
    summary = run_distributed(_pretrain, 1, cfg, timeout=300)[0]
    assert len(summary["losses"]) == 3
    assert summary["profile"]["profiled_steps"] == [2, 3]
    assert set(summary["profile"]["host_ms_per_step"]) == {"forward", "backward", "optimizer"}
    assert (tmp_path / "prof" / "trace_steps_2-3.json.gz").is_file()
    assert (tmp_path / "prof" / "kernels_steps_2-3.json").is_file()
