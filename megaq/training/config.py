"""megaq's run configuration: one JSON file holding megaq's sections and the DeepSpeed configuration.

    {
      "_comment": "free text (top level only)",
      "model": {...}, "data": {...}, "quant": {...}, "parallel": {...},
      "train": {...}, "checkpoint": {...}, "logging": {...},
      "zero_optimization": {"stage": 1}, ...   <- every other top-level key is DeepSpeed's
    }

megaq's sections are pydantic models that forbid unknown keys. Every other top-level key must be a
known DeepSpeed key (an explicit allow-list below); it is passed to ``deepspeed.initialize`` as is,
after megaq fills in what it derives from its own sections (batch sizes, precision, clipping).
Every error names the offending key as a dotted path (``train.lr``) and, where it helps, the
allowed values or the closest valid key.

The checks that need the world size (tensor parallel size dividing it, batch sizes) run at start-up
in :func:`resolve_layout`; everything else runs in :func:`load_config`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ---------------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """A configuration file, key or value is wrong. The message names the key."""


# ---------------------------------------------------------------------------------------------------
# Model presets: architecture shapes. Explicit keys in `model` override the preset's values.

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Fast on a CPU: for tests, demos and trying a config out.
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "seq_len": 64},
    # GPT-2 family (Radford et al. 2019). The vocabulary is the tokenizer's (not part of a preset).
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "seq_len": 1024},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "seq_len": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "seq_len": 1024},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "seq_len": 1024},
    # GPT-3 XL shape (1.3B), as in ALGORITHMS.md's end-to-end measurements.
    "gpt-1.3b": {"n_layer": 24, "n_head": 16, "n_embd": 2048, "seq_len": 2048},
    # GPT-3 2.7B shape (Brown et al. 2020, table 2.1): the larger end of issue 9's "1.3B-2.7B".
    "gpt-2.7b": {"n_layer": 32, "n_head": 32, "n_embd": 2560, "seq_len": 2048},
    # GPT-3 6.7B shape (same table): the 7B-class width (4096) of issue 5's block benchmark, trained end
    # to end. Its optimizer state alone (~16 bytes per parameter) needs ZeRO over two or more GPUs.
    "gpt-6.7b": {"n_layer": 32, "n_head": 32, "n_embd": 4096, "seq_len": 2048},
}
PRESET_KEYS = ("n_layer", "n_head", "n_embd", "seq_len")

# ---------------------------------------------------------------------------------------------------
# DeepSpeed's top-level keys (DeepSpeed 0.19, deepspeed/runtime/config.py and the sub-configs it
# reads). Kept explicit so that a typo at the top level is caught here instead of being ignored.

DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "steps_per_print", "dump_state", "disable_python_gc",
    "disable_allgather", "communication_data_type", "seq_parallel_communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "gradient_clipping", "fp16", "bf16",
    "bfloat16", "torch_autocast", "optimizer", "scheduler", "flops_profiler", "wall_clock_breakdown",
    "memory_breakdown", "autotuning", "use_data_before_expert_parallelism", "hybrid_engine", "pipeline",
    "data_efficiency", "data_types", "aio", "dataloader_drop_last", "log_level", "datastates_ckpt",
    "weight_quantization", "compile", "timers", "tensor_parallel", "expert_parallel", "vocabulary_size",
    "sequence_parallel_size", "data_parallel_size",
    # "checkpoint" is DeepSpeed's too, but the name is megaq's section: DeepSpeed's checkpoint options
    # go in checkpoint.deepspeed.
})

# DeepSpeed keys that would fight with what megaq sets up itself.
DEEPSPEED_KEYS_MEGAQ_OWNS = {
    "optimizer": "megaq builds AdamW itself from train.lr, train.betas, train.eps and train.weight_decay; "
                 "remove the top-level 'optimizer' key",
    "scheduler": "megaq builds the learning-rate schedule itself from train.lr, train.min_lr, "
                 "train.warmup_steps and train.decay; remove the top-level 'scheduler' key",
    "tensor_parallel": "tensor parallelism is megaq's (Megatron-style layers); set parallel.tensor_parallel "
                       "instead of DeepSpeed's AutoTP 'tensor_parallel' key",
    "sequence_parallel_size": "megaq's process groups come from parallel.tensor_parallel; set "
                              "parallel.sequence_parallel instead of DeepSpeed's 'sequence_parallel_size'",
    "data_parallel_size": "the data-parallel size is world size / parallel.tensor_parallel; remove "
                          "'data_parallel_size'",
}

MEGAQ_SECTIONS = ("model", "data", "quant", "parallel", "train", "checkpoint", "logging")
COMMENT_KEY = "_comment"

# Names people reach for out of habit, and where megaq keeps them.
_KEY_ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "num_layers": "n_layer", "n_layers": "n_layer",
    "hidden_size": "n_embd", "num_heads": "n_head", "n_heads": "n_head", "seq_length": "seq_len",
    "max_seq_len": "seq_len", "block_size": "seq_len", "batch_size": "micro_batch_size",
    "global_batch": "global_batch_size", "max_steps": "train_steps", "steps": "train_steps",
    "warmup": "warmup_steps", "clip_grad": "grad_clip", "gradient_clipping": "grad_clip",
    "tp": "tensor_parallel", "tp_size": "tensor_parallel", "tensor_parallel_size": "tensor_parallel",
    "save_dir": "dir", "save": "dir", "resume": "auto_resume", "data_path": "path",
}


def suggest(key: str, allowed: list[str] | set[str] | frozenset[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed key, or ''."""
    if key in _KEY_ALIASES and _KEY_ALIASES[key] in allowed:
        return f" (did you mean {_KEY_ALIASES[key]!r}?)"
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    # A misspelt alias ('lerning_rate') still points to its megaq name.
    alias = difflib.get_close_matches(key, sorted(_KEY_ALIASES), n=1, cutoff=0.8)
    if alias and _KEY_ALIASES[alias[0]] in allowed:
        return f" (did you mean {_KEY_ALIASES[alias[0]]!r}?)"
    return ""


