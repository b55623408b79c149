"""HuggingFace transformers: fastattn as an attention implementation.

>>> import fastattn.integrations.transformers as fa_hf
>>> fa_hf.register()
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")

``register()`` adds ``"fastattn"`` to transformers' attention registry
(``AttentionInterface``) and ``fastattn_mask`` to its mask registry
(``AttentionMaskInterface``). As on transformers' flash-attention path, a model then hands
the attention function a 2-D mask or None, never a (B, 1, Tq, Tk) one:

* None: no padding; the Tq queries are the last Tq of the Tk keys.
* bool (B, W), W <= Tk: key j of row b is a real token iff ``mask[b, j]``; keys from W on
  are slots of a static cache not written yet (W counts the tokens up to the newest
  query); the queries are the last Tq of the W keys.
* int32 (B, T) sequence ids: sequences packed into rows (transformers found them in the
  ``position_ids`` of a call without cache or mask); token j of row b belongs to sequence
  ``ids[b, j]``, 0 is padding.

The causal and sliding-window patterns are not in the mask: the attention function takes
them from ``is_causal`` and ``sliding_window`` and aligns them to the bottom-right of
each sequence, where transformers puts them too.

Served on fastattn's kernels, every dtype and head dim they take (fp16/bf16/fp32, head
dim 1 to 256, one head dim for q, k and v):

* No mask: ``fastattn.flash_attention`` on (B, H, Tq, D).
* A 2-D mask (padding on either side, decoding with a dynamic or static cache, Tq == Tk,
  Tq == 1, a chunk of Tq < Tk queries, packed sequences): unpad, attend, re-pad, as
  transformers' flash path does. The real keys of each sequence, and for causal
  attention its real queries, are gathered into ``fastattn.flash_attention_varlen``; its
  rows are scattered back into (B, Tq, H, D). Pad query rows come back 0 (eager gives
  them values that no real token reads). Non-causal attention (encoders, cross
  attention) keeps every query row, as eager does.
* ``sliding_window`` w: the window ``(w - 1, 0)`` when causal (eager keeps key kv for
  query q iff ``q - w < kv <= q``), ``(w, w)`` otherwise (eager: ``|q - kv| <= w``).
* ``softcap`` (Gemma 2): the kernel's softcap. ``dropout`` (models pass it only while
  training): the kernel's ``dropout_p``; its random mask is fastattn's own, so a dropout
  step matches eager only in distribution.

Handed to transformers' ``sdpa_attention_forward``, with the 4-D mask transformers' own
``sdpa_mask`` builds for the same call: a ``position_bias`` (T5's relative bias); a 4-D
mask (passed by the caller, or built by ``fastattn_mask`` for a mask pattern it does not
recognise: image-token overlays, chunked or blockwise attention); a dtype, head dim or
value head dim the kernels do not take; a sliding window over a sequence whose mask has
holes (the kernel's window counts real tokens, eager's counts positions). Where such a
call carries a ``softcap``, which SDPA refuses, it goes to eager instead.

Handed to the model's own ``eager_attention_forward`` (what ``"eager"`` runs), with the
mask in eager's additive 4-D form: any other keyword argument that is set, e.g. gpt-oss's
attention sinks (``s_aux``) or ``output_attentions=True``. An attention class without an
``eager_attention_forward`` beside it raises NotImplementedError.

Each fallback warns (``FallbackWarning``) once per reason and config object: models
built from one config object share it; T5's encoder and decoder each have their own.
transformers is an optional dependency: importing this module needs it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface, and_masks, bidirectional_mask_function, causal_mask_function,
    packed_sequence_mask_function, prepare_padding_mask, remap_positions_for_packed_sequence,
    sdpa_mask, sliding_window_bidirectional_mask_function,
    sliding_window_bidirectional_overlay, sliding_window_causal_mask_function,
    sliding_window_overlay)

from fastattn._warnings import warn_fallback
from fastattn.ops.flash_attention import (
    DTYPES, HEAD_DIMS, flash_attention, flash_attention_varlen, head_dim_supported)

NAME = "fastattn"
WHERE = "fastattn (transformers attention)"

# Keywords that change nothing in the attention math. Positions, packing and the cache
# are already in the mask; cu_seq_lens_*/max_length_* describe the packing that
# ``position_ids`` gave the mask (eager ignores them too).
_BOOKKEEPING = frozenset({
    "position_ids", "use_cache", "cache_position", "num_items_in_batch",
    "output_hidden_states", "output_router_logits", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "seq_idx"})
# Keywords fastattn serves or routes itself; any other keyword that is set goes to eager.
_HANDLED = frozenset({"sliding_window", "softcap", "position_bias"})


# ------------------------------------------------------------------ the mask function

def _cells(fn: Callable) -> dict:
    """The variables a closure captured, by name."""
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


# transformers composes its mask patterns from these closures; a pattern is recognised by
# the code objects of its parts, so one composed differently is simply not recognised.
_AND = and_masks().__code__
_SLIDING = sliding_window_overlay(1).__code__
_SLIDING_BIDIRECTIONAL = sliding_window_bidirectional_overlay(1).__code__
_REMAP = remap_positions_for_packed_sequence(causal_mask_function, None).__code__
_PACKED = packed_sequence_mask_function(None).__code__


@dataclass(frozen=True)
class _Pattern:
    causal: bool
    packed: torch.Tensor | None = None     # (B, T) sequence index of each token


def _pattern(fn: Callable) -> _Pattern | None:
    """What a transformers mask function computes, if it is one fastattn serves from a
    2-D mask plus ``is_causal`` and ``sliding_window``: causal or bidirectional, with or
    without a sliding window, causal over packed sequences. None for anything else."""
    if fn is causal_mask_function:
        return _Pattern(causal=True)
    if fn is bidirectional_mask_function:
        return _Pattern(causal=False)
    if getattr(fn, "__code__", None) is not _AND or len(_cells(fn)["mask_functions"]) != 2:
        return None
    first, second = _cells(fn)["mask_functions"]
    kind = getattr(first, "__code__", None)
    if kind is _SLIDING and second is causal_mask_function:
        return _Pattern(causal=True)
    if kind is _SLIDING_BIDIRECTIONAL and second is bidirectional_mask_function:
        return _Pattern(causal=False)
    if kind is _REMAP and getattr(second, "__code__", None) is _PACKED:
        # Inside a packed sequence the position ids count up by one (that is how
        # transformers splits them), so the pattern evaluated on positions is the same
        # pattern evaluated on token order.
        inner = _pattern(_cells(first)["mask_function"])
        if inner is not None and inner.causal and inner.packed is None:
            return _Pattern(causal=True, packed=_cells(second)["packed_sequence_mask"])
    return None


def _causal_of(fn: Callable) -> bool | None:
    """``_pattern(fn).causal`` for a pattern without packed sequences; None if unserved."""
    pattern = _pattern(fn)
    return None if pattern is None or pattern.packed is not None else pattern.causal


# Under torch.compile a mask function made inside the compiled region has a closure that
# dynamo does not let code read (``fn.__closure__`` raises there). Its closure is read
# once, at trace time, on the real function dynamo rebuilds from it, and the answer is a
# constant of the graph. That rebuild needs every captured value to be a constant: true
# unless the pattern holds a tensor, i.e. packed sequences (transformers packs only
# without an attention mask, and then drops the is_causal skip) or a mask overlay
# (``use_vmap``).
_causal_traced = torch._dynamo.assume_constant_result(_causal_of)


def _compiled_pattern(fn: Callable, attention_mask, kwargs) -> _Pattern | None:
    """``_pattern`` while dynamo traces: a pattern that may capture a tensor is not read
    (None: the 4-D mask, and the attention on SDPA)."""
    if fn is causal_mask_function or fn is bidirectional_mask_function:
        return _pattern(fn)
    may_capture_tensor = kwargs.get("use_vmap", False) or (
        attention_mask is None and not kwargs.get("allow_is_causal_skip", True))
    if may_capture_tensor:
        return None
    causal = _causal_traced(fn)
    return None if causal is None else _Pattern(causal=causal)


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                  kv_offset: int = 0, mask_function: Callable = causal_mask_function,
                  attention_mask: torch.Tensor | None = None, **kwargs
                  ) -> torch.Tensor | None:
    """transformers' mask-function contract (``AttentionMaskInterface``): the 2-D mask
    (or None) ``fastattn_attention_forward`` reads, see the module docstring.

    ``attention_mask`` is the caller's (B, seen tokens) padding mask; key j of this call
    is absolute position ``kv_offset + j``, query i is ``q_offset + i`` (a tensor for
    static caches). A pattern ``_pattern`` does not recognise gets transformers' 4-D
    ``sdpa_mask``, which the attention function hands to SDPA."""
    pattern = (_compiled_pattern(mask_function, attention_mask, kwargs)
               if torch.compiler.is_compiling() else _pattern(mask_function))
    if pattern is None or (pattern.packed is not None and attention_mask is not None):
        kwargs["allow_is_causal_skip"] = False       # None means something else to fastattn
        kwargs["allow_is_bidirectional_skip"] = False
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, **kwargs)
    if pattern.packed is not None:
        return (pattern.packed + 1).to(torch.int32)                  # 0 stays padding
    width = kv_length
    if pattern.causal:
        # Keys past the newest query are never seen: static-cache slots not written yet.
        width = min(kv_length, int(q_offset + q_length - kv_offset))
    if attention_mask is None:
        if width == kv_length:
            return None
        return torch.ones(batch_size, width, dtype=torch.bool, device=kwargs.get("device"))
    if pattern.causal and kv_offset > 0 and attention_mask.shape[1] == width < \
            int(q_offset + q_length):
        # This very function's mask for this call, handed back: for a static cache
        # generate builds the masks before the forward, and a model whose config has no
        # layer_types builds its mask again from the 2-D one it got. A padding mask
        # covers every token seen (q_offset + q_length); this one covers only the
        # sliding cache's slots, which start at kv_offset, so it is read as it is.
        return attention_mask.bool()
    # sdpa_mask reads column kv_offset + j for key j, padding a short mask with zeros
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    mask = mask[:, kv_offset:kv_offset + width].bool()
    if width == kv_length and bool(mask.all()):
        return None
    return mask


# ------------------------------------------------------------------ unpad / re-pad

@dataclass
class _Unpadded:
    """A masked batch as packed sequences: key rows ``keys`` (flat indices into the
    (B·W) key rows) form the sequences ``cu_k``; query rows ``queries`` (flat indices into
    the (B·Tq) query rows, None for all of them) form ``cu_q``."""
    keys: torch.Tensor
    queries: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    holes: bool          # some sequence's real keys do not sit side by side


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _unpad(mask: torch.Tensor, tq: int, causal: bool) -> _Unpadded:
    """Sequences of a (B, W) bool mask or int sequence-id mask, queries being the last Tq
    of the W positions. Causal: a sequence is the real keys of one row and one id, its
    queries those among the last Tq. Non-causal: a sequence is a row, and keeps all Tq
    query rows (a pad query still attends to the real keys in eager)."""
    b, w = mask.shape
    ids = mask.to(torch.int64)
    keys = (ids != 0).flatten().nonzero().squeeze(1)                 # (total_k,)
    if causal:
        rows = torch.arange(b, device=mask.device)[:, None]
        label = (ids + rows * 2 ** 32).flatten()[keys]
        starts = torch.ones_like(label, dtype=torch.bool)
        starts[1:] = label[1:] != label[:-1]
        sequence = starts.cumsum(0) - 1                              # of each real key
        k_len = torch.bincount(sequence)
        at = torch.full((b * w,), -1, dtype=torch.int64, device=mask.device)
        at[keys] = sequence
        at = at.view(b, w)[:, w - tq:].flatten()                     # of each query row
        queries = (at >= 0).nonzero().squeeze(1)
        q_len = torch.bincount(at[queries], minlength=k_len.numel())
    else:
        k_len = (ids != 0).sum(1)
        queries, q_len = None, torch.full((b,), tq, device=mask.device)
    cu_k = _cumulative(k_len)
    if len(keys) == 0:                                               # nothing but padding
        return _Unpadded(keys, queries, _cumulative(q_len), cu_k, 0, 0, False)
    first, last = keys[cu_k[:-1].clamp(max=len(keys) - 1)], keys[(cu_k[1:] - 1).clamp(min=0)]
    holes = ((last - first + 1 != k_len) & (k_len > 0)).any()
    max_q, max_k, holes = torch.stack([q_len.max(), k_len.max(), holes.long()]).tolist()
    return _Unpadded(keys, queries, _cumulative(q_len), cu_k, max_q, max_k, bool(holes))


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _attend_unpadded(query, key, value, mask, batch: _Unpadded, **options) -> torch.Tensor:
    """Unpad, attend on ``flash_attention_varlen``, re-pad: (B, Tq, H, D), pad rows 0."""
    b, h, tq, d = query.shape
    w = mask.shape[1]
    if len(batch.keys) == 0:                             # every query sees no key: 0
        return query.new_zeros(b, tq, h, d)

    def rows(t, length):                                             # (B·T, heads, D)
        return t[:, :, :length].transpose(1, 2).reshape(b * length, t.shape[1], d)

    q = rows(query, tq) if batch.queries is None else rows(query, tq)[batch.queries]
    k, v = rows(key, w)[batch.keys], rows(value, w)[batch.keys]
    out = flash_attention_varlen(q, k, v, batch.cu_q, batch.cu_k, batch.max_q, batch.max_k,
                                 **options)
    if batch.queries is not None:
        out = out.new_zeros(b * tq, h, d).index_copy(0, batch.queries, out)
    return out.view(b, tq, h, d)


# ------------------------------------------------------------------ fallbacks

def _check_mask(mask, query, key, causal: bool) -> None:
    """A 2-D mask must be ``fastattn_mask``'s: (B, W), Tq <= W <= Tk when causal."""
    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    w = mask.shape[1]
    if mask.shape[0] != b or w > tk or (causal and w < tq):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit {tq} "
                         f"queries over {tk} keys: a 2-D mask must be (batch {b}, W) with "
                         f"W <= {tk}" + (f" and W >= {tq} (causal)" if causal else ""))


