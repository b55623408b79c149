"""Attention modules: ``fastattn.nn.CausalSelfAttention`` and the drop-in
``fastattn.nn.MultiheadAttention``, against the torch / textbook modules they replace."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn
from routing import fastattn_ops
from fastattn._warnings import FallbackWarning


class NaiveCausalSelfAttention(nn.Module):
    """The seed's textbook module: fused QKV, a registered tril mask, full T×T softmax."""

    def __init__(self, d_model, n_heads, max_seq_len=64, bias=True):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.register_buffer("mask", torch.tril(torch.ones(max_seq_len, max_seq_len))
                             .view(1, 1, max_seq_len, max_seq_len), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q, k, v = (y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf")).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("bias", [True, False])
def test_causal_self_attention_matches_textbook(bias):
    torch.manual_seed(0)
    naive = NaiveCausalSelfAttention(64, 4, bias=bias)
    fast = fastattn.nn.CausalSelfAttention(64, 4, bias=bias)
    fast.load_state_dict(naive.state_dict())               # same parameter names and shapes
    assert fast.state_dict().keys() == naive.state_dict().keys()
    x = torch.randn(3, 37, 64, requires_grad=True)
    out, ref = fast(x), naive(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    out.backward(do)
    gx, x.grad = x.grad, None
    ref.backward(do)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    for (name, p), rp in zip(fast.named_parameters(), naive.parameters()):
        torch.testing.assert_close(p.grad, rp.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_causal_self_attention_grouped_query():
    torch.manual_seed(0)
    m = fastattn.nn.CausalSelfAttention(64, 4, n_kv_heads=2)
    assert m.qkv_proj.out_features == (4 + 2 * 2) * 16
    x = torch.randn(2, 11, 64)
    q, k, v = m.qkv_proj(x).split([64, 32, 32], dim=-1)
    q = q.view(2, 11, 4, 16).transpose(1, 2)
    k, v = (y.view(2, 11, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1) for y in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = m.out_proj(ref.transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert "n_kv_heads=2" in repr(m)


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 64, "n_heads": 5}, r"n_heads must be a positive divisor of d_model=64, got 5"),
    ({"d_model": 64, "n_heads": 4, "n_kv_heads": 3},
     r"n_kv_heads must be a positive divisor of n_heads=4, got 3"),
    ({"d_model": 64, "n_heads": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
])
def test_causal_self_attention_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastattn.nn.CausalSelfAttention(**kwargs)


# --- MultiheadAttention: a drop-in for torch.nn.MultiheadAttention ---

def _pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(64, 4, **kwargs)
    ours = fastattn.nn.MultiheadAttention(64, 4, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True}, {"bias": False},
                                    {"kdim": 32, "vdim": 48, "batch_first": True}])
def test_multihead_attention_state_dict_round_trip(kwargs):
    ours, ref = _pair(**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())                 # and back


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_fast_path_matches_torch(batch_first, causal):
    ours, ref = _pair(batch_first=batch_first)
    shape = (2, 13, 64) if batch_first else (13, 2, 64)
    x = torch.randn(*shape, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(13) if causal else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out, weights = ours(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    expected, _ = ref(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    assert weights is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    g, = torch.autograd.grad(out, x, do)
    rg, = torch.autograd.grad(expected, x, do)
    torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_multihead_attention_cross_attention_and_unbatched():
    ours, ref = _pair(kdim=32, vdim=48, batch_first=True)
    q, k, v = torch.randn(2, 7, 64), torch.randn(2, 19, 32), torch.randn(2, 19, 48)
    out, _ = ours(q, k, v, need_weights=False)
    torch.testing.assert_close(out, ref(q, k, v, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    out, _ = ours(q[0], k[0], v[0], need_weights=False)
    torch.testing.assert_close(out, ref(q[0], k[0], v[0], need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,reason", [
    ({}, r"need_weights=True"),
    ({"need_weights": False, "key_padding_mask": True}, r"key_padding_mask"),
    ({"need_weights": False, "attn_mask": True}, r"attn_mask without is_causal=True"),
])
def test_multihead_attention_fallback_warns_and_matches_torch(call, reason):
    ours, ref = _pair(batch_first=True)
    x = torch.randn(2, 9, 64)
    if call.pop("key_padding_mask", False):
        call["key_padding_mask"] = torch.zeros(2, 9, dtype=torch.bool)
        call["key_padding_mask"][0, -3:] = True
    if call.pop("attn_mask", False):
        call["attn_mask"] = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)) > 0.5
        call["attn_mask"].fill_diagonal_(False)
    fastattn._warnings._SEEN.clear()
    with pytest.warns(FallbackWarning, match=reason):
        out, weights = ours(x, x, x, **call)
    expected, expected_weights = ref(x, x, x, **call)
    torch.testing.assert_close(out, expected)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights)


def test_multihead_attention_training_dropout_falls_back():
    ours, _ = _pair(dropout=0.1, batch_first=True)
    fastattn._warnings._SEEN.clear()
    with pytest.warns(FallbackWarning, match=r"attention dropout=0.1 in training mode"):
        ours(torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 64),
             need_weights=False)
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        ours(torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 64),
             need_weights=False)


# --- torch.compile ---

class TinyModel(nn.Module):
    """Every fastattn op: attention, (residual) LayerNorm, bias-GELU, RMSNorm."""

    def __init__(self):
        super().__init__()
        self.block = fastattn.nn.Block(64, 4, n_kv_heads=2)
        self.norm = fastattn.nn.RMSNorm(64)

    def forward(self, x):
        return self.norm(self.block(x))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(2, 24, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), x)
    rg, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_triton_op_registration_without_interpreter():
    """Without TRITON_INTERPRET the ops are ``triton_op``s that torch.compile traces into;
    the rest of the suite (on CPU) runs under the interpreter, so check this path here."""
    code = textwrap.dedent("""
        import torch, fastattn
        import torch.nn as nn
        torch.manual_seed(0)
        q = torch.randn(1, 4, 9, 16, requires_grad=True)
        k = torch.randn(1, 2, 9, 16, requires_grad=True)
        v = torch.randn(1, 2, 9, 16, requires_grad=True)
        torch.library.opcheck(torch.ops.fastattn.flash_attention_fwd.default,
                              (q, k, v, None, None, None, 0, 0, True, -1, 0, 0.0, 0.0, 0, 0,
                               0.25, "torch", True))
        m = fastattn.nn.CausalSelfAttention(32, 2)
        x = torch.randn(2, 10, 32)
        out = torch.compile(m, fullgraph=True)(x)
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# --- KV cache and attention-sink share ---

def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    m = fastattn.nn.CausalSelfAttention(64, 4, n_kv_heads=2)
    x = torch.randn(2, 12, 64)
    cache = fastattn.nn.KVCache(2, 2, 16, 16)
    steps = [m(x[:, :5], cache)] + [m(x[:, i:i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), m(x), atol=1e-5, rtol=1e-5)
    assert cache.length == 12
    with pytest.raises(ValueError, match=r"KV cache holds at most 16 positions; appending 5 "
                                         r"to 12 cached would make 17"):
        m(x[:, :5], cache)


@pytest.mark.parametrize("n_sink", [1, 3])
def test_sink_share_equals_explicit_softmax(n_sink):
    torch.manual_seed(0)
    m = fastattn.nn.CausalSelfAttention(64, 4, n_kv_heads=2)
    x = torch.randn(2, 12, 64)
    share = m.sink_share(x, n_sink)
    q, k, v = m._qkv(x)
    k = k.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1)) * 16 ** -0.5
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1)[..., :n_sink].sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(share, expected, atol=1e-6, rtol=1e-5)


# --- LayerNorm, RMSNorm, GELU, LinearGELU, MLP, Block ---

@pytest.mark.parametrize("make_ours,make_theirs", [
    (lambda: fastattn.nn.LayerNorm(48), lambda: nn.LayerNorm(48)),
    (lambda: fastattn.nn.LayerNorm(48, bias=False), lambda: nn.LayerNorm(48, bias=False)),
    (lambda: fastattn.nn.LayerNorm((3, 16), eps=1e-3), lambda: nn.LayerNorm((3, 16), eps=1e-3)),
    (lambda: fastattn.nn.LayerNorm(48, elementwise_affine=False),
     lambda: nn.LayerNorm(48, elementwise_affine=False)),
    (lambda: fastattn.nn.RMSNorm(48), lambda: nn.RMSNorm(48)),
    (lambda: fastattn.nn.GELU(), lambda: nn.GELU()),
    (lambda: fastattn.nn.GELU("tanh"), lambda: nn.GELU("tanh")),
])
def test_norm_and_gelu_modules_are_drop_ins(make_ours, make_theirs):
    torch.manual_seed(0)
    ours, theirs = make_ours(), make_theirs()
    for p in theirs.parameters():                            # non-trivial affine parameters
        p.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(4, 5, 3, 16).reshape(4, 5, 48) if "3, 16" not in repr(theirs) else (
        torch.randn(4, 5, 3, 16))
    x.requires_grad_()
    with fastattn_ops() as ran:
        out = ours(x)
    ref = theirs(x)
    assert ran, "the fastattn module ran no fastattn:: op"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, [x] + list(ours.parameters()), do),
                               torch.autograd.grad(ref, [x] + list(theirs.parameters()), do),
                               atol=1e-5, rtol=1e-5)


def test_layer_norm_module_fused_residual():
    ln = fastattn.nn.LayerNorm(32)
    x, r = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    y, h = ln(x, residual=r, return_residual=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (32,), ln.weight, ln.bias),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_matches_linear_then_gelu(bias, approximate):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    fused = fastattn.nn.LinearGELU(24, 40, bias=bias, approximate=approximate)
    fused.load_state_dict(lin.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    out, ref = fused(x), F.gelu(lin(x), approximate=approximate)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, [x] + list(fused.parameters()), do),
                               torch.autograd.grad(ref, [x] + list(lin.parameters()), do),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh', got 'erf'"):
        fastattn.nn.LinearGELU(4, 4, approximate="erf")


class TorchBlock(nn.Module):
    """The same pre-LN block from torch parts, with the parameter names of ``Block``."""

    def __init__(self, d, h):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NaiveCausalSelfAttention(d, h)
        self.mlp = nn.Module()
        self.mlp.fc, self.mlp.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln2(x))))


def test_block_matches_torch_block():
    torch.manual_seed(0)
    ref = TorchBlock(64, 4)
    block = fastattn.nn.Block(64, 4)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 64, requires_grad=True)
    out, expected = block(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    names = sorted(dict(ref.named_parameters()))
    ours, theirs = dict(block.named_parameters()), dict(ref.named_parameters())
    torch.testing.assert_close(
        torch.autograd.grad(out, [x] + [ours[n] for n in names], do),
        torch.autograd.grad(expected, [x] + [theirs[n] for n in names], do),
        atol=1e-4, rtol=1e-4)
