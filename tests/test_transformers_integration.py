"""transformers integration: ``attn_implementation="fastattn"`` on tiny models built from
configs (nothing is downloaded), against the same weights under ``"eager"``.

Every model is fp32, so fastattn and eager differ only by summation order: atol/rtol
1e-4 throughout. Pad query rows are compared nowhere: fastattn returns 0 there, as
transformers' flash path does, and eager a value no real token reads."""
import warnings
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn._warnings import FallbackWarning  # noqa: E402
from routing import fastattn_ops  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    and_masks, bidirectional_mask_function, causal_mask_function,
    packed_sequence_mask_function, sdpa_mask, sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function)

TOL = dict(atol=1e-4, rtol=1e-4)
WINDOW = 8               # the sliding window of the windowed models: shorter than the inputs
DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0,
               # weights 10x the default: scores of order 1, so that a wrong mask, window
               # or softcap moves the logits far past the tolerance
               initializer_range=0.2)
GPT2 = (transformers.GPT2LMHeadModel, transformers.GPT2Config,
        dict(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
LLAMA = (transformers.LlamaForCausalLM, transformers.LlamaConfig, DECODER)
MISTRAL = (transformers.MistralForCausalLM, transformers.MistralConfig,
           dict(DECODER, sliding_window=WINDOW))
QWEN2 = (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,      # layer 1 slides
         dict(DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1))
GEMMA2 = (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
          # a softcap of 1 bends the scores of order 1: dropping it moves logits by ~1
          dict(DECODER, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0))
GPT_OSS = (transformers.GptOssForCausalLM, transformers.GptOssConfig,
           dict(DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                sliding_window=WINDOW))
T5 = (transformers.T5ForConditionalGeneration, transformers.T5Config,
      dict(vocab_size=97, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
           dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
DECODERS = pytest.mark.parametrize("model", [LLAMA, MISTRAL, QWEN2, GEMMA2, GPT2],
                                   ids=["llama", "mistral", "qwen2", "gemma2", "gpt2"])
LAYERS = 2


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


def _padded(batch, length, seed):
    """Token ids and their mask: row 1 padded on the left, row 2 (if any) on the right."""
    ids = _ids(batch, length, seed)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if batch > 2:
        mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _labels(ids, mask):
    """Labels whose loss reads only real rows: no pad token is a target, and neither is a
    token whose predictor (the position before it) is a pad."""
    predicted_by_pad = torch.nn.functional.pad(mask[:, :-1] == 0, (1, 0))
    return ids.masked_fill((mask == 0) | predicted_by_pad, -100)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls fastattn's kernels served: ("dense", Tq) or ("varlen", rows of q), with
    the keyword options each got."""
    calls = []
    for kind, name in (("dense", "flash_attention"), ("varlen", "flash_attention_varlen")):
        original = getattr(fastattn_hf, name)

        def record(q, *args, _kind=kind, _original=original, **options):
            calls.append((_kind, q.shape[2] if _kind == "dense" else q.shape[0], options))
            return _original(q, *args, **options)
        monkeypatch.setattr(fastattn_hf, name, record)
    return calls


@contextmanager
def _served():
    """Fail on any fallback; count the fastattn custom ops that ran (the proof that the
    kernels, not torch, computed the attention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        with fastattn_ops() as ran:
            yield ran


def _assert_same_step(fast, eager, out, ref, rows=None):
    """Logits (on ``rows``, a bool (B, T) mask, if given), then the gradients of the loss
    for every parameter."""
    pick = (lambda x: x) if rows is None else (lambda x: x[rows.bool()])
    torch.testing.assert_close(pick(out.logits), pick(ref.logits), **TOL)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), rp in zip(fast.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (rp.grad is None), name
        if rp.grad is not None:
            torch.testing.assert_close(p.grad, rp.grad, **TOL, msg=name)


# ------------------------------------------------------------------ served on fastattn

def test_logits_and_gradients_match_eager(kernel_calls):
    eager, fast = _pair(*GPT2)
    ids = _ids(2, 23, seed=1)
    with _served() as ran:
        out = fast(ids, labels=ids)
        out.loss.backward()
    assert [c[:2] for c in kernel_calls] == [("dense", 23)] * LAYERS
    assert ran["flash_attention_fwd"] == ran["flash_attention_bwd"] == LAYERS
    fast.zero_grad()
    _assert_same_step(fast, eager, fast(ids, labels=ids), eager(ids, labels=ids))


@DECODERS
def test_padded_batch_matches_eager(model, kernel_calls):
    """Left and right padding over 13 tokens (past the window of 8): unpadded into the
    varlen kernel, forward and backward, no fallback."""
    eager, fast = _pair(*model)
    ids, mask = _padded(3, 13, seed=2)
    labels = _labels(ids, mask)
    with _served() as ran:
        out = fast(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    assert ran["flash_attention_fwd"] == ran["flash_attention_bwd"] == LAYERS
    assert [c[:2] for c in kernel_calls] == [("varlen", int(mask.sum()))] * LAYERS
    fast.zero_grad()
    _assert_same_step(fast, eager, fast(ids, attention_mask=mask, labels=labels),
                      eager(ids, attention_mask=mask, labels=labels), rows=mask)


@DECODERS
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_batched_generation_with_left_padding_matches_eager(model, cache, kernel_calls):
    """Greedy generation from a left-padded batch: the prefill and every decoding step
    go through the varlen kernel; 10 prompt + 6 new tokens run past the window of 8."""
    eager, fast = _pair(*model)
    ids, mask = _padded(2, 10, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation=cache, output_logits=True, return_dict_in_generate=True)
    with _served() as ran:
        out = fast.eval().generate(ids, **kw)
    ref = eager.eval().generate(ids, **kw)
    assert ran["flash_attention_fwd"] == LAYERS * 6                # prefill + 5 steps
    # the prefill unpads; a step whose keys hold no padding (the window has moved past
    # it) runs dense
    assert [c[0] for c in kernel_calls[:LAYERS]] == ["varlen"] * LAYERS
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("model", [LLAMA, GEMMA2, GPT2], ids=["llama", "gemma2", "gpt2"])
def test_static_cache_generation_without_padding_is_served(model, kernel_calls):
    """Regression (issue 11): filling an empty static cache, transformers passes no mask
    to SDPA, and decoding it passes a 4-D one (a fallback). fastattn's mask function
    marks the slots written so far, so every call runs on the kernels."""
    eager, fast = _pair(*model)
    ids = _ids(1, 6, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    with _served() as ran:
        out = fast.eval().generate(ids, **kw)
    ref = eager.eval().generate(ids, **kw)
    assert ran["flash_attention_fwd"] == LAYERS * 8
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("model", [LLAMA, MISTRAL], ids=["llama", "mistral"])
def test_chunked_prefill_with_left_padding_matches_eager(model, kernel_calls):
    """A second chunk of 4 queries over 13 cached keys (Tq < Tk), rows left-padded: the
    queries are the last real keys of each row, bottom-right aligned."""
    eager, fast = _pair(*model)
    ids, mask = _padded(2, 13, seed=5)
    logits = []
    for m in (fast.eval(), eager.eval()):
        cache = transformers.DynamicCache(config=m.config)
        m(ids[:, :9], attention_mask=mask[:, :9], cache=cache, use_cache=True)
        with _served() if m is fast else warnings.catch_warnings():
            logits.append(m(ids[:, 9:], attention_mask=mask, cache=cache,
                            use_cache=True).logits)
    assert [c[:2] for c in kernel_calls[-LAYERS:]] == [("varlen", 8)] * LAYERS
    torch.testing.assert_close(logits[0], logits[1], **TOL)


@pytest.mark.parametrize("model", [LLAMA, MISTRAL], ids=["llama", "mistral"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_match_eager(model, use_cache, kernel_calls):
    """Sequences of 5, 7 and 6 tokens packed into one row, told apart by restarting
    ``position_ids``. Without a cache transformers keeps them apart (and fastattn runs
    them as 3 varlen sequences); with one it reads the row as one sequence, and so does
    fastattn."""
    eager, fast = _pair(*model)
    ids = _ids(1, 18, seed=6)
    positions = torch.cat([torch.arange(n) for n in (5, 7, 6)])[None]
    kw = dict(position_ids=positions, labels=ids, use_cache=use_cache)
    with _served() as ran:
        out = fast(ids, **kw)
    assert ran["flash_attention_fwd"] == LAYERS
    if not use_cache:
        assert [(c[0], c[2]["causal"]) for c in kernel_calls] == [("varlen", True)] * LAYERS
    _assert_same_step(fast, eager, out, eager(ids, **kw))


def test_dropout_in_training_runs_on_the_kernel(kernel_calls):
    """Attention dropout while training is the kernel's own (a different random mask
    from eager's): served, at the model's rate, fresh at each call; none in eval."""
    _, fast = _pair(LLAMA[0], LLAMA[1], dict(DECODER, attention_dropout=0.5))
    ids = _ids(2, 12, seed=7)
    with _served():
        first, second = fast.train()(ids).logits, fast(ids).logits
        plain = fast.eval()(ids).logits
    assert [c[2]["dropout_p"] for c in kernel_calls] == [0.5] * (2 * LAYERS) + [0.0] * LAYERS
    assert not torch.allclose(first, second) and not torch.allclose(first, plain)
    assert torch.isfinite(first).all()


# ------------------------------------------------------------------ mask semantics

def _reference(q, k, v, mask4d):
    """SDPA with transformers' 4-D mask: what eager computes, up to rounding."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask4d, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("tq, tk, width, causal, window, pad", [
    (9, 9, 9, True, None, "both"),          # prefill, left and right padding
    (9, 9, 9, True, 3, "both"),             # ... with a sliding window
    (1, 9, 9, True, 3, "left"),             # decoding
    (3, 9, 9, True, 3, "left"),             # a chunk of queries over a cache
    (4, 12, 4, True, None, "left"),         # prefill into a static cache (slots 4.. empty)
    (1, 12, 7, True, 3, "left"),            # decoding a static cache
    (9, 9, 9, False, None, "both"),         # encoder self-attention
    (9, 9, 9, False, 2, "none"),            # bidirectional sliding window
    (5, 9, 9, False, None, "both"),         # cross attention over a padded encoder
])
def test_2d_mask_matches_transformers_4d_mask(tq, tk, width, causal, window, pad):
    """fastattn's reading of a 2-D mask against transformers' own 4-D mask for it
    (sdpa_mask, query i at position width - tq + i)."""
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(3, 4, tq, 16, generator=g)
    k, v = (torch.randn(3, 2, tk, 16, generator=g) for _ in range(2))
    mask = torch.ones(3, width, dtype=torch.bool)
    if pad in ("left", "both"):
        mask[1, :3] = False
    if pad == "both":
        mask[2, -2:] = False
    module = torch.nn.Module()
    with _served():
        out, _ = fastattn_hf.fastattn_attention_forward(
            module, q, k, v, None if pad == "none" else mask, is_causal=causal,
            sliding_window=window)
    function = {(True, None): causal_mask_function,
                (False, None): bidirectional_mask_function}.get((causal, window))
    if function is None:
        function = (sliding_window_causal_mask_function(window) if causal
                    else sliding_window_bidirectional_mask_function(window))
    mask4d = sdpa_mask(3, tq, tk, q_offset=width - tq if causal else 0, mask_function=function,
                       attention_mask=mask, allow_is_causal_skip=False)
    real = mask4d.any(-1)[:, 0]                       # query rows that see some key
    if causal:                                        # pad queries: 0, as in flash-attn
        assert (out[~mask[:, width - tq:]] == 0).all()
        real &= mask[:, width - tq:]
    torch.testing.assert_close(out[real], _reference(q, k, v, mask4d)[real], **TOL)


@pytest.mark.parametrize("shape, causal", [((2, 9), True), ((3, 4), True), ((3, 13), False)])
def test_2d_mask_that_does_not_fit_raises(shape, causal):
    q, k = torch.randn(3, 4, 5, 16), torch.randn(3, 2, 12, 16)
    with pytest.raises(ValueError, match=rf"attention_mask of shape \({shape[0]}, "
                                         rf"{shape[1]}\) does not fit 5 queries over 12 keys"):
        fastattn_hf.fastattn_attention_forward(torch.nn.Module(), q, k, k,
                                               torch.ones(shape, dtype=torch.bool),
                                               is_causal=causal)


def test_packed_sequence_ids_match_transformers_4d_mask():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 10, 16, generator=g)
    k, v = (torch.randn(2, 2, 10, 16, generator=g) for _ in range(2))
    ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]],
                       dtype=torch.int32)
    with _served():
        out, _ = fastattn_hf.fastattn_attention_forward(torch.nn.Module(), q, k, v, ids,
                                                        is_causal=True, sliding_window=3)
    function = and_masks(sliding_window_causal_mask_function(3),
                         packed_sequence_mask_function(ids))
    mask4d = sdpa_mask(2, 10, 10, mask_function=function, allow_is_causal_skip=False)
    torch.testing.assert_close(out, _reference(q, k, v, mask4d), **TOL)


def test_unrecognised_mask_pattern_gets_the_4d_mask():
    """A pattern fastattn does not serve (here an overlay, as multimodal models add)
    gets transformers' own 4-D mask, which the attention function hands to SDPA."""
    overlay = and_masks(causal_mask_function, lambda b, h, q, kv: kv != 2)
    mask = fastattn_hf.fastattn_mask(2, 5, 5, mask_function=overlay,
                                     attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(mask, sdpa_mask(2, 5, 5, mask_function=overlay,
                                       allow_is_causal_skip=False))


# ------------------------------------------------------------------ fallbacks

def test_t5_position_bias_falls_back_to_sdpa():
    """Regression (issue 11): T5's relative attention bias (the ``position_bias`` keyword)
    was swallowed: logits off by 0.2, no warning, no gradient for the bias table."""
    eager, fast = _pair(*T5)
    ids, labels = _ids(2, 12, seed=9), _ids(2, 9, seed=10)
    with pytest.warns(FallbackWarning, match="position bias.*sdpa_attention_forward"):
        out = fast(input_ids=ids, labels=labels)
    _assert_same_step(fast, eager, out, eager(input_ids=ids, labels=labels))
    for stack in (fast.encoder, fast.decoder):
        assert stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad is not None


def test_gpt_oss_attention_sinks_fall_back_to_eager():
    """Regression (issue 11): gpt-oss's attention sinks (the ``s_aux`` keyword) were
    dropped: logits off by 0.23, no warning. A padded batch checks that fastattn's 2-D
    mask reaches eager attention in its additive 4-D form (window and padding)."""
    eager, fast = _pair(*GPT_OSS)
    ids, mask = _padded(3, 12, seed=11)
    labels = _labels(ids, mask)
    with pytest.warns(FallbackWarning, match="s_aux.*eager attention of GptOssAttention"):
        out = fast(ids, attention_mask=mask, labels=labels)
    _assert_same_step(fast, eager, out, eager(ids, attention_mask=mask, labels=labels),
                      rows=mask)


def test_unknown_keyword_falls_back_to_eager():
    """``output_attentions=True`` (a model that forwards it; transformers 5 models
    capture the weights with hooks instead) needs eager's weights: the call goes to the
    model's eager attention, with fastattn's 2-D mask in eager's additive 4-D form."""
    _, fast = _pair(*LLAMA)
    attention = fast.model.layers[0].self_attn
    g = torch.Generator().manual_seed(12)
    q = torch.randn(3, 4, 9, 16, generator=g)
    k, v = (torch.randn(3, 2, 9, 16, generator=g) for _ in range(2))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :3] = False
    with pytest.warns(FallbackWarning, match="output_attentions.*eager attention of Llama"):
        out, weights = fastattn_hf.fastattn_attention_forward(attention, q, k, v, mask,
                                                              output_attentions=True)
    additive = torch.zeros(3, 1, 9, 9).masked_fill(
        ~sdpa_mask(3, 9, 9, attention_mask=mask, allow_is_causal_skip=False), -1e30)
    probs = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4 + additive).softmax(-1)
    torch.testing.assert_close(weights, probs, **TOL)
    torch.testing.assert_close(out, (probs @ v.repeat_interleave(2, 1)).transpose(1, 2), **TOL)


def test_custom_4d_mask_falls_back_to_sdpa():
    eager, fast = _pair(*LLAMA)
    ids = _ids(2, 7, seed=13)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    mask[4, 1:3] = False                                    # not a pattern fastattn serves
    mask4d = torch.zeros(2, 1, 7, 7).masked_fill(~mask, torch.finfo(torch.float32).min)
    with pytest.warns(FallbackWarning, match="4-D attention mask.*sdpa_attention_forward"):
        out = fast(ids, attention_mask=mask4d).logits
    torch.testing.assert_close(out, eager(ids, attention_mask=mask4d).logits, **TOL)


@pytest.mark.parametrize("model, to", [(MISTRAL, "sdpa_attention_forward"),
                                       (GEMMA2, "eager attention")], ids=["mistral", "gemma2"])
def test_sliding_window_over_mask_with_holes_falls_back(model, to):
    """A mask with a hole inside a row: eager's window counts positions, the kernel's
    would count real tokens. Gemma 2's softcap sends it to eager (SDPA refuses one)."""
    eager, fast = _pair(*model)
    ids = _ids(2, 12, seed=14)
    mask = torch.ones_like(ids)
    mask[0, 5:7] = 0
    with pytest.warns(FallbackWarning, match=f"holes.*{to}"):
        out = fast(ids, attention_mask=mask).logits
    ref = eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_each_model_reports_its_own_fallbacks():
    """Regression (issue 11): FallbackWarning fired once per process and reason, so a second
    model's fallback went unreported. Now: once per model (config) and reason, even under
    Python's default filter, which shows a message once per code location."""
    ids = _ids(2, 8, seed=15)
    mask4d = torch.zeros(2, 1, 8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), -1e30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for model in range(2):
            _, fast = _pair(*GPT2)
            fast(ids, attention_mask=mask4d)                  # two layers ...
            fast(ids, attention_mask=mask4d)                  # ... and a second call
            fallbacks = [w for w in caught if w.category is FallbackWarning]
            assert len(fallbacks) == model + 1, [str(w.message) for w in fallbacks]


def _compiled(model):
    """``torch.compile(fullgraph=True)`` with a backend that keeps each graph's code (the
    eager backend's run: what dynamo traced, without a C++ compiler)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward
    return torch.compile(model, fullgraph=True, backend=keep), graphs


@pytest.mark.parametrize("model", [GEMMA2, MISTRAL], ids=["gemma2", "mistral"])
def test_sliding_window_model_compiles_in_one_graph_on_the_kernel(model):
    """Regression (issue 16): under ``torch.compile(fullgraph=True)`` Gemma 2 raised an
    ObservedAttributeError: reading its sliding-window mask function's closure, which
    dynamo does not allow. Each layer's attention is fastattn's op inside the graph."""
    eager, fast = _pair(*model)
    ids = _ids(2, 12, seed=16)
    compiled, graphs = _compiled(fast.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager.eval()(ids).logits, **TOL)
    assert len(graphs) == 1 and graphs[0].count("fastattn.flash_attention") == LAYERS


def test_compiled_training_without_mask_falls_back_to_sdpa_and_says_so():
    """Without a mask or a cache transformers builds a packed-sequence pattern around a
    tensor, which fastattn cannot read under torch.compile: the call goes to SDPA with
    transformers' own 4-D mask, warned while tracing; loss and gradients stay eager's."""
    import fastattn._warnings as w
    w._SEEN.clear()
    eager, fast = _pair(*MISTRAL)
    ids = _ids(2, 12, seed=17)
    compiled, graphs = _compiled(fast.train())
    with pytest.warns(FallbackWarning, match="under torch.compile.*sdpa_attention_forward"):
        out = compiled(ids, labels=ids, use_cache=False)
    ref = eager.train()(ids, labels=ids, use_cache=False)
    _assert_same_step(fast, eager, out, ref)
    assert len(graphs) == 1 and "fastattn.flash_attention" not in graphs[0]


def test_static_sliding_cache_past_the_window_matches_eager():
    """Regression (issue 16): with a static cache and a prompt longer than Mistral's
    window, generate builds the mask once and the model builds it again from the 2-D one
    it got; fastattn read its own (B, window) mask as padding from position kv_offset on,
    and the tokens went wrong from the first one generated."""
    eager, fast = _pair(*MISTRAL)
    ids, mask = _padded(3, 12, seed=18)
    mask[2] = 1                                     # left padding only
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with _served():
        out = fast.eval().generate(ids, **kw)
    assert torch.equal(out, eager.eval().generate(ids, **kw))


def test_t5_static_cache_fallback_masks_the_unwritten_slots():
    """Regression (issue 16): T5's decoder under a static cache goes to SDPA (position
    bias); the 4-D mask built for it skipped the causal mask at one query, and SDPA read
    the cache slots not written yet (logits off by 2.5)."""
    eager, fast = _pair(*T5)
    ids = _ids(2, 9, seed=19)
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True,
              return_dict_in_generate=True, cache_implementation="static")
    with pytest.warns(FallbackWarning, match="position bias"):
        out = fast.eval().generate(ids, **kw)
    ref = eager.eval().generate(ids, **kw)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)
