"""``fastattn.swap`` and ``fastattn.enable`` on models that never heard of fastattn."""
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn
import fastattn._swap as swap_mod
import fastattn.nn as fnn
from fastattn._warnings import FallbackWarning
from routing import fastattn_ops


class SeedAttention(nn.Module):
    """The seed's textbook multi-head attention (separate q/k/v Linears, masked_fill)."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_linear, self.k_linear = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_linear, self.out_linear = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = (lin(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for lin in (self.q_linear, self.k_linear, self.v_linear))
        scores = (q @ k.transpose(-2, -1)) / self.head_dim ** 0.5
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.out_linear(out.transpose(1, 2).contiguous().view(b, t, c))


class SeedBlock(nn.Module):
    """The seed's pre-LN transformer block: ln1, attn, ln2, ffn = Linear → GELU → Linear."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SeedAttention(d_model, n_heads)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.ffn(self.ln2(x))


class TorchOnlyModel(nn.Module):
    """Built only from torch.nn parts: MultiheadAttention, norms, an MLP."""

    def __init__(self, d=64, h=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, h, batch_first=True)
        self.rms = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(2 * d, d), nn.GELU())

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        a, _ = self.mha(self.norm(x), self.norm(x), self.norm(x), need_weights=False,
                        attn_mask=mask, is_causal=True)
        return self.mlp(self.rms(x + a))


def _outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [lambda: SeedBlock(64, 4), TorchOnlyModel])
def test_swap_keeps_outputs_gradients_and_weights(make):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = fastattn.swap(model)
    assert report.swapped, str(report)
    assert list(model.state_dict()) == keys_before
    for n, p in model.named_parameters():                   # shared, not copied
        assert p is params_before[n], n
    x = torch.randn(2, 9, 64)
    out, gx, grads = _outputs_and_grads(model, x)
    rout, rgx, rgrads = _outputs_and_grads(original, x)
    torch.testing.assert_close(out, rout, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rgx, atol=1e-5, rtol=1e-5)
    for n in rgrads:
        torch.testing.assert_close(grads[n], rgrads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_swap_report_and_idempotence():
    model = TorchOnlyModel().eval()
    report = fastattn.swap(model)
    swapped = {path for path, _, _ in report.swapped}
    assert swapped == {"norm", "mha", "rms", "mlp.0", "mlp.2"}
    assert isinstance(model.norm, fnn.LayerNorm) and isinstance(model.rms, fnn.RMSNorm)
    assert isinstance(model.mha, fnn.MultiheadAttention)
    assert isinstance(model.mlp[0], fnn.LinearGELU) and isinstance(model.mlp[1], nn.Identity)
    assert model.mlp[0].approximate == "tanh" and model.mlp[2].approximate == "none"
    assert isinstance(model.mlp[2], fnn.LinearGELU) and isinstance(model.mlp[3], nn.Identity)
    assert not model.mlp[0].training                         # eval mode kept
    assert "swapped 5 module(s)" in str(report)
    again = fastattn.swap(model)
    assert again.swapped == []
    assert all(why == "already a fastattn module" for _, _, why in again.left)


def test_swap_options_and_subclasses():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.LayerNorm(8), MyNorm(8), nn.Linear(8, 8), nn.GELU())
    report = fastattn.swap(model, layer_norm=False, linear_gelu=False)
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is MyNorm
    assert isinstance(model[3], fnn.GELU) and type(model[2]) is nn.Linear
    left = {path: why for path, _, why in report.left}
    assert left["0"] == "layer_norm=False"
    assert "subclass of nn.LayerNorm" in left["1"]


def test_swap_reports_norms_and_activations_it_does_not_recognise():
    """Regression (issue 11): on a Llama the report said "swapped 0 module(s), left 0",
    hiding the LlamaRMSNorms and SiLU activations that swap leaves alone."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2)
    report = fastattn.swap(transformers.LlamaForCausalLM(config))
    left = {path: (what, why) for path, what, why in report.left}
    assert report.swapped == []
    assert str(report).startswith("swapped 0 module(s), left 7")   # 2 × (2 norms, act) + norm
    what, why = left["model.norm"]
    assert what == "LlamaRMSNorm" and "norm class fastattn does not recognise" in why
    what, why = left["model.layers.1.mlp.act_fn"]
    assert "activation class fastattn does not recognise" in why, what
    torch_parts = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Linear(8, 8))
    left = {path: why for path, _, why in fastattn.swap(torch_parts).left}
    assert set(left) == {"0", "1"}
    assert "norm class" in left["0"] and "activation class" in left["1"]


def test_swap_names_one_thing():
    """Regression (issue 11): ``fastattn.swap`` was both a module and the function that
    rebinds it; the module is now ``fastattn._swap``."""
    assert fastattn.swap is swap_mod.swap
    assert fastattn.SwapReport is swap_mod.SwapReport and fastattn.enable is swap_mod.enable
    assert fastattn.enable_globally is swap_mod.enable_globally
    with pytest.raises(ModuleNotFoundError, match="fastattn.swap"):
        importlib.import_module("fastattn.swap")


def test_swap_keeps_dtype_and_device():
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU()).to(torch.bfloat16)
    fastattn.swap(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16
    out = model(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_enable_routes_functional_calls():
    model = SeedBlock(64, 4)
    x = torch.randn(2, 7, 64)
    mask = torch.tril(torch.ones(7, 7))
    ref = model(x, mask)
    with fastattn.enable(), fastattn_ops() as ran:
        out = model(x, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ran["layer_norm_fwd"] == 2 and ran["gelu_fwd"] == 1, ran


def test_enable_sdpa_and_fallback_for_unsupported_dtype():
    q = torch.randn(1, 2, 9, 16)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    import fastattn._warnings as w
    w._SEEN.clear()
    with fastattn.enable(), fastattn_ops() as ran:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        x64 = torch.randn(3, 8, dtype=torch.float64)
        with pytest.warns(FallbackWarning, match="dtype torch.float64"):
            y64 = F.layer_norm(x64, (8,))               # float64: torch's own, said once
    assert ran == {"flash_attention_fwd": 1}
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y64, F.layer_norm(x64, (8,)))


def test_enable_globally_on_and_off():
    assert not swap_mod.is_enabled_globally()
    swap_mod.enable_globally(True)
    try:
        assert swap_mod.is_enabled_globally()
        x = torch.randn(4, 8)
        with fastattn_ops() as ran:
            y = F.gelu(x)
        assert ran["gelu_fwd"] == 1                # routed, not torch's own F.gelu
        torch.testing.assert_close(y, 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)))
    finally:
        swap_mod.enable_globally(False)
    assert not swap_mod.is_enabled_globally()
