"""``fastattn.scaled_dot_product_attention`` and ``fastattn.flash_attn_func``: drop-in
signatures, the fast path, documented fallbacks and errors."""
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICE
from fastattn._warnings import FallbackWarning


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g).to(out)
    return torch.autograd.grad(out, inputs, do)


def test_sdpa_signature_matches_torch():
    """torch's function is a builtin without __signature__; its docstring states it."""
    doc = F.scaled_dot_product_attention.__doc__
    args = " ".join(doc[doc.index("(") + 1:doc.index(")")].split())
    theirs = inspect.signature(eval(f"lambda {args}: None"))
    ours = inspect.signature(fastattn.scaled_dot_product_attention)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].default == p.default, name


@pytest.mark.parametrize("shape,causal,gqa", [
    ((2, 4, 33, 32), True, False),
    ((2, 4, 33, 32), False, False),
    ((3, 17, 64), True, False),         # 3-D (B, L, E)
    ((2, 8, 20, 16), True, True),       # fewer KV heads with enable_gqa
])
def test_sdpa_fast_path_matches_torch(shape, causal, gqa):
    q = _rand(*shape)
    kv_shape = (shape[0], 2) + shape[2:] if gqa else shape
    k, v = _rand(*kv_shape, seed=1), _rand(*kv_shape, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)    # the fast path must not fall back
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    kw = {"enable_gqa": True} if gqa else {}
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for g, rg in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(g, rg, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs,reason", [
    ({"attn_mask": "bool"}, "not a key-padding mask"),
    ({"attn_mask": "bias"}, "not a key-padding mask"),
    ({"is_causal": True, "short_q": True}, "is_causal with query length != key length"),
    ({"head_dim": 264}, "head dim 264"),
    ({"value_dim": 24}, "value head dim 24"),
])
def test_sdpa_fallback_warns_and_matches_torch(kwargs, reason):
    kwargs = dict(kwargs)
    d = kwargs.pop("head_dim", 16)
    tq = 5 if kwargs.pop("short_q", False) else 9
    q, k = _rand(2, 2, tq, d), _rand(2, 2, 9, d, seed=1)
    v = _rand(2, 2, 9, kwargs.pop("value_dim", d), seed=2)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(tq, 9, generator=torch.Generator().manual_seed(3)) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif kwargs.get("attn_mask") == "bias":                     # a key bias, not 0 / -inf
        kwargs["attn_mask"] = torch.randn(1, 1, 1, 9, generator=torch.Generator().manual_seed(3))
    with pytest.warns(FallbackWarning, match=reason):
        fastattn._warnings._SEEN.clear()
        out = fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref)


def test_fallback_warns_once():
    q = _rand(1, 2, 8, 264)
    fastattn._warnings._SEEN.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fastattn.scaled_dot_product_attention(q, q, q)
    assert len([w for w in caught if issubclass(w.category, FallbackWarning)]) == 1


# --- flash_attn_func: flash-attn's signature and (B, T, H, D) layout ---

def test_flash_attn_func_signature():
    params = list(inspect.signature(fastattn.flash_attn_func).parameters)
    assert params == ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size",
                      "softcap", "alibi_slopes", "deterministic", "return_attn_probs",
                      "q_descale", "k_descale", "v_descale"]           # keyword-only (FA3)


@pytest.mark.parametrize("tq,tk,hkv", [(13, 13, 4), (1, 30, 2), (9, 21, 1)])
def test_flash_attn_func_layout_and_values(tq, tk, hkv):
    q = _rand(2, tq, 4, 32)                                  # (B, T, H, D)
    k, v = _rand(2, tk, hkv, 32, seed=1), _rand(2, tk, hkv, 32, seed=2)
    out, lse, probs = fastattn.flash_attn_func(q, k, v, causal=True, softmax_scale=0.2,
                                               deterministic=True, return_attn_probs=True)
    assert out.shape == (2, tq, 4, 32) and lse.shape == (2, 4, tq)
    assert probs.shape == (2, 4, tq, tk) and probs.dtype == torch.float32
    # flash-attn returns a contiguous (B, T, H, D) tensor; code written for it calls
    # .view(B, T, H * D) on it (a transposed view used to make that raise).
    assert out.is_contiguous()
    out.view(2, tq, 4 * 32)
    ref, rlse = fastattn.reference.attention(
        *(x.detach().double().transpose(1, 2) for x in (q, k, v)), causal=True, scale=0.2)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rlse, atol=1e-5, rtol=1e-5)
    assert torch.equal(fastattn.flash_attn_func(q, k, v, causal=True, softmax_scale=0.2), out)


def test_flash_attn_func_bad_rank():
    with pytest.raises(ValueError, match=r"q must have shape \(batch, seqlen, nheads, "
                                         r"headdim\), got \(8, 4, 16\)"):
        fastattn.flash_attn_func(_rand(8, 4, 16), _rand(1, 8, 4, 16), _rand(1, 8, 4, 16))
