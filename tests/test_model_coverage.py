"""The coverage table of issue 16: on tiny models of each architecture, kernelized with
the one call (``kernelize``), the share of attention, norm and activation calls that run
on fastattn, in training, padded batches and generation (plain, left-padded, static
cache), with logits, gradients and tokens as eager's on the same weights.

A call is counted on the untouched eager model (a forward hook on every attention, norm
and activation module: the calls eager makes) and on the kernelized one as the
``fastattn::`` ops that ran (tests/routing.py); the share is their ratio. Every cell must
be 100% except those ``EXPECTED`` names with the reason. ``pytest -s`` prints the table.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastattn._warnings import FallbackWarning  # noqa: E402
from fastattn.integrations._hf_layers import _is_activation  # noqa: E402
from fastattn.integrations.kernelize import _attention_keywords  # noqa: E402
from routing import count_module_calls, fastattn_ops  # noqa: E402
from test_kernelize import (CAUSAL, MODELS, TOL, _assert_same_gradients,  # noqa: E402
                            _inputs, _pair, _padded)

KINDS = {"attention": ("flash_attention_fwd",), "norms": ("layer_norm_fwd",),
         "activations": ("gelu_fwd", "swiglu_fwd")}
SCENARIOS = ("train", "padded", "generate", "generate_left_padded", "generate_static")
# (architecture, kind) -> (share, reason): every other cell is 100%
EXPECTED = {("t5", "attention"): (0.0, "relative attention bias (position_bias) goes to "
                                       "SDPA: the kernels take no additive bias")}
ENCODER_ONLY = ("bert", "vit")
TABLE: dict = {}


def _kind(module):
    if _attention_keywords(type(module)) is not None:
        return "attention"
    if "Norm" in type(module).__name__:
        return "norms"
    return "activations" if _is_activation(module) else None


def _run(name, scenario):
    eager, fast, _ = _pair(name)
    calls = count_module_calls(eager, _kind, KINDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if name == "t5" else "error", FallbackWarning)
        with fastattn_ops() as ran:
            _scenario(name, scenario, eager, fast)
    return {kind: (sum(ran[op] for op in ops), calls[kind]) for kind, ops in KINDS.items()}


def _scenario(name, scenario, eager, fast):
    if scenario in ("train", "padded"):
        kw, rows = _inputs(name)
        if scenario == "train":
            kw.pop("attention_mask", None)
            if "input_ids" in kw:
                kw["labels"] = kw["input_ids"].clone()
        ref = eager.train()(**kw)
        ref.loss.backward()
        out = fast.train()(**kw)
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        _assert_same_gradients(fast, eager)
        return
    ids, mask = _padded(3, 10, seed=4)
    mask = torch.ones_like(ids) if scenario == "generate" else mask
    if name in CAUSAL and scenario != "generate":                 # padding on the left
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    if scenario == "generate_static":
        kw["cache_implementation"] = "static"
    ref = eager.eval().generate(ids, **kw)
    out = fast.eval().generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", list(MODELS))
def test_share_of_calls_on_fastattn(name, scenario):
    if scenario.startswith("generate") and name in ENCODER_ONLY:
        pytest.skip(f"{name} does not generate")
    if scenario == "padded" and name == "vit":
        pytest.skip("images have no padding")
    counts = _run(name, scenario)
    TABLE[name, scenario] = counts
    for kind, (fast, total) in counts.items():
        assert total > 0, (kind, counts)
        share, why = EXPECTED.get((name, kind), (1.0, None))
        assert fast == share * total, f"{kind}: {fast} of {total} calls on fastattn ({why})"


def teardown_module():
    """The table, for ``pytest -s``: per architecture and scenario, fastattn/eager calls."""
    if not TABLE:
        return
    print("\narchitecture      scenario              attention   norms     activations")
    for (name, scenario), counts in TABLE.items():
        cells = [f"{fast:>3}/{total:<3} {100 * fast // total:>3}%"
                 for fast, total in counts.values()]
        print(f"{name:<17} {scenario:<21} " + "  ".join(cells))