# ---------------------------------------------------------------------------------------------------
# megaq's sections

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The GPT architecture (pre-LayerNorm GPT-2: learned positions, GELU MLP)."""
    preset: Optional[Literal["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-1.3b",
                                     "gpt-2.7b", "gpt-6.7b"]] = Field(
        None, description="Named architecture whose shape fills n_layer, n_head, n_embd and seq_len; "
        "keys given explicitly in `model` override it. See the presets table.")
    vocab_size: Optional[int] = Field(
        None, gt=0, description="Embedding rows. Default: the tokenizer's vocabulary. Either way it is "
        "padded up to a multiple of make_vocab_size_divisible_by x parallel.tensor_parallel.")
    make_vocab_size_divisible_by: int = Field(
        128, gt=0, description="Pad the vocabulary to a multiple of this times the tensor-parallel size "
        "(tensor-core friendly shapes, equal vocab shards).")
    n_layer: Optional[int] = Field(None, gt=0, description="Transformer blocks.")
    n_head: Optional[int] = Field(None, gt=0, description="Attention heads; must be divisible by "
                                  "parallel.tensor_parallel.")
    n_embd: Optional[int] = Field(None, gt=0, description="Model width; must be divisible by n_head.")
    seq_len: Optional[int] = Field(None, gt=0, description="Context length in tokens (learned positions).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and "
                           "residual branches.")
    bias: bool = Field(True, description="Biases in linear layers and LayerNorms (GPT-2 has them).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output layer "
                                 "(lm_head), as GPT-2 does.")
    fused_cross_entropy: bool = Field(
        True, description="Run the output layer and the cross entropy fused, in chunks of tokens, "
        "computing the loss and its gradients in the forward: the [tokens, vocabulary] logits and FP32 "
        "softmax are never kept whole (3.09 GiB saved at GPT-2 124M, 16 x 1024 tokens). Applies when "
        "quant.lm_head_recipe is unquantized (bf16); false: the unfused head and loss (the reference).")
    cross_entropy_chunk_tokens: Optional[int] = Field(
        None, gt=0, description="Tokens per chunk of the fused output layer + cross entropy. Default: "
        "as many as keep one chunk's logits, as held, within 256 MiB (2560 at a 50k vocabulary on "
        "CUDA, where the Triton passes keep them in BF16; 1280 on the torch path's FP32).")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "ModelConfig":
        if self.preset is not None:
            for key, value in MODEL_PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        missing = [k for k in ("n_layer", "n_head", "n_embd", "seq_len") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join('model.' + k for k in missing)}: give them, or set "
                             f"model.preset to one of {sorted(MODEL_PRESETS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        return self


class TokenizerConfig(_Section):
    """Which tokenizer turns text into ids (megaq.data.build_tokenizer's spec)."""
    type: Literal["byte", "char", "sentencepiece"] = Field(
        "byte", description="'byte': UTF-8 bytes (257 ids, nothing to train); 'char': a character "
        "vocabulary file; 'sentencepiece': a trained .model (tools/train_tokenizer.py).")
    model: Optional[str] = Field(None, description="Path of the char vocabulary .json or the "
                                 "sentencepiece .model; none for 'byte'.")

    @model_validator(mode="after")
    def _check_model(self) -> "TokenizerConfig":
        if self.type == "byte" and self.model is not None:
            raise ValueError("data.tokenizer.model must be null for the byte tokenizer")
        if self.type != "byte":
            if not self.model:
                raise ValueError(f"data.tokenizer.model is required for tokenizer type {self.type!r}")
            if not Path(os.path.expanduser(self.model)).is_file():
                raise ValueError(f"data.tokenizer.model: file not found: {self.model}")
        return self

    def spec(self) -> dict:
        model = os.path.expanduser(self.model) if self.model else None
        return {"type": self.type, "model": model}


class DataConfig(_Section):
    """Where training text comes from. Precedence: path, then text_files, then the demo corpus."""
    path: Optional[str] = Field(
        None, description="Prefix of an indexed dataset: PREFIX.bin and PREFIX.idx, written by "
        "tools/preprocess_data.py. Takes precedence over `demo`.")
    text_files: list[str] = Field(
        default_factory=list, description="Convenience for small corpora: text / JSONL files tokenized "
        "into cache_dir on first use (rebuilt when the files or the tokenizer change).")
    demo: bool = Field(
        False, description="Train on the demo corpus (the Python standard library's docstrings, built "
        "under cache_dir; no download) when neither path nor text_files is set.")
    demo_max_bytes: Optional[int] = Field(
        None, gt=0, description="Cap the demo corpus at about this much text (default: the whole library, "
        "about 1.5 MB).")
    cache_dir: str = Field("~/.cache/megaq", description="Where the demo corpus and tokenized text_files "
                           "are written.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig,
                                       description="Tokenizer spec: {type, model}.")
    valid_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of the documents held out "
                                  "for validation (the last ones).")
    valid_path: Optional[str] = Field(
        None, description="Prefix of a separate indexed dataset to validate on (a held-out test text, "
        "tokenized like data.path). With it, all of data.path trains and valid_fraction is not used.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.path is not None and self.text_files:
            raise ValueError("data.path and data.text_files are both set; give one of them")
        if self.path is not None:
            prefix = os.path.expanduser(self.path)
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(f"{prefix}{ext}")]
            if missing:
                raise ValueError(f"data.path={self.path!r}: missing {' and '.join(missing)} (data.path is "
                                 f"the prefix of an indexed dataset made by tools/preprocess_data.py; or "
                                 f"set data.demo=true to train on the demo corpus)")
        elif self.text_files:
            missing = [f for f in self.text_files if not os.path.exists(os.path.expanduser(f))]
            if missing:
                raise ValueError(f"data.text_files: not found: {missing}")
        elif not self.demo:
            raise ValueError("data.path is not set: give the prefix of an indexed dataset (PREFIX.bin + "
                             "PREFIX.idx from tools/preprocess_data.py), or data.text_files, or set "
                             "data.demo=true to train on the built-in demo corpus")
        if self.valid_path is not None:
            prefix = os.path.expanduser(self.valid_path)
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(f"{prefix}{ext}")]
            if missing:
                raise ValueError(f"data.valid_path={self.valid_path!r}: missing {' and '.join(missing)} (the "
                                 f"prefix of an indexed dataset made by tools/preprocess_data.py)")
            if "valid_fraction" in self.model_fields_set and self.valid_fraction > 0:
                raise ValueError(f"data.valid_path and data.valid_fraction={self.valid_fraction} are both set: "
                                 f"with a separate validation set all of the training data trains; remove "
                                 f"data.valid_fraction (or set it to 0)")
        return self

    @property
    def source(self) -> str:
        """'path', 'text_files' or 'demo'."""
        if self.path is not None:
            return "path"
        return "text_files" if self.text_files else "demo"


