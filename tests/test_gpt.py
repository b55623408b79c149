"""The GPT model: fast and naive variants agree, generation, sampling filters, sinks,
activation checkpointing, counting, and the errors for bad input. Runs on CPU."""
import math

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.models import (GPT, GPTConfig, apply_repetition_penalty, top_k_filter,
                             top_p_filter)
from fastattn.models.gpt import PRESETS


def make_pair(seed=0, **overrides):
    """A fast GPT and a naive one holding the same weights."""
    cfg = dict(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_embd=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    fast = GPT(GPTConfig(**cfg, attention="fast"))
    naive = GPT(GPTConfig(**cfg, attention="naive"))
    naive.load_state_dict(fast.state_dict())
    return fast, naive


def assert_same_function(fast, naive, idx, tol):
    torch.testing.assert_close(fast(idx)[0], naive(idx)[0], atol=tol, rtol=tol)
    logits_f, loss_f = fast(idx, idx.roll(-1, dims=1))   # the fused loss: no logits formed
    logits_n, loss_n = naive(idx, idx.roll(-1, dims=1))
    assert logits_f is None and logits_n is not None
    torch.testing.assert_close(loss_f, loss_n, atol=tol, rtol=tol)
    loss_f.backward()
    loss_n.backward()
    grads_n = dict(naive.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_n[name].grad, atol=tol, rtol=10 * tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------- fast vs naive


def test_fast_and_naive_share_state_dict_keys():
    fast, naive = make_pair(n_kv_head=2, bias=False)
    keys = {k: v.shape for k, v in fast.state_dict().items()}
    assert keys == {k: v.shape for k, v in naive.state_dict().items()}
    assert "blocks.1.attn.qkv_proj.weight" in keys and "blocks.0.mlp.fc.weight" in keys
    assert fast.lm_head.weight is fast.wte.weight          # tied head


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2, "bias": False},
                                       {"approximate": "tanh", "mlp_hidden": 96}],
                         ids=["default", "gqa-nobias", "tanh"])
def test_fast_matches_naive_torch_backend(overrides):
    fast, naive = make_pair(**overrides)
    idx = torch.randint(0, 96, (3, 37))                    # 37: no tile multiple
    with fastattn.use_backend("torch"):
        assert_same_function(fast, naive, idx, tol=2e-5)


def test_loss_is_fused_only_when_the_vocabulary_is_wider_than_the_model():
    """V > C: the fused head + loss (no logits formed); V <= C: the plain head, whose
    logits are no bigger than the hidden state. Same loss and gradients as naive."""
    for vocab, fused in ((64, False), (65, True)):
        fast, naive = make_pair(vocab_size=vocab)                     # n_embd = 64
        idx = torch.randint(0, vocab, (2, 19))
        with fastattn.use_backend("torch"):
            (logits_f, loss_f), (_, loss_n) = (m(idx, idx.roll(-1, dims=1))
                                               for m in (fast, naive))
        assert (logits_f is None) == fused
        torch.testing.assert_close(loss_f, loss_n, atol=2e-5, rtol=2e-5)
        loss_f.backward()
        loss_n.backward()
        torch.testing.assert_close(fast.lm_head.weight.grad, naive.lm_head.weight.grad,
                                   atol=2e-5, rtol=2e-4)


