"""`pretrain(cfg)`: the whole run, from process groups to the last checkpoint.

    init distributed -> check layout -> TP/DP groups, seeds -> data -> model + DeepSpeed engine
    -> resume (newest complete checkpoint in checkpoint.dir, else checkpoint.load)
    -> loop: gradient accumulation through engine.backward/step, progress, evaluation,
             quantization-error probes, checkpoints, stop signals
    -> final checkpoint, clean shutdown

Resuming continues the same loss sequence: the data order is a pure function of the global count of
samples consumed (stored in the checkpoint), and every rank's RNG states are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaq.data import DataIterator, ResumableSampler, collate_samples
from megaq.ops import delayed_scaling, get_recipe, weight_cache
from megaq.parallel import (destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                            get_data_parallel_world_size, initialize_model_parallel, model_parallel_seed)
from megaq.training.checkpoint import CheckpointError, CheckpointManager, resolve_checkpoint
from megaq.training.config import (MegaqConfig, build_deepspeed_config, deepspeed_skips_nonfinite_steps,
                                   resolve_layout, resolve_precision, validate_communication)
from megaq.training.data import prepare_data
from megaq.training.distributed import configure_cpu_threads, destroy_distributed, init_distributed
from megaq.training.engine import (apply_config_to_optimizer, build_training_engine,
                                   compile_failures_explained)
from megaq.training.metrics import (CommBytesPerStep, Throughput, count_deepspeed_collectives,
                                    current_device_peak_tflops)
from megaq.training.memory import MemoryPhases
from megaq.training.nonfinite import NonfiniteGradients
from megaq.training.profiling import StepProfiler
from megaq.training.progress import ProgressReporter, setup_console_logging
from megaq.training.quant_error import QuantErrorProbe
from megaq.training.signals import EXIT_RESUMABLE, StopRequest

logger = logging.getLogger("megaq.training")

# Above this many parameters, a CPU run gets a hint about the tiny preset.
_CPU_HINT_PARAMETERS = 20_000_000


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over the data-parallel group (TP ranks already agree on it)."""
    size = get_data_parallel_world_size()
    if size > 1:
        dist.all_reduce(value, group=get_data_parallel_group())
        value = value / size
    return value


@contextlib.contextmanager
def _probing(probe: QuantErrorProbe, block_graphs):
    """The quantization-error probe's forward hooks need real module calls: no graph replays then."""
    with probe.measuring(), (block_graphs.suspended() if block_graphs is not None else contextlib.nullcontext()):
        yield


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def evaluate(engine, dataset, micro_batch_size: int, iters: int, device: torch.device, seed: int) -> float:
    """Mean validation loss over `iters` micro batches per DP rank (the same batches every time)."""
    sampler = ResumableSampler(len(dataset), micro_batch_size, get_data_parallel_rank(),
                               get_data_parallel_world_size(), seed, shuffle=False)
    batches = iter(sampler)
    total = torch.zeros((), device=device)
    engine.eval()
    try:
        with torch.no_grad():
            for _ in range(iters):
                batch = collate_samples([dataset[i] for i in next(batches)])
                total += engine(batch["input_ids"].to(device), batch["labels"].to(device)).float()
    finally:
        engine.train()
    return float(_dp_mean(total / iters).item())


def pretrain(cfg: MegaqConfig) -> dict:
    """Train as `cfg` says. Returns a summary: steps run, the per-step training losses (DP mean),
    validation losses, whether a stop signal ended the run, and the process exit code to use
    (0, or signals.EXIT_RESUMABLE when stopped early after saving)."""
    created_process_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed()
    configure_cpu_threads(env)
    setup_console_logging(env.rank)
    try:
        summary = _train(cfg, env)
        if created_process_group and env.world_size > 1:
            # every rank is past its last collective before any tears its connections down. Seen once
            # in a 2-process CPU (gloo) run: rank 0 logged "done", then aborted at exit ("terminate
            # called without an active exception"); a peer closing its sockets while rank 0 still
            # finished the last collective is the likely cause (not reproduced in 19 more runs).
            # Only on success: a rank that failed would leave the others waiting here.
            dist.barrier()
        return summary
    finally:
        destroy_model_parallel()
        if created_process_group:
            destroy_distributed()


