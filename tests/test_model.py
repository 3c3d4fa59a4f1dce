"""The GPT model on one process (TP size 1): shapes, learning, causality, configuration, vocabulary
padding, weight tying, initialization and accounting. Multi-process behaviour is in
test_parallel.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from megaq.models.gpt import (GPT, GPTConfig, configure_optimizer_groups, tensor_parallel_layout)
from megaq.nn import ColumnParallelLinear, RowParallelLinear

TINY = dict(vocab_size=96, seq_len=16, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and CI's two cores are shared with other tests
    (intra-op threads of a busy machine slow these steps ~100x)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _ids(batch=2, seq=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_shapes():
    model = GPT(GPTConfig(**TINY), init_seed=0)
    assert model.padded_vocab_size == 128  # 96 rounded up to a multiple of 128
    ids = _ids()
    logits = model(ids)
    assert logits.shape == (2, 16, 128)
    assert model(ids[:, :5]).shape == (2, 5, 128)  # shorter sequences are fine
    loss = model(ids, _ids(seed=1))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    # at initialization the prediction is close to uniform over the real vocabulary
    assert abs(loss.item() - math.log(96)) < 0.5


def test_loss_decreases_on_a_repeating_sequence():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY), init_seed=0)
    optimizer = torch.optim.AdamW(configure_optimizer_groups(model, 0.1), lr=3e-3)
    pattern = torch.tensor([5, 9, 13, 2, 77, 31, 60, 8])
    tokens = pattern.repeat(3)[:17]
    ids, labels = tokens[:-1].repeat(4, 1), tokens[1:].repeat(4, 1)
    losses = []
    for _ in range(30):
        loss = model(ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


def test_attention_is_causal():
    model = GPT(GPTConfig(**TINY), init_seed=0).eval()
    ids = _ids()
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 96
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


@pytest.mark.parametrize("overrides, key", [
    (dict(n_embd=66), "n_embd"),         # not divisible by n_head
    (dict(n_head=0), "n_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(seq_len=-1), "seq_len"),
    (dict(n_layer=2.0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
    (dict(recipe="int3"), "recipe"),
    (dict(lm_head_recipe={"no_such_key": 1}), "lm_head_recipe"),
    (dict(make_vocab_size_divisible_by=0), "make_vocab_size_divisible_by"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_invalid_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"GPTConfig.{key}"):
        GPTConfig(**dict(TINY, **overrides))


def test_tensor_parallel_checks():
    cfg = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="n_head"):
        cfg.validate(tensor_parallel_size=3)
    assert cfg.padded_vocab_size(2) == 256
    assert GPTConfig(**dict(TINY, make_vocab_size_divisible_by=1)).padded_vocab_size(2) == 96
    assert GPTConfig(**dict(TINY, vocab_size=95, make_vocab_size_divisible_by=1)).padded_vocab_size(2) == 96


def test_forward_rejects_bad_inputs():
    model = GPT(GPTConfig(**TINY), init_seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        model(_ids(seq=17))
    with pytest.raises(ValueError, match="batch, seq"):
        model(_ids()[0])
    with pytest.raises(ValueError, match="labels"):
        model(_ids(), _ids()[:, :8])


def test_tied_lm_head_is_the_token_embedding():
    model = GPT(GPTConfig(**TINY), init_seed=0)
    assert not hasattr(model, "lm_head")
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
    ids = _ids()
    logits = model(ids)
    expected = F.linear(hidden["h"].transpose(0, 1), model.token_embedding.weight)
    torch.testing.assert_close(logits[..., :96], expected[..., :96])
    # the embedding gets gradient from both its uses
    model(ids, _ids(seed=1)).backward()
    assert model.token_embedding.weight.grad[96:].abs().sum() == 0  # padding rows: none

    untied = GPT(GPTConfig(**TINY, tie_embeddings=False), init_seed=0)
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_parameters() == model.num_parameters() + 96 * 64


def test_padded_vocabulary_does_not_change_the_loss():
    ids, labels = _ids(), _ids(seed=1)
    labels[1, :4] = -100
    unpadded = GPT(GPTConfig(**TINY, make_vocab_size_divisible_by=1), init_seed=3)
    padded = GPT(GPTConfig(**TINY), init_seed=3)
    assert unpadded.padded_vocab_size == 96 and padded.padded_vocab_size == 128
    # the same seed draws the same real rows; the padding rows are zero
    assert torch.equal(padded.token_embedding.weight[:96], unpadded.token_embedding.weight)
    assert padded.token_embedding.weight[96:].abs().sum() == 0

    loss_padded, loss_unpadded = padded(ids, labels), unpadded(ids, labels)
    torch.testing.assert_close(loss_padded, loss_unpadded, rtol=1e-6, atol=0)
    logits = padded(ids)
    assert torch.isneginf(logits[..., 96:]).all()
    reference = F.cross_entropy(logits[..., :96].reshape(-1, 96), labels.reshape(-1))
    torch.testing.assert_close(loss_padded, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(padded.gather_logits(logits), logits[..., :96])


def test_same_seed_same_model():
    a, b = GPT(GPTConfig(**TINY), init_seed=5), GPT(GPTConfig(**TINY), init_seed=5)
    c = GPT(GPTConfig(**TINY), init_seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    torch.manual_seed(11)  # without a seed the default generator decides
    d = GPT(GPTConfig(**TINY))
    torch.manual_seed(11)
    e = GPT(GPTConfig(**TINY))
    assert all(torch.equal(x, y) for x, y in zip(d.parameters(), e.parameters()))


def test_gpt2_initialization_statistics():
    cfg = GPTConfig(vocab_size=96, seq_len=16, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg, init_seed=0)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "fc2.weight")):
            assert abs(p.std().item() - residual_std) < 0.1 * residual_std, name
        elif name.endswith(("qkv.weight", "fc1.weight", "position_embedding.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias"):
            assert p.abs().sum() == 0, name
        elif "ln" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_dropout_only_in_training():
    model = GPT(GPTConfig(**TINY, dropout=0.2), init_seed=0)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_quantized_recipes_give_finite_loss_and_gradients(recipe):
    model = GPT(GPTConfig(**TINY, recipe=recipe), init_seed=0)
    assert model.blocks[0].attn.qkv.recipe.name == recipe
    assert model.lm_head_recipe.name == "bf16"
    loss = model(_ids(), _ids(seed=1))
    loss.backward()
    assert math.isfinite(loss.item())
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_parameter_count_and_flops():
    cfg = GPTConfig(**TINY)
    model = GPT(cfg, init_seed=0)
    L, C, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.seq_len
    per_layer = 12 * C * C + 13 * C  # qkv, out_proj, fc1, fc2 (+ biases) and two LayerNorms
    assert model.num_parameters() == L * per_layer + 2 * C + V * C + T * C
    assert model.num_parameters(exclude_embeddings=True) == L * per_layer + 2 * C
    # the tied lm_head is a V x C matmul although its parameters are the embedding's
    assert model.flops_per_token() == 6 * (L * per_layer + 2 * C + V * C) + 12 * L * C * T


def test_optimizer_groups():
    model = GPT(GPTConfig(**TINY, tie_embeddings=False), init_seed=0)
    decay, no_decay = configure_optimizer_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    expected = sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                      for m in ("attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2")) + ["lm_head.weight"]
    assert decayed == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert "token_embedding.weight" in {names[id(p)] for p in no_decay["params"]}


def test_optimizer_groups_split_by_size_keep_order_and_decay():
    """max_group_params cuts each group into consecutive runs of at most that many parameters (a larger
    tensor alone); together they hold the unsplit groups' parameters in the same order."""
    model = GPT(GPTConfig(**TINY, tie_embeddings=False), init_seed=0)
    whole = configure_optimizer_groups(model, weight_decay=0.1)
    limit = max(p.numel() for p in whole[0]["params"]) + 1
    split = configure_optimizer_groups(model, weight_decay=0.1, max_group_params=limit)
    assert len(split) > len(whole)
    for wd, unsplit in ((0.1, whole[0]), (0.0, whole[1])):
        parts = [g for g in split if g["weight_decay"] == wd]
        assert [id(p) for g in parts for p in g["params"]] == [id(p) for p in unsplit["params"]]
        assert all(sum(p.numel() for p in g["params"]) <= limit or len(g["params"]) == 1 for g in parts)
    tiny = configure_optimizer_groups(model, weight_decay=0.1, max_group_params=1)   # one tensor per group
    assert sum(len(g["params"]) for g in tiny) == len(list(model.parameters()))
    assert all(len(g["params"]) == 1 for g in tiny)


def test_layout_table_matches_the_layers():
    model = GPT(GPTConfig(**TINY, tie_embeddings=False), init_seed=0)
    for name, p in model.named_parameters():
        attrs = (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
        assert tensor_parallel_layout(name) == attrs, name
        assert tensor_parallel_layout("module." + name) == attrs, name  # DeepSpeed's prefix
    parallel = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(parallel) == 4 * 2 + 1
