"""The end-to-end evidence tooling: train.compile, the torchao float8 peer (quant.peer), a separate
validation set (data.valid_path, for the English accuracy run), and tools/bench_e2e.py's parsing,
table and failure handling."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, tiny_config
from distributed_utils import run_distributed
from megaq.training.config import ConfigError, config_from_dict, load_config


def _load_tool(name: str, register: bool = False):
    """tools/<name>.py as a module (the scripts are not a package). register: also in sys.modules, where
    a script's dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_tool("bench_e2e", register=True)


# ---------------------------------------------------------------------------------------------------
# train.compile

def _pretrain_and_read_parameter_names(rank, world_size, cfg_dicts):
    from torch._dynamo.utils import counters

    from megaq.training.trainer import pretrain

    out = []
    for cfg in cfg_dicts:
        graphs_before = counters["stats"]["unique_graphs"]
        summary = pretrain(config_from_dict(cfg))
        states = next(Path(summary["last_checkpoint"]).rglob("*model_states.pt"))
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        out.append((summary["losses"], sorted(module), counters["stats"]["unique_graphs"] - graphs_before))
    return out


def test_compiled_blocks_train_like_eager_and_keep_parameter_names(demo_cache, tmp_path):
    """train.compile=true: the same losses as eager (BF16 recipe: FP32 on CPU; INT8: its quantized
    GEMMs run as graph breaks) and checkpoints with the same parameter names (no `_orig_mod.`)."""
    cases = [("bf16", False), ("bf16", True), ("int8", False), ("int8", True)]
    cfgs = [tiny_config(demo_cache, quant={"recipe": recipe}, train={"train_steps": 3, "compile": compiled},
                        checkpoint={"dir": str(tmp_path / f"{recipe}_{compiled}")})
            for recipe, compiled in cases]
    results = run_distributed(_pretrain_and_read_parameter_names, 1, cfgs, timeout=600)[0]
    assert [graphs > 0 for _, _, graphs in results] == [compiled for _, compiled in cases]
    (bf16_eager, names, _), (bf16_compiled, names_compiled, _), (int8_eager, _, _), (int8_compiled, _, _) = results
    assert names == names_compiled and not any("_orig_mod" in n for n in names_compiled)
    torch.testing.assert_close(torch.tensor(bf16_compiled), torch.tensor(bf16_eager), rtol=1e-5, atol=1e-6)
    # Compiled code may round differently before the quantizers: close, not bit-equal.
    torch.testing.assert_close(torch.tensor(int8_compiled), torch.tensor(int8_eager), rtol=2e-3, atol=1e-3)