class QuantConfig(_Section):
    """Precision of the linear layers (recipes are defined in megaq.ops)."""
    recipe: Union[str, dict] = Field(
        "bf16", description="Recipe of the transformer blocks' linear layers (QKV, out-projection, fc1, "
        "fc2): a preset name (bf16, int8, int8_delayed, int8_jetfire, int4, ...; docs/NUMERICS.md) or a mapping "
        "{\"preset\": ..., overrides} (see megaq.ops.get_recipe).")
    lm_head_recipe: Union[str, dict] = Field("bf16", description="Recipe of the output layer (lm_head).")
    data_flow: Literal["bf16", "int8"] = Field(
        "bf16", description="Activations between the blocks' operators. int8: LayerNorm, GELU and fc1's "
        "GEMM epilogue write INT8 GEMM operands and the blocks save INT8 activations for backward (the "
        "INT8 data flow, ALGORITHMS.md §1); needs an INT8 recipe (int8, int8_block128, ...) and no "
        "sequence parallelism. bf16: every linear quantizes its own BF16 input.")
    attention_saves: Literal["bf16", "int8"] = Field(
        "bf16", description="What causal attention keeps for backward. bf16: PyTorch SDPA's own q, k, v and "
        "output in the activations' dtype. int8: INT8 copies of them with one FP32 scale per (token, head), "
        "dequantized for the flash attention backward (megaq.ops.attention): about half of those bytes; the "
        "forward is unchanged; the gradients' relative error grows with the attention logits (about 1.5% at "
        "logit std 1, 4% at 4, 15% at 16 on random data; BF16's own: 0.4-2.6%). Runs PyTorch's flash "
        "attention op (CUDA: BF16/FP16, head_dim a multiple of 8; CPU: no dropout), else falls back to "
        "bf16 with a warning. Independent of recipe and data_flow.")
    log_error_interval: int = Field(
        0, ge=0, description="Every this many steps, log each quantized linear layer's relative forward "
        "error against the bf16 recipe to TensorBoard (quant_error/<layer>); 0 = never.")
    peer: Optional[Literal["torchao_float8_tensorwise", "torchao_float8_rowwise"]] = Field(
        None, description="Benchmark peer, not a megaq recipe: train the transformer blocks' linear layers "
        "with torchao's float8 training (tensorwise or rowwise scaling) instead, for end-to-end "
        "comparisons (tools/bench_e2e.py). Needs torchao, a GPU with float8 tensor cores, "
        "quant.recipe=bf16 and parallel.tensor_parallel=1; use with train.compile=true.")
    cache_weights: bool = Field(
        True, description="Keep each weight's quantized operands (W, and Wᵀ for dgrad) across the micro batches "
        "of one optimizer step instead of requantizing them in every micro batch (megaq.ops.weight_cache; "
        "bit for bit the same numerics). Costs one INT8 copy of the weights per orientation. Not used under "
        "ZeRO-3, whose gathered weights are transient.")
    check_finite: bool = Field(
        False, description="Check every quantizer input for NaN/Inf and raise naming the tensor. Costs a "
        "host synchronization per operand on GPUs; off by default because the training loop stops on a "
        "non-finite loss anyway (at the next log step). Turn on to find where a NaN first appears.")

    @field_validator("recipe", "lm_head_recipe")
    @classmethod
    def _known_recipe(cls, value, info):
        from megaq.ops import RecipeError, get_recipe

        try:
            get_recipe(value)
        except RecipeError as e:
            raise ValueError(f"quant.{info.field_name}: {e}") from None
        return value

    @model_validator(mode="after")
    def _peer_replaces_bf16_only(self) -> "QuantConfig":
        from megaq.ops import get_recipe

        if self.peer is not None:
            quantized = [key for key in ("recipe", "lm_head_recipe") if get_recipe(getattr(self, key)).is_quantized]
            if quantized:
                raise ValueError(f"quant.peer={self.peer!r} replaces the BF16 linear layers with torchao's float8 "
                                 f"ones; it needs {' and '.join('quant.' + k for k in quantized)} = 'bf16'")
        return self


