"""``kernelize``: fastattn in a transformers model with one call, on tiny models built from
configs (nothing is downloaded), against an untouched copy with the same weights.

Every model is fp32 with weights at 10x their default scale (scores and activations of
order 1, so a wrong mask, cast, softcap or gate moves outputs far past the tolerance);
fastattn and eager then differ only by summation order: atol/rtol 1e-4. Rows of padding
are compared nowhere (fastattn's attention returns 0 there, eager a value nobody reads).
The ``fastattn::`` ops a call ran are counted (tests/routing.py) and must equal the
modules the report says it replaced: that is the proof each one ran on fastattn."""
import copy
import importlib
import warnings
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn import nn as fnn  # noqa: E402
from fastattn._warnings import FallbackWarning  # noqa: E402
from fastattn.integrations.kernelize import (  # noqa: E402
    from_config, from_pretrained, kernelize)
from routing import fastattn_ops  # noqa: E402
from tolerances import assert_close  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
WINDOW = 8
V = 97
DECODER = dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
ENCODER = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, initializer_range=0.2)
MODELS = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.2)),
    "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
        **ENCODER, max_position_embeddings=64, pad_token_id=0)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**DECODER)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(
        **DECODER, sliding_window=WINDOW)),
    "mistral_nowindow": (transformers.MistralForCausalLM, transformers.MistralConfig(
        **DECODER, sliding_window=None)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(     # layer 1 slides
        **DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        # softcaps that bend values of order 1: dropping either moves the outputs by ~1
        **DECODER, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0)),
    "vit": (transformers.ViTForImageClassification, transformers.ViTConfig(
        **{k: v for k, v in ENCODER.items() if k != "vocab_size"}, image_size=16,
        patch_size=4, num_labels=3)),
    "bart": (transformers.BartForConditionalGeneration, transformers.BartConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, init_std=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config(   # T5 v1.1 MLP
        vocab_size=V, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)),
}
CAUSAL = ("gpt2", "llama", "mistral", "mistral_nowindow", "qwen2", "gemma2")
ROTARY = ("llama", "mistral", "mistral_nowindow", "qwen2", "gemma2")
# (norms, activations, attention) modules replaced / found: the table. T5 passes
# its relative attention bias (position_bias) to every attention call: those go to SDPA.
SHARES = {
    "gpt2": ((5, 5), (2, 2), (2, 2)), "bert": ((6, 6), (3, 3), (2, 2)),
    "llama": ((5, 5), (2, 2), (2, 2)), "mistral": ((5, 5), (2, 2), (2, 2)),
    "mistral_nowindow": ((5, 5), (2, 2), (2, 2)),
    "qwen2": ((5, 5), (2, 2), (2, 2)), "gemma2": ((9, 9), (2, 2), (2, 2)),
    "vit": ((5, 5), (2, 2), (2, 2)), "bart": ((12, 12), (4, 4), (6, 6)),
    "t5": ((12, 12), (4, 4), (0, 6)),
}


def _pair(name):
    """An eager model and a kernelized copy of it (same weights, each its own config)."""
    model_cls, config = MODELS[name]
    torch.manual_seed(0)
    eager = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager")
    fast = copy.deepcopy(eager)
    before = {k: (v.data_ptr(), v.clone()) for k, v in fast.state_dict().items()}
    report = kernelize(fast)
    after = fast.state_dict()
    assert list(after) == list(before)
    for key, (ptr, value) in before.items():          # the very same tensors, unchanged
        assert after[key].data_ptr() == ptr and torch.equal(after[key], value), key
    return eager, fast, report


def _padded(batch, length, seed):
    """Token ids (3..96: no special token) and their mask: row 1 padded on the left, row 2
    on the right."""
    ids = torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _inputs(name):
    """Keyword inputs with labels, and the (B, T) rows of the output to compare."""
    if name == "vit":
        g = torch.Generator().manual_seed(1)
        return dict(pixel_values=torch.randn(3, 3, 16, 16, generator=g),
                    labels=torch.tensor([0, 2, 1])), None
    ids, mask = _padded(3, 13, seed=2)
    if name in ("bart", "t5"):
        labels = _padded(3, 7, seed=3)[0][:, :5].clone()
        return dict(input_ids=ids, attention_mask=mask, labels=labels), None
    ignore = mask == 0                                   # no pad is a target ...
    if name in CAUSAL:           # ... nor a token whose predictor (the one before) is a pad
        ignore |= torch.nn.functional.pad(mask[:, :-1] == 0, (1, 0))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(ignore, -100)), mask