def _route(query, key, value, attention_mask, causal: bool,
           kwargs) -> tuple[str, str | None]:
    """("fastattn", None), or the fallback ("sdpa" or "eager") and the reason for it,
    before looking at the mask's contents."""
    unserved = sorted(name for name, v in kwargs.items() if v is not None and v is not False
                      and name not in _BOOKKEEPING | _HANDLED)
    if unserved:
        return "eager", f"keyword argument(s) {', '.join(unserved)}"
    if kwargs.get("position_bias") is not None:
        return _sdpa_or_eager(kwargs), "a position bias (e.g. T5's relative attention bias)"
    if attention_mask is not None and attention_mask.dim() != 2:
        return _sdpa_or_eager(kwargs), (f"a {attention_mask.dim()}-D attention mask (a custom "
                                        "one, a mask pattern fastattn does not serve, or, "
                                        "under torch.compile, one it cannot read: packed "
                                        "sequences or no mask without a cache)")
    if attention_mask is not None:
        _check_mask(attention_mask, query, key, causal)
    if query.dtype not in DTYPES:
        return _sdpa_or_eager(kwargs), f"dtype {query.dtype}"
    d = query.shape[-1]
    if not head_dim_supported(d) or value.shape[-1] != d:
        return _sdpa_or_eager(kwargs), (f"head dims q/k {d}, v {value.shape[-1]} (fastattn "
                                        f"takes one head dim, {HEAD_DIMS})")
    return "fastattn", None