class ParallelConfig(_Section):
    """Tensor parallelism (data parallelism is whatever is left of the world size)."""
    tensor_parallel: int = Field(1, ge=1, description="Tensor-parallel size (Megatron-style). Must divide "
                                 "model.n_head and the world size; data-parallel size = world size / this.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism: shard LayerNorm and "
                                    "dropout activations along the sequence over the tensor-parallel group.")
    comm_dtype: Literal["bf16", "int8"] = Field(
        "bf16", description="Tensor-parallel collectives of the transformer blocks: 'bf16' exact (in the "
        "activations' dtype) or 'int8' (INT8 payload + FP32 block scales; docs/COMMUNICATION.md).")
    comm_block: int = Field(128, description="Elements per scale of the INT8 collectives (-1: one per row).")
    comm_backward: Literal["int8", "exact"] = Field(
        "int8", description="With comm_dtype int8: quantize the backward (gradient) collectives too, or "
        "run them exactly.")
    grad_compression: Literal["none", "int8_ef", "int4_ef", "zeropp"] = Field(
        "none", description="Data-parallel gradient communication: 'none' (DeepSpeed's exact reduction), "
        "'int8_ef' (megaq's INT8 block-scaled all-reduce with error feedback; ZeRO stages 0-2), 'int4_ef' "
        "(the same with INT4 payloads, two per byte: about 0.27x BF16's bytes instead of 0.52x), 'zeropp' "
        "(DeepSpeed ZeRO++ quantized weights/gradients; ZeRO-3 on GPUs). Unsupported combinations are "
        "refused at start-up.")


