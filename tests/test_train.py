"""Training, data, checkpoints and sampling (fastattn.models: train, data, checkpoint,
sample), on CPU."""
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastattn.models import data as D
from fastattn.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastattn.models.metrics import read_log, sink_summary
from fastattn.models.optim import configure_optimizer, lr_at
from fastattn.models.sample import sample
from fastattn.models.train import main, train, train_main
from fastattn.models.train_config import parse_train_args, resolve_args

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: 2 layers, width 64, 32-token rows.
SMALL = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--device", "cpu",
         "--no-progress", "--no-plot", "--peak-tflops", "1", "--eval-iters", "2"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the session: the standard library is encoded once."""
    return tmp_path_factory.mktemp("cache")


def run(out_dir, cache_dir, *argv):
    return train(parse_train_args([*SMALL, "--out-dir", str(out_dir), "--cache-dir",
                                   str(cache_dir), *argv]))


def train_losses(log_path):
    return {e["step"]: e["loss"] for e in read_log(log_path) if e["event"] == "train"}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, cache_dir):
    """8 steps with dropout and gradient accumulation, a checkpoint kept every 4."""
    out = tmp_path_factory.mktemp("run_a")
    result = run(out, cache_dir, "--max-steps", "8", "--ckpt-interval", "4", "--eval-interval",
                 "4", "--keep-checkpoints", "--log-interval", "1", "--dropout", "0.1",
                 "--grad-accum", "2")
    return out, result


# ------------------------------------------------------------------ training


def test_loss_falls_on_default_data(tmp_path, cache_dir):
    """The tiny model learns the standard library's sources (the default data)."""
    result = run(tmp_path, cache_dir, "--block-size", "64", "--batch-size", "16",
                 "--max-steps", "60", "--eval-interval", "60", "--eval-iters", "4",
                 "--log-interval", "10", "--plot")
    losses = train_losses(result["log"])
    assert losses[10] > 4.0                       # near ln(256) = 5.5 at the start
    assert result["val_loss"] < 3.4
    assert result["val_loss"] < losses[10] - 1.0
    evals = [e for e in read_log(result["log"]) if e["event"] == "eval"]
    sink = evals[-1]["sink"]
    assert len(sink["layer_mean"]) == 2 and len(sink["shares"][0]) == 4
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["config"]["n_layer"] == 2


def test_resume_reproduces_uninterrupted_run(interrupted, tmp_path, cache_dir):
    out_a, result_a = interrupted
    result_b = run(tmp_path, cache_dir, "--resume", str(out_a / "ckpt-0000004.pt"))
    assert result_b["step"] == 8
    a, b = train_losses(result_a["log"]), train_losses(result_b["log"])
    assert sorted(b) == [5, 6, 7, 8]
    assert [a[s] for s in b] == [b[s] for s in b]          # bitwise: same batches, masks
    for (name, p), q in zip(result_a["model"].state_dict().items(),
                            result_b["model"].state_dict().values()):
        assert torch.equal(p, q), name
    assert result_a["val_loss"] == result_b["val_loss"]


def test_resume_from_run_folder_extends_training(interrupted, tmp_path, cache_dir):
    out_a, _ = interrupted
    for f in ("ckpt.pt", "log.jsonl"):
        (tmp_path / f).write_bytes((out_a / f).read_bytes())
    (tmp_path / "log.jsonl").open("a").write('{"event": "train", "step": 9, "loss": 0}\n')
    result = run(tmp_path, cache_dir, "--resume", "--max-steps", "10")
    assert result["step"] == 10
    steps = [e["step"] for e in read_log(result["log"]) if e["event"] == "train"]
    assert steps == list(range(1, 11))            # the stale step-9 line was dropped


def test_resume_rejects_a_different_model_shape(interrupted, tmp_path, cache_dir):
    out_a, _ = interrupted
    with pytest.raises(ValueError, match="--n-layer 3 differs from the checkpoint's 2"):
        run(tmp_path, cache_dir, "--resume", str(out_a), "--n-layer", "3")


def test_checkpoint_contents(interrupted):
    out_a, _ = interrupted
    ckpt = load_checkpoint(out_a)
    assert ckpt["step"] == 8 and ckpt["world_size"] == 1
    assert ckpt["tokenizer"] == {"kind": "byte"} and ckpt["config"]["dropout"] == 0.1
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["sampler"][0]["bit_generator"] == "PCG64"
    assert ckpt["optimizer"]["state"] and ckpt["scaler"] is None
    assert not [p for p in out_a.iterdir() if p.name.endswith(".tmp")]


def test_sample_from_checkpoint(interrupted):
    out_a, _ = interrupted
    args = lambda **kw: parse_sample_args(["--checkpoint", str(out_a), "--prompt", "def ",
                                           "--max-new-tokens", "12", "--device", "cpu",
                                           *sum(([f"--{k.replace('_', '-')}", str(v)]
                                                 for k, v in kw.items()), [])])
    a = sample(args(seed=3, num_samples=2, top_k=10, top_p=0.9, repetition_penalty=1.2))
    assert len(a) == 2 and all(t.startswith("def ") for t in a)
    assert a == sample(args(seed=3, num_samples=2, top_k=10, top_p=0.9,
                            repetition_penalty=1.2))
    greedy = sample(args(temperature=0))
    assert greedy == sample(args(temperature=0, attention="naive"))   # same weights