def _sdpa_or_eager(kwargs) -> str:
    """SDPA refuses a softcap."""
    return "eager" if kwargs.get("softcap") is not None else "sdpa"


def _pattern_function(causal: bool, sliding_window: int | None) -> Callable:
    if causal:
        return (causal_mask_function if sliding_window is None
                else sliding_window_causal_mask_function(sliding_window))
    return (bidirectional_mask_function if sliding_window is None
            else sliding_window_bidirectional_mask_function(sliding_window))


def _dense_mask(query, key, attention_mask, causal: bool, sliding_window: int | None,
                skip: bool) -> torch.Tensor | None:
    """The 4-D bool mask transformers' ``sdpa_mask`` builds for what a fastattn 2-D mask
    (or None) means, or None where ``skip`` allows SDPA's ``is_causal`` to stand in."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    function, padding = _pattern_function(causal, sliding_window), attention_mask
    if attention_mask is not None and attention_mask.dtype != torch.bool:   # sequence ids
        ids = F.pad(attention_mask, (0, tk - attention_mask.shape[1]))
        function, padding = and_masks(function, packed_sequence_mask_function(ids)), ids != 0
    width = tk if attention_mask is None else attention_mask.shape[1]
    # sdpa_mask's skip looks at the padding, not at the static-cache slots past it
    skip = skip and width == tk
    return sdpa_mask(batch_size=b, q_length=tq, kv_length=tk,
                     q_offset=max(width - tq, 0) if causal else 0, mask_function=function,
                     attention_mask=padding, local_size=sliding_window,
                     allow_is_causal_skip=skip and causal,
                     allow_is_bidirectional_skip=skip and not causal, device=query.device)


def _eager_attention(module: torch.nn.Module, reason: str):
    """The model's own ``eager_attention_forward``, from the file defining its attention."""
    for cls in type(module).__mro__:
        found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if found is not None:
            return found
    raise NotImplementedError(f"{WHERE}: {reason} needs the model's eager attention, but no "
                              f"eager_attention_forward sits beside {type(module).__name__}; "
                              "use attn_implementation='eager'")