def test_quantized_linears_stay_eager_inside_compiled_blocks():
    """Under INT8 the blocks compile but their quantized linears are left to run eagerly; under
    BF16 nothing is excluded."""
    from megaq.models import GPT, GPTConfig
    from megaq.nn import ColumnParallelLinear, RowParallelLinear
    from megaq.training.engine import compile_blocks

    def excluded(recipe: str) -> list[bool]:
        model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, n_embd=32, recipe=recipe), init_seed=0)
        compile_blocks(model)
        assert all(block._compiled_call_impl is not None for block in model.blocks)
        return [getattr(m.forward, "_torchdynamo_disable", False) for m in model.modules()
                if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    assert excluded("int8") == [True] * 8
    assert excluded("bf16") == [False] * 8


def test_compile_failure_names_the_option_and_the_recipe(tiny_cfg):
    from torch._dynamo.exc import Unsupported

    from megaq.training.engine import compile_failures_explained

    compiled = config_from_dict(tiny_cfg(quant={"recipe": "int4"}, train={"compile": True}))
    with pytest.raises(RuntimeError, match=r"train.compile=true: torch.compile failed for quant.recipe=int4"):
        with compile_failures_explained(compiled):
            raise Unsupported("a made-up dynamo failure")
    eager = config_from_dict(tiny_cfg())
    with pytest.raises(Unsupported):  # without compile, nothing is reworded
        with compile_failures_explained(eager):
            raise Unsupported("a made-up dynamo failure")


def test_compile_option_is_validated(tiny_cfg):
    assert config_from_dict(tiny_cfg()).train.compile is False
    with pytest.raises(ConfigError, match="train.compile"):
        config_from_dict(tiny_cfg(train={"compile": "sometimes"}))
    with pytest.raises(ConfigError, match=r"train.compile=true does not support quant.data_flow='int8'"):
        config_from_dict(tiny_cfg(quant={"recipe": "int8", "data_flow": "int8"}, train={"compile": True}))


# ---------------------------------------------------------------------------------------------------
# quant.peer: torchao float8

@pytest.mark.parametrize("sections, key", [
    ({"quant": {"recipe": "int8", "peer": "torchao_float8_rowwise"}}, "quant.recipe"),
    ({"quant": {"lm_head_recipe": "int4", "peer": "torchao_float8_rowwise"}}, "quant.lm_head_recipe"),
    ({"quant": {"peer": "torchao_float8_tensorwise"}, "parallel": {"tensor_parallel": 2}},
     "parallel.tensor_parallel=1"),
    ({"quant": {"peer": "torchao_float8_blockwise"}}, "torchao_float8_rowwise"),
])
def test_peer_config_is_refused_where_it_would_not_be_the_bf16_model(tiny_cfg, sections, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(tiny_cfg(**sections))


def test_peer_config_accepted_with_bf16_at_tp1(tiny_cfg):
    cfg = config_from_dict(tiny_cfg(quant={"peer": "torchao_float8_rowwise"}))
    assert cfg.quant.peer == "torchao_float8_rowwise"


def test_peer_without_torchao_says_so(monkeypatch):
    from megaq.models import GPT, GPTConfig
    from megaq.training.peers import apply_peer

    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` raise ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=32), init_seed=0)
    with pytest.raises(ConfigError, match="quant.peer='torchao_float8_rowwise' needs torchao"):
        apply_peer(model, "torchao_float8_rowwise", "cuda")


def test_peer_needs_a_gpu():
    from megaq.training.peers import check_float8_device

    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        check_float8_device("torchao_float8_tensorwise", "cpu")


def test_swapped_linears_share_the_parameters_and_compute_the_same():
    """The peer's first step (before torchao converts anything): nn.Linear modules that hold the
    TP-size-1 BF16 layers' own Parameters give the same loss and gradients under the same names."""
    from megaq.models import GPT, GPTConfig
    from megaq.training.peers import swap_parallel_linears

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, n_embd=32), init_seed=0)
    ids, labels = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    before = model(ids, labels)
    before.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    parameters = dict(model.named_parameters())
    model.zero_grad()

    swapped = swap_parallel_linears(model)
    assert len(swapped) == 4 * 2 and "blocks.1.mlp.fc2" in swapped
    assert all(type(model.get_submodule(name)) is nn.Linear for name in swapped)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in parameters.items()}
    after = model(ids, labels)
    after.backward()
    torch.testing.assert_close(after, before)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_a_quantized_layer_is_not_swapped():
    from megaq.nn import ColumnParallelLinear
    from megaq.training.peers import as_plain_linear

    with pytest.raises(ValueError, match="quantized recipe"):
        as_plain_linear(ColumnParallelLinear(32, 32, recipe="int8"))


@pytest.mark.gpu
@pytest.mark.parametrize("peer", ["torchao_float8_tensorwise", "torchao_float8_rowwise"])
def test_float8_peer_trains_close_to_bf16(peer):
    pytest.importorskip("torchao.float8")
    from megaq.models import GPT, GPTConfig
    from megaq.training.peers import apply_peer

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 tensor cores on this GPU")
    cfg = GPTConfig(vocab_size=512, seq_len=128, n_layer=2, n_head=4, n_embd=256)
    reference = GPT(cfg, init_seed=0).cuda().bfloat16()
    peer_model = GPT(cfg, init_seed=0).cuda().bfloat16()
    apply_peer(peer_model, peer, "cuda")
    ids = torch.randint(0, 512, (8, 128), device="cuda")
    labels = torch.randint(0, 512, (8, 128), device="cuda")
    ref_loss, peer_loss = reference(ids, labels), peer_model(ids, labels)
    peer_loss.backward()
    assert abs(peer_loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
    assert all(torch.isfinite(p.grad).all() for p in peer_model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------
# data.valid_path

def _byte_dataset(path: Path, documents: list[str]) -> str:
    from megaq.data.preprocess import preprocess

    text = path.with_suffix(".txt")
    text.write_text("\n\n".join(documents) + "\n")
    preprocess(text, path, {"type": "byte", "model": None}, progress=False)
    return str(path)


def test_valid_path_validates_on_all_of_it_and_trains_on_all_of_path(tmp_path):
    from megaq.data import IndexedDataset
    from megaq.training.data import prepare_data

    train = _byte_dataset(tmp_path / "train", [f"training document {i} " * 20 for i in range(30)])
    valid = _byte_dataset(tmp_path / "valid", [f"held-out text {i} " * 20 for i in range(7)])
    raw = tiny_config(tmp_path, data={"path": train, "valid_path": valid, "demo": False, "valid_fraction": 0.0})
    del raw["data"]["valid_fraction"]  # left at its default: not used with valid_path
    data = prepare_data(config_from_dict(raw), 0, 0, lambda: None)
    assert data.train.num_documents == len(IndexedDataset(train)) == 30
    assert data.valid.num_documents == len(IndexedDataset(valid)) == 7
    assert bytes(data.valid[0]["input_ids"][:13].tolist()) == b"held-out text"


def test_valid_path_errors_name_the_key(tmp_path):
    train = _byte_dataset(tmp_path / "train", ["some text " * 50] * 3)
    with pytest.raises(ConfigError, match=r"data\.valid_path='nowhere': missing nowhere\.bin"):
        config_from_dict(tiny_config(tmp_path, data={"path": train, "valid_path": "nowhere"}))
    with pytest.raises(ConfigError, match=r"data\.valid_path and data\.valid_fraction=0\.05 are both set"):
        config_from_dict(tiny_config(tmp_path, data={"path": train, "valid_path": train}))


# ---------------------------------------------------------------------------------------------------
# tools/bench_e2e.py

def test_micro_batches_per_model():
    assert bench.parse_micro_batches("8", ["gpt2", "gpt2-xl"]) == {"gpt2": 8, "gpt2-xl": 8}
    assert bench.parse_micro_batches("gpt2:16,gpt2-xl:4", ["gpt2-xl"]) == {"gpt2": 16, "gpt2-xl": 4}
    with pytest.raises(ValueError, match=r"no micro batch for \['gpt-1.3b'\]"):
        bench.parse_micro_batches("gpt2:16", ["gpt2", "gpt-1.3b"])
    with pytest.raises(ValueError, match="'gpt2=16' is not MODEL:N"):
        bench.parse_micro_batches("gpt2=16", ["gpt2"])


def test_recipes_with_peers_and_compile_choices():
    assert bench.parse_recipes("bf16,int8@compile,fp8_rowwise,int8@graphs", compile_default=False) == [
        ("bf16", "eager"), ("int8", "compile"), ("fp8_rowwise", "compile"), ("int8", "graphs")]
    assert bench.parse_recipes("bf16,fp8_tensorwise@eager", compile_default=True) == [
        ("bf16", "compile"), ("fp8_tensorwise", "eager")]
    (case,) = bench.build_cases(["gpt2"], [1024], bench.parse_recipes("int8_df@graphs", False), {"gpt2": 16})
    assert {"quant.recipe=int8", "quant.data_flow=int8", "train.cuda_graphs=true"} <= set(case.overrides())
    plain = bench.build_cases(["gpt2"], [1024], [("int8", "eager")], {"gpt2": 4})[0].overrides()
    assert {"quant.data_flow=bf16", "quant.attention_saves=bf16"} <= set(plain)
    (case,) = bench.build_cases(["gpt2"], [1024], bench.parse_recipes("int8_df_attn8", False), {"gpt2": 16})
    assert {"quant.recipe=int8", "quant.data_flow=int8", "quant.attention_saves=int8"} <= set(case.overrides())
    with pytest.raises(ValueError, match="'int9' is neither a megaq recipe nor a peer"):
        bench.parse_recipes("bf16,int9", compile_default=False)
    with pytest.raises(ValueError, match="@eager, @compile, @graphs"):
        bench.parse_recipes("bf16@fast", compile_default=False)


def test_case_overrides_are_a_valid_config():
    """Every case's overrides load on the bench's default config (the peer as quant.peer over bf16)."""
    for recipe, mode in (("fp8_rowwise", "compile"), ("int8", "graphs")):
        case = bench.Case("gpt2-xl", 2048, recipe, mode, 4)
        cfg = load_config(REPO_ROOT / "configs" / "gpt2_bf16.json", case.overrides())
        assert (cfg.model.n_layer, cfg.model.seq_len, cfg.train.micro_batch_size) == (48, 2048, 4)
        assert (cfg.train.compile, cfg.train.cuda_graphs) == (mode == "compile", mode == "graphs")
    assert cfg.quant.peer is None and cfg.quant.recipe == "int8"
    peer = load_config(REPO_ROOT / "configs" / "gpt2_bf16.json", bench.Case("gpt2", 1024, "fp8_rowwise", "compile", 16).overrides())
    assert (peer.quant.recipe, peer.quant.peer) == ("bf16", "torchao_float8_rowwise")


def test_table_has_ratios_to_the_fastest_bf16_and_failed_rows():
    def row(recipe, mode, tps, mem, **extra):
        return {"model": "gpt2", "seq_len": 1024, "recipe": recipe, "mode": mode, "micro_batch": 16,
                "tokens_per_s": tps, "mfu": 0.2, "peak_memory_gib": mem, "final_loss": 5.0, **extra}

    rows = [row("bf16", "eager", 100.0, 40.0), row("bf16", "compile", 200.0, 30.0), row("int8", "graphs", 300.0, 21.0),
            {"model": "gpt2", "seq_len": 1024, "recipe": "int4", "mode": "compile", "micro_batch": 16,
             "error": "out of memory"}]
    bench.add_ratios(rows)
    assert rows[2]["speed_vs_bf16"] == pytest.approx(1.5) and rows[2]["memory_vs_bf16"] == pytest.approx(0.7)
    table = bench.format_table(rows)
    assert "| gpt2 | 1024 | 16 × 1 | int8 | graphs | 300 | 1.50x | 20.0% | 21.0 | 0.70x | - | - | - | 5.000 |" in table
    assert "| int4 | compile | failed: out of memory |" in table


def test_metrics_file_gives_speed_and_the_memory_by_phase(tmp_path):
    """read_metrics: medians over the steps after the warm-up, and the trainer's one row of memory by
    phase (megaq.training.memory) in the table's column."""
    path = tmp_path / "m.jsonl"
    lines = [{"step": 1, "perf/tokens_per_s": 10.0, "perf/peak_memory_gib": 5.0, "train/loss": 9.0},
             {"step": 2, "perf/tokens_per_s": 100.0, "perf/peak_memory_gib": 6.0, "perf/peak_reserved_gib": 8.0,
              "train/loss": 8.0},
             {"step": 2, "perf/memory_resident_gib": 2.0, "perf/memory_forward_peak_gib": 4.0,
              "perf/memory_backward_peak_gib": 6.0, "perf/memory_optimizer_peak_gib": 3.5},
             {"step": 3, "perf/tokens_per_s": 120.0, "perf/peak_memory_gib": 6.0, "train/loss": 7.0}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = bench.read_metrics(path, warmup=1)
    assert out["tokens_per_s"] == pytest.approx(110.0) and out["peak_memory_gib"] == 6.0
    assert out["peak_reserved_gib"] == 8.0
    assert out["final_loss"] == 7.0 and out["steps_measured"] == 2
    assert out["memory_phases_gib"] == {"resident": 2.0, "forward_peak": 4.0, "backward_peak": 6.0,
                                        "optimizer_peak": 3.5}
    row = {"model": "gpt2", "seq_len": 1024, "recipe": "bf16", "mode": "eager", "micro_batch": 4, **out}
    assert "| 6.0 | - | 8.0 | - | 2.0 / 4.0 / 6.0 / 3.5 |" in bench.format_table([row])
    # --profile runs one more step, profiled: the medians stop before it
    assert bench.read_metrics(path, warmup=1, last_step=2)["tokens_per_s"] == pytest.approx(100.0)


def test_profiled_cases_get_a_category_table_and_the_extra_step(tmp_path):
    args = bench.parse_args(["--models", "gpt2", "--recipes", "bf16@graphs", "--steps", "4", "--profile",
                             str(tmp_path)])
    case = bench.Case("gpt2", 1024, "bf16", "graphs", 16)
    profiled = {"categories": [{"name": "gemm (bf16/fp8)", "us_per_step": 2500.0},
                               {"name": "attention", "us_per_step": 500.0}],
                "gpu_us_per_step": 3000.0, "wall_ms_per_step": 3.5, "gpu_idle_ms_per_step": 0.4}
    rows = [{"model": "gpt2", "recipe": "bf16", "mode": "graphs", "profile": profiled},
            {"model": "gpt2", "recipe": "int8", "mode": "graphs",
             "profile": {**profiled, "categories": [{"name": "quantize", "us_per_step": 700.0}]}},
            {"model": "gpt2", "recipe": "int4", "mode": "graphs", "error": "out of memory"}]
    table = bench.format_profile_table(rows)
    assert "| GPU ms per step | gpt2 bf16@graphs | gpt2 int8@graphs |" in table
    assert "| gemm (bf16/fp8) | 2.5 | 0.0 |" in table and "| quantize | 0.0 | 0.7 |" in table
    assert "| all kernels | 3.0 | 3.0 |" in table and "| wall (profiled step) | 3.5 | 3.5 |" in table
    assert "| GPU idle between kernels | 0.4 | 0.4 |" in table
    assert bench.format_profile_table(rows[2:]) == ""
    # the case's command: steps + 1, the last one profiled into the case's own directory
    captured = {}

    def fake_run(cmd, **kwargs):
        captured["cmd"] = cmd
        raise bench.subprocess.TimeoutExpired(cmd, 1)

    import unittest.mock
    with unittest.mock.patch.object(bench.subprocess, "run", fake_run):
        row = bench.run_case(case, args, tmp_path, port=29999)
    assert row["error"] == "timed out"
    assert "train.train_steps=5" in captured["cmd"] and "logging.profile_steps=[5,5]" in captured["cmd"]
    assert f"logging.profile_dir={tmp_path / case.name}" in captured["cmd"]


def test_failure_reasons():
    assert bench.summarize_failure(None, "") == "timed out"
    assert bench.summarize_failure(1, "x\ntorch.OutOfMemoryError: CUDA out of memory. Tried") == "out of memory"
    assert bench.summarize_failure(2, "log\nmegaq: configuration error: model.preset: bad\n") == \
        "megaq: configuration error: model.preset: bad"
    assert bench.summarize_failure(1, "nothing useful") == "exit code 1"


def test_bench_runs_cases_and_reports_a_failing_one_as_a_row(demo_cache, tmp_path, monkeypatch, capsys):
    """A real (tiny, CPU) case and one whose model does not exist: one table, the failure a row."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "e2e.json"
    code = bench.main(["--models", "tiny,no-such-model", "--seq", "64", "--recipes", "bf16", "--steps", "3",
                       "--grad-accum", "2", "--warmup", "1", "--micro-batch", "2", "--vocab-size", "384",
                       "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"),
                       "--override", f"data.cache_dir={demo_cache}", "--override", "data.demo_max_bytes=400000",
                       "--override", "data.num_workers=0", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    ok, failed = report["results"]
    assert ok["tokens_per_s"] > 0 and ok["steps_measured"] == 2 and ok["speed_vs_bf16"] == 1.0
    assert "model.preset" in failed["error"]
    assert report["environment"]["command"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| no-such-model | 64 | 2 × 2 | bf16 | eager | failed")


def test_bench_runs_a_data_parallel_case_with_the_batch_per_gpu_kept(demo_cache, tmp_path, monkeypatch):
    """--gpus 2: the case runs under torch.distributed.run (two gloo processes here), each GPU keeps the
    micro batch and accumulation of the one-GPU case (the global batch doubles), and the ratio compares
    it with a BF16 row of the same width only."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    case = bench.build_cases(["gpt2"], [1024], [("int8", "graphs")], {"gpt2": 16}, grad_accum=8, gpus=4)[0]
    assert "train.global_batch_size=512" in case.overrides() and case.name.endswith("_dp4")
    out = tmp_path / "e2e.json"
    code = bench.main(["--models", "tiny", "--seq", "64", "--recipes", "bf16", "--steps", "2", "--gpus", "2",
                       "--warmup", "1", "--micro-batch", "2", "--vocab-size", "384",
                       "--config", str(REPO_ROOT / "configs" / "tiny_cpu.json"),
                       "--override", f"data.cache_dir={demo_cache}", "--override", "data.demo_max_bytes=400000",
                       "--override", "data.num_workers=0", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert code == 0, row.get("log_tail")
    assert row["gpus"] == 2 and row["tokens_per_s"] > 0 and row["speed_vs_bf16"] == 1.0
    log = (tmp_path / "work" / "tiny_64_bf16_eager_dp2.log").read_text()
    assert "world 2 = TP 1 x DP 2" in log and "micro 2 x accumulation 8 x DP 2" in log, log[-2000:]
    rows = [dict(row), dict(row, gpus=1, tokens_per_s=row["tokens_per_s"] * 4)]   # a faster one-GPU BF16 row
    bench.add_ratios(rows)
    assert rows[0]["speed_vs_bf16"] == 1.0 and rows[1]["speed_vs_bf16"] == 1.0     # each against its own width
    assert "| tiny | 64 | 2 × 8 × 2 GPUs | bf16 | eager |" in bench.format_table(rows)


# ---------------------------------------------------------------------------------------------------
# tools/memory_breakdown.py

def test_memory_breakdown_counts_what_each_recipe_keeps(tmp_path):
    """The byte count behind the end-to-end memory comparison, on the tiny preset: BF16 saves every
    linear's input in BF16, the int8 recipe its INT8 operand (so the linears' share shrinks and
    nothing else changes), the INT8 data flow moves the LayerNorm/GELU/attention saves into the block
    (INT8); the head's logits and the model state are the same for all; the weight cache holds two
    INT8 orientations of every block linear (2 bytes per weight element + scales)."""
    tool = _load_tool("memory_breakdown")
    out = tmp_path / "mem.json"
    assert tool.main(["--model", "tiny", "--seq", "64", "--micro-batch", "8", "--count-batch", "2",
                      "--vocab", "512", "--recipes", "bf16,int8,int8_df", "--json", str(out)]) == 0
    bf16, int8, df = json.loads(out.read_text())["results"]
    linears = ("ColumnParallelLinear", "RowParallelLinear")
    share = [sum(r["activations_by_module"].get(k, 0) for k in linears) for r in (bf16, int8)]
    assert 0 < share[1] < 0.75 * share[0], share
    for key in ("GPT", "CausalSelfAttention", "LayerNorm", "MLP"):
        assert int8["activations_by_module"].get(key) == bf16["activations_by_module"].get(key), key
    assert df["activations"] < int8["activations"] < bf16["activations"]
    assert bf16["model_state"] == int8["model_state"] == 16 * bf16["parameters"]
    # W [out, in] and Wᵀ [in, out], each padded to whole Hadamard-128 blocks along its last dim, INT8,
    # with an FP32 scale per row; 2 layers of qkv, proj, fc1, fc2 at width 64
    def padded(n):
        return -(-n // 128) * 128
    shapes = [(3 * 64, 64), (64, 64), (4 * 64, 64), (64, 4 * 64)]
    cache = 2 * sum(o * padded(i) + 4 * o + i * padded(o) + 4 * i for o, i in shapes)
    assert bf16["weight_cache"] == 0 and int8["weight_cache"] == cache
    with pytest.raises(ValueError, match="unknown variant"):
        tool.build("tiny", 64, "int3", 512)


# ---------------------------------------------------------------------------------------------------
# tools/bench_kernels.py (GPU only; its argument parsing is checked here)

def test_bench_kernels_profile_shapes_parse_and_name_bad_ones():
    kernels_bench = _load_tool("bench_kernels")
    assert kernels_bench._parse_shapes("8192x4096x4096, 16384X3072x768") == [(8192, 4096, 4096), (16384, 3072, 768)]
    for bad in ("8192x4096", "8192x0x4096", "axbxc"):
        with pytest.raises(ValueError, match=f"--profile-shapes: '{bad}' is not MxNxK"):
            kernels_bench._parse_shapes(bad)


# ---------------------------------------------------------------------------------------------------
# tools/sweep_quantizers.py (its GPU sweep; here the Triton kernels under the interpreter)

def _run_quantizer_sweep(tmp_path, *options: str) -> tuple[list[dict], str]:
    """sweep_quantizers.py on 256 x 200 inputs under the interpreter, two plans per orientation, one
    timing each: (its JSON results, its stdout); it must exit 0."""
    import subprocess

    from conftest import subprocess_env

    out = tmp_path / "sweep.json"
    env = subprocess_env(MEGAQ_KERNELS="triton", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "sweep_quantizers.py"), "--tokens", "256",
                           "--widths", "200", *options, "--quick", "--iters", "1", "--warmup", "0",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())["results"], proc.stdout


def test_quantizer_sweep_runs_plans_and_checks_them_against_the_automatic_choice(tmp_path):
    rows, stdout = _run_quantizer_sweep(tmp_path)
    assert {(r["orientation"], r["rounding"]) for r in rows} == {
        (o, r) for o in ("rows", "transposed") for r in ("nearest", "stochastic")}
    for r in rows:   # every plan ran, matched the automatic choice (same dither for stochastic) and was timed
        assert len(r["plans"]) == 2 and all(p["ok"] and p["us"] > 0 for p in r["plans"]), r
        assert r["best"]["us"] > 0 and r["width"] == 200 and r["tokens"] == 256
    assert "200 transposed stochastic" in stdout


def test_quantizer_sweep_times_the_dual_call_against_the_two_single_calls(tmp_path):
    rows, stdout = _run_quantizer_sweep(tmp_path, "--orientations", "dual")
    assert [(r["orientation"], r["rounding"]) for r in rows] == [("dual", "nearest"), ("dual", "stochastic")]
    for r in rows:   # the pair agrees with the single calls' and with every plan's; all were timed
        assert r["vs_singles"]["ok"] and r["singles_us"] > 0 and r["auto_us"] > 0, r
        assert len(r["plans"]) == 2 and all(p["ok"] and p["us"] > 0 for p in r["plans"]), r
    assert "output as theirs" in stdout


def test_quantizer_sweep_times_the_delayed_call_against_the_two_pass_call(tmp_path):
    rows, stdout = _run_quantizer_sweep(tmp_path, "--orientations", "delayed")
    assert [(r["orientation"], r["rounding"]) for r in rows] == [("delayed", "nearest"), ("delayed", "stochastic")]
    for r in rows:   # a prediction equal to the abs-max gives the two-pass output; every plan agrees
        assert r["vs_twopass"]["ok"] and r["twopass_us"] > 0 and r["auto_us"] > 0, r
        assert len(r["plans"]) == 2 and all(p["ok"] and p["us"] > 0 for p in r["plans"]), r
    assert "output as its" in stdout


def test_quantizer_sweep_flags_a_plan_whose_output_differs():
    from types import SimpleNamespace

    sweep = _load_tool("sweep_quantizers")
    data = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    ref = SimpleNamespace(data=data, scale=torch.ones(64, 1))
    assert sweep.compare(SimpleNamespace(data=data.clone(), scale=torch.ones(64, 1)), ref)["ok"]
    off_by_two = data.clone()
    off_by_two[0, 0] = off_by_two[0, 0] - 2 if off_by_two[0, 0] > 0 else off_by_two[0, 0] + 2
    assert not sweep.compare(SimpleNamespace(data=off_by_two, scale=torch.ones(64, 1)), ref)["ok"]
    many_ones = data.clone()
    many_ones[:8] = torch.where(data[:8] > 0, data[:8] - 1, data[:8] + 1)   # 1/8 of the payload one step off
    assert not sweep.compare(SimpleNamespace(data=many_ones, scale=torch.ones(64, 1)), ref)["ok"]
    scaled = SimpleNamespace(data=data.clone(), scale=torch.full((64, 1), 1.0 + 1e-4))
    assert not sweep.compare(scaled, ref)["ok"]
    nan = SimpleNamespace(data=data.clone(), scale=torch.full((64, 1), float("nan")))
    assert not sweep.compare(nan, ref)["ok"]


# ---------------------------------------------------------------------------------------------------
# tools/bench_env.py: the commit a results file names

def _bench_env():
    return _load_tool("bench_env")


def test_results_name_the_checkouts_commit_and_not_an_enclosing_ones(tmp_path, monkeypatch):
    """The checkout's own HEAD at its top; a tree unpacked inside another checkout (or outside any)
    names MEGAQ_COMMIT, or nothing, never the enclosing clone's HEAD."""
    import subprocess

    env = _bench_env()
    monkeypatch.delenv("MEGAQ_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert env.checkout_commit(REPO_ROOT) in (head, head + "+dirty")
    outer = tmp_path / "clone"
    nested = outer / "scratch" / "copy"
    nested.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=outer, check=True)
    (outer / "f").write_text("x")
    subprocess.run(git + ["add", "f"], cwd=outer, check=True)
    subprocess.run(git + ["commit", "-qm", "c"], cwd=outer, check=True)
    assert env.checkout_commit(outer) and env.checkout_commit(nested) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    assert env.checkout_commit(plain) is None
    monkeypatch.setenv("MEGAQ_COMMIT", "abc1234")
    assert env.checkout_commit(nested) == "abc1234" and env.checkout_commit(plain) == "abc1234"
    assert env.environment(nested)["commit"] == "abc1234"


# ---------------------------------------------------------------------------------------------------
# tools/bench_block.py (GPU-only; its table from results here)

def _bench_block():
    return _load_tool("bench_block")


def test_block_variant_switches_name_real_defaults():
    bench_block = _bench_block()
    assert bench_block.parse_variant("int8_df_delayed+gelu2+gelu32+wrot") == ("int8_df_delayed", ["gelu2", "gelu32", "wrot"])
    assert bench_block.parse_variant("bf16") == ("bf16", [])
    for bad in ("int8_df+nope", "int9"):
        with pytest.raises(ValueError, match="unknown variant"):
            bench_block.parse_variant(bad)
    for module, attr in bench_block.SWITCHES.values():    # each switch is a data-flow default, on
        assert getattr(module, attr) is True, (module.__name__, attr)


def test_block_table_reports_graphed_times_against_graphed_bf16():
    bench_block = _bench_block()

    def row(variant, ms, ms_graphs=None):
        r = {"width": 4096, "seq": 2048, "batch": 8, "variant": variant, "ms": ms,
             "peak_bytes": 2**30, "saved_bytes": 2**29}
        if ms_graphs is not None:
            r["ms_graphs"] = ms_graphs
        return r

    plain = bench_block.table([row("bf16", 10.0), row("int8", 8.0)])
    assert "graphs ms" not in plain and "| 4096 | 16384 | int8 | 8.00 | 1.25× | 1024 |" in plain
    graphed = bench_block.table([row("bf16", 10.0, 9.0), row("int8", 8.0, 6.0), row("int4", 20.0)])
    assert "| graphs ms | vs BF16 |" in graphed
    assert "| 4096 | 16384 | int8 | 8.00 | 1.25× | 6.00 | 1.50× | 1024 |" in graphed
    assert "| 4096 | 16384 | int4 | 20.00 | 0.50× | — | — | 1024 |" in graphed


def test_short_case_timeout_warns_only_when_a_quantized_recipe_runs(capsys):
    bench.parse_args(["--models", "gpt2", "--recipes", "bf16@graphs,int8_delayed@graphs", "--case-timeout", "130"])
    warning = capsys.readouterr().err
    assert "--case-timeout 130 s" in warning and "int8_delayed" in warning
    bench.parse_args(["--models", "gpt2", "--recipes", "bf16@graphs,fp8_tensorwise", "--case-timeout", "130"])
    bench.parse_args(["--models", "gpt2", "--recipes", "int8_delayed@graphs"])     # the default: 600 s
    assert capsys.readouterr().err == ""


def test_gemm_tiles_table_gives_ratios_to_bf16_and_the_same_tile_ratio():
    tiles = _load_tool("bench_gemm_tiles")
    row = {"shape": [8192, 4096, 4096], "cuBLAS bf16": 800.0}
    row.update({name: 400.0 * (i + 1) for i, name in enumerate(tiles.CASES)})
    row["blk128 / rowcol, 128x128 registers"] = 0.5
    text = tiles.table([row])
    header, _, line = text.splitlines()
    assert header.count("|") == len(tiles.CASES) + 4
    assert line.startswith("| 8192, 4096, 4096 | 800 | 400 (0.50×) | 800 (1.00×) |")
    assert line.endswith("| 0.50 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU gets")
def test_gemm_tiles_without_a_gpu_says_what_it_needs(capsys):
    tiles = _load_tool("bench_gemm_tiles")
    assert tiles.main([]) == 2
    assert "needs an sm_90 GPU" in capsys.readouterr().err