class TrainConfig(_Section):
    """Optimization: length, batch, AdamW, learning-rate schedule, evaluation."""
    train_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to train. Give this or "
                                       "train_tokens.")
    train_tokens: Optional[int] = Field(None, gt=0, description="Tokens to train on; steps = ceil(tokens / "
                                        "(global_batch_size x seq_len)).")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="Sequences per forward pass per data-parallel rank. Default: DeepSpeed's "
        "train_micro_batch_size_per_gpu if given, else 1.")
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Sequences per optimizer step over all data-parallel ranks; gradient "
        "accumulation steps = global / (micro x data-parallel size). Default: DeepSpeed's "
        "train_batch_size if given, else micro_batch_size x data-parallel size.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate (after warm-up).")
    min_lr: float = Field(6e-5, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from lr/warmup_steps to lr.")
    decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay from lr to min_lr after warm-up, over decay_steps.")
    decay_steps: Optional[int] = Field(None, gt=0, description="Step at which the decay reaches min_lr "
                                       "(default: the total number of steps).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay, applied to the linear layers' "
                                "weights only (not to biases, LayerNorms or embeddings).")
    optimizer_group_params: int = Field(
        2 ** 26, ge=0, description="Split the AdamW parameter groups into groups of at most this many "
        "parameters (0 = one group with weight decay, one without). DeepSpeed ZeRO's update flattens one "
        "group's gradient partition at a time into a BF16 and an FP32 copy, 6 bytes per parameter: with the "
        "default, that transient is at most ~0.4 GB per GPU instead of 6 bytes x the model (7.3 GiB at 1.3B "
        "parameters on one GPU). A checkpoint resumes only with the value it was written with.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off); "
                             "becomes DeepSpeed's gradient_clipping.")
    seed: int = Field(1234, ge=0, description="Seed of the weights, dropout and data order.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Parameter/activation precision: 'auto' = bf16 (with FP32 master weights) on "
        "GPUs that support it, fp32 on CPU. Leave 'auto' when giving DeepSpeed's bf16/fp16 keys.")
    eval_interval: int = Field(0, ge=0, description="Evaluate validation loss and perplexity every this "
                               "many steps and at the end (0 = never).")
    eval_iters: int = Field(10, gt=0, description="Micro batches per data-parallel rank in one evaluation.")
    compile: bool = Field(
        False, description="torch.compile each transformer block in place (nn.Module.compile: parameter "
        "names, and so checkpoints, stay the same) before DeepSpeed wraps the model. Linear layers under "
        "a quantized recipe (INT8/INT4) run eagerly between the compiled pieces; not with "
        "quant.data_flow='int8'. The first step is slow while it compiles.")
    cuda_graphs: Union[bool, Literal["auto"]] = Field(
        False, description="Replay each transformer block's forward and backward from CUDA graphs, captured "
        "at the first training step (megaq.training.cuda_graphs): removes the host time of the quantized "
        "recipes' many small kernel launches. Needs a GPU, parallel.tensor_parallel=1, ZeRO stage <= 2, "
        "model.dropout=0, quant.check_finite=false, no train.compile or quant.peer. "
        "Costs the capture (a few warm-up steps' time) once and keeps the blocks' activations in the "
        "graphs' memory pool. true: required (a run that cannot use them is refused, naming why); "
        "'auto': used where possible, else the blocks run eagerly and the log says why; false: never.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if (self.train_steps is None) == (self.train_tokens is None):
            raise ValueError("give exactly one of train.train_steps and train.train_tokens")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is larger than train.lr={self.lr}")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"train.betas must be in [0, 1), got {list(self.betas)}")
        return self


class CheckpointConfig(_Section):
    """Saving and resuming."""
    dir: Optional[str] = Field(None, description="Directory of the checkpoints (one sub-directory per "
                               "save, plus a 'latest' file). None disables saving.")
    save_interval: int = Field(0, ge=0, description="Save every this many steps (0 = only at the end and "
                               "when a stop signal arrives).")
    save_at_end: bool = Field(True, description="Save when training finishes.")
    keep_last: int = Field(2, ge=0, description="Keep this many complete checkpoints; older ones are "
                           "deleted after a new one is committed (0 = keep all).")
    auto_resume: bool = Field(True, description="On start, resume from the newest complete checkpoint in "
                              "`dir` if there is one (a requeued job continues).")
    load: Optional[str] = Field(None, description="Checkpoint to start from when `dir` has none to "
                                "resume: a checkpoint directory (with 'latest') or one checkpoint's "
                                "directory.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed's own top-level "
                                      "'checkpoint' options (tag_validation, use_node_local_storage, ...), "
                                      "passed on as is.")


class LoggingConfig(_Section):
    """Console progress and TensorBoard."""
    log_interval: int = Field(10, gt=0, description="Print a progress line (rank 0) and write "
                              "TensorBoard scalars every this many steps (and at step 1).")
    tensorboard_dir: Optional[str] = Field(None, description="TensorBoard event directory (rank 0 "
                                           "writes); None disables TensorBoard.")
    metrics_file: Optional[str] = Field(None, description="JSON-lines file of the same scalars (one line "
                                        "per log step and evaluation; appended to on resume); None: none.")
    peak_tflops: Optional[float] = Field(None, gt=0, description="Peak dense BF16 TFLOP/s of one GPU, "
                                         "for MFU; default: looked up from the GPU's name.")
    profile_steps: Optional[tuple[int, int]] = Field(
        None, description="[first, last]: profile these optimizer steps (1-based, inclusive) on rank 0 with "
        "torch.profiler, as Megatron's --profile does. Writes a Chrome/Perfetto trace and the GPU time per "
        "step by kernel category (GEMMs, quantizers, attention, LayerNorm, optimizer, ...) into "
        "logging.profile_dir and logs that table (megaq.training.profiling). With CUDA graphs pick steps "
        "after the first (the capture step). The profiled steps run slower; leave them out of timings.")
    profile_dir: Optional[str] = Field(None, description="Directory of the profiler's trace and kernel "
                                       "summary; required with logging.profile_steps.")

    @model_validator(mode="after")
    def _check_profile(self) -> "LoggingConfig":
        if self.profile_steps is not None:
            first, last = self.profile_steps
            if first < 1 or last < first:
                raise ValueError(f"logging.profile_steps={list(self.profile_steps)} must be [first, last] with "
                                 f"1 <= first <= last")
            if not self.profile_dir:
                raise ValueError("logging.profile_steps is set but logging.profile_dir is not: name the "
                                 "directory the trace goes to")
        return self


class MegaqConfig(BaseModel):
    """A validated run configuration: megaq's sections + the DeepSpeed keys (`deepspeed`)."""
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(description="GPT architecture.")
    data: DataConfig = Field(description="Training data.")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="Linear-layer precision recipes.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Tensor parallelism.")
    train: TrainConfig = Field(description="Optimization.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Console and TensorBoard.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="The top-level DeepSpeed keys.")
    comment: Optional[Union[str, list[str]]] = Field(None, description="The file's `_comment`.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "MegaqConfig":
        tp = self.parallel.tensor_parallel
        if self.model.n_head % tp:
            raise ValueError(f"parallel.tensor_parallel={tp} does not divide model.n_head={self.model.n_head}: "
                             f"each tensor-parallel rank must hold whole attention heads")
        if self.parallel.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
        if self.train.compile and self.quant.data_flow == "int8":
            raise ValueError("train.compile=true does not support quant.data_flow='int8' (its blocks are fused "
                             "INT8 kernels already); set one of them off")
        if self.quant.peer is not None and tp != 1:
            raise ValueError(f"quant.peer={self.quant.peer!r} swaps the linear layers for torchao's, which are "
                             f"not tensor parallel: it needs parallel.tensor_parallel=1 (got {tp})")
        if self.train.cuda_graphs is True:
            conflicts = cuda_graph_conflicts(self)
            if conflicts:
                raise ValueError("train.cuda_graphs=true does not support " + "; ".join(conflicts))
        from megaq.models.gpt import check_data_flow
        check_data_flow(self.quant.data_flow, self.quant.recipe, self.parallel.sequence_parallel, "quant.")
        return self

    def to_dict(self) -> dict:
        """The configuration as a file would hold it (DeepSpeed keys back at the top level)."""
        out: dict[str, Any] = {}
        if self.comment is not None:
            out[COMMENT_KEY] = self.comment
        for section in MEGAQ_SECTIONS:
            out[section] = getattr(self, section).model_dump(mode="json")
        out.update(copy.deepcopy(self.deepspeed))
        return out


# ---------------------------------------------------------------------------------------------------
# Loading


def _format_validation_error(err: ValidationError, prefix: str = "",
                             root: Optional[type[BaseModel]] = None) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Union members show up as extra path parts ('str', 'dict[str,any]'): drop them.
        loc = [p for p in loc if p not in ("str", "dict[str,any]", "list[str]")]
        key = prefix + ".".join(loc)
        if e["type"] == "extra_forbidden":
            parent = _section_model_for(loc[:-1], root or MegaqConfig)
            allowed = sorted(parent.model_fields) if parent is not None else []
            where = f" in '{prefix + '.'.join(loc[:-1])}'" if loc[:-1] else ""
            listing = f"; allowed keys{where}: {allowed}" if allowed else ""
            lines.append(f"unknown key '{key}'{suggest(loc[-1], allowed)}{listing}")
        elif e["type"] in ("value_error", "assertion_error"):
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(msg if key in msg or not key else f"{key}: {msg}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(dict.fromkeys(lines))


def _section_model_for(loc: list[str], root: type[BaseModel]) -> Optional[type[BaseModel]]:
    """The pydantic model at a dotted location (for listing the allowed keys)."""
    model: Optional[type[BaseModel]] = root
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _pydantic_model_in(model.model_fields[part].annotation)
    return model


def _pydantic_model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The BaseModel class in an annotation such as `X`, `Optional[X]` or `Union[X, None]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _pydantic_model_in(arg)
        if found is not None:
            return found
    return None


def _check_deepspeed_keys(raw: dict) -> None:
    for key in raw:
        if key in MEGAQ_SECTIONS or key == COMMENT_KEY:
            continue
        if key in DEEPSPEED_KEYS_MEGAQ_OWNS:
            raise ConfigError(f"top-level key '{key}': {DEEPSPEED_KEYS_MEGAQ_OWNS[key]}")
        if key not in DEEPSPEED_KEYS:
            removed = _deepspeed_removed_keys().get(key)
            if removed:
                raise ConfigError(f"top-level key '{key}' is no longer supported by DeepSpeed: {removed}")
            allowed = set(DEEPSPEED_KEYS) | set(MEGAQ_SECTIONS)
            raise ConfigError(f"unknown top-level key '{key}'{suggest(key, allowed)}: the top level holds "
                              f"megaq's sections {list(MEGAQ_SECTIONS)}, '{COMMENT_KEY}', and DeepSpeed keys "
                              f"(see docs/CONFIG.md)")
    if "zero_optimization" in raw:
        _check_zero_section(raw["zero_optimization"])


def _deepspeed_removed_keys() -> dict[str, str]:
    try:  # private in DeepSpeed: its explanations are better than ours, but don't depend on them
        from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS
        return dict(_REMOVED_TOP_LEVEL_CONFIG_KEYS)
    except Exception:
        return {}


def _check_zero_section(zero: Any) -> None:
    """Validate `zero_optimization` with DeepSpeed's own schema now, not deep inside initialize."""
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization must be an object like {{\"stage\": 1}}, got {zero!r}")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # DeepSpeed missing: deepspeed.initialize will say so later
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, prefix="zero_optimization.",
                                                  root=DeepSpeedZeroConfig)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value). The value is JSON (numbers, true, null,
    [lists], {objects}, "strings"); anything that is not valid JSON is taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=3e-4)")
    key, value_text = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: bad key {key!r} (expected section.key=value)")
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[:i + 1])
                raise ConfigError(f"override {text!r}: '{where}' is {child!r}, not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict) -> MegaqConfig:
    """Validate a configuration dict (DeepSpeed keys at the top level, as in the file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a configuration must be a JSON object, got {type(raw).__name__}")
    _check_deepspeed_keys(raw)
    sections = {k: raw[k] for k in MEGAQ_SECTIONS if k in raw}
    if "model" not in sections:
        raise ConfigError("missing section 'model' (give model.preset or the model's shape)")
    if "train" not in sections:
        raise ConfigError("missing section 'train' (at least train.train_steps or train.train_tokens)")
    if "data" not in sections:
        raise ConfigError("missing section 'data' (data.path, data.text_files or data.demo=true)")
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise ConfigError(f"section '{name}' must be an object, got {value!r}")
    deepspeed_part = {k: copy.deepcopy(v) for k, v in raw.items() if k not in MEGAQ_SECTIONS and k != COMMENT_KEY}
    try:
        return MegaqConfig(**sections, deepspeed=deepspeed_part, comment=raw.get(COMMENT_KEY))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> MegaqConfig:
    """Read a JSON config, apply `section.key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in the same object")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Start-up resolution: what depends on the world size and the device


@dataclass(frozen=True)
class Layout:
    """How the world is split and how a step is batched."""
    world_size: int
    tensor_parallel: int
    data_parallel: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    seq_len: int
    train_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def resolve_layout(cfg: MegaqConfig, world_size: int) -> Layout:
    """Check the parallel sizes and batch sizes against the world size; derive accumulation."""
    tp = cfg.parallel.tensor_parallel
    if world_size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide the world size {world_size} "
                          f"(processes launched); launch a multiple of {tp} processes")
    dp = world_size // tp
    ds = cfg.deepspeed
    micro = cfg.train.micro_batch_size or ds.get("train_micro_batch_size_per_gpu") or 1
    if (cfg.train.micro_batch_size and "train_micro_batch_size_per_gpu" in ds
            and ds["train_micro_batch_size_per_gpu"] != cfg.train.micro_batch_size):
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} and DeepSpeed's "
                          f"train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} disagree; "
                          f"give one of them")
    if cfg.train.global_batch_size is not None:
        global_batch = cfg.train.global_batch_size
    elif "train_batch_size" in ds:
        global_batch = ds["train_batch_size"]
    elif "gradient_accumulation_steps" in ds:
        global_batch = micro * dp * ds["gradient_accumulation_steps"]
    else:
        global_batch = micro * dp
    if global_batch % (micro * dp):
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size"
                          f"={micro} x data-parallel size {dp} (= world size {world_size} / "
                          f"parallel.tensor_parallel={tp})")
    gas = global_batch // (micro * dp)
    for key, derived in (("train_batch_size", global_batch), ("gradient_accumulation_steps", gas)):
        if key in ds and ds[key] != derived:
            raise ConfigError(f"DeepSpeed's {key}={ds[key]} disagrees with {derived} derived from "
                              f"train.global_batch_size={global_batch}, train.micro_batch_size={micro} and "
                              f"data-parallel size {dp}; remove {key} or make them agree")
    seq_len = cfg.model.seq_len
    if cfg.train.train_steps is not None:
        steps = cfg.train.train_steps
    else:
        steps = math.ceil(cfg.train.train_tokens / (global_batch * seq_len))
    return Layout(world_size=world_size, tensor_parallel=tp, data_parallel=dp, micro_batch_size=micro,
                  gradient_accumulation_steps=gas, global_batch_size=global_batch, seq_len=seq_len,
                  train_steps=steps)


