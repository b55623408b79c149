"""The GPT's Llama-style options, ``GPTConfig(pos="rope", mlp="swiglu", norm="rms")``:
fast and naive models share one state dict and compute the same function, the rotary
turn matches a float64 rotation, decoding through the KV cache (plain, left-padded)
gives the tokens of the uncached and the naive model, checkpoints round-trip (and old
ones without the new fields still load), bad values raise, and the model trains."""
import math

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.models import GPT, GPTConfig
from fastattn.models.checkpoint import CKPT_FORMAT, load_checkpoint, load_model, save_checkpoint
from fastattn.models.naive import NaiveBlock
from fastattn.models.train import train
from fastattn.models.train_config import parse_train_args
from fastattn.nn import Block, swiglu_hidden

CFG = dict(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_embd=64)
LLAMA = dict(pos="rope", mlp="swiglu", norm="rms", bias=False)
NEW_FIELDS = ("pos", "rope_base", "rope_dim", "mlp", "norm")
VARIANTS = {
    "rope": dict(pos="rope"),
    "rope-partial": dict(pos="rope", rope_dim=6, rope_base=500.0),
    "swiglu": dict(mlp="swiglu"),
    "swiglu-hidden-nobias": dict(mlp="swiglu", mlp_hidden=72, bias=False),
    "rms": dict(norm="rms"),
    "llama": LLAMA,
    "llama-gqa": {**LLAMA, "n_kv_head": 2},
}


def make_pair(seed=0, sharp=False, **overrides):
    """A fast GPT and a naive one holding the same weights. ``sharp``: q, k, v weights 10×
    GPT-2's init, so that attention is peaked and greedy tokens depend on positions (at
    init, generation falls into a loop that no position change alters)."""
    cfg = {**CFG, **overrides}
    torch.manual_seed(seed)
    fast = GPT(GPTConfig(**cfg, attention="fast"))
    if sharp:
        with torch.no_grad():
            for block in fast.blocks:
                block.attn.qkv_proj.weight.mul_(10.0)
    naive = GPT(GPTConfig(**cfg, attention="naive"))
    naive.load_state_dict(fast.state_dict())
    return fast, naive


def assert_same_function(fast, naive, idx, tol):
    torch.testing.assert_close(fast(idx)[0], naive(idx)[0], atol=tol, rtol=tol)
    logits_f, loss_f = fast(idx, idx.roll(-1, dims=1))     # fused loss: no logits formed
    _, loss_n = naive(idx, idx.roll(-1, dims=1))
    assert logits_f is None
    torch.testing.assert_close(loss_f, loss_n, atol=tol, rtol=tol)
    loss_f.backward()
    loss_n.backward()
    grads_n = dict(naive.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_n[name].grad, atol=tol, rtol=10 * tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------- parameters


def test_llama_state_dict_keys_and_sizes():
    fast, naive = make_pair(**LLAMA, n_kv_head=2)
    keys = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
    assert keys == {k: tuple(v.shape) for k, v in naive.state_dict().items()}
    assert fast.wpe is None and not any(k.startswith("wpe") for k in keys)
    hidden = swiglu_hidden(64)
    assert hidden == 192
    assert keys["blocks.0.mlp.gate_proj.weight"] == (hidden, 64)
    assert keys["blocks.0.mlp.up_proj.weight"] == (hidden, 64)
    assert keys["blocks.0.mlp.down_proj.weight"] == (64, hidden)
    assert keys["blocks.1.attn.qkv_proj.weight"] == ((4 + 2 * 2) * 16, 64)
    assert keys["ln_f.weight"] == (64,)
    assert not any(k.endswith("bias") for k in keys)       # bias=False; RMSNorm has none
    assert isinstance(fast.blocks[0].ln1, fastattn.nn.RMSNorm)
    assert isinstance(fast.blocks[0].mlp, fastattn.nn.SwiGLUMLP)
    total = sum(p.numel() for p in fast.parameters())
    assert fast.num_params() == total - 96 * 64            # only wte is an embedding


def test_default_config_keeps_gpt2_state_dict():
    """The new fields at their defaults build exactly the GPT-2 model of before."""
    keys = set(GPT(GPTConfig(**CFG)).state_dict())
    assert "wpe.weight" in keys and "blocks.0.ln1.bias" in keys
    assert "blocks.0.mlp.fc.weight" in keys and "blocks.0.mlp.proj.weight" in keys


def test_swiglu_hidden_rule_and_init():
    assert [swiglu_hidden(c) for c in (32, 64, 384, 768, 4096)] == [128, 192, 1024, 2048,
                                                                   10944]
    assert swiglu_hidden(4096, multiple_of=256) == 11008               # Llama 7B
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=256,
                          **LLAMA))
    std = lambda t: float(t.detach().std())
    assert math.isclose(std(model.blocks[0].mlp.down_proj.weight), 0.02 / 4, rel_tol=0.05)
    assert math.isclose(std(model.blocks[0].mlp.gate_proj.weight), 0.02, rel_tol=0.05)
    assert torch.equal(model.ln_f.weight, torch.ones(256))