def _warn_at_trace_time(reason: str, to: str) -> bool:
    warn_fallback(WHERE, reason, to=to)
    return True


# dynamo cannot trace the warning: it is given once, while tracing, per process
_warn_traced = torch._dynamo.assume_constant_result(_warn_at_trace_time)


def _warn(reason: str, module: torch.nn.Module, to: str) -> None:
    if torch.compiler.is_compiling():
        _warn_traced(reason, to)
    else:
        warn_fallback(WHERE, reason, key=getattr(module, "config", module), to=to)


def _fall_back(path, reason, module, query, key, value, attention_mask, dropout, scaling,
               causal, kwargs):
    window = kwargs.get("sliding_window")
    if path == "sdpa":
        _warn(reason, module, "transformers' sdpa_attention_forward")
        mask = _dense_mask(query, key, attention_mask, causal, window, skip=True)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, is_causal=causal, **kwargs)
    eager = _eager_attention(module, reason)
    _warn(reason, module, f"the eager attention of {type(module).__name__}")
    mask = _dense_mask(query, key, attention_mask, causal, window, skip=False)
    if mask is not None and mask.dtype == torch.bool:          # eager adds its mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device
                           ).masked_fill(~mask, torch.finfo(query.dtype).min)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling   # eager needs one
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


