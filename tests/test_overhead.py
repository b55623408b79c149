"""The host-overhead and decoding benchmarks (``fastattn bench --op overhead`` /
``--op decode``): their documents, tables and command line. No timing is asserted
(tests never assert speed); the quick runs only prove the whole path works."""
import json

import pytest
import torch

from fastattn.tools import cli
from fastattn.tools.bench import decode, overhead


def test_overhead_rows_cover_every_call_and_mode():
    doc = overhead.run_overhead("cpu", quick=True, calls=["layer_norm", "bias_gelu"])
    assert [(r["call"], r["mode"]) for r in doc["rows"]] == [
        ("layer_norm", "fwd"), ("layer_norm", "fwd+bwd"),
        ("bias_gelu", "fwd"), ("bias_gelu", "fwd+bwd")]
    for r in doc["rows"]:
        assert r["torch_us"] > 0 and r["fastattn_us"] > 0
        assert r["ratio"] == pytest.approx(r["fastattn_us"] / r["torch_us"])
        assert r["limit"] == {"fwd": 3.0, "fwd+bwd": 2.0}[r["mode"]]
    table = overhead.readme_block(doc)
    assert "| layer_norm | fwd+bwd |" in table and "thread_time" in table


def test_overhead_sides_compute_the_same():
    """Every call pair computes the same result (the benchmark checks it before timing)."""
    for name, (make, torch_fn, fast_fn) in overhead.CALLS.items():
        inputs = make(torch.device("cpu"), torch.Generator().manual_seed(3))
        torch.testing.assert_close(fast_fn(*inputs), torch_fn(*inputs), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_decode_table_marks_disagreement():
    row = {"preset": "tiny", "context": "short", "prompt_len": 32, "new_tokens": 8,
           "variant": "fast", "tokens_per_s": 10.0, "seconds": 0.8, "speedup_vs_naive": 1.2,
           "same_tokens": False}
    table = decode.format_table({"rows": [row]})
    assert "| tiny | short | 32 | fast | 10.0 | 1.20× | NO |" in table


@pytest.mark.slow
def test_cli_overhead_and_decode_quick(tmp_path, capsys):
    """``fastattn bench --op overhead|decode --quick --save DIR`` write their documents."""
    assert cli.main(["bench", "--op", "overhead", "--quick", "--save", str(tmp_path)]) in (0, 1)
    doc = json.loads((tmp_path / "overhead.json").read_text())
    assert doc["op"] == "overhead" and len(doc["rows"]) == 2 * len(overhead.CALLS)
    assert doc["provenance"]["command"].startswith("fastattn bench --op overhead")
    assert cli.main(["bench", "--op", "decode", "--quick", "--save", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert {r["variant"] for r in doc["rows"]} == set(decode.VARIANTS)
    assert all(r["same_tokens"] for r in doc["rows"])


def test_cli_rejects_flags_that_do_not_apply(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--op", "overhead", "--seq", "64"])
    assert "--seq do(es) not apply to --op overhead" in capsys.readouterr().err