# ------------------------------------------------------------- fast vs naive


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_fast_matches_naive_torch_backend(overrides):
    fast, naive = make_pair(**overrides)
    idx = torch.randint(0, 96, (3, 37))                    # 37: no tile multiple
    with fastattn.use_backend("torch"):
        assert_same_function(fast, naive, idx, tol=2e-5)


@pytest.mark.skipif(not backends.available("triton", torch.device("cpu"))[0],
                    reason="triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
def test_fast_matches_naive_triton_interpreter():
    """The rope, swiglu, rms_norm and attention kernels together, forward and backward."""
    fast, naive = make_pair(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32,
                            n_kv_head=1, **LLAMA)
    idx = torch.randint(0, 64, (2, 13))
    with fastattn.use_backend("triton"):
        assert_same_function(fast, naive, idx, tol=1e-4)


def test_llama_under_bf16_autocast_like_naive():
    fast, naive = make_pair(**LLAMA, n_kv_head=2)
    idx = torch.randint(0, 96, (2, 37))
    losses = []
    for model in (fast, naive):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(idx, idx.roll(-1, dims=1))[1].float())
    # bf16 matmuls: about 3 significant digits
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("attention", ["fast", "naive"])
@pytest.mark.parametrize("rope_dim", [None, 6])
def test_rotary_turn_matches_float64_rotation(attention, rope_dim):
    """q and k of a layer, turned, against pairs (x_i, x_{i+R/2}) multiplied as complex
    numbers by exp(j·pos·base^(-2i/R)) in float64; the dims past R are untouched."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, **LLAMA, n_kv_head=2, rope_dim=rope_dim, rope_base=100.0,
                          attention=attention))
    attn, x = model.blocks[0].attn, torch.randn(2, 11, 64)
    pos = torch.tensor([list(range(3, 14)), list(range(11))])          # (B, T)
    _, rotary = model._embed(torch.zeros(2, 11, dtype=torch.long), pos)
    with torch.no_grad():
        plain, turned = attn._qkv(x), attn._qkv(x, rotary)
    r = model.config.rotary_dim
    theta = 100.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = pos.double()[..., None] * theta                          # (B, T, R/2)
    phase = torch.polar(torch.ones_like(angles), angles)[:, None]     # (B, 1, T, R/2)
    for before, after in zip(plain[:2], turned[:2]):
        z = torch.complex(before[..., :r // 2].double(), before[..., r // 2:r].double()) * phase
        want = torch.cat((z.real, z.imag, before[..., r:].double()), dim=-1)
        torch.testing.assert_close(after.double(), want, atol=2e-6, rtol=1e-5)
    assert torch.equal(turned[2], plain[2])                           # v is not turned


def test_rope_attention_depends_on_relative_position_only():
    """The same tokens at positions shifted by 7 give the same logits (rotary scores
    depend on m − n only); with learned positions they do not."""
    for pos, same in (("rope", True), ("learned", False)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**CFG, "pos": pos}))
        idx = torch.randint(0, 96, (1, 20))
        with torch.no_grad():
            a = model.lm_head(model._hidden(idx, pos=torch.arange(20)))
            b = model.lm_head(model._hidden(idx, pos=torch.arange(7, 27)))
        assert torch.allclose(a, b, atol=1e-4) == same, pos


def test_sink_shares_and_checkpointing_with_rope():
    fast, naive = make_pair(**LLAMA, n_kv_head=2, dropout=0.1)
    idx = torch.randint(0, 96, (2, 30))
    torch.testing.assert_close(fast.sink_shares(idx), naive.sink_shares(idx), atol=1e-5,
                               rtol=1e-4)
    ckpt = GPT(GPTConfig(**{**fast.config.to_dict(), "checkpointing": True}))
    ckpt.load_state_dict(fast.state_dict())
    for model in (fast, ckpt):
        torch.manual_seed(1)                                          # same dropout masks
        model(idx, idx)[1].backward()
    for (name, p), q in zip(fast.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


# ---------------------------------------------------------------- generation


def test_generation_cache_no_cache_fast_naive_agree():
    """Greedy, past block_size 48 (the window slides and the cache re-fills): the fast
    model's cached tokens equal its uncached ones and the naive model's (cached)."""
    fast, naive = make_pair(sharp=True, **LLAMA, n_kv_head=2)
    prompt = torch.randint(0, 96, (2, 5))
    cached = fast.generate(prompt, 50, temperature=0)
    assert cached.shape == (2, 55)
    assert torch.equal(cached, fast.generate(prompt, 50, temperature=0, use_cache=False))
    assert torch.equal(cached, naive.generate(prompt, 50, temperature=0))


def test_generation_sampled_cache_equals_no_cache():
    fast, _ = make_pair(sharp=True, **LLAMA)
    prompt = torch.randint(0, 96, (3, 4))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    assert torch.equal(fast.generate(prompt, 16, **kw),
                       fast.generate(prompt, 16, use_cache=False, **kw))


@pytest.mark.parametrize("new_tokens", [6, 40], ids=["within_block", "window_slides"])
def test_left_padded_rows_equal_alone(new_tokens):
    """Each row of a left-padded batch gets the tokens its prompt gets alone: rotary
    positions count from each row's first real token, in prefill and every step."""
    fast, _ = make_pair(sharp=True, **LLAMA, n_kv_head=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (9, 2, 5)]
    idx = torch.tensor([[0] * (9 - len(p)) + p for p in prompts])
    out = fast.generate(idx, new_tokens, temperature=0, prompt_lengths=[9, 2, 5])
    for row, prompt in zip(out, prompts):
        alone = fast.generate(torch.tensor([prompt]), new_tokens, temperature=0)[0]
        assert row[9 - len(prompt):].tolist() == alone.tolist()