@contextmanager
def _served(name):
    """Fail on any attention fallback; T5's must be its position bias (to SDPA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        if name != "t5":
            yield
            return
        with pytest.warns(FallbackWarning, match="position bias.*sdpa_attention_forward"):
            yield


def _assert_same_gradients(fast, eager):
    for (name, p), rp in zip(fast.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (rp.grad is None), name
        if rp.grad is not None:
            torch.testing.assert_close(p.grad, rp.grad, **TOL, msg=name)


def _replaced(report, kind):
    return report.share(kind)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_matches_eager_on_fastattn(name):
    """A padded batch with labels in training mode: loss, logits and every gradient as
    eager's; each replaced module ran its fastattn op (norms, activations, attention,
    rotary, the fused loss of causal LMs, which then returns no logits)."""
    eager, fast, report = _pair(name)
    assert tuple(report.share(k) for k in ("norms", "activations", "attention")) == \
        SHARES[name], str(report)
    kw, rows = _inputs(name)
    with _served(name), fastattn_ops() as ran:
        out = fast(**kw)
        out.loss.backward()
    ref = eager(**kw)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    _assert_same_gradients(fast, eager)
    assert ran["layer_norm_fwd"] == _replaced(report, "norms")
    assert ran["gelu_fwd"] + ran["swiglu_fwd"] == _replaced(report, "activations")
    assert ran["flash_attention_fwd"] == ran["flash_attention_bwd"] == \
        _replaced(report, "attention")
    assert ran["rope_fwd"] == _replaced(report, "rope") == (2 if name in ROTARY else 0)
    if name in CAUSAL:                       # the fused loss: no logits at all
        assert ran["linear_cross_entropy_fwd"] == 1 and out.logits is None
        kw.pop("labels")
        with torch.no_grad():
            out, ref = fast(**kw), eager(**kw)
    pick = (lambda x: x) if rows is None else (lambda x: x[rows.bool()])
    torch.testing.assert_close(pick(out.logits), pick(ref.logits), **TOL)


def _calls(report, kind, steps):
    """Calls of the modules of ``kind`` replaced, over a generation of ``steps`` forward
    passes: an encoder's run once."""
    return sum(1 if path.startswith("encoder.") or ".encoder." in path else steps
               for k, path, *_ in report.replaced if k == kind)


@pytest.mark.parametrize("name", [*CAUSAL, "bart", "t5"])
def test_greedy_generation_from_a_padded_batch_matches_eager(name):
    """Left-padded prompts for decoders (padded encoder input for BART and T5): the same
    tokens and logits, with the prefill and every step on fastattn."""
    eager, fast, report = _pair(name)
    ids, mask = _padded(3, 10, seed=4)
    if name in CAUSAL:                                          # all padding on the left
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    with _served(name), fastattn_ops() as ran:
        out = fast.eval().generate(ids, **kw)
    ref = eager.eval().generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)
    for kind, ops in (("norms", ["layer_norm_fwd"]), ("attention", ["flash_attention_fwd"]),
                      ("rope", ["rope_fwd"]), ("activations", ["gelu_fwd", "swiglu_fwd"])):
        assert sum(ran[op] for op in ops) == _calls(report, kind, steps=5), kind


def test_fused_loss_sums_over_num_items_in_batch():
    """transformers' gradient-accumulation contract: with ``num_items_in_batch`` the loss
    is the sum over targets divided by it, as ForCausalLMLoss computes it."""
    eager, fast, _ = _pair("llama")
    kw, _ = _inputs("llama")
    kw["num_items_in_batch"] = torch.tensor(50)
    with fastattn_ops() as ran:
        out = fast(**kw)
    assert ran["linear_cross_entropy_fwd"] == 1
    torch.testing.assert_close(out.loss, eager(**kw).loss, **TOL)


