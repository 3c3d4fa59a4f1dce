"""Configuration: validation messages name the key, overrides, the DeepSpeed part, the shipped
configs, and docs/CONFIG.md being generated from the schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from megaq.training.config import (ConfigError, apply_overrides, build_deepspeed_config, config_from_dict,
                                   load_config, parse_override, resolve_layout, resolve_precision)

REPO = Path(__file__).resolve().parent.parent

BASE = {
    "model": {"preset": "tiny"},
    "data": {"demo": True},
    "train": {"train_steps": 10, "micro_batch_size": 4, "global_batch_size": 16},
    "zero_optimization": {"stage": 1},
}


def with_(**sections) -> dict:
    cfg = copy.deepcopy(BASE)
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    return str(err.value)


def test_valid_config_and_preset_filling():
    cfg = config_from_dict(with_(model={"preset": "gpt2", "n_layer": 3}))
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.seq_len) == (3, 12, 768, 1024)
    assert cfg.deepspeed == {"zero_optimization": {"stage": 1}}
    again = config_from_dict(cfg.to_dict())  # what a checkpoint stores validates back to the same
    assert again == cfg
    big = config_from_dict(with_(model={"preset": "gpt-2.7b"})).model
    assert (big.n_layer, big.n_head, big.n_embd, big.seq_len) == (32, 32, 2560, 2048)
    seven = config_from_dict(with_(model={"preset": "gpt-6.7b"})).model
    assert (seven.n_layer, seven.n_head, seven.n_embd, seven.seq_len) == (32, 32, 4096, 2048)


def test_unknown_top_level_key_is_named_with_the_closest_valid_one():
    message = error_of(with_(zero_optimisation={"stage": 1}))
    assert "'zero_optimisation'" in message and "did you mean 'zero_optimization'" in message
    message = error_of(with_(trian={"train_steps": 1}))
    assert "'trian'" in message and "'train'" in message
    assert "'nebula'" in error_of(with_(nebula={"enabled": True}))  # removed from DeepSpeed: says so


def test_unknown_key_inside_a_section_is_named():
    message = error_of(with_(train={"learning_rate": 1e-3}))
    assert "'train.learning_rate'" in message and "did you mean 'lr'" in message
    message = error_of(with_(model={"n_layers": 4}))
    assert "'model.n_layers'" in message and "'n_layer'" in message
    message = error_of(with_(data={"tokenizer": {"typ": "byte"}}))
    assert "'data.tokenizer.typ'" in message and "'type'" in message
    message = error_of(with_(zero_optimization={"stag": 2}))  # checked with DeepSpeed's own schema
    assert "'zero_optimization.stag'" in message and "'stage'" in message


def test_wrong_values_name_the_key_and_the_allowed_values():
    message = error_of(with_(train={"decay": "cosin"}))
    assert "train.decay" in message and "'cosine'" in message and "'linear'" in message
    message = error_of(with_(quant={"recipe": "int9"}))
    assert "quant.recipe" in message and "int8" in message
    assert "model.preset" in error_of(with_(model={"preset": "gpt5"}))
    assert "train.lr" in error_of(with_(train={"lr": -1}))
    assert "zero_optimization.stage" in error_of(with_(zero_optimization={"stage": 7}))
    assert "train.train_steps" in error_of(with_(train={"train_tokens": 1000}))  # both given
    assert "model.n_head" in error_of({**BASE, "model": {"n_layer": 2, "n_embd": 64, "seq_len": 8}})


def test_tensor_parallel_not_dividing_heads_names_both_keys():
    message = error_of(with_(model={"preset": "tiny", "n_head": 2}, parallel={"tensor_parallel": 4}))
    assert "parallel.tensor_parallel=4" in message and "model.n_head=2" in message


def test_missing_data_path_names_data_path(tmp_path):
    message = error_of({**BASE, "data": {"path": str(tmp_path / "corpus")}})
    assert "data.path" in message and "corpus.bin" in message and "corpus.idx" in message
    assert "data.path" in error_of({**BASE, "data": {}})
    (tmp_path / "corpus.bin").write_bytes(b"")
    (tmp_path / "corpus.idx").write_bytes(b"")
    assert config_from_dict({**BASE, "data": {"path": str(tmp_path / "corpus")}}).data.source == "path"
    # path wins over the demo corpus
    assert config_from_dict({**BASE, "data": {"path": str(tmp_path / "corpus"), "demo": True}}).data.source == "path"


def test_world_size_and_batch_checks_name_the_keys():
    cfg = config_from_dict(with_(parallel={"tensor_parallel": 2}))
    with pytest.raises(ConfigError, match="parallel.tensor_parallel=2 does not divide the world size 3"):
        resolve_layout(cfg, 3)
    layout = resolve_layout(cfg, 4)  # TP 2 x DP 2: 16 = 4 x 2 x 2 -> accumulation 2
    assert (layout.data_parallel, layout.gradient_accumulation_steps, layout.global_batch_size) == (2, 2, 16)
    with pytest.raises(ConfigError, match="train.global_batch_size=16 is not a multiple of train.micro_batch_size=4"):
        resolve_layout(config_from_dict(BASE), 3)
    disagree = config_from_dict(with_(train_batch_size=32))
    with pytest.raises(ConfigError, match="train_batch_size=32"):
        resolve_layout(disagree, 1)
    # DeepSpeed-style batch keys alone are understood.
    ds_style = config_from_dict({**with_(train={"train_steps": 1}), "train_batch_size": 64,
                                 "train_micro_batch_size_per_gpu": 8})
    ds_style.train.micro_batch_size = None
    ds_style.train.global_batch_size = None
    layout = resolve_layout(ds_style, 2)
    assert (layout.micro_batch_size, layout.gradient_accumulation_steps) == (8, 4)
    tokens = config_from_dict(with_(train={"train_steps": None, "train_tokens": 10_000}))
    assert resolve_layout(tokens, 1).train_steps == 10  # ceil(10000 / (16 x 64))


def test_deepspeed_config_is_filled_from_train():
    cfg = config_from_dict(with_(train={"grad_clip": 0.5}, wall_clock_breakdown=True))
    layout = resolve_layout(cfg, 2)
    ds = build_deepspeed_config(cfg, layout, resolve_precision(cfg, "cpu"))
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert "bf16" not in ds and "fp16" not in ds  # FP32 on CPU
    assert ds["wall_clock_breakdown"] is True and ds["zero_optimization"] == {"stage": 1}
    # BF16 without DeepSpeed's per-parameter overflow scan (megaq checks the gradient norm instead);
    # a config's own bf16 section is kept as given
    assert build_deepspeed_config(cfg, layout, "bf16")["bf16"] == {"enabled": True, "check_grad_overflow": False}
    own = config_from_dict(with_(bf16={"enabled": True}))
    assert build_deepspeed_config(own, resolve_layout(own, 1), "bf16")["bf16"] == {"enabled": True}
    # DeepSpeed's throughput timer (a device sync per micro batch) is off unless the config sets it
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    timed = config_from_dict(with_(timers={"throughput": {"enabled": True}}))
    assert build_deepspeed_config(timed, resolve_layout(timed, 1), "fp32")["timers"] == {"throughput": {"enabled": True}}
    clash = config_from_dict(with_(gradient_clipping=2.0))
    with pytest.raises(ConfigError, match="gradient_clipping=2.0 disagrees with train.grad_clip"):
        build_deepspeed_config(clash, resolve_layout(clash, 1), "fp32")
    with pytest.raises(ConfigError, match="train.precision='bf16' is not supported on CPU"):
        resolve_precision(config_from_dict(with_(train={"precision": "bf16"})), "cpu")
    with pytest.raises(ConfigError, match="'optimizer'"):
        config_from_dict(with_(optimizer={"type": "Adam"}))
    ds_checkpoint = config_from_dict(with_(checkpoint={"deepspeed": {"tag_validation": "Ignore"}}))
    assert build_deepspeed_config(ds_checkpoint, resolve_layout(ds_checkpoint, 1), "fp32")["checkpoint"] == {
        "tag_validation": "Ignore"}


def test_overrides():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("model.preset=tiny") == (["model", "preset"], "tiny")  # not JSON: a string
    assert parse_override("train.betas=[0.9, 0.99]") == (["train", "betas"], [0.9, 0.99])
    assert parse_override("checkpoint.dir=null") == (["checkpoint", "dir"], None)
    assert parse_override("data.path=a=b") == (["data", "path"], "a=b")
    raw = apply_overrides(BASE, ["zero_optimization.stage=3", "train.seed=7", "logging.tensorboard_dir=tb",
                                 "bf16.enabled=false"])
    assert raw["zero_optimization"] == {"stage": 3} and raw["train"]["seed"] == 7
    assert raw["logging"] == {"tensorboard_dir": "tb"} and raw["bf16"] == {"enabled": False}
    assert BASE["zero_optimization"] == {"stage": 1}  # the input is not modified
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="'train.lr' is 0.001, not a section"):
        apply_overrides(with_(train={"lr": 1e-3}), ["train.lr.x=1"])


def test_load_config_applies_and_validates_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"_comment": "a note", **BASE}))
    cfg = load_config(path, ["model.preset=gpt2", "train.lr=1e-4", "zero_optimization.stage=2"])
    assert cfg.model.n_layer == 12 and cfg.train.lr == 1e-4 and cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.comment == "a note"
    with pytest.raises(ConfigError, match="'train.lerning_rate'.*did you mean 'lr'"):
        load_config(path, ["train.lerning_rate=1e-4"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    path.write_text('{"model": {"preset": "tiny"}, "model": {}}')
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


def _prepared_char_corpus(tmp_path: Path) -> list[str]:
    """A small char-level indexed dataset, for configs written for prepared data (data.path)."""
    from megaq.data.preprocess import preprocess
    from megaq.data.tokenizer_training import train_char_vocab

    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 400)
    vocab = tmp_path / "chars.json"
    train_char_vocab([text.read_text()], vocab)
    preprocess(text, tmp_path / "corpus", {"type": "char", "model": str(vocab)}, whole_file=True,
               progress=False)
    return [f"data.path={tmp_path / 'corpus'}", f"data.tokenizer.model={vocab}"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, tmp_path):
    data = json.loads(path.read_text()).get("data", {})
    prepared = bool(data.get("path"))
    overrides = _prepared_char_corpus(tmp_path) if prepared else []
    if data.get("valid_path"):  # a separate validation set: the same small corpus stands in
        overrides.append(f"data.valid_path={tmp_path / 'corpus'}")
    cfg = load_config(path, overrides)
    if not prepared:
        assert cfg.data.source == "demo"  # runs anywhere, out of the box
    # CPU configs are for 1-2 processes, GPU configs for a node of 8 GPUs; a config for prepared data
    # reproduces a single-GPU reference run.
    counts = (1, 2) if path.name.startswith("tiny") else (1,) if prepared else (1, 8)
    for processes in counts:
        resolve_layout(cfg, cfg.parallel.tensor_parallel * processes)
    assert cfg.checkpoint.dir and cfg.logging.tensorboard_dir


def test_gpt2_configs_have_gpt2_124m_shape():
    for name, recipe in (("gpt2_bf16", "bf16"), ("gpt2_int8", "int8_delayed"), ("gpt2_int4", "int4")):
        cfg = load_config(REPO / "configs" / f"{name}.json")
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.seq_len) == (12, 768, 12, 1024)
        assert cfg.quant.recipe == recipe
    tiny = load_config(REPO / "configs" / "gpt2_int8.json", ["model.preset=tiny"])
    assert (tiny.model.n_layer, tiny.model.n_embd) == (2, 64)


def test_config_docs_are_up_to_date():
    from megaq.training.config_docs import render_config_docs

    committed = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert committed == render_config_docs(), "docs/CONFIG.md is stale: run python tools/gen_config_docs.py"


def test_every_schema_field_has_a_description():
    from megaq.training.config_docs import SECTIONS

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    for section, model in SECTIONS:
        walk(model, f"{section}.")


def test_cuda_graphs_refuse_what_cannot_be_captured_naming_each_key():
    assert config_from_dict(with_(train={"cuda_graphs": True})).train.cuda_graphs
    message = error_of(with_(train={"cuda_graphs": True, "compile": True},
                             model={"preset": "tiny", "dropout": 0.1},
                             quant={"recipe": "int4", "check_finite": True},
                             zero_optimization={"stage": 3}))
    for key in ("model.dropout=0.1", "quant.check_finite=true", "train.compile=true",
                "zero_optimization.stage=3"):
        assert key in message, (key, message)
    assert "parallel.tensor_parallel=2" in error_of(with_(train={"cuda_graphs": True},
                                                          parallel={"tensor_parallel": 2}))


def test_cuda_graphs_auto_accepts_any_run_and_names_why_it_stays_eager():
    from megaq.training.config import cuda_graph_conflicts

    auto = config_from_dict(with_(train={"cuda_graphs": "auto"}, parallel={"tensor_parallel": 2},
                                  quant={"recipe": "int4"}))
    assert auto.train.cuda_graphs == "auto"
    conflicts = cuda_graph_conflicts(auto, "cpu")
    assert any("cpu run" in c for c in conflicts) and any("tensor_parallel=2" in c for c in conflicts)
    assert not any("int4" in c for c in conflicts)   # the INT4 backward is sync-free: it is captured
    assert cuda_graph_conflicts(config_from_dict(with_(train={"cuda_graphs": "auto"})), "cuda") == []
    assert "train.cuda_graphs" in error_of(with_(train={"cuda_graphs": "sometimes"}))