@pytest.mark.slow
def test_compiled_decode_step_with_rope():
    """``generate(compile=True)`` computes the rotary angles inside the compiled step:
    same tokens as eager, for a plain and a left-padded batch."""
    fast, _ = make_pair(sharp=True, **LLAMA)
    idx = torch.randint(1, 96, (2, 6))
    for kw in ({}, {"prompt_lengths": [6, 3]}):
        want = fast.generate(idx, 8, temperature=0, **kw)
        torch._dynamo.reset()
        assert torch.equal(fast.generate(idx, 8, temperature=0, compile=True, **kw), want)


# ---------------------------------------------------------------- checkpoints


def _checkpoint(model: GPT, config: dict) -> dict:
    return {"format": CKPT_FORMAT, "version": 1, "step": 0, "config": config,
            "model": model.state_dict(), "optimizer": {}, "rng": [], "sampler": [],
            "tokenizer": {"kind": "byte"}}


def test_checkpoint_round_trip_keeps_new_fields(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, **LLAMA, n_kv_head=2, rope_dim=8, rope_base=500.0))
    save_checkpoint(_checkpoint(model, model.config.to_dict()), tmp_path / "ckpt.pt")
    loaded, _, ckpt = load_model(tmp_path, attention="naive")
    assert {k: ckpt["config"][k] for k in NEW_FIELDS} == dict(
        pos="rope", rope_base=500.0, rope_dim=8, mlp="swiglu", norm="rms")
    assert loaded.config == GPTConfig(**{**model.config.to_dict(), "attention": "naive"})
    idx = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=2e-5, rtol=2e-5)