def _train(cfg: MegaqConfig, env) -> dict:
    rank = env.rank
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    layout = resolve_layout(cfg, env.world_size)
    precision = resolve_precision(cfg, device_type)
    ds_config = build_deepspeed_config(cfg, layout, precision)
    validate_communication(cfg, layout, ds_config, device_type)

    initialize_model_parallel(layout.tensor_parallel)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model_parallel_seed(cfg.train.seed)

    data = prepare_data(cfg, rank, env.local_rank, _barrier)
    run = build_training_engine(cfg, layout, ds_config, data.tokenizer.vocab_size, device_type)
    engine = run.engine
    zero_stage = int(engine.zero_optimization_stage())
    mc = run.model_config
    logger.info(f"model: GPT {mc.n_layer} layers x {mc.n_embd} wide, {mc.n_head} heads, context {mc.seq_len}, "
                f"vocab {mc.vocab_size}: {run.num_parameters / 1e6:.2f}M parameters | recipe "
                f"{get_recipe(mc.recipe).name}, lm_head {get_recipe(mc.lm_head_recipe).name}"
                + (f" | blocks' linears: peer {cfg.quant.peer}" if cfg.quant.peer else "")
                + (" | torch.compile per block" if cfg.train.compile else "")
                + (" | CUDA graphs per block" if run.block_graphs is not None else ""))
    logger.info(f"parallel: world {layout.world_size} = TP {layout.tensor_parallel} x DP {layout.data_parallel} | "
                f"ZeRO stage {zero_stage} | {precision} on {device_type} | TP collectives "
                f"{cfg.parallel.comm_dtype}, DP gradients {cfg.parallel.grad_compression}"
                + (f" | CUDA allocator {os.environ.get('PYTORCH_CUDA_ALLOC_CONF') or 'default'}"
                   if device_type == "cuda" else ""))
    logger.info(f"batch: {layout.global_batch_size} sequences/step = micro {layout.micro_batch_size} x accumulation "
                f"{layout.gradient_accumulation_steps} x DP {layout.data_parallel}; {layout.tokens_per_step:,} "
                f"tokens/step; {layout.train_steps} steps")
    logger.info(f"data: {data.description}: {len(data.train):,} training samples")
    if device_type == "cpu" and run.num_parameters > _CPU_HINT_PARAMETERS:
        logger.warning(f"no GPU: training a {run.num_parameters / 1e6:.0f}M-parameter model on the CPU, each step "
                       f"will take long. For a quick try add: --override model.preset=tiny "
                       f"--override train.train_steps=20")

    manager = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                                {"tensor_parallel": layout.tensor_parallel, "data_parallel": layout.data_parallel,
                                 "world_size": layout.world_size, "zero_stage": zero_stage,
                                 "optimizer_group_params": cfg.train.optimizer_group_params}, rank, _barrier)
    step, consumed_samples, resumed_from = 0, 0, None
    checkpoint = manager.latest() if cfg.checkpoint.auto_resume else None
    if checkpoint is None and cfg.checkpoint.load:
        try:
            checkpoint = resolve_checkpoint(os.path.expanduser(cfg.checkpoint.load))
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint.load={cfg.checkpoint.load!r}: {e}") from None
    if checkpoint is not None:
        state = manager.load(engine, checkpoint)
        weight_cache.weights_updated()
        step, consumed_samples = int(state["step"]), int(state["consumed_samples"])
        for change in apply_config_to_optimizer(cfg, run.scheduler, layout.train_steps):
            logger.info(f"the config changes the checkpoint's optimizer setting: {change}")
        resumed_from = str(checkpoint.path)
        logger.info(f"resumed from {checkpoint.path} (step {step}, {consumed_samples:,} samples consumed)")

    summary = {"start_step": step, "final_step": step, "total_steps": layout.train_steps, "losses": [],
               "val_losses": [], "quant_errors": {}, "stopped_by_signal": False, "exit_code": 0,
               "resumed_from": resumed_from, "last_checkpoint": resumed_from, "num_parameters": run.num_parameters,
               "layout": layout.__dict__, "zero_stage": zero_stage, "precision": precision,
               "optimizer_groups": len(run.scheduler.optimizer.param_groups)}
    if step >= layout.train_steps:
        logger.info(f"nothing to do: already at step {step} of {layout.train_steps}")
        return summary

    sampler = ResumableSampler(len(data.train), layout.micro_batch_size, get_data_parallel_rank(),
                               get_data_parallel_world_size(), cfg.train.seed, consumed_samples=consumed_samples)
    # Starting a DataLoader iterator draws a seed from torch's default generator; fork it so that a
    # resumed run's random stream (restored from the checkpoint) is not shifted by that draw.
    with torch.random.fork_rng(devices=[]):
        batches = DataIterator(data.train, sampler, num_workers=cfg.data.num_workers,
                               pin_memory=device_type == "cuda")
    peak = cfg.logging.peak_tflops or current_device_peak_tflops()
    throughput = Throughput(layout.tokens_per_step, run.flops_per_token, layout.world_size, peak,
                            layout.train_steps, start_step=step)
    count_deepspeed_collectives()
    comm_bytes = CommBytesPerStep()
    reporter = ProgressReporter(layout.train_steps, cfg.logging.tensorboard_dir, enabled=rank == 0,
                                metrics_file=cfg.logging.metrics_file)
    probe = QuantErrorProbe(engine.module, cfg.quant.log_error_interval if rank == 0 else 0)
    memory = MemoryPhases(at_step=2 if rank == 0 else 0)
    profiler = StepProfiler(cfg.logging.profile_steps, cfg.logging.profile_dir, enabled=rank == 0)
    step_losses: list[torch.Tensor] = []
    last_saved_step = step if resumed_from else None
    nonfinite = NonfiniteGradients(enabled=not deepspeed_skips_nonfinite_steps(ds_config))

    def save(at_step: int) -> None:
        nonlocal last_saved_step
        if manager.directory is None or last_saved_step == at_step:
            return
        nonfinite.check(at_step, summary.get("last_checkpoint"))   # never save non-finite weights
        t0 = time.perf_counter()
        with comm_bytes.excluded():
            path = manager.save(engine, at_step, {"consumed_samples": batches.consumed_samples,
                                                  "tokens_seen": at_step * layout.tokens_per_step,
                                                  "config": cfg.to_dict(), "model": dataclasses.asdict(mc),
                                                  "tokenizer": {"spec": data.tokenizer.spec,
                                                                "vocab_size": data.tokenizer.vocab_size,
                                                                "eod_id": data.tokenizer.eod_id}})
        summary["last_checkpoint"] = str(path)
        last_saved_step = at_step
        throughput.exclude(time.perf_counter() - t0)

    weight_cache.set_enabled(cfg.quant.cache_weights and zero_stage < 3)
    try:
        with StopRequest() as stop, compile_failures_explained(cfg):
            while step < layout.train_steps:
                measuring = _probing(probe, run.block_graphs) if probe.due(step + 1) else contextlib.nullcontext()
                loss_sum = torch.zeros((), device=device)
                lr = engine.get_lr()[0]  # the rate this step's update uses
                profiler.step_begins(step + 1)
                with measuring:
                    for _ in range(layout.gradient_accumulation_steps):
                        batch = next(batches)
                        with memory.phase(step + 1, "forward"), profiler.phase("forward"):
                            loss = engine(batch["input_ids"].to(device, non_blocking=True),
                                          batch["labels"].to(device, non_blocking=True))
                        with memory.phase(step + 1, "backward"), profiler.phase("backward"):
                            engine.backward(loss)
                        with memory.phase(step + 1, "optimizer"), profiler.phase("optimizer"):
                            engine.step()  # updates at the last micro batch of the step only
                        loss_sum += loss.detach().float()
                weight_cache.weights_updated()  # the optimizer stepped: cached quantized weights are stale
                step += 1
                nonfinite.step_done(engine, step)
                step_loss = _dp_mean(loss_sum / layout.gradient_accumulation_steps)
                step_losses.append(step_loss)
                throughput.exclude(profiler.step_done(step))  # writing the trace is not training time
                throughput.step_done(step)
                comm_bytes.step_done()
                memory_scalars = memory.report(step)
                if memory_scalars:
                    reporter.scalars(memory_scalars, step)
                errors = probe.take()
                if errors:
                    reporter.quant_errors(step, errors)
                    summary["quant_errors"][step] = errors

                if step % cfg.logging.log_interval == 0 or step in (1, layout.train_steps):
                    nonfinite.check(step, summary.get("last_checkpoint"))
                    loss_value = float(step_loss.item())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(
                            f"the training loss is {loss_value} at step {step}; the last good checkpoint "
                            f"is {summary.get('last_checkpoint', 'none')}. Set quant.check_finite=true to "
                            f"find the first quantizer input that holds NaN/Inf")
                    reporter.train_step(step, loss_value, lr, _grad_norm(engine), throughput.report())
                    reporter.scalars(comm_bytes.report(), step)
                    clipped, quantized = delayed_scaling.take_overflow_counts()
                    if quantized:   # delayed scaling: how often a feature's abs-max passed its prediction
                        reporter.scalars({"quant/delayed_overflow_fraction": clipped / quantized}, step)

                if cfg.train.eval_interval and data.valid is not None and (
                        step % cfg.train.eval_interval == 0 or step == layout.train_steps):
                    t0 = time.perf_counter()
                    with comm_bytes.excluded():
                        val = evaluate(engine, data.valid, layout.micro_batch_size, cfg.train.eval_iters, device,
                                       cfg.train.seed)
                    summary["val_losses"].append((step, val))
                    reporter.evaluation(step, val)
                    throughput.exclude(time.perf_counter() - t0)

                stopping = stop.agreed(device)
                finished = step == layout.train_steps
                if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or \
                        (finished and cfg.checkpoint.save_at_end) or stopping:
                    save(step)
                if stopping and not finished:
                    summary["stopped_by_signal"] = True
                    summary["exit_code"] = EXIT_RESUMABLE
                    logger.warning(f"stopped at step {step} by a signal; exit code {EXIT_RESUMABLE} "
                                   f"(resumable: run the same command again)")
                    break
    finally:
        profiler.close()
        summary["profile"] = profiler.summary
        reporter.close()
        weight_cache.set_enabled(False)
        summary["final_step"] = step
        summary["losses"] = [float(t.item()) for t in step_losses]
    logger.info(f"done: step {step}/{layout.train_steps}"
                + (f", last checkpoint {summary['last_checkpoint']}" if summary["last_checkpoint"] else ""))
    return summary