def resolve_precision(cfg: MegaqConfig, device_type: str) -> str:
    """'bf16', 'fp16' or 'fp32' for this run on `device_type` ('cuda' or 'cpu')."""
    ds = cfg.deepspeed
    ds_choice = None
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False) in (True, "auto"):
            ds_choice = name
    if ds_choice is not None:
        if cfg.train.precision not in ("auto", ds_choice):
            raise ConfigError(f"train.precision={cfg.train.precision!r} conflicts with DeepSpeed's "
                              f"'{ds_choice}' section being enabled; set one of them")
        return ds_choice
    if cfg.train.precision != "auto":
        if device_type == "cpu" and cfg.train.precision != "fp32":
            raise ConfigError(f"train.precision={cfg.train.precision!r} is not supported on CPU "
                              f"(no GPU found); use 'auto' or 'fp32'")
        return cfg.train.precision
    if device_type == "cuda":
        import torch
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def cuda_graph_conflicts(cfg: MegaqConfig, device_type: str | None = None) -> list[str]:
    """Why train.cuda_graphs cannot be used with `cfg` (empty if it can), each naming the key; with
    `device_type`, also the device."""
    zero = cfg.deepspeed.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    conflicts = [
        (device_type is not None and device_type != "cuda", f"a {device_type} run (graphs need a CUDA GPU)"),
        (cfg.parallel.tensor_parallel != 1, f"parallel.tensor_parallel={cfg.parallel.tensor_parallel} (the TP "
         "collectives count their bytes from Python; graphs need 1)"),
        (cfg.model.dropout > 0, f"model.dropout={cfg.model.dropout} (the TP-aware dropout RNG is not "
         "capture safe; graphs need 0)"),
        (cfg.quant.check_finite, "quant.check_finite=true (a host synchronization per operand)"),
        (cfg.train.compile, "train.compile=true (use one or the other)"),
        (cfg.quant.peer is not None, f"quant.peer={cfg.quant.peer!r}"),
        (str(stage) == "3", "zero_optimization.stage=3 (it gathers parameters into new storage every step)"),
    ]
    return [why for bad, why in conflicts if bad]