def test_fast_trains_under_bf16_autocast_like_naive():
    """Mixed precision as ``fastattn train`` runs it: the attention output is bf16 while
    the residual stream stays fp32, so the fused residual LayerNorm gets mixed dtypes."""
    fast, naive = make_pair()
    idx = torch.randint(0, 96, (2, 37))
    out = {}
    for name, model in (("fast", fast), ("naive", naive)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        out[name] = loss.float(), model.wte.weight.grad
    # bf16 matmuls: about 3 significant digits on the loss and the gradients
    torch.testing.assert_close(out["fast"][0], out["naive"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out["fast"][1], out["naive"][1], atol=5e-3, rtol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in fast.parameters())


@pytest.mark.skipif(not backends.available("triton", torch.device("cpu"))[0],
                    reason="triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
def test_fast_matches_naive_triton_interpreter():
    fast, naive = make_pair(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    idx = torch.randint(0, 64, (2, 16))
    with fastattn.use_backend("triton"):
        assert_same_function(fast, naive, idx, tol=1e-4)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.1))
    ckpt = GPT(GPTConfig(**{**plain.config.to_dict(), "checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 32))
    for model in (plain, ckpt):
        torch.manual_seed(1)                               # same dropout masks
        model(idx, idx)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


# --------------------------------------------------------------------- sinks


@pytest.mark.parametrize("n_sink", [1, 3])
def test_sink_shares_equal_explicit_softmax(n_sink):
    fast, naive = make_pair(n_kv_head=2)
    idx = torch.randint(0, 96, (2, 40))
    # Read the share off each layer's explicit softmax matrix, layer by layer.
    expected, x = [], naive.wte(idx) + naive.wpe(torch.arange(40))
    for block in naive.blocks:
        probs = block.attn.attention_probs(block.ln1(x))   # (B, H, T, T)
        assert torch.allclose(probs.sum(-1), torch.ones(()))
        expected.append(probs[..., :n_sink].sum(-1).mean(dim=(0, 2)))
        x = block(x)
    expected = torch.stack(expected)                        # (L, H)
    with torch.no_grad():
        torch.testing.assert_close(naive.sink_shares(idx, n_sink), expected)
        torch.testing.assert_close(fast.sink_shares(idx, n_sink), expected, atol=1e-5,
                                   rtol=1e-4)
    assert fast.sink_shares(idx, n_sink).shape == (2, 4)


def test_sink_shares_rejects_bad_n_sink():
    fast, _ = make_pair()
    with pytest.raises(ValueError, match=r"n_sink must be in \[1, T=8\], got 9"):
        fast.sink_shares(torch.zeros(1, 8, dtype=torch.long), n_sink=9)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("attention", ["fast", "naive"])
def test_kv_cache_generation_equals_no_cache_greedy(attention):
    fast, naive = make_pair(n_kv_head=2)
    model = fast if attention == "fast" else naive
    prompt = torch.randint(0, 96, (2, 5))
    # 60 new tokens run past block_size 48: the window slides and the cache re-fills.
    cached = model.generate(prompt, 60, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 60, temperature=0, use_cache=False)
    assert cached.shape == (2, 65)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


@pytest.mark.skipif(not backends.available("triton", torch.device("cpu"))[0],
                    reason="triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
def test_kv_cache_generation_triton_interpreter():
    """Decoding runs the Triton kernel with query length 1 against the cache."""
    fast, _ = make_pair(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    prompt = torch.randint(0, 64, (1, 3))
    with fastattn.use_backend("triton"):
        cached = fast.generate(prompt, 4, temperature=0, use_cache=True)
        assert torch.equal(cached, fast.generate(prompt, 4, temperature=0, use_cache=False))
    with fastattn.use_backend("torch"):
        assert torch.equal(cached, fast.generate(prompt, 4, temperature=0))


def test_kv_cache_generation_equals_no_cache_sampled():
    fast, _ = make_pair()
    prompt = torch.randint(0, 96, (3, 4))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    assert torch.equal(fast.generate(prompt, 20, use_cache=True, **kw),
                       fast.generate(prompt, 20, use_cache=False, **kw))


def test_seed_makes_sampling_reproducible():
    fast, _ = make_pair()
    prompt = torch.randint(0, 96, (2, 4))
    a = fast.generate(prompt, 30, seed=123)
    b = fast.generate(prompt, 30, seed=123)
    c = fast.generate(prompt, 30, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_stops_and_pads_finished_rows():
    fast, _ = make_pair()
    prompt = torch.randint(0, 96, (2, 3))
    full = fast.generate(prompt, 12, temperature=0)
    eos = int(full[0, 3 + 2])                               # row 0's third new token
    out = fast.generate(prompt, 12, temperature=0, eos=eos)
    # Index of each row's first eos among the new tokens (12: none).
    first = [int((full[r, 3:] == eos).nonzero()[0]) if (full[r, 3:] == eos).any() else 12
             for r in range(2)]
    assert out.shape[1] == 3 + min(max(first) + 1, 12)     # stops when all rows are done
    for r in range(2):
        stop = 3 + min(first[r] + 1, 12)
        assert torch.equal(out[r, :stop], full[r, :stop])  # same tokens up to eos
        assert (out[r, stop:] == eos).all()                 # then padding
    single = fast.generate(prompt[:1], 12, temperature=0, eos=eos)
    assert single.shape == (1, 3 + first[0] + 1)


def test_generate_keeps_training_mode():
    fast, _ = make_pair()
    fast.train()
    fast.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert fast.training


# ------------------------------------------------------------ sampling filters


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0], [0.0, 0.0, 1.0, 2.0, -1.0]])
    out = top_k_filter(logits, 2)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[inf, 5.0, inf, inf, 4.0], [inf, inf, 1.0, 2.0, inf]]))
    assert torch.equal(top_k_filter(logits, 5), logits)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        top_k_filter(logits, 0)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    # Sorted: 0.5, 0.3, 0.1, 0.05, 0.05 -> cumulative 0.5, 0.8, 0.9, ...
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert kept(0.5) == [False, True, False, False, False]    # 0.5 reaches 0.5
    assert kept(0.6) == [False, True, False, True, False]
    assert kept(0.85) == [False, True, True, True, False]
    assert kept(0.01) == [False, True, False, False, False]   # always the top token
    assert kept(1.0) == [True] * 5
    kept_logits = top_p_filter(logits, 0.85)
    assert torch.equal(kept_logits[torch.isfinite(kept_logits)], logits[0, [1, 2, 3]])
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        top_p_filter(logits, 1.5)


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
    seen = torch.tensor([[0, 1, 1], [3, 3, 3]])             # repeats count once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0], [3.0, 3.0, 3.0, 1.5]]))
    assert torch.equal(logits[0], torch.tensor([2.0, -2.0, 1.0, -1.0]))  # not in place
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0, got 0"):
        apply_repetition_penalty(logits, seen, 0.0)


def test_generate_rejects_bad_arguments():
    fast, _ = make_pair()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        fast.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        fast.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) with T >= 1"):
        fast.generate(torch.zeros(1, 0, dtype=torch.long), 2)


# -------------------------------------------------------------- configs, errors


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of: tiny, small, gpt2"):
        GPTConfig.from_preset("huge")


@pytest.mark.parametrize("attention", ["fast", "naive"])
def test_block_size_exceeded(attention):
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32,
                          attention=attention))
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    ({"attention": "flash"}, r"attention must be one of \('fast', 'naive'\), got 'flash'"),
    ({"n_embd": 64, "n_head": 3}, "n_head must divide n_embd=64, got 3"),
    ({"n_embd": 1040, "n_head": 4}, "head dim n_embd / n_head = 1040 / 4 = 260 must be"),
    ({"n_kv_head": 3}, "n_kv_head must be a positive divisor of n_head=4, got 3"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
    ({"approximate": "fast"}, "approximate must be one of"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


# ------------------------------------------------------------------ counting


def test_gpt2_preset_has_124m_parameters_and_palm_flops():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (12, 12, 768, 1024)
    assert model.num_params(non_embedding=False) == 124_439_808   # GPT-2 small
    n = model.num_params()
    assert n == 124_439_808 - 50257 * 768 - 1024 * 768
    expected = 6 * (n + 50257 * 768) + 12 * 12 * 12 * 64 * 1024
    assert model.flops_per_token() == expected
    assert model.flops_per_token(seq_len=2048) == expected + 12 * 12 * 12 * 64 * 1024
    assert math.isclose(model.estimate_mfu(1000.0, 1e12), expected * 1000 / 1e12)
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        model.estimate_mfu(1.0, 0.0)


def test_presets_build():
    """Each preset is a valid config with the sizes it promises (``gpt2``: GPT-2 small)."""
    assert set(PRESETS) == {"tiny", "small", "gpt2"}
    configs = {name: GPTConfig.from_preset(name) for name in PRESETS}
    gpt2 = configs["gpt2"]
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    widths = [configs[name].n_embd * configs[name].n_layer for name in ("tiny", "small", "gpt2")]
    assert widths == sorted(widths) and len(set(widths)) == 3       # ordered by size


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=256))
    std = lambda t: float(t.detach().std())
    assert math.isclose(std(model.wte.weight), 0.02, rel_tol=0.05)
    assert math.isclose(std(model.blocks[0].attn.qkv_proj.weight), 0.02, rel_tol=0.05)
    assert math.isclose(std(model.blocks[0].mlp.proj.weight), 0.02 / 4, rel_tol=0.05)
    assert math.isclose(std(model.blocks[3].attn.out_proj.weight), 0.02 / 4, rel_tol=0.05)
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(256))
    assert torch.equal(model.blocks[0].attn.qkv_proj.bias, torch.zeros(3 * 256))
