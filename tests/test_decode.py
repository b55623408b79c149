"""Decoding with the GPT: left-padded batches of prompts of different lengths through
the KV cache, and the compiled (static-shape) decoding step. Tokens are compared
exactly: greedy decoding of a row in a padded batch must give what that prompt gives
alone, and the compiled step what the eager one gives."""
import pytest
import torch

from fastattn.models import GPT, GPTConfig


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=64, block_size=24, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def _padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Left-pad ``prompts`` to one (B, T0) tensor; also return their lengths."""
    t0 = max(map(len, prompts))
    idx = torch.tensor([[pad] * (t0 - len(p)) + p for p in prompts])
    return idx, [len(p) for p in prompts]


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("new_tokens", [6, 22], ids=["within_block", "window_slides"])
def test_left_padded_rows_equal_alone(new_tokens):
    """Each row of a left-padded batch gets exactly the tokens its prompt gets alone
    (greedy): pad keys are never attended, positions count from each row's first token,
    and past block_size (24) the window slides per row as it does alone."""
    model = _model()
    prompts = _prompts([7, 2, 5])
    idx, lengths = _padded(prompts, pad=63)
    out = model.generate(idx, new_tokens, temperature=0, prompt_lengths=lengths)
    for row, prompt in zip(out, prompts):
        alone = model.generate(torch.tensor([prompt]), new_tokens, temperature=0)[0]
        assert row[idx.shape[1] - len(prompt):].tolist() == alone.tolist()


def test_left_padding_ignores_pad_values_and_penalty():
    """Pad tokens change nothing, even under a repetition penalty (which counts only the
    row's real tokens): two different pad ids give the same continuation."""
    model = _model()
    prompts = _prompts([6, 3], seed=2)
    kw = dict(temperature=0, repetition_penalty=1.3)
    outs = []
    for pad in (5, 40):
        idx, lengths = _padded(prompts, pad=pad)
        outs.append(model.generate(idx, 8, prompt_lengths=lengths, **kw)[:, idx.shape[1]:])
    assert torch.equal(outs[0], outs[1])
    alone = model.generate(torch.tensor([prompts[1]]), 8, **kw)[0, len(prompts[1]):]
    assert torch.equal(outs[0][1], alone)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_lengths": [3]}, r"prompt_lengths must be 2 integers"),
    ({"prompt_lengths": [0, 4]}, r"prompt_lengths must be in \[1, 4\]"),
    ({"prompt_lengths": [5, 4]}, r"prompt_lengths must be in \[1, 4\]"),
    ({"prompt_lengths": [2, 4], "use_cache": False}, "served by the fast model's KV cache"),
    ({"compile": True, "use_cache": False}, "compile=True compiles the cached decoding step"),
])
def test_generate_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model().generate(torch.zeros(2, 4, dtype=torch.long), 2, **kwargs)


def test_left_padding_needs_fast_model():
    with pytest.raises(ValueError, match="use attention='fast'"):
        _model(attention="naive").generate(torch.zeros(2, 4, dtype=torch.long), 2,
                                           prompt_lengths=[2, 4])


def test_fast_and_naive_decode_the_same_tokens():
    """Same weights, greedy: the fast GPT's cached decoding (unmasked kernel for the
    one-query steps) and the naive one's agree token for token, past the window slide."""
    prompt = torch.tensor(_prompts([5, 5], seed=3))
    fast = _model().generate(prompt, 30, temperature=0)
    naive = _model(attention="naive").generate(prompt, 30, temperature=0)
    assert torch.equal(fast, naive)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """``generate(compile=True)`` (torch.compile of the one-token step, static shapes,
    the caches written at a column tensor) gives the eager tokens, for a plain batch
    past the window slide and for a left-padded one. Static shapes: with recompilation
    made an error, every step after the first reuses what it compiled; and the step is
    one graph (the cache attention traced in, no graph break)."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch")
    from torch._dynamo.utils import counters
    model = _model()
    cases = [(torch.tensor(_prompts([5, 5], seed=4)), 26, {}),
             (_padded(_prompts([6, 2], seed=5))[0], 6, {"prompt_lengths": [6, 2]})]
    for idx, n, kw in cases:
        want = model.generate(idx, n, temperature=0, **kw)
        torch._dynamo.reset()
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = model.generate(idx, n, temperature=0, compile=True, **kw)
        assert counters["frames"]["ok"] > 0, "nothing was compiled"
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
        assert torch.equal(got, want)


@pytest.mark.slow
def test_compiled_decode_step_recompiles_only_when_its_span_doubles():
    """The compiled step attends a power-of-two span of the cache (64, 128, ...): one
    graph per span, none per step, and the tokens stay the eager ones across the jump."""
    from torch._dynamo.utils import counters
    model = _model(block_size=160, n_layer=1)
    idx = torch.tensor(_prompts([60], seed=6))
    want = model.generate(idx, 12, temperature=0)           # lengths 60 .. 71: 64 -> 128
    torch._dynamo.reset()
    counters.clear()
    got = model.generate(idx, 12, temperature=0, compile=True)
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
