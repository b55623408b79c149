"""transformers integration: ``attn_implementation="fastattn"`` on a small GPT-2 built from
a config (nothing is downloaded), against transformers' own eager attention."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn._warnings import FallbackWarning  # noqa: E402


def _models(**overrides):
    fastattn_hf.register()
    kwargs = dict(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                  eos_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**kwargs),
                                                      attn_implementation="eager")
    fast = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**kwargs),
                                                     attn_implementation="fastattn")
    fast.load_state_dict(eager.state_dict())
    assert fast.config._attn_implementation == "fastattn"
    assert eager.config._attn_implementation == "eager"
    return eager, fast


def test_logits_and_gradients_match_eager():
    eager, fast = _models()
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    calls = []
    original = fastattn_hf.flash_attention
    fastattn_hf.flash_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            out = fast(ids, labels=ids)
    finally:
        fastattn_hf.flash_attention = original
    ref = eager(ids, labels=ids)
    assert len(calls) == 2                                    # one per layer: the kernel ran
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), rp in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, rp.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_greedy_generation_with_kv_cache_matches_eager():
    eager, fast = _models()
    eager.eval()
    fast.eval()
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kw), eager.generate(ids, **kw))


def test_padding_mask_falls_back_with_a_warning():
    eager, fast = _models()
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                           # left padding
    import fastattn._warnings as w
    w._SEEN.clear()
    with pytest.warns(FallbackWarning, match="explicit attention mask"):
        out = fast(ids, attention_mask=mask).logits
    ref = eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