def validate_communication(cfg: MegaqConfig, layout: Layout, ds_config: dict, device_type: str) -> None:
    """Refuse tensor/data-parallel communication set-ups megaq does not support, naming the keys."""
    from megaq.parallel.grad_compression import validate_comm_config

    p = cfg.parallel
    zero = ds_config.get("zero_optimization") or {}
    try:
        validate_comm_config(int(zero.get("stage", 0)), {
            "grad_compression": p.grad_compression, "comm_dtype": p.comm_dtype, "comm_block": p.comm_block,
            "comm_backward": p.comm_backward, "zero_optimization": zero,
            "communication_data_type": ds_config.get("communication_data_type"),
            "tensor_parallel": layout.tensor_parallel, "world_size": layout.world_size,
            "device_type": device_type})
    except ValueError as err:
        raise ConfigError(str(err)) from None


def deepspeed_skips_nonfinite_steps(ds_config: dict) -> bool:
    """Whether DeepSpeed itself skips an optimizer step whose gradient norm is NaN/Inf: in FP16 and FP32
    (its ZeRO optimizer checks the norm it clips with; "OVERFLOW! Skipping step"), and in BF16 unless
    `check_grad_overflow` is false (DeepSpeed's default: true; megaq's BF16 configs: false)."""
    for key in ("bf16", "bfloat16"):
        section = ds_config.get(key) or {}
        if section.get("enabled"):
            return bool(section.get("check_grad_overflow", True))
    return True


