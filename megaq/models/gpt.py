"""GPT-2, tensor parallel, with every transformer linear layer under a quantization recipe.

    ids [B, T] -> token embedding (vocab-parallel) + position embedding -> dropout
               -> n_layer x TransformerBlock (pre-LN, causal attention, GELU MLP)
               -> final LayerNorm -> lm_head (vocab-parallel; tied to the token embedding)
               -> logits [B, T, padded_vocab/tp]  or  loss (vocab-parallel cross-entropy)

With labels and an unquantized lm_head, the head and the loss run fused and chunked over the tokens
(``cfg.fused_cross_entropy``, megaq.nn.fused_cross_entropy): the [tokens, vocab] logits and softmax
are never kept whole. The unfused path (switch off, or a quantized head) is the reference.

The recipe (``cfg.recipe``) applies to QKV, out-projection, fc1 and fc2; the lm_head has its own
(``cfg.lm_head_recipe``, BF16 by default, as the embeddings, attention and loss stay in high
precision). The vocabulary is padded (Megatron-style) so that it splits evenly over the TP ranks and
keeps GEMM shapes friendly; padded entries never take part in the loss: their logits are -inf.

Initialization (GPT-2): N(0, 0.02) for weights and embeddings, N(0, 0.02/sqrt(2 n_layer)) for the
projections that write to the residual stream (out_proj, fc2), zero biases, unit LayerNorm scales.
Each parameter's *full* tensor is drawn from a generator seeded by (seed, parameter name) and this
rank keeps its shard, so one seed gives the same model for every TP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import nn

from megaq.models.transformer import TransformerBlock
from megaq.nn import (ColumnParallelLinear, LayerNorm, ParallelDropout, RowParallelLinear,
                      VocabParallelEmbedding, column_parallel_input, column_parallel_linear,
                      fused_linear_cross_entropy, normal_init, vocab_parallel_cross_entropy,
                      zeros_init)
from megaq.ops import ATTENTION_SAVES, data_flow_format, get_recipe
from megaq.parallel.quantized_comm import tp_mappings
from megaq.parallel import (gather_from_tp_region, get_model_parallel_seed,
                            get_tensor_parallel_rank, get_tensor_parallel_world_size,
                            init_seed_for, initialize_from_full_, is_tensor_parallel,
                            scatter_to_sequence_parallel_region)

IGNORE_INDEX = -100  # label value excluded from the loss, as in torch.nn.functional.cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    sequence_parallel: bool = False
    recipe: str | dict = "bf16"     # recipe name or dict (megaq.ops.get_recipe) for the blocks
    lm_head_recipe: str | dict = "bf16"
    make_vocab_size_divisible_by: int = 128  # the padded vocab is a multiple of this x TP size
    layer_norm_eps: float = 1e-5
    comm_dtype: str = "bf16"        # tensor-parallel collectives of the blocks: "bf16" exact | "int8"
    comm_config: dict | None = None  # megaq.parallel.quantized_comm.QuantizedCommConfig fields
    data_flow: str = "bf16"         # activations between the blocks' operators: "bf16" | "int8"
    attention_saves: str = "bf16"   # what attention keeps for backward: "bf16" | "int8" (q, k, v, output)
    fused_cross_entropy: bool = True  # lm_head + loss chunked, in one pass (unquantized head only)
    cross_entropy_chunk_tokens: int | None = None  # tokens per chunk of it; None: logits <= 256 MiB

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the offending key. TP-dependent checks use
        ``tensor_parallel_size``."""
        for key in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd",
                    "make_vocab_size_divisible_by"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{key} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"GPTConfig.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        chunk = self.cross_entropy_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"GPTConfig.cross_entropy_chunk_tokens must be a positive integer or None, "
                             f"got {chunk!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for key in ("recipe", "lm_head_recipe"):
            try:
                get_recipe(getattr(self, key))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"GPTConfig.{key}: {err}") from err
        try:
            tp_mappings(self.comm_dtype, self.comm_config)
        except (ValueError, TypeError) as err:
            raise ValueError(f"GPTConfig.comm_dtype/comm_config: {err}") from err
        if self.n_head % tensor_parallel_size != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be divisible by the "
                             f"tensor-parallel size ({tensor_parallel_size})")
        check_data_flow(self.data_flow, self.recipe, self.sequence_parallel, "GPTConfig.")
        if self.attention_saves not in ATTENTION_SAVES:
            raise ValueError(f"GPTConfig.attention_saves must be one of {list(ATTENTION_SAVES)}, "
                             f"got {self.attention_saves!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """``vocab_size`` rounded up to a multiple of make_vocab_size_divisible_by x TP size."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return math.ceil(self.vocab_size / multiple) * multiple


def check_data_flow(data_flow: str, recipe, sequence_parallel: bool, prefix: str = "") -> None:
    """Raise ValueError unless the blocks can run `data_flow` under `recipe`; keys named with
    `prefix` (GPTConfig. / quant.)."""
    if data_flow not in ("bf16", "int8"):
        raise ValueError(f"{prefix}data_flow must be 'bf16' or 'int8', got {data_flow!r}")
    if data_flow == "bf16":
        return
    try:
        data_flow_format(recipe)
    except ValueError as err:
        raise ValueError(f"{prefix}data_flow='int8': {err}; use an INT8 recipe such as 'int8' or "
                         f"'int8_block128', or data_flow 'bf16'") from None
    if sequence_parallel:
        raise ValueError(f"{prefix}data_flow='int8' does not support sequence parallelism (the LayerNorm "
                         f"output would cross an all-gather as INT8 operands, which is not implemented); "
                         f"turn sequence parallelism off or use data_flow 'bf16'")


# ---- the TP layout of every parameter, by name (used to merge checkpoint shards) -------------

VOCAB_PARALLEL_PARAMETERS = ("token_embedding.weight", "lm_head.weight")  # padded along dim 0
_COLUMN_PARALLEL_MODULES = {"attn.qkv": 3, "mlp.fc1": 1}  # module suffix -> partition stride
_ROW_PARALLEL_MODULES = ("attn.out_proj", "mlp.fc2")


def is_vocab_parallel(name: str) -> bool:
    """Whether GPT parameter ``name`` (possibly prefixed, e.g. ``module.``) is a padded
    vocab-parallel matrix."""
    return any(name == p or name.endswith("." + p) for p in VOCAB_PARALLEL_PARAMETERS)


def tensor_parallel_layout(name: str) -> tuple[int, int] | None:
    """``(partition_dim, partition_stride)`` of GPT parameter ``name``, or None if replicated.
    Names may carry a prefix (DeepSpeed's ``module.``).

    Matches the attributes the parallel layers set on their parameters (a test checks it); it
    exists so that checkpoint shards can be merged without building the model.
    """
    if is_vocab_parallel(name):
        return (0, 1)
    module, _, param = name.rpartition(".")
    for suffix, stride in _COLUMN_PARALLEL_MODULES.items():
        if module.endswith(suffix):
            return (0, stride)  # weight rows and bias
    if module.endswith(_ROW_PARALLEL_MODULES) and param == "weight":
        return (1, 1)  # the row-parallel bias is replicated
    return None


# ---- the model -------------------------------------------------------------------------------

class GPT(nn.Module):
    """GPT-2 language model. ``GPT(cfg)`` reads the TP group from ``megaq.parallel`` (TP size 1
    when model parallelism is not initialized).

    ``init_seed`` seeds the weights; by default the seed given to
    ``megaq.parallel.model_parallel_seed``, or, with TP size 1 only, a draw from torch's default
    generator (so ``torch.manual_seed`` makes it reproducible).
    """

    def __init__(self, cfg: GPTConfig, *, init_seed: int | None = None):
        super().__init__()
        tp = get_tensor_parallel_world_size()
        cfg.validate(tensor_parallel_size=tp)
        self.cfg = cfg
        self.padded_vocab_size = cfg.padded_vocab_size(tp)
        sp = cfg.sequence_parallel

        self.token_embedding = VocabParallelEmbedding(self.padded_vocab_size, cfg.n_embd,
                                                      skip_init=True)
        self.position_embedding = nn.Embedding(cfg.seq_len, cfg.n_embd)  # replicated
        self.embedding_dropout = ParallelDropout(cfg.dropout, input_is_sharded=sp)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.bias, sequence_parallel=sp)
        self.lm_head_recipe = get_recipe(cfg.lm_head_recipe)
        if not cfg.tie_embeddings:
            self.lm_head = ColumnParallelLinear(cfg.n_embd, self.padded_vocab_size, bias=False,
                                                recipe=self.lm_head_recipe, sequence_parallel=sp,
                                                skip_init=True)
        self.init_weights(self._resolve_init_seed(init_seed))

    # -- initialization --

    @staticmethod
    def _resolve_init_seed(init_seed: int | None) -> int:
        if init_seed is not None:
            return init_seed
        seed = get_model_parallel_seed()
        if seed is not None:
            return seed
        if get_tensor_parallel_world_size() > 1:
            raise RuntimeError("GPT under tensor parallelism needs an initialization seed shared "
                               "by all ranks: call megaq.parallel.model_parallel_seed(seed) first "
                               "or pass init_seed")
        return int(torch.randint(0, 2**62, ()).item())

    def init_weights(self, seed: int) -> None:
        """(Re)initialize every parameter from ``seed`` (GPT-2's scheme; see the module doc)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        residual_projections = {id(b.attn.out_proj) for b in self.blocks} | \
                               {id(b.mlp.fc2) for b in self.blocks}

        def vocab_init(full: torch.Tensor, generator: torch.Generator) -> None:
            # Draw only the real vocabulary (so the padding, which depends on the TP size, does
            # not shift the random stream) and zero the padded rows.
            full.zero_()
            full[: self.cfg.vocab_size].normal_(0.0, std, generator=generator)

        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if isinstance(module, LayerNorm):
                    init = (lambda t, g: t.fill_(1.0)) if param_name == "weight" else zeros_init
                elif param_name == "bias":
                    init = zeros_init
                elif isinstance(module, VocabParallelEmbedding) or module is getattr(self, "lm_head", None):
                    init = vocab_init
                elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                    init = normal_init(residual_std if id(module) in residual_projections else std)
                elif isinstance(module, nn.Embedding):
                    init = normal_init(std)
                else:
                    raise TypeError(f"no initialization rule for {module_name}.{param_name}")
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                generator = torch.Generator(device="cpu").manual_seed(init_seed_for(full_name, seed))
                initialize_from_full_(param, init, generator)

    # -- forward --

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` [B, T] -> mean loss over labels != -100 if ``labels`` [B, T] is given,
        else this rank's vocab-parallel logits [B, T, padded_vocab/tp]."""
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq = input_ids.size(1)
        if seq > cfg.seq_len:
            raise ValueError(f"sequence length {seq} exceeds GPTConfig.seq_len ({cfg.seq_len})")
        tp = get_tensor_parallel_world_size()
        if cfg.sequence_parallel and seq % tp != 0:
            raise ValueError(f"with sequence_parallel the sequence length ({seq}) must be "
                             f"divisible by the tensor-parallel size ({tp})")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")

        positions = torch.arange(seq, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # [B, T, C]
        x = x.transpose(0, 1).contiguous()  # [T, B, C]: the blocks work sequence-first
        if cfg.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [T/tp, B, C]
        x = self.embedding_dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if labels is not None and self.fuses_cross_entropy:
            return self._fused_head_and_loss(x, labels.t())
        logits = self._vocab_parallel_logits(x)  # [T, B, padded_vocab/tp]

        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return vocab_parallel_cross_entropy(logits, labels.t(), ignore_index=IGNORE_INDEX)

    @property
    def fuses_cross_entropy(self) -> bool:
        """Whether a forward with labels runs the head and the loss fused (the head's GEMM is the
        plain one, the switch is on)."""
        return self.cfg.fused_cross_entropy and not self.lm_head_recipe.is_quantized

    def _fused_head_and_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The head's input goes through the TP mapping of a column-parallel input, as in
        _vocab_parallel_logits, so its backward sums the ranks' partial gradients."""
        if self.cfg.tie_embeddings:
            weight, comm = self.token_embedding.weight, None
        else:
            weight, comm = self.lm_head.weight, self.lm_head.comm
        x = column_parallel_input(x, sequence_parallel=self.cfg.sequence_parallel, comm=comm)
        return fused_linear_cross_entropy(x, weight, target, ignore_index=IGNORE_INDEX,
                                          chunk_tokens=self.cfg.cross_entropy_chunk_tokens,
                                          vocab_size=self.cfg.vocab_size)

    def _vocab_parallel_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.tie_embeddings:
            logits = column_parallel_linear(x, self.token_embedding.weight, None,
                                            self.lm_head_recipe,
                                            sequence_parallel=self.cfg.sequence_parallel)
        else:
            logits = self.lm_head(x)
        # Padded vocabulary entries: -inf, so they get zero probability and zero gradient.
        per_rank = logits.size(-1)
        real_here = self.cfg.vocab_size - get_tensor_parallel_rank() * per_rank
        if real_here < per_rank:
            padding = torch.arange(per_rank, device=logits.device) >= real_here
            logits = logits.masked_fill(padding, float("-inf"))
        return logits

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """All ranks' vocab-parallel logits ``[..., padded_vocab/tp]`` -> ``[..., vocab_size]``."""
        return gather_from_tp_region(logits)[..., : self.cfg.vocab_size]

    # -- accounting --

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the full model (all TP shards, vocabulary padding excluded)."""
        tp = get_tensor_parallel_world_size()
        total = 0
        for name, param in self.named_parameters():
            if exclude_embeddings and name in ("token_embedding.weight",
                                               "position_embedding.weight"):
                continue
            count = param.numel() * (tp if is_tensor_parallel(param) else 1)
            if is_vocab_parallel(name):
                count = count // self.padded_vocab_size * self.cfg.vocab_size
            total += count
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token, for MFU: 6 per weight used in a matmul (2 forward, 4
        backward; LayerNorm and bias parameters are counted too, as in nanoGPT, being negligible)
        plus attention's QK^T and AV, 12 * n_layer * n_embd * seq_len (PaLM, appendix B: the
        full T x T matrix, although causal kernels skip half of it). Uses the unpadded vocabulary
        so that the figure does not depend on the TP size."""
        cfg = self.cfg
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if cfg.tie_embeddings:
            matmul_params += cfg.vocab_size * cfg.n_embd  # the lm_head reuses the embedding
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len


def configure_optimizer_groups(model: nn.Module, weight_decay: float, max_group_params: int = 0) -> list[dict]:
    """AdamW parameter groups: weight decay on the linear layers' weights only; none on biases,
    LayerNorm parameters and embeddings (the tied lm_head is the embedding). Empty groups are left
    out. `max_group_params` > 0 splits each of the two into consecutive groups of at most that many
    parameters (a larger tensor is a group of its own): DeepSpeed ZeRO's update flattens one group's
    gradient partition at a time into a BF16 and an FP32 copy (6 bytes per parameter), so small groups
    bound that transient by the group size instead of the model size."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_linear_weight = isinstance(module, (ColumnParallelLinear, RowParallelLinear,
                                                   nn.Linear)) and param_name == "weight"
            (decay if is_linear_weight else no_decay).append(param)
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        groups += [{"params": chunk, "weight_decay": wd} for chunk in _chunks_by_size(params, max_group_params)]
    return groups


def _chunks_by_size(params: list[nn.Parameter], max_params: int) -> list[list[nn.Parameter]]:
    """`params` in order, cut into runs of at most `max_params` elements (0: one run; none when empty)."""
    if not params:
        return []
    if max_params <= 0:
        return [params]
    chunks, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > max_params:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    chunks.append(current)
    return chunks
