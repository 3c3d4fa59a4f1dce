"""Build what DeepSpeed trains: the GPT under its recipes, AdamW with decay / no-decay groups, the
warm-up + decay LR schedule, and the DeepSpeed engine over megaq's tensor x data parallel groups.

Precision: on GPUs DeepSpeed's bf16 mode (BF16 parameters and activations, FP32 master weights and
optimizer state in its optimizer wrapper); on CPU everything stays FP32. ZeRO stages 0-3 come from
the config's `zero_optimization` section as DeepSpeed reads it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from megaq.models import GPT, GPTConfig, configure_optimizer_groups
from megaq.nn import ColumnParallelLinear, RowParallelLinear
from megaq.parallel import DeepSpeedMPU
from megaq.parallel.grad_compression import ERROR_FEEDBACK_BITS
from megaq.training.config import ConfigError, Layout, MegaqConfig, cuda_graph_conflicts
from megaq.training.schedule import WarmupDecaySchedule

logger = logging.getLogger(__name__)


@dataclass
class TrainingEngine:
    engine: Any                  # deepspeed.DeepSpeedEngine
    optimizer: Any               # what DeepSpeed wraps around our AdamW (ZeRO / bf16 optimizer)
    scheduler: torch.optim.lr_scheduler.LambdaLR   # steps a WarmupDecaySchedule (see schedule.py)
    model_config: GPTConfig
    flops_per_token: int
    num_parameters: int
    block_graphs: Any = None     # megaq.training.cuda_graphs.BlockGraphs with train.cuda_graphs


def gpt_config(cfg: MegaqConfig, tokenizer_vocab_size: int) -> GPTConfig:
    m = cfg.model
    vocab = m.vocab_size if m.vocab_size is not None else tokenizer_vocab_size
    if vocab < tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer_vocab_size} ids); remove model.vocab_size or raise it")
    p = cfg.parallel
    return GPTConfig(vocab_size=vocab, seq_len=m.seq_len, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                     dropout=m.dropout, bias=m.bias, tie_embeddings=m.tie_embeddings,
                     fused_cross_entropy=m.fused_cross_entropy,
                     cross_entropy_chunk_tokens=m.cross_entropy_chunk_tokens,
                     sequence_parallel=p.sequence_parallel,
                     recipe=_with_finite_check(cfg.quant.recipe, cfg.quant.check_finite),
                     lm_head_recipe=_with_finite_check(cfg.quant.lm_head_recipe, cfg.quant.check_finite),
                     make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
                     comm_dtype=p.comm_dtype,
                     comm_config={"block": p.comm_block, "backward": p.comm_backward},
                     data_flow=cfg.quant.data_flow, attention_saves=cfg.quant.attention_saves)


def _with_finite_check(recipe: "str | dict", check_finite: bool) -> dict:
    """The recipe as a mapping with quant.check_finite applied (a mapping's own key wins)."""
    spec = {"preset": recipe} if isinstance(recipe, str) else dict(recipe)
    spec.setdefault("check_finite", check_finite)
    return spec


DECAY_GROUP_KEY = "megaq_weight_decay_group"


def build_optimizer(cfg: MegaqConfig, model: torch.nn.Module, device_type: str) -> torch.optim.Optimizer:
    """AdamW: apex's FusedAdam when apex is installed on a GPU machine, else PyTorch's AdamW
    (fused kernel on CUDA, multi-tensor 'foreach' on CPU)."""
    t = cfg.train
    groups = configure_optimizer_groups(model, 1.0, t.optimizer_group_params)  # 1.0 marks the decaying groups
    for group in groups:
        # Remembered in the optimizer state, so that a resumed run knows which group decays even
        # when the configured weight decay is 0.
        group[DECAY_GROUP_KEY] = group["weight_decay"] == 1.0
        group["weight_decay"] = t.weight_decay if group[DECAY_GROUP_KEY] else 0.0
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def apply_config_to_optimizer(cfg: MegaqConfig, scheduler: torch.optim.lr_scheduler.LambdaLR,
                              total_steps: int) -> list[str]:
    """After loading a checkpoint: make the optimizer and LR schedule follow this run's config.

    A checkpoint restores the optimizer's hyperparameters and the scheduler's fields as they were
    saved (LambdaLR.load_state_dict overwrites the schedule object's attributes in place); a resumed
    run whose config changed them (longer training, another peak LR) means the new values. The step
    count and the Adam moments stay as loaded. Returns what changed, for the log.
    """
    t = cfg.train
    schedule = build_schedule(cfg, total_steps)
    groups = scheduler.optimizer.param_groups
    changes = []
    saved = dict(getattr(scheduler.lr_lambdas[0], "__dict__", {})) if scheduler.lr_lambdas else {}
    for key, value in schedule.__dict__.items():
        if key in saved and saved[key] != value:
            changes.append(f"schedule {key}: {saved[key]} -> {value}")
    scheduler.lr_lambdas = [schedule] * len(groups)
    scheduler.base_lrs = [schedule.lr] * len(groups)
    lr = schedule.lr_at(scheduler.last_epoch)
    for group in groups:
        decay = t.weight_decay if group.get(DECAY_GROUP_KEY, group["weight_decay"] > 0) else 0.0
        for key, value in (("betas", tuple(t.betas)), ("eps", t.eps), ("weight_decay", decay)):
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.append(f"{key}: {old} -> {value}")
            group[key] = value
        group["lr"] = lr
    scheduler._last_lr = [lr] * len(groups)
    return list(dict.fromkeys(changes))


def build_schedule(cfg: MegaqConfig, total_steps: int) -> WarmupDecaySchedule:
    t = cfg.train
    decay_steps = t.decay_steps if t.decay_steps is not None else total_steps
    return WarmupDecaySchedule(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, decay_steps=decay_steps,
                               decay=t.decay)


def compile_blocks(model: GPT) -> None:
    """train.compile: torch.compile each transformer block in place.

    In place (nn.Module.compile) rather than torch.compile(model): the parameter names keep no
    `_orig_mod.` prefix, so checkpoints, the optimizer groups and the export do not depend on the
    flag. Per block ("regional" compilation): the blocks share one compiled graph, so compile time
    does not grow with depth; the embeddings and the vocab-parallel loss stay eager. Done before
    `deepspeed.initialize`, which then wraps a model whose blocks are compiled; this is what
    DeepSpeed's own `engine.compile()` does without DeepCompile (module.compile with the inductor
    backend), and DeepCompile's passes are for ZeRO-3, which megaq's ZeRO-1 runs do not use.
    Compilation is lazy: the first forward pays for it.

    Linear layers under a quantized recipe (INT8/INT4) are excluded (torch.compiler.disable): they
    run eagerly, as graph breaks between the compiled LayerNorm / attention / GELU / residual
    pieces. Left to dynamo, tracing into their kernel dispatch (Triton launches, cached lookups,
    host-side checks) did not finish within a minute for GPT-2 on an H100, and their GEMMs and
    quantizers are fused kernels already."""
    for block in model.blocks:
        for module in block.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.recipe.is_quantized:
                module.forward = torch.compiler.disable(module.forward)
        block.compile()


@contextlib.contextmanager
def compile_failures_explained(cfg: MegaqConfig):
    """Around the training loop: a torch.compile failure (train.compile=true) is re-raised naming
    the option and the recipe. It is not hidden by falling back to eager, which would make a
    benchmark row claim a compiled run that was not."""
    if not cfg.train.compile:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as e:
        what = f"quant.peer={cfg.quant.peer}" if cfg.quant.peer else f"quant.recipe={cfg.quant.recipe}"
        raise RuntimeError(f"train.compile=true: torch.compile failed for {what} ({type(e).__name__}, see "
                           f"above); run with train.compile=false") from e


def _gpus_per_node() -> int:
    return max(torch.cuda.device_count(), 1)


def build_training_engine(cfg: MegaqConfig, layout: Layout, ds_config: dict, tokenizer_vocab_size: int,
                          device_type: str) -> TrainingEngine:
    """Model, optimizer, schedule and `deepspeed.initialize`. Model parallel groups and seeds must
    already be set up (megaq.parallel.initialize_model_parallel, model_parallel_seed)."""
    import deepspeed

    model_cfg = gpt_config(cfg, tokenizer_vocab_size)
    model = GPT(model_cfg)
    flops_per_token = model.flops_per_token()
    num_parameters = model.num_parameters()
    if cfg.quant.peer is not None:
        from megaq.training.peers import apply_peer
        apply_peer(model, cfg.quant.peer, device_type)
    if cfg.train.compile:
        compile_blocks(model)
    optimizer = build_optimizer(cfg, model, device_type)
    schedule = build_schedule(cfg, layout.train_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if cfg.parallel.grad_compression == "zeropp":
        from megaq.parallel.grad_compression import zeropp_keys
        zero = ds_config.setdefault("zero_optimization", {})
        for key, value in zeropp_keys(layout.world_size, _gpus_per_node()).items():
            zero.setdefault(key, value)  # explicit keys in the config win
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=DeepSpeedMPU())
    if cfg.parallel.grad_compression in ERROR_FEEDBACK_BITS:
        from megaq.parallel import get_data_parallel_group
        from megaq.parallel.grad_compression import GradCompressionState, attach_to_deepspeed
        attach_to_deepspeed(engine, GradCompressionState(group=get_data_parallel_group(),
                                                         block=cfg.parallel.comm_block,
                                                         bits=ERROR_FEEDBACK_BITS[cfg.parallel.grad_compression]))
    block_graphs = None
    if cfg.train.cuda_graphs:
        conflicts = cuda_graph_conflicts(cfg, device_type)
        if conflicts and cfg.train.cuda_graphs is True:   # only the device is left to refuse here
            raise ConfigError("train.cuda_graphs=true does not support " + "; ".join(conflicts))
        if conflicts:
            logger.info("train.cuda_graphs=auto: the blocks run eagerly, because of " + "; ".join(conflicts))
        else:
            # after deepspeed.initialize: from here on ZeRO-1/2 keep every parameter's storage in place
            from megaq.training.cuda_graphs import install_block_graphs
            block_graphs = install_block_graphs(engine.module)
    return TrainingEngine(engine=engine, optimizer=ds_optimizer, scheduler=ds_scheduler,
                          model_config=model_cfg, flops_per_token=flops_per_token, num_parameters=num_parameters,
                          block_graphs=block_graphs)
