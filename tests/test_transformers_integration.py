"""transformers integration: ``attn_implementation="fastattn"`` on tiny models built from
configs (nothing is downloaded), against the same weights under ``"eager"``.

Every model is fp32, so fastattn, SDPA and eager differ only by summation order:
atol/rtol 1e-4 throughout."""
import warnings
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn._warnings import FallbackWarning  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    sdpa_mask, sliding_window_causal_mask_function)

TOL = dict(atol=1e-4, rtol=1e-4)
DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
GPT2 = (transformers.GPT2LMHeadModel, transformers.GPT2Config,
        dict(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
LLAMA = (transformers.LlamaForCausalLM, transformers.LlamaConfig, DECODER)
QWEN2 = (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, DECODER)
GEMMA2 = (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
          # a softcap of 1 bends every logit, so dropping it could not pass unnoticed
          dict(DECODER, head_dim=16, sliding_window=8, attn_logit_softcapping=1.0))
GPT_OSS = (transformers.GptOssForCausalLM, transformers.GptOssConfig,
           dict(DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                sliding_window=8))
T5 = (transformers.T5ForConditionalGeneration, transformers.T5Config,
      dict(vocab_size=97, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
           dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _pair(model_cls, config_cls, config):
    """The same weights under "eager" and "fastattn", each model on its own config."""
    fastattn_hf.register()
    torch.manual_seed(0)
    eager = model_cls._from_config(config_cls(**config), attn_implementation="eager")
    fast = model_cls._from_config(config_cls(**config), attn_implementation="fastattn")
    fast.load_state_dict(eager.state_dict())
    assert fast.config._attn_implementation == "fastattn"
    assert eager.config._attn_implementation == "eager"
    return eager, fast


def _ids(batch, length, seed):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Query lengths of the calls that fastattn's kernel served."""
    calls = []
    original = fastattn_hf.flash_attention
    monkeypatch.setattr(fastattn_hf, "flash_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or original(q, *a, **k))
    return calls


@contextmanager
def _no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        yield


def _assert_same_step(fast, eager, out, ref):
    """Logits, then the gradients of the loss for every parameter."""
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), rp in zip(fast.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (rp.grad is None), name
        if rp.grad is not None:
            torch.testing.assert_close(p.grad, rp.grad, **TOL, msg=name)


def test_logits_and_gradients_match_eager(kernel_calls):
    eager, fast = _pair(*GPT2)
    ids = _ids(2, 23, seed=1)
    with _no_fallback():
        out = fast(ids, labels=ids)
    assert kernel_calls == [23, 23]                           # one per layer: the kernel ran
    _assert_same_step(fast, eager, out, eager(ids, labels=ids))


def test_greedy_generation_with_kv_cache_matches_eager():
    eager, fast = _pair(*GPT2)
    ids = _ids(1, 6, seed=2)
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    assert torch.equal(fast.eval().generate(ids, **kw), eager.eval().generate(ids, **kw))


def test_padding_mask_falls_back_with_a_warning():
    eager, fast = _pair(*GPT2)
    ids = _ids(2, 8, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                           # left padding
    with pytest.warns(FallbackWarning, match="explicit attention mask"):
        out = fast(ids, attention_mask=mask).logits
    ref = eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_t5_position_bias_falls_back_to_sdpa():
    """Regression (issue 11): T5's relative attention bias (the ``position_bias`` keyword)
    was swallowed: logits off by 0.2, no warning, no gradient for the bias table."""
    eager, fast = _pair(*T5)
    ids, labels = _ids(2, 12, seed=4), _ids(2, 9, seed=5)
    with pytest.warns(FallbackWarning, match="position bias.*sdpa_attention_forward"):
        out = fast(input_ids=ids, labels=labels)
    _assert_same_step(fast, eager, out, eager(input_ids=ids, labels=labels))
    for stack in (fast.encoder, fast.decoder):
        assert stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad is not None


def test_gpt_oss_attention_sinks_fall_back_to_eager():
    """Regression (issue 11): gpt-oss's attention sinks (the ``s_aux`` keyword) were
    dropped: logits off by 0.23, no warning."""
    eager, fast = _pair(*GPT_OSS)
    ids = _ids(2, 12, seed=6)                                 # longer than the window of 8
    with pytest.warns(FallbackWarning, match="s_aux.*eager attention of GptOssAttention"):
        out = fast(ids, labels=ids)
    _assert_same_step(fast, eager, out, eager(ids, labels=ids))


def test_gemma2_softcap_falls_back_to_eager():
    """Regression (issue 11): the softcap fallback went to SDPA, which raises "`sdpa`
    attention does not support `softcap`". Padding and the sliding window of 8 over 12
    tokens give both layers a mask, which must reach eager attention in additive form."""
    eager, fast = _pair(*GEMMA2)
    ids = _ids(2, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.warns(FallbackWarning, match="softcap.*eager attention of Gemma2Attention"):
        out = fast(ids, attention_mask=mask, labels=ids)
    ref = eager(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    ids = ids[:1]                              # no padding: the full-attention layer gets no mask
    _assert_same_step(fast, eager, fast(ids, labels=ids), eager(ids, labels=ids))


@pytest.mark.parametrize("model", [LLAMA, QWEN2, GPT2], ids=["llama", "qwen2", "gpt2"])
def test_static_cache_generation_matches_eager(model, kernel_calls):
    """Regression (issue 11): filling an empty static cache, transformers passes no mask and
    relies on SDPA's top-left ``is_causal`` over the first Tq of max_cache_len keys; fastattn
    aligned bottom-right, so the prefill attended to empty slots (logits off by up to 0.6)."""
    eager, fast = _pair(*model)
    ids = _ids(1, 6, seed=2)
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    # decoding a static cache comes with a mask over its empty slots
    with pytest.warns(FallbackWarning, match="explicit attention mask"):
        out = fast.eval().generate(ids, **kw)
    ref = eager.eval().generate(ids, **kw)
    assert kernel_calls == [6, 6]                             # the prefill, one per layer
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("length, served", [(12, True), (16, False), (20, False)])
def test_mistral_sliding_window_served_while_it_cuts_nothing(length, served, kernel_calls):
    """Regression (issue 11): any sliding_window fell back, even Mistral's 4096 over a few
    tokens. transformers builds a mask once the sequence reaches the window of 16."""
    eager, fast = _pair(transformers.MistralForCausalLM, transformers.MistralConfig,
                        dict(DECODER, sliding_window=16))
    ids = _ids(2, length, seed=8)
    if served:
        with _no_fallback():
            out = fast(ids, labels=ids)
        assert kernel_calls == [length, length]
    else:
        with pytest.warns(FallbackWarning, match="explicit attention mask"):
            out = fast(ids, labels=ids)
        assert kernel_calls == []
    _assert_same_step(fast, eager, out, eager(ids, labels=ids))


@pytest.mark.parametrize("tq, tk, served", [(8, 8, True), (9, 9, False), (1, 8, True),
                                            (1, 9, False), (8, 16, True), (9, 16, False)])
def test_sliding_window_without_a_mask_is_served_exactly_when_it_cuts_no_key(tq, tk, served):
    """With window 8, transformers' mask keeps key kv for query q iff q - 8 < kv <= q. One
    query is the newest token (q_offset tk - 1); more are the first positions (an empty
    static cache being filled, keys from tq on empty)."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, t, 16, generator=torch.Generator().manual_seed(t))
               for t in (tq, tk, tk))
    if not served:
        with pytest.raises(ValueError, match="sliding_window=8 cuts keys"):
            fastattn_hf.fastattn_attention_forward(module, q, k, v, None, sliding_window=8)
        return
    with _no_fallback():
        out, _ = fastattn_hf.fastattn_attention_forward(module, q, k, v, None, sliding_window=8)
    q_offset = tk - 1 if tq == 1 else 0
    filled = torch.arange(tk)[None] <= q_offset + tq - 1
    mask = sdpa_mask(1, tq, tk, q_offset=q_offset, attention_mask=filled,
                     mask_function=sliding_window_causal_mask_function(8),
                     allow_is_causal_skip=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL)


def test_each_model_reports_its_own_fallbacks():
    """Regression (issue 11): FallbackWarning fired once per process and reason, so a second
    model's fallback went unreported. Now: once per model (config) and reason, even under
    Python's default filter, which shows a message once per code location."""
    ids = _ids(2, 8, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for model in range(2):
            _, fast = _pair(*GPT2)
            fast(ids, attention_mask=mask)                    # two layers ...
            fast(ids, attention_mask=mask)                    # ... and a second call
            fallbacks = [w for w in caught if w.category is FallbackWarning]
            assert len(fallbacks) == model + 1, [str(w.message) for w in fallbacks]
