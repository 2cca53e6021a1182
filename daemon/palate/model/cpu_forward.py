"""Inference-only forward pass of the reward model's blocks in numpy, for CPUs.

Why it exists: on a CPU, MLX runs element-wise kernels as scalar loops on one thread. For
SmolLM2-sized models the exp inside softmax and SiLU then costs more than every matmul
together (measured here: ``exp`` over 2048x1536 floats 75 ms in MLX vs 14 ms in numpy,
whose ufuncs are SIMD-vectorised; see docs/benchmarks.md). The matmuls go to OpenBLAS in
both. So wherever no gradient is needed -- the frozen-prefix cache pass of training and all
scoring -- the CPU path runs this numpy forward instead of MLX's; training the top blocks
(which needs autodiff) stays in MLX, and on Metal everything stays in MLX.

It computes exactly what :meth:`palate.model.reward_model.RewardModel.forward_groups` computes,
prompt-grouped (each prompt once, its keys/values shared by its responses) and with the
last block evaluated only at each response's last token; tests hold the two together
(float32 rounding only). LoRA is merged into the weights of the adapted blocks
(``W + scale * A @ B``), so an engine is a snapshot: build a new one after the weights
change. Base weights are zero-copy views of the MLX arrays, so the engine costs memory only
for the merged top blocks.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PARITY_TOLERANCE",
    "CpuEngine",
    "cpu_engine_unsupported",
    "default_threads",
    "parity_error",
    "set_numpy_blas_threads",
]

#: Largest relative difference between the numpy and the MLX rewards of the parity batch
#: that passes (float32 rounding over a few blocks is ~1e-6; a missing bias or a wrong RoPE
#: style is > 1e-2).
PARITY_TOLERANCE = 1e-3

_NEG = np.float32(-1e30)
_THREAD_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


class _Workers:
    """Daemon worker threads shared by every engine in the process.

    Not a ThreadPoolExecutor: Python joins its workers at exit, so a daemon told to stop
    (SIGTERM) in the middle of a scoring batch would wait for the batch's matmuls. One
    shared pool also means hot-swapping models never leaks threads.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._q: queue.SimpleQueue[tuple[Any, tuple[Any, ...], Future[Any]]] = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._loop, name=f"palate-cpu-{i}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, args, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, which re-raises it
                fut.set_exception(e)

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._q.put((fn, args, fut))
        return fut


_workers: _Workers | None = None
_workers_lock = threading.Lock()


def _shared_workers(n: int) -> _Workers:
    global _workers
    with _workers_lock:
        if _workers is None or _workers.n < n:
            _workers = _Workers(n)  # a smaller old pool just idles; this happens at most once
        return _workers


def default_threads() -> int:
    """Worker threads for the engine: the cores this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def set_numpy_blas_threads(n: int) -> bool:
    """Set the thread count of numpy's bundled OpenBLAS; False when it cannot be found.

    The engine parallelises over shards itself, one BLAS thread each. Measured on this
    2-core machine under load: a multi-threaded OpenBLAS whose threads outnumber the free
    cores spins, and small attention GEMMs ran ~20x slower than single-threaded.
    """
    import numpy

    libs = glob.glob(
        os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*")
    )
    for path in libs:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0))
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                return True
    return False


def _np(a: Any) -> np.ndarray:
    """A float32 numpy view (zero-copy for float32 MLX arrays) of a weight."""
    arr = np.asarray(a)
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def _linear_weight(layer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(W^T as (in, out), bias) of a Linear or an mlx-lm LoRALinear with LoRA merged."""
    if hasattr(layer, "lora_a"):  # mlx-lm LoRALinear: y = x W^T + scale * (x A) B
        base_w = _np(layer.linear.weight)
        merged = base_w.T + float(layer.scale) * (_np(layer.lora_a) @ _np(layer.lora_b))
        bias = getattr(layer.linear, "bias", None)
        return np.ascontiguousarray(merged, dtype=np.float32), (None if bias is None else _np(bias))
    bias = getattr(layer, "bias", None) if "bias" in layer else None
    return _np(layer.weight).T, None if bias is None else _np(bias)