def test_skip_logits_is_the_callers_choice():
    eager, fast, _ = _pair("gpt2")
    kw, rows = _inputs("gpt2")
    out = fast(**kw, skip_logits=False)                  # training, logits asked for
    assert out.logits is not None
    torch.testing.assert_close(out.loss, eager(**kw).loss, **TOL)
    with fastattn_ops() as ran:
        fast.eval()(**kw, skip_logits=True)
    assert ran["linear_cross_entropy_fwd"] == 1
    kw.pop("labels")
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        fast(**kw, skip_logits=True)


def test_two_models_in_one_process_stay_independent():
    """Kernelizing one model patches that model's modules only: a second model of the same
    class runs eager (no fastattn op at all), and transformers' classes and module
    globals are unchanged."""
    modeling = importlib.import_module("transformers.models.llama.modeling_llama")
    classes = {cls: dict(vars(cls)) for cls in (modeling.LlamaRMSNorm, modeling.LlamaMLP,
                                                modeling.LlamaAttention,
                                                modeling.LlamaForCausalLM)}
    rope = modeling.apply_rotary_pos_emb
    eager, fast, _ = _pair("llama")
    plain = copy.deepcopy(eager)
    kw, _ = _inputs("llama")
    with fastattn_ops() as ran:
        out = plain(**kw)
    assert not ran, dict(ran)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, eager(**kw).loss, rtol=0, atol=0)
    with fastattn_ops() as ran:
        fast(**kw)
    assert ran["layer_norm_fwd"] and ran["rope_fwd"] and ran["swiglu_fwd"]
    assert modeling.apply_rotary_pos_emb is rope
    assert {cls: dict(vars(cls)) for cls in classes} == classes
    assert plain.config._attn_implementation == "eager"


def test_kernelize_twice_changes_nothing_and_copies_keep_it():
    _, fast, first = _pair("gemma2")
    again = kernelize(fast)
    assert sorted(again.counts().values()) == sorted(first.counts().values())
    assert {how for *_, how in again.replaced} == {
        "already kernelized", "attn_implementation='fastattn'",
        "fused into the MLP's fastattn.geglu (tanh)"}
    twin = copy.deepcopy(fast)                           # the patches follow the copy
    kw, _ = _inputs("gemma2")
    with fastattn_ops() as ran:
        twin(**kw)
    assert ran["linear_cross_entropy_fwd"] == 1 and ran["layer_norm_fwd"] == 9


def test_report_names_what_it_left_and_why():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2,
        feed_forward_proj="relu", decoder_start_token_id=0))
    report = kernelize(t5, norms=False)
    left = {(kind, cls, why) for kind, _, cls, why in report.left}
    assert ("activations", "ReLU", "an activation fastattn has no kernel for") in left
    assert ("norms", "T5LayerNorm", "norms=False") in left
    assert any(kind == "attention" and "position_bias" in why for kind, _, why in left)
    assert any(kind == "loss" and "lm_head" in why for kind, _, why in left)
    text = str(report)
    assert "left activations" in text and "position_bias" in text

    class OddNorm(torch.nn.Module):                       # not an RMSNorm form
        def forward(self, x):
            return x / x.abs().amax(-1, keepdim=True)

    class SquaredReLUActivation(torch.nn.Module):         # named like one, from elsewhere
        def forward(self, x):
            return torch.relu(x) ** 2

    model = torch.nn.Sequential(OddNorm(), transformers.activations.QuickGELUActivation(),
                                torch.nn.GELU(approximate="tanh"), torch.nn.SiLU(inplace=True),
                                SquaredReLUActivation(), torch.nn.Mish())
    model.config = transformers.PretrainedConfig()
    report = kernelize(model, attention=False, loss=False)
    assert [(cls, why) for _, _, cls, why in report.left] == [
        ("OddNorm", "its forward reads like none of the RMSNorm forms kernelize reproduces"),
        ("SiLU", "inplace=True"),
        ("SquaredReLUActivation", "an activation fastattn has no kernel for"),
        ("Mish", "an activation fastattn has no kernel for")]
    assert type(model[2]) is fnn.GELU
    assert report.share("activations") == (2, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_runs_on_fastattn_silu(dtype):
    """QuickGELU (CLIP's x·σ(1.702x)) as silu(1.702x) / 1.702: values and gradients
    against float64, within twice eager's error at the same dtype."""
    act = transformers.activations.QuickGELUActivation()
    module = torch.nn.ModuleDict({"a": copy.deepcopy(act)})
    assert kernelize(module, attention=False, loss=False).share("activations") == (1, 1)
    g = torch.Generator().manual_seed(6)
    x = (4 * torch.randn(3, 37, generator=g)).to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    with fastattn_ops() as ran:
        y = module["a"](x)
    assert ran["swiglu_fwd"] == 1 and y.dtype == dtype
    eager, ref = act(x), act(x64)
    dy = torch.randn(y.shape, generator=g)
    (gx,), (ex,), (rx,) = (torch.autograd.grad(out, inp, dy.to(out.dtype)) for out, inp in
                           ((y, x), (eager, x), (ref, x64)))
    assert_close(y, ref, "y", eager=eager)
    assert_close(gx, rx, "dx", eager=ex)


# ------------------------------------------------------------------ norm forms, casting

def _norm_class(module, name):
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                   name)


