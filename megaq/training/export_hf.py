"""Export a megaq checkpoint (any tensor-parallel size, any ZeRO stage) as a Hugging Face GPT-2
directory: config.json + model.safetensors, loadable by transformers.GPT2LMHeadModel.from_pretrained.

Weights per tensor-parallel rank:
  - ZeRO 1-3: the FP32 master weights, reassembled from the data-parallel partitions of the optimizer
    state by DeepSpeed's zero_to_fp32 (which reads one model-parallel rank at a time: each TP rank's
    files are presented to it, through symbolic links, as a checkpoint of its own);
  - ZeRO 0: the module weights DeepSpeed saved (FP32 on CPU runs; the BF16 copy on GPU runs).
The TP shards are then merged and renamed by megaq.models.hf_export.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from megaq.models import GPTConfig
from megaq.models.hf_export import hf_gpt2_config, merge_tensor_parallel_shards, to_hf_gpt2_state_dict
from megaq.training.checkpoint import CheckpointError, CheckpointInfo, atomic_write_text, resolve_checkpoint

_MP_FILE = re.compile(r"^(?P<head>.*)mp_rank_(?P<mp>\d+)(?P<tail>_(model|optim)_states\.pt)$")


def _zero_fp32_state_dict(checkpoint: CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="megaq_export_") as tmp:
        view = Path(tmp) / "rank"
        view.mkdir()
        linked = 0
        for f in checkpoint.path.iterdir():
            m = _MP_FILE.match(f.name)
            if m and int(m.group("mp")) == tp_rank:
                os.symlink(f.resolve(), view / f"{m.group('head')}mp_rank_00{m.group('tail')}")
                linked += 1
        if not linked:
            raise CheckpointError(f"{checkpoint.path} has no DeepSpeed files of model-parallel rank {tp_rank}")
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="rank")


def _module_state_dict(checkpoint: CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    path = checkpoint.path / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def load_tensor_parallel_shards(checkpoint: CheckpointInfo) -> list[dict[str, torch.Tensor]]:
    """The full state dict of each TP rank (FP32), in rank order."""
    layout = checkpoint.state.get("layout", {})
    tp = int(layout.get("tensor_parallel", 1))
    zero_stage = int(layout.get("zero_stage", 0))
    load = _zero_fp32_state_dict if zero_stage > 0 else _module_state_dict
    return [load(checkpoint, rank) for rank in range(tp)]


def export_hf(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write `output_dir`/config.json and model.safetensors from a megaq checkpoint (a checkpoint
    directory, or a run's checkpoint.dir, whose newest complete checkpoint is taken)."""
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(checkpoint_path)
    if "model" not in checkpoint.state:
        raise CheckpointError(f"{checkpoint.path} does not record the model configuration (megaq_state.json "
                              f"has no 'model'); it was not written by megaq's trainer")
    model_cfg = GPTConfig(**checkpoint.state["model"])
    full = merge_tensor_parallel_shards(load_tensor_parallel_shards(checkpoint), model_cfg)
    hf_state = to_hf_gpt2_state_dict(full, model_cfg)
    if model_cfg.tie_embeddings:
        # Tied: transformers re-ties lm_head to wte on load (and safetensors refuses shared storage).
        hf_state.pop("lm_head.weight", None)
    hf_state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in hf_state.items()}
    eod_id = checkpoint.state.get("tokenizer", {}).get("eod_id")
    config = hf_gpt2_config(model_cfg, eos_token_id=eod_id)
    config["torch_dtype"] = "float32"

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights = out / f".model.safetensors.tmp.{os.getpid()}"
    save_file(hf_state, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "megaq_export.json", json.dumps(
        {"checkpoint": str(checkpoint.path), "step": checkpoint.step, "tokenizer": checkpoint.state.get("tokenizer"),
         "layout": checkpoint.state.get("layout")}, indent=2, sort_keys=True) + "\n")
    return out
