"""Export to Hugging Face GPT-2: the converted model computes the same logits as megaq's, from a
single-process model and from merged TP=2 shards."""

import importlib.util

import pytest
import torch

from distributed_utils import run_distributed
from megaq.models.gpt import GPT, GPTConfig
from megaq.models.hf_export import (hf_gpt2_config, merge_tensor_parallel_shards,
                                    to_hf_gpt2_state_dict)
from megaq.parallel import initialize_model_parallel, model_parallel_seed

# find_spec rather than an import: the TP=2 worker processes import this module, and need no
# transformers (whose import costs seconds).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (needed to build the HF GPT-2 model)")

TINY = dict(vocab_size=96, seq_len=16, n_layer=2, n_head=4, n_embd=64)
CASES = {
    "tied_with_bias": dict(TINY),
    # HF GPT-2 always has biases: bias-free megaq layers export zero biases
    "untied_without_bias": dict(TINY, tie_embeddings=False, bias=False, vocab_size=95,
                                make_vocab_size_divisible_by=1),
}
SEED = 21


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; CI's two cores are shared
    yield
    torch.set_num_threads(previous)


def _ids(vocab_size):
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))


def _hf_logits(full_state_dict, cfg, ids):
    import transformers

    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2_config(cfg)))
    hf_model.load_state_dict(to_hf_gpt2_state_dict(full_state_dict, cfg), strict=True)
    with torch.no_grad():
        return hf_model.eval()(ids).logits


def _assert_relative_close(actual, expected, tol=1e-4):
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tol, f"relative error {error:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_hf_model_gives_megaq_logits(case):
    cfg = GPTConfig(**CASES[case])
    model = GPT(cfg, init_seed=SEED).eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = model.gather_logits(model(ids))
    full = merge_tensor_parallel_shards([model.state_dict()], cfg)
    hf_logits = _hf_logits(full, cfg, ids)
    assert hf_logits.shape == (2, 16, cfg.vocab_size)
    _assert_relative_close(hf_logits, expected)


def _tp2_state_dicts(rank, world):
    initialize_model_parallel(world)
    model_parallel_seed(SEED)
    out = {}
    for case, kwargs in CASES.items():
        cfg = GPTConfig(**kwargs)
        model = GPT(cfg)
        # a few training steps, so that the shards no longer equal a fresh TP=1 initialization
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ids = _ids(cfg.vocab_size)
        for _ in range(2):
            optimizer.zero_grad()
            model(ids, ids.roll(-1, dims=1)).backward()
            optimizer.step()
        with torch.no_grad():
            logits = model.gather_logits(model.eval()(ids))
        out[case] = (model.state_dict(), logits)
    return out


@pytest.fixture(scope="module")
def tp2_runs():
    return run_distributed(_tp2_state_dicts, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_model_from_merged_tp2_shards(tp2_runs, case):
    cfg = GPTConfig(**CASES[case])
    (shard_0, tp_logits), (shard_1, _) = (run[case] for run in tp2_runs)
    assert shard_0["blocks.0.attn.qkv.weight"].shape == (3 * 64 // 2, 64)
    full = merge_tensor_parallel_shards([shard_0, shard_1], cfg)
    assert full["token_embedding.weight"].shape == (cfg.vocab_size, 64)
    hf_logits = _hf_logits(full, cfg, _ids(cfg.vocab_size))
    _assert_relative_close(hf_logits, tp_logits)


def test_hf_config():
    cfg = GPTConfig(**TINY)
    config = hf_gpt2_config(cfg, eos_token_id=0)
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (16, 64, 2, 4)
    assert config["vocab_size"] == 96 and config["eos_token_id"] == config["bos_token_id"] == 0
    assert config["activation_function"] == "gelu_new"
    with pytest.raises(ValueError, match="eos_token_id"):
        hf_gpt2_config(cfg, eos_token_id=96)


def test_merge_rejects_mismatched_shards():
    cfg = GPTConfig(**TINY)
    state = GPT(cfg, init_seed=0).state_dict()
    partial = dict(state)
    del partial["ln_f.weight"]
    with pytest.raises(ValueError, match="ln_f.weight"):
        merge_tensor_parallel_shards([state, partial], cfg)
    with pytest.raises(KeyError, match="ln_f.weight"):
        to_hf_gpt2_state_dict(partial, cfg)