def test_old_checkpoint_without_new_fields_loads(tmp_path):
    """A checkpoint written before pos/mlp/norm existed loads as the GPT-2 it was."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    old = {k: v for k, v in model.config.to_dict().items() if k not in NEW_FIELDS}
    save_checkpoint(_checkpoint(model, old), tmp_path / "ckpt.pt")
    loaded, _, _ = load_model(tmp_path)
    assert (loaded.config.pos, loaded.config.mlp, loaded.config.norm) == ("learned", "gelu",
                                                                           "layer")
    idx = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, match", [
    ({"pos": "alibi"}, r"pos must be one of \('learned', 'rope'\), got 'alibi'"),
    ({"mlp": "relu"}, r"mlp must be one of \('gelu', 'swiglu'\), got 'relu'"),
    ({"norm": "batch"}, r"norm must be one of \('layer', 'rms'\), got 'batch'"),
    ({"pos": "rope", "rope_dim": 7}, r"rope_dim must be an even integer in \[2, head dim 16\], "
                                     "got 7"),
    ({"pos": "rope", "rope_dim": 18}, r"rope_dim must be .* got 18"),
    ({"rope_dim": 8}, r"rope_dim=8 needs pos='rope', got pos='learned'"),
    ({"pos": "rope", "rope_base": 0.0}, r"rope_base must be a number > 1, got 0.0"),
    ({"mlp": "swiglu", "approximate": "tanh"}, r"approximate='tanh' picks the GELU of "
                                               "mlp='gelu'"),
])
def test_config_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**CFG, **overrides})


@pytest.mark.parametrize("block", [Block, NaiveBlock])
def test_blocks_reject_unknown_options(block):
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms'\), got 'x'"):
        block(32, 2, norm="x")
    with pytest.raises(ValueError, match=r"mlp must be one of \('gelu', 'swiglu'\), got 'y'"):
        block(32, 2, mlp="y")


# ------------------------------------------------------------------ training


def test_llama_style_training_run(tmp_path):
    """``fastattn train --pos rope --mlp swiglu --norm rms`` for a few steps: the loss
    falls, the checkpoint holds the options and loads, and resuming with another
    position scheme is refused."""
    text = "def add(a, b):\n    return a + b\n\n" * 400
    (tmp_path / "data.txt").write_text(text)
    common = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--device", "cpu",
              "--no-progress", "--no-plot", "--peak-tflops", "1", "--eval-iters", "1",
              "--data", str(tmp_path / "data.txt"), "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "run"
    result = train(parse_train_args([
        *common, "--out-dir", str(out), "--pos", "rope", "--mlp", "swiglu", "--norm", "rms",
        "--no-bias", "--n-kv-head", "2", "--max-steps", "12", "--warmup-steps", "2",
        "--eval-interval", "12", "--log-interval", "1"]))
    losses = [e["loss"] for e in _log(result["log"]) if e["event"] == "train"]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0, losses
    config = load_checkpoint(out)["config"]
    assert (config["pos"], config["mlp"], config["norm"], config["bias"]) == (
        "rope", "swiglu", "rms", False)
    model, _, _ = load_model(out)
    assert model.wpe is None and isinstance(model.blocks[0].mlp, fastattn.nn.SwiGLUMLP)
    with pytest.raises(ValueError, match="--pos learned differs from the checkpoint's rope"):
        train(parse_train_args([*common, "--out-dir", str(out), "--resume", str(out),
                                "--pos", "learned", "--max-steps", "13"]))


def _log(path):
    from fastattn.models.metrics import read_log
    return read_log(path)