# ------------------------------------------------------------------ the attention function

def fastattn_attention_forward(module: torch.nn.Module, query: torch.Tensor,
                               key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key/value
    (B, Hkv, Tk, D), ``attention_mask`` as ``fastattn_mask`` makes it (or 4-D); returns
    ((B, Tq, H, D), attention weights or None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    path, reason = _route(query, key, value, attention_mask, causal, kwargs)
    batch = None
    if path == "fastattn" and attention_mask is not None:
        batch = _unpad(attention_mask, query.shape[2], causal)
        if batch.holes and kwargs.get("sliding_window") is not None:
            path, reason = _sdpa_or_eager(kwargs), ("a sliding window over a sequence with "
                                                   "holes in its attention mask")
    if path != "fastattn":
        return _fall_back(path, reason, module, query, key, value, attention_mask, dropout,
                          scaling, causal, kwargs)
    options = dict(causal=causal, scale=scaling,
                   window=_window(kwargs.get("sliding_window"), causal),
                   softcap=float(kwargs.get("softcap") or 0.0), dropout_p=float(dropout))
    if batch is None:
        out = flash_attention(query, key, value, **options)           # (B, H, Tq, D)
        return out.transpose(1, 2), None
    return _attend_unpadded(query, key, value, attention_mask, batch, **options), None


def register() -> None:
    """Make ``attn_implementation="fastattn"`` available to every transformers model."""
    AttentionInterface.register(NAME, fastattn_attention_forward)
    AttentionMaskInterface.register(NAME, fastattn_mask)