def build_deepspeed_config(cfg: MegaqConfig, layout: Layout, precision: str) -> dict:
    """The dict for ``deepspeed.initialize(config=...)``: the user's DeepSpeed keys plus what megaq
    derives (batch sizes, precision, clipping)."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch_size
    ds["gradient_accumulation_steps"] = layout.gradient_accumulation_steps
    ds["train_batch_size"] = layout.global_batch_size
    if "gradient_clipping" in ds and float(ds["gradient_clipping"]) != cfg.train.grad_clip:
        raise ConfigError(f"DeepSpeed's gradient_clipping={ds['gradient_clipping']} disagrees with "
                          f"train.grad_clip={cfg.train.grad_clip}; set train.grad_clip only")
    ds["gradient_clipping"] = cfg.train.grad_clip
    if not any(k in ds for k in ("bf16", "bfloat16", "fp16")):
        if precision == "bf16":
            # DeepSpeed's BF16 overflow check scans every parameter's gradient with ~6 small kernels each
            # and synchronizes the device: ~50 ms of host time per 1.3B step during which the GPU waits
            # (with its per-group norm checks, 145 ms of GPU idle per step; docs/PERFORMANCE.md). BF16 has
            # no loss scale to back off, so megaq checks the gradient norm DeepSpeed computes anyway
            # instead, without a sync (NonfiniteGradients in megaq.training.trainer): a non-finite
            # step stops the run before any checkpoint of it. A config's own "bf16" section keeps its choice.
            ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
        elif precision == "fp16":
            ds["fp16"] = {"enabled": True}
    # megaq passes a torch.optim.AdamW; ZeRO would refuse it as "untested" otherwise.
    ds.setdefault("zero_allow_untested_optimizer", True)
    # megaq prints its own progress lines.
    ds.setdefault("steps_per_print", 2**31 - 1)
    # ... and measures its own throughput: DeepSpeed's throughput timer synchronizes the device at every
    # micro batch's forward and every engine.step() call (its default), which leaves the GPU idle while
    # the host catches up: 16 of a 1.3B step's 18 device syncs at 8 micro batches, ~5% of its time on
    # an H100 (docs/PERFORMANCE.md). A config that gives "timers" keeps its own.
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    if cfg.checkpoint.deepspeed:
        ds["checkpoint"] = copy.deepcopy(cfg.checkpoint.deepspeed)
    return ds