NORMS = [("llama", "LlamaRMSNorm", {}), ("gemma2", "Gemma2RMSNorm", {}),
         ("t5", "T5LayerNorm", {}), ("olmo_hybrid", "OlmoHybridRMSNorm", {}),
         ("moshi", "MoshiRMSNorm", {}), ("llama4", "Llama4TextRMSNorm", {}),
         ("gemma4", "Gemma4RMSNorm", {"with_scale": True}),
         ("gemma4", "Gemma4RMSNorm", {"with_scale": False})]


@pytest.mark.parametrize("module, name, kwargs", NORMS,
                         ids=[f"{n}{kw}" for _, n, kw in NORMS])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32),
                                              (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_rms_norm_forms_keep_their_casting(module, name, kwargs, x_dtype, w_dtype):
    """Each family's own rules: output dtype and values as its eager forward (Llama
    rounds before the weight, Gemma multiplies by 1 + w in fp32, T5 rounds to the
    weight's dtype), gradients too."""
    cls = _norm_class(module, name)
    norm = cls(40, eps=1e-5, **kwargs)
    g = torch.Generator().manual_seed(5)
    if "weight" in dict(norm.named_parameters()):
        norm.weight.data = torch.randn(40, generator=g)
    norm = norm.to(w_dtype)
    fast = copy.deepcopy(norm)
    report = kernelize(torch.nn.ModuleDict({"n": fast}), attention=False, loss=False)
    assert report.share("norms") == (1, 1), str(report)
    x = (3 * torch.randn(2, 7, 40, generator=g)).to(x_dtype).requires_grad_()
    with fastattn_ops() as ran:
        y = fast(x)
    eager = norm(x)
    assert ran["layer_norm_fwd"] == 1
    assert y.dtype == eager.dtype
    x64 = x.detach().double().requires_grad_()
    ref64 = copy.deepcopy(norm).double()(x64)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    (gx,), (ex,), (rx,) = (torch.autograd.grad(out, inp, dy.to(out.dtype)) for out, inp in
                           ((y, x), (eager, x), (ref64, x64)))
    assert_close(y, ref64, "y", eager=eager)
    assert_close(gx, rx, "dx", eager=ex)


def test_from_pretrained_loads_then_kernelizes(tmp_path):
    """From a checkpoint saved to disk (nothing downloaded): the same weights, kernelized."""
    eager, _, _ = _pair("llama")
    eager.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config._attn_implementation == "fastattn"
    assert model.fastattn_report.share("rope") == (2, 2)
    kw, rows = _inputs("llama")
    kw.pop("labels")
    with fastattn_ops() as ran:
        out = model(**kw).logits
    assert ran["rope_fwd"] == 2
    torch.testing.assert_close(out[rows.bool()], eager.eval()(**kw).logits[rows.bool()], **TOL)


def test_from_config_builds_a_kernelized_model():
    config = copy.deepcopy(MODELS["qwen2"][1])
    model = from_config(config)                                  # AutoModelForCausalLM
    assert type(model) is transformers.Qwen2ForCausalLM
    assert model.config._attn_implementation == "fastattn"
    assert model.fastattn_report.share("norms") == (5, 5)
    t5 = from_config(copy.deepcopy(MODELS["t5"][1]), transformers.T5ForConditionalGeneration,
                     attention=False)
    assert t5.config._attn_implementation != "fastattn"
    assert t5.fastattn_report.share("attention") == (0, 6)