def cpu_engine_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot run on :class:`CpuEngine` (None when it can).

    Supported: llama/mistral/qwen2-style blocks (RMSNorm, plain RoPE, GQA, SwiGLU, optional
    q/k/v biases) with float weights. Anything else keeps the MLX path.
    """
    import mlx.nn as nn

    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"block {i} has no self_attn/mlp"
        if hasattr(attn, "q_norm"):
            return "per-head q/k norms (qwen3) are not implemented on the numpy path"
        if type(attn.rope) is not nn.RoPE:
            return f"rope type {type(attn.rope).__name__} is not implemented on the numpy path"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                return f"block {i} MLP has no {name} (not SwiGLU)"
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj):
            inner = getattr(lin, "linear", lin)
            if type(inner) is not nn.Linear:
                return f"block {i} has {type(inner).__name__} weights (quantized)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not nn.RMSNorm:
                return f"block {i} uses {type(norm).__name__}, not RMSNorm"
    if type(model.norm) is not nn.RMSNorm:
        return "final norm is not RMSNorm"
    return None


@dataclass
class _Block:
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    wo: np.ndarray
    wg: np.ndarray
    wu: np.ndarray
    wd: np.ndarray
    # o_proj / MLP biases: llama checkpoints with attention_bias or mlp_bias have them, and
    # dropping them computes another function (issue 13).
    bo: np.ndarray | None
    bg: np.ndarray | None
    bu: np.ndarray | None
    bd: np.ndarray | None
    ln1: np.ndarray
    eps1: float
    ln2: np.ndarray
    eps2: float


def _block(layer: Any) -> _Block:
    a, m = layer.self_attn, layer.mlp
    wq, bq = _linear_weight(a.q_proj)
    wk, bk = _linear_weight(a.k_proj)
    wv, bv = _linear_weight(a.v_proj)
    wo, bo = _linear_weight(a.o_proj)
    wg, bg = _linear_weight(m.gate_proj)
    wu, bu = _linear_weight(m.up_proj)
    wd, bd = _linear_weight(m.down_proj)
    return _Block(
        wq=wq,
        wk=wk,
        wv=wv,
        bq=bq,
        bk=bk,
        bv=bv,
        wo=wo,
        wg=wg,
        wu=wu,
        wd=wd,
        bo=bo,
        bg=bg,
        bu=bu,
        bd=bd,
        ln1=_np(layer.input_layernorm.weight),
        eps1=float(layer.input_layernorm.eps),
        ln2=_np(layer.post_attention_layernorm.weight),
        eps2=float(layer.post_attention_layernorm.eps),
    )


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("...d,...d->...", x, x)[..., None]
    ms *= 1.0 / x.shape[-1]
    ms += eps
    return x * (1.0 / np.sqrt(ms)) * w


def _softmax_(s: np.ndarray) -> np.ndarray:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _gemm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x.reshape(-1, x.shape[-1]) @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1])


class CpuEngine:
    """The reward model's forward pass in numpy; see the module docstring.

    ``threads`` > 1 splits each batch's groups into shards run in parallel threads (numpy
    releases the GIL in BLAS and in ufunc loops), which keeps both cores of a small machine
    busy during the single-threaded element-wise parts.
    """

    def __init__(self, model: Any, threads: int = 1) -> None:
        reason = cpu_engine_unsupported(model)
        if reason is not None:
            raise ValueError(f"numpy forward unsupported: {reason}")
        attn = model.layers[0].self_attn
        self.n_heads = int(attn.n_heads)
        self.n_kv_heads = int(attn.n_kv_heads)
        self.scale = float(attn.scale)
        rope = attn.rope
        self.rope_dims = int(rope.dims)
        self.rope_traditional = bool(rope.traditional)
        self.rope_base = float(rope.base)
        self.rope_scale = float(rope.scale)
        self.num_layers = int(model.num_layers)
        self.split = int(model.split)
        self.embed = _np(model.embed_tokens.weight)
        self.norm_w = _np(model.norm.weight)
        self.norm_eps = float(model.norm.eps)
        self.head_w = np.ascontiguousarray(_np(model.head.weight).T)  # (D, K): K members
        self.head_b = _np(model.head.bias)  # (K,)
        self.blocks = [_block(layer) for layer in model.layers]
        self.head_dim = self.blocks[0].wo.shape[0] // self.n_heads
        self.threads = max(1, threads)
        if self.threads > 1:
            set_numpy_blas_threads(1)
        self._pool = _shared_workers(self.threads) if self.threads > 1 else None

    # -- rope -----------------------------------------------------------------------------
    def _angles(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin (B, L, 1, d/2) of positions (B, L); computed once per forward, since
        every block rotates the same positions."""
        d = self.rope_dims
        inv = self.rope_base ** (-np.arange(0, d, 2, dtype=np.float32) / d)
        ang = (pos.astype(np.float32) * self.rope_scale)[..., None] * inv  # (B, L, d/2)
        return np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]

    def _rope(self, x: np.ndarray, cs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Rotate (B, L, H, hd) by precomputed angles, as ``mlx.nn.RoPE`` does."""
        d = self.rope_dims
        cos, sin = cs
        out = x.copy()
        if self.rope_traditional:
            x1, x2 = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = x1 * cos - x2 * sin
            out[..., 1:d:2] = x1 * sin + x2 * cos
        else:
            h = d // 2
            x1, x2 = x[..., :h], x[..., h:d]
            out[..., :h] = x1 * cos - x2 * sin
            out[..., h:d] = x1 * sin + x2 * cos
        return out

    def _qkv(
        self, b: _Block, x: np.ndarray, cs: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B, L, _ = x.shape
        hd = self.head_dim
        q = _gemm(x, b.wq, b.bq).reshape(B, L, self.n_heads, hd)
        k = _gemm(x, b.wk, b.bk).reshape(B, L, self.n_kv_heads, hd)
        v = _gemm(x, b.wv, b.bv).reshape(B, L, self.n_kv_heads, hd)
        return self._rope(q, cs), self._rope(k, cs), v

    # -- attention ----------------------------------------------------------------------
    def _attend(
        self, q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, mask: np.ndarray
    ) -> np.ndarray:
        """GQA attention. q (B, Lq, H, hd); keys_t (B, Hkv, hd, Lk); values (B, Hkv, Lk, hd);
        additive mask broadcastable to (B, Hkv, rep, Lq, Lk). Returns (B, Lq, H*hd).

        The query heads sharing one key/value head are stacked along the rows, so every
        product is a contiguous 3-D batched GEMM (numpy falls back to slow loops for
        broadcast 5-D matmuls)."""
        B, Lq, H, hd = q.shape
        Hkv = self.n_kv_heads
        rep = H // Hkv
        Lk = keys_t.shape[-1]
        qs = np.ascontiguousarray(q.reshape(B, Lq, Hkv, rep, hd).transpose(0, 2, 3, 1, 4))
        qs *= self.scale
        s = qs.reshape(B * Hkv, rep * Lq, hd) @ keys_t.reshape(B * Hkv, hd, Lk)
        s5 = s.reshape(B, Hkv, rep, Lq, Lk)
        s5 += mask
        _softmax_(s5)
        o = s.reshape(B * Hkv, rep * Lq, Lk) @ values.reshape(B * Hkv, Lk, hd)
        return o.reshape(B, Hkv, rep, Lq, hd).transpose(0, 3, 1, 2, 4).reshape(B, Lq, H * hd)

    def _mlp(self, b: _Block, h: np.ndarray) -> np.ndarray:
        x = _rms(h, b.ln2, b.eps2)
        g = _gemm(x, b.wg, b.bg)
        u = _gemm(x, b.wu, b.bu)
        t = np.negative(g)
        np.exp(t, out=t)
        t += 1.0
        np.divide(g, t, out=g)  # silu(g) = g * sigmoid(g)
        g *= u
        out: np.ndarray = h + _gemm(g, b.wd, b.bd)
        return out

    # -- forward ------------------------------------------------------------------------
    def forward_groups(
        self,
        prompt: np.ndarray,
        prompt_len: np.ndarray,
        response: np.ndarray,
        response_len: np.ndarray,
        group: np.ndarray,
        start: int = 0,
        end: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """Same contract as ``RewardModel.forward_groups`` with numpy arrays."""
        end = self.num_layers if end is None else end
        args = (prompt, prompt_len, response, response_len, group, start, end)
        shards = _shards(group, len(prompt), self.threads) if self._pool is not None else []
        if len(shards) < 2:
            return self._forward(*args)
        assert self._pool is not None
        futures = [
            self._pool.submit(
                self._forward,
                prompt[p_rows],
                prompt_len[p_rows],
                response[r_rows],
                response_len[r_rows],
                g_rows,
                start,
                end,
            )
            for p_rows, r_rows, g_rows in shards
        ]
        parts = [f.result() for f in futures]
        order = np.argsort(np.concatenate([r for _, r, _ in shards]), kind="stable")
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)[order]
        # Hidden states: every prompt row once (a prompt split over shards is identical in
        # each), responses back in input order.
        hp = _pad_cat([p[0] for p in parts])
        p_first = np.unique(np.concatenate([p for p, _, _ in shards]), return_index=True)[1]
        return hp[p_first], _pad_cat([p[1] for p in parts])[order]

    def _forward(
        self,
        prompt: np.ndarray,
        prompt_len: np.ndarray,
        response: np.ndarray,
        response_len: np.ndarray,
        group: np.ndarray,
        start: int,
        end: int,
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        # Trim padding columns no row of this shard uses (shards of a batch differ).
        Lp = max(1, int(prompt_len.max()))
        Lr = max(1, int(response_len.max()))
        hp, hr = prompt[:, :Lp], response[:, :Lr]
        if start == 0:
            hp, hr = self.embed[hp], self.embed[hr]
        hp = np.ascontiguousarray(hp, dtype=np.float32)
        hr = np.ascontiguousarray(hr, dtype=np.float32)
        G = hp.shape[0]
        lp = prompt_len[group].astype(np.int64)  # (S,)
        cs_p = self._angles(np.broadcast_to(np.arange(Lp), (G, Lp)))
        cs_r = self._angles(lp[:, None] + np.arange(Lr)[None, :])
        mask_p = np.where(np.tri(Lp, dtype=bool), np.float32(0), _NEG).astype(np.float32)
        cols = np.arange(Lp + Lr)
        allowed = np.where(
            cols[None, None, :] < Lp,
            cols[None, None, :] < lp[:, None, None],
            (cols[None, None, :] - Lp) <= np.arange(Lr)[None, :, None],
        )  # (S, Lr, Lk)
        mask_r = np.where(allowed, np.float32(0), _NEG).astype(np.float32)[:, None, None]
        for i in range(start, end):
            b = self.blocks[i]
            xp, xr = _rms(hp, b.ln1, b.eps1), _rms(hr, b.ln1, b.eps1)
            qp, kp, vp = self._qkv(b, xp, cs_p)
            kp_t = np.ascontiguousarray(kp.transpose(0, 2, 3, 1))  # (G, Hkv, hd, Lp)
            vp_t = np.ascontiguousarray(vp.transpose(0, 2, 1, 3))  # (G, Hkv, Lp, hd)
            if i == self.num_layers - 1:
                return self._last(b, hr, xr, kp_t, vp_t, cs_r, response_len, group, mask_r)
            qr, kr, vr = self._qkv(b, xr, cs_r)
            keys_t, values = _response_kv(kp_t, vp_t, kr, vr, group)
            op = self._attend(qp, kp_t, vp_t, mask_p)
            orr = self._attend(qr, keys_t, values, mask_r)
            hp = self._mlp(b, hp + _gemm(op, b.wo, b.bo))
            hr = self._mlp(b, hr + _gemm(orr, b.wo, b.bo))
        return hp, hr

    def _last(
        self,
        b: _Block,
        hr: np.ndarray,
        xr: np.ndarray,
        kp_t: np.ndarray,
        vp_t: np.ndarray,
        cs_r: tuple[np.ndarray, np.ndarray],
        response_len: np.ndarray,
        group: np.ndarray,
        mask_r: np.ndarray,
    ) -> np.ndarray:
        """Final block at each response's last token only, then norm and head."""
        S, Lr, _ = hr.shape
        hd = self.head_dim
        kr = self._rope(_gemm(xr, b.wk, b.bk).reshape(S, Lr, self.n_kv_heads, hd), cs_r)
        vr = _gemm(xr, b.wv, b.bv).reshape(S, Lr, self.n_kv_heads, hd)
        last = response_len.astype(np.int64) - 1
        rows = np.arange(S)
        h_last = hr[rows, last][:, None]  # (S, 1, D)
        x_last = xr[rows, last][:, None]
        q = _gemm(x_last, b.wq, b.bq).reshape(S, 1, self.n_heads, hd)
        q = self._rope(q, (cs_r[0][rows, last][:, None], cs_r[1][rows, last][:, None]))
        keys_t, values = _response_kv(kp_t, vp_t, kr, vr, group)
        row_mask = mask_r[rows, :, :, last][:, :, :, None]  # (S, 1, 1, 1, Lk)
        o = self._attend(q, keys_t, values, row_mask)
        h = self._mlp(b, h_last + _gemm(o, b.wo, b.bo))[:, 0]  # (S, D)
        out: np.ndarray = _rms(h, self.norm_w, self.norm_eps) @ self.head_w + self.head_b
        return (out[:, 0] if out.shape[1] == 1 else out).astype(np.float32)  # (S,) or (S, K)

    def close(self) -> None:
        """Drop the weight snapshot (the worker threads are shared and stay)."""
        self.blocks = []
        self._pool = None


def parity_error(model: Any, engine: CpuEngine) -> float:
    """Max |numpy - MLX| / (1 + max |MLX|) over the rewards of a short fixed batch.

    Two prompts (8 and 5 tokens) and three responses (5, 3 and 4 tokens), deterministic
    token ids: every path the engine has (grouped prompts, padding, the pooled last block)
    runs once. MLX runs in eval mode (no LoRA dropout), restored afterwards.
    """
    import mlx.core as mx

    vocab = int(model.embed_tokens.weight.shape[0])
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, (2, 8)).astype(np.int32)
    response = rng.integers(0, vocab, (3, 5)).astype(np.int32)
    plen = np.array([8, 5], dtype=np.int32)
    rlen = np.array([5, 3, 4], dtype=np.int32)
    group = np.array([0, 0, 1], dtype=np.int32)
    was_training = bool(model.training)
    model.eval()
    try:
        ref = np.array(
            model.forward_groups(
                mx.array(prompt),
                mx.array(plen),
                mx.array(response),
                mx.array(rlen),
                mx.array(group),
            ),
            dtype=np.float64,
        )
    finally:
        if was_training:
            model.train()
    got = np.asarray(engine.forward_groups(prompt, plen, response, rlen, group), np.float64)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.abs(got - ref).max() / (1.0 + np.abs(ref).max()))