def parse_sample_args(argv):
    import argparse

    from fastattn.models.sample import add_sample_arguments
    p = argparse.ArgumentParser()
    add_sample_arguments(p)
    return p.parse_args(argv)


def test_bpe_tokenizer_is_trained_and_saved(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py"):
        src = Path(os.__file__).parent / name
        (corpus / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "run"
    result = run(out, cache_dir, "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size",
                 "400", "--max-steps", "3", "--val-fraction", "0.2")
    assert result["model"].config.vocab_size == 448          # 400 rounded up to 64s
    tok = D.BPETokenizer.from_file(out / "tokenizer.json")
    assert tok.vocab_size == 400 and tok.eot is not None
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("    return self")
    assert len(ids) < len("    return self")                  # merges were learned
    texts = sample(parse_sample_args(["--checkpoint", str(out), "--prompt", "import",
                                      "--max-new-tokens", "5", "--seed", "0"]))
    assert texts[0].startswith("import")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_cpu_processes_train_identical_weights(mode, tmp_path, cache_dir):
    """torchrun with 2 gloo ranks: after training both ranks hold the same weights and
    each drew its own batches."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""
        import sys
        import torch
        import torch.distributed as dist
        from fastattn.models.train import train
        from fastattn.models.train_config import parse_train_args

        dist.init_process_group("gloo")        # kept open after train() to gather weights
        result = train(parse_train_args(sys.argv[2:]))
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in result["model"].state_dict().items()}
        torch.save({"state": state, "sampler": result["sampler"], "loss": result["loss"]},
                   f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
        dist.destroy_process_group()
    """))
    argv = [*SMALL, "--out-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir),
            "--max-steps", "3", "--eval-interval", "3", "--grad-accum", "2"]
    argv += ["--fsdp"] if mode == "fsdp" else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for _ in range(3):                     # another process may take the free port first
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(port), str(worker),
             str(tmp_path), *argv], env=env, capture_output=True, text=True, timeout=240)
        if "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["state"].items():
        assert torch.equal(p, r1["state"][name]), name
    assert r0["sampler"] != r1["sampler"]                      # different batch streams
    assert r0["loss"] == r1["loss"]                            # the mean over ranks
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["world_size"] == 2 and len(ckpt["sampler"]) == 2
    assert ckpt["fsdp"] == (mode == "fsdp")


# --------------------------------------------------------------- bad input


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of: tiny, small, gpt2"):
        resolve_args(parse_train_args([]), {"preset": "huge"})
    with pytest.raises(SystemExit):
        parse_train_args(["--preset", "huge"])


def test_empty_data(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="the training data is empty"):
        run(tmp_path / "a", cache_dir, "--data", str(empty))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no text files found in folder"):
        run(tmp_path / "b", cache_dir, "--data", str(tmp_path / "folder"))
    with pytest.raises(FileNotFoundError, match="data path .* does not exist"):
        run(tmp_path / "c", cache_dir, "--data", str(tmp_path / "missing"))


def test_data_shorter_than_a_row(tmp_path, cache_dir):
    short = tmp_path / "short.txt"
    short.write_text("x" * 30)
    with pytest.raises(ValueError, match="the train split holds 28 tokens, fewer than "
                                         "block_size \\+ 1 = 33"):
        run(tmp_path / "a", cache_dir, "--data", str(short), "--val-fraction", "0.05")


def test_vocab_size_needs_bpe(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="--vocab-size applies to --tokenizer bpe"):
        run(tmp_path, cache_dir, "--vocab-size", "300")


def test_corrupt_checkpoint(interrupted, tmp_path, cache_dir, capsys):
    out_a, _ = interrupted
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    good = (out_a / "ckpt.pt").read_bytes()
    truncated.write_bytes(good[:len(good) // 2])
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError, match="is corrupt or truncated"):
            load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="is not a fastattn GPT checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        run(tmp_path / "r", cache_dir, "--resume", str(truncated))
    args = parse_train_args([*SMALL, "--out-dir", str(tmp_path / "r"), "--resume", str(garbage)])
    assert train_main(args) == 2
    assert "fastattn train: error: checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------- pieces


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": "x", "n": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint({"format": "x", "n": lambda: 2}, path)    # cannot be pickled
    assert torch.load(path, weights_only=True) == {"format": "x", "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)                # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_weight_decay_groups():
    from fastattn.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.wte.weight for p in decay["params"])


def test_sink_summary_flags_heads():
    s = sink_summary(torch.tensor([[0.1, 0.9], [0.2, 0.4]]), threshold=0.5)
    assert s["layer_max"] == [0.9, 0.4] and s["layer_mean"] == [0.5, 0.3]
    assert s["heads_above"] == [[0, 1, 0.9]]


def test_batch_sampler(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    a = D.BatchSampler(tokens, 4, 16, seed=[0, 0])
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    state = a.state_dict()
    nxt = a.next()
    a.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(nxt, a.next()))
    b = D.BatchSampler(tokens, 4, 16, seed=[0, 1])             # another rank
    assert not torch.equal(D.BatchSampler(tokens, 4, 16, seed=[0, 0]).next()[0], b.next()[0])


def test_default_data_is_the_standard_library():
    files = D.text_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert any(f.name == "textwrap.py" for f in files)


def test_byte_tokenizer_roundtrip():
    tok = D.ByteTokenizer()
    text = "naïve → fast\n"
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 256


def test_help():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
