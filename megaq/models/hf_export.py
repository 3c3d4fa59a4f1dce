"""Convert megaq GPT weights to Hugging Face ``GPT2LMHeadModel`` (transformers) naming.

Two steps, both pure functions on state dicts (loading checkpoints is the caller's business):
  1. ``merge_tensor_parallel_shards``: the TP ranks' state dicts -> one full state dict, with the
     vocabulary padding removed.
  2. ``to_hf_gpt2_state_dict``: full megaq names -> HF names. HF's GPT-2 uses ``Conv1D`` layers,
     whose weights are stored transposed (``[in, out]``); its ``c_attn`` packs q, k, v along the
     output dimension exactly as megaq's full ``qkv`` weight does (``[q; k; v]``), so a transpose
     suffices. HF's GPT-2 always has biases; a megaq model without them exports zeros.

``hf_gpt2_config(cfg)`` gives the matching ``GPT2Config`` keyword arguments.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from megaq.models.gpt import GPTConfig, is_vocab_parallel, tensor_parallel_layout
from megaq.parallel import merge_shards


def merge_tensor_parallel_shards(shards: Sequence[Mapping[str, torch.Tensor]],
                                 cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Full (unsharded) GPT state dict from the state dicts of TP ranks 0..tp-1, in rank order.

    Column-parallel tensors are concatenated along dim 0 (the fused QKV per block of q, k and v:
    each rank holds ``[q_r; k_r; v_r]``), row-parallel weights along dim 1, the vocab-parallel
    embedding / lm_head along dim 0 and then cut to ``cfg.vocab_size`` rows. Replicated tensors
    are taken from rank 0. A single state dict (TP size 1) only loses its vocabulary padding.
    """
    if not shards:
        raise ValueError("merge_tensor_parallel_shards needs at least one state dict")
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            missing = sorted(set(names) - set(shard))
            extra = sorted(set(shard) - set(names))
            raise ValueError(f"the state dict of TP rank {rank} does not match rank 0's: "
                             f"missing {missing}, unexpected {extra}")
    merged = {}
    for name in names:
        tensors = [shard[name] for shard in shards]
        layout = tensor_parallel_layout(name)
        if layout is None:
            full = tensors[0]
        else:
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise ValueError(f"{name}: TP shards have different shapes {sorted(shapes)}")
            full = merge_shards(tensors, *layout)
        if is_vocab_parallel(name):
            if full.size(0) < cfg.vocab_size:
                raise ValueError(f"{name} has {full.size(0)} rows, fewer than "
                                 f"vocab_size {cfg.vocab_size}")
            full = full[: cfg.vocab_size]
        merged[name] = full.contiguous()
    return merged


def hf_gpt2_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Keyword arguments of ``transformers.GPT2Config`` for the model ``cfg`` describes.

    ``eos_token_id``: the tokenizer's end-of-document id, used for both BOS and EOS as GPT-2 does
    (None leaves them unset rather than at GPT-2's 50256, which may not exist in our vocabulary).
    """
    if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        # GPT-2's tanh approximation of GELU, which megaq's MLP computes.
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }


def to_hf_gpt2_state_dict(full_state_dict: Mapping[str, torch.Tensor],
                          cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF ``GPT2LMHeadModel`` state dict from a full megaq GPT state dict (vocabulary padding, if
    still present, is dropped)."""
    def get(name: str) -> torch.Tensor:
        if name not in full_state_dict:
            raise KeyError(f"{name!r} is missing from the megaq state dict")
        return full_state_dict[name]

    def bias(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        # HF's Conv1D and LayerNorm always have a bias; a bias-free megaq layer is a zero bias.
        if name in full_state_dict:
            return full_state_dict[name]
        return torch.zeros(size, dtype=like.dtype, device=like.device)

    def conv1d(hf_prefix: str, megaq_prefix: str) -> None:
        weight = get(f"{megaq_prefix}.weight")  # [out, in]
        hf[f"{hf_prefix}.weight"] = weight.t().contiguous()  # Conv1D: [in, out]
        hf[f"{hf_prefix}.bias"] = bias(f"{megaq_prefix}.bias", weight.size(0), weight)

    def layer_norm(hf_prefix: str, megaq_prefix: str) -> None:
        weight = get(f"{megaq_prefix}.weight")
        hf[f"{hf_prefix}.weight"] = weight
        hf[f"{hf_prefix}.bias"] = bias(f"{megaq_prefix}.bias", weight.size(0), weight)

    hf: dict[str, torch.Tensor] = {}
    wte = get("token_embedding.weight")[: cfg.vocab_size]
    hf["transformer.wte.weight"] = wte
    hf["transformer.wpe.weight"] = get("position_embedding.weight")
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        layer_norm(f"{h}.ln_1", f"{b}.ln_attn")
        conv1d(f"{h}.attn.c_attn", f"{b}.attn.qkv")
        conv1d(f"{h}.attn.c_proj", f"{b}.attn.out_proj")
        layer_norm(f"{h}.ln_2", f"{b}.ln_mlp")
        conv1d(f"{h}.mlp.c_fc", f"{b}.mlp.fc1")
        conv1d(f"{h}.mlp.c_proj", f"{b}.mlp.fc2")
    layer_norm("transformer.ln_f", "ln_f")
    hf["lm_head.weight"] = wte if cfg.tie_embeddings else get("lm_head.weight")[: cfg.vocab_size]
    return hf