def _response_kv(
    kp_t: np.ndarray, vp_t: np.ndarray, kr: np.ndarray, vr: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keys (S, Hkv, hd, Lp+Lr) and values (S, Hkv, Lp+Lr, hd) a response attends to: its
    prompt's (shared by every response of that prompt), then its own."""
    keys_t = np.concatenate([kp_t[group], kr.transpose(0, 2, 3, 1)], axis=3)
    values = np.concatenate([vp_t[group], vr.transpose(0, 2, 1, 3)], axis=2)
    return keys_t, values


def _shards(
    group: np.ndarray, n_groups: int, n: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Split a batch into up to ``n`` shards of about equal response counts.

    Returns (prompt rows, response rows, group of each response within the shard). Whole
    groups are kept together when there are several groups; a batch of one prompt (one
    rerank request) is split by responses instead, each shard recomputing the prompt --
    extra work, but it is the only way to use a second core for a lone request.
    """
    S = len(group)
    if n < 2 or S < 2:
        return []
    if n_groups == 1:
        chunks = [c for c in np.array_split(np.arange(S), min(n, S)) if len(c)]
        zero = np.zeros(1, dtype=np.int64)
        return [(zero, c, np.zeros(len(c), dtype=group.dtype)) for c in chunks]
    counts = np.bincount(group, minlength=n_groups)
    cum = np.cumsum(counts)
    bounds = [0]
    for k in range(1, n):
        cut = int(np.searchsorted(cum, S * k / n)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), n_groups))
    bounds.append(n_groups)
    out = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        rows = np.nonzero((group >= a) & (group < b))[0]
        out.append((np.arange(a, b), rows, group[rows] - a))
    return out


def _pad_cat(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate (B_i, L_i, D) arrays along B, right-padding L with zeros."""
    L = max(p.shape[1] for p in parts)
    out = np.zeros((sum(p.shape[0] for p in parts), L, parts[0].shape[2]), dtype=np.float32)
    row = 0
    for p in parts:
        out[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return out
