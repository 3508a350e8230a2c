"""Triton kernels of the CUDA backend and their launchers.

Imported lazily (first op call), never by ``import accel_backend_cuda``: a machine without Triton or CUDA
can import the backend and see why it is unusable. The launchers take arguments the host side
(``accel_backend_cuda/__init__.py``) has already checked and planned; they only allocate outputs and launch.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter (the CPU-side
tests use that). The interpreter has no libdevice, so the few libdevice calls sit behind the constexpr
``LIBDEVICE`` and have a portable twin for the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
LIBDEVICE = not INTERPRET
#: split-K attention merges inside the attention kernel (last split to arrive), not in a second kernel
FUSED_MERGE = True

#: Launch parameters. The benchmark script may overwrite entries to sweep them; these are the defaults
#: chosen from the H100 measurements in docs/cuda-notes.md.
CONFIG: dict[str, dict[str, int]] = {
    # split_keys: the fewest keys per split-K chunk; split_below / split_target: split when the busy programs
    # are fewer than split_below x SMs, aiming at split_target x SMs programs (attention_plan)
    # (H100, issue 11: splitting short decode contexts pays only while the programs leave most SMs idle;
    # 32-key tiles and splits at batch 1 measured the same as these, within the +-2.5% between runs).
    # prefetch_*: the prefetching key loop while the busy programs are at most prefetch_below x SMs (and
    # unsplit unless prefetch_splits), with tiles of prefetch_elems keys x head elements (H200, session 14);
    # busy_elems: unsplit decode with more programs than SMs takes tiles of up to that many (session 15)
    "attn_decode": {"BLOCK_M": 16, "TILE_N": 64, "num_warps": 4, "num_stages": 2, "split_keys": 64,
                    "split_below": 0.5, "split_target": 4, "prefetch_below": 1.0, "prefetch_elems": 8192,
                    "prefetch_warps": 8, "prefetch_stages": 1, "prefetch_splits": 0, "busy_elems": 8192},
    "attn_prefill": {"BLOCK_M": 64, "TILE_N": 32, "num_warps": 4, "num_stages": 3},
    "moe_small": {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "moe_large": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    "moe_down_large": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    # rms_norm's warps per program (None: 4 up to 2048 elements a program, then 8, then 16)
    "rms_norm": {"num_warps": None},
}


def _pdl_default() -> bool:
    """Programmatic dependent launch (Hopper+): each kernel may be launched while the previous one in the
    stream finishes, and waits (griddepcontrol.wait) before touching memory. Off under the interpreter,
    before sm90, without Triton's gdc intrinsics, or with ACCEL_CUDA_PDL=0."""
    if INTERPRET or os.environ.get("ACCEL_CUDA_PDL", "1") == "0" or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    try:
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    except RuntimeError:  # pragma: no cover
        return False


#: launch every kernel with programmatic dependent launch (see _pdl_default)
PDL = _pdl_default()


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait until the previous kernel in the stream has finished
    and flushed its writes (so every read and write below is ordered as without PDL), then let the next
    kernel's programs launch early (they wait the same way). Saves the launch gap between kernels."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _tl_dtype_ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


@triton.jit
def _tanh(x, LIB: tl.constexpr):
    if LIB:
        y = libdevice.tanh(x)
    else:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return y


@triton.jit
def _rint(x, LIB: tl.constexpr):
    if LIB:
        y = libdevice.rint(x)
    else:  # round half to even for |x| < 2**22 (int8 range): the float32 magic-number trick
        y = (x + 12582912.0) - 12582912.0
    return y


# ----------------------------------------------------------------------------------------------------
# Split-K semaphores: the last program of a split group reduces the partials (no second kernel)
# ----------------------------------------------------------------------------------------------------

#: int32 arrival counters per device, zero between launches: the program that finds ``splits - 1``
#: reduces its group's partials and stores 0 back. Allocated once, outside any graph capture.
COUNTER_SLOTS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed counter buffer, or None when ``needed`` slots exceed it or it would have to be
    allocated inside a graph capture (a captured memset has not run yet): the caller then reduces with a
    second kernel."""
    if needed > COUNTER_SLOTS:
        return None
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


# ----------------------------------------------------------------------------------------------------
# RMS norm (+ fused residual add)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, N, x_stride, res_stride, eps,
                     HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + rows64[:, None] * res_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + rows64[:, None] * N + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=1) / N
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = (x * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x2: torch.Tensor, residual2: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x2, residual2: [rows, N] with unit column stride. Returns (out, residual_out or None), contiguous."""
    n_rows, n = x2.shape
    out = torch.empty((n_rows, n), dtype=x2.dtype, device=x2.device)
    res_out = torch.empty_like(out) if residual2 is not None else out
    block = triton.next_power_of_2(n)
    rows = max(1, min(16, 2048 // block))
    warps = CONFIG.get("rms_norm", {}).get("num_warps") or (4 if block * rows <= 2048 else (8 if block * rows <= 8192 else 16))
    if n_rows:
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x2, residual2 if residual2 is not None else x2, weight, out, res_out, n_rows, n, x2.stride(0),
            residual2.stride(0) if residual2 is not None else 0, float(eps),
            HAS_RES=residual2 is not None, ROWS=rows, BLOCK=block, num_warps=warps, PDL=PDL, launch_pdl=PDL)
    return out, (res_out if residual2 is not None else None)


# ----------------------------------------------------------------------------------------------------
# Greedy argmax (API 1.6)
# ----------------------------------------------------------------------------------------------------

#: argmax's columns per program (one load of BLOCK elements: 8 KB of bf16 logits)
ARGMAX_BLOCK = 4096
_INT64_MIN = -(2**63)
#: per device: the argmax's packed-key and arrival words ([rows] int64 and int32), at rest INT64_MIN and 0
_ARGMAX_STATE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_ARGMAX_OLD: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown words a captured graph may still use


def argmax_state(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The argmax's words for at least ``rows`` rows on ``device``, allocated (or grown) outside any graph
    capture: None inside one before they exist. Every launch leaves them at rest (the last program of a row
    resets its two words), so one set serves every launch and every graph of the stream. Launches on two
    streams of one device at once would share the words (as the persistent layer's barrier words are
    shared): the runtime issues every step on one stream."""
    st = _ARGMAX_STATE.get(device)
    if st is None or st[0].numel() < rows:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if st is not None:
            _ARGMAX_OLD.append(st)
        n = max(64, triton.next_power_of_2(rows))
        st = (torch.full((n,), _INT64_MIN, dtype=torch.int64, device=device),
              torch.zeros(n, dtype=torch.int32, device=device))
        _ARGMAX_STATE[device] = st
    return st


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, key_ptr, cnt_ptr, cols, stride_r, stride_c, chunks, BLOCK: tl.constexpr,
                   PDL: tl.constexpr = False):
    """Program (row, chunk): the chunk's maximum as one int64 key, ``order(value) * 2**32 + (2**32 - 1 - col)``
    (order: the float's bits made monotone as signed ints, NaN above +inf, -0.0 as 0.0), so the largest key
    is the row's first maximal column; ``atomic_max`` into the row's key; the last chunk of the row to
    arrive (an acq_rel counter) takes the key, stores the column and puts both words back at rest."""
    _pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < cols
    v = tl.load(x_ptr + row.to(tl.int64) * stride_r + offs.to(tl.int64) * stride_c, mask=ok, other=0.0)
    v = v.to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 compares equal to 0.0: one key for both
    b = v.to(tl.int32, bitcast=True)
    o = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
    o = tl.where(v != v, 0x7FFFFFFF, o)  # NaN (either sign) above +inf (0x7F800000)
    key = o.to(tl.int64) * 4294967296 + (4294967295 - offs.to(tl.int64))
    key = tl.where(ok, key, -9223372036854775807 - 1)
    tl.atomic_max(key_ptr + row, tl.max(key, 0), sem="relaxed", scope="gpu")
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == chunks - 1:
        final = tl.atomic_xchg(key_ptr + row, -9223372036854775807 - 1, sem="acq_rel", scope="gpu")
        tl.store(out_ptr + row, 4294967295 - (final & 4294967295))
        tl.atomic_xchg(cnt_ptr + row, 0, sem="relaxed", scope="gpu")


def argmax_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[r] = argmax(x[r])`` (first maximum, NaN the largest) in one launch of rows x chunks programs;
    x [rows, cols] with any strides, out [rows] int64 contiguous. Inside a graph capture whose words were
    never allocated (no eager run before it), torch's reductions instead."""
    rows, cols = x.shape
    st = argmax_state(x.device, rows)
    if st is None:
        return out.copy_(x.argmax(dim=-1))
    chunks = triton.cdiv(cols, ARGMAX_BLOCK)
    _argmax_kernel[(rows, chunks)](x, out, st[0], st[1], cols, x.stride(0), x.stride(1), chunks,
                                   BLOCK=ARGMAX_BLOCK, num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# Gated activations
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _activation(g, ACT: tl.constexpr, LIB: tl.constexpr):
    """The gated activation of float32 ``g``: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g), LIB))
    return a


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, d, x_stride, ACT: tl.constexpr, BLOCK: tl.constexpr, LIB: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    # ACT: 0 silu, 1 gelu (erf), 2 gelu (tanh)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    a = _activation(g, ACT, LIB)
    tl.store(out_ptr + row * d + cols, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def act_and_mul(x2: torch.Tensor, act: int) -> torch.Tensor:
    n_rows, two_d = x2.shape
    d = two_d // 2
    out = torch.empty((n_rows, d), dtype=x2.dtype, device=x2.device)
    block = min(1024, triton.next_power_of_2(max(d, 1)))
    if n_rows and d:
        _act_and_mul_kernel[(n_rows, triton.cdiv(d, block))](x2, out, d, x2.stride(0), ACT=act, BLOCK=block,
                                                            LIB=LIBDEVICE, num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# Rotary embedding of q and k in one launch (in place), optionally fused with the KV-cache write
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(x_ptr, t, heads, n_heads, x_stride_t, x_stride_h, c, s, o1, o2, imask):
    """Rotate (in place) ``heads`` of token ``t``; returns the rotated pairs (float32 of the stored
    values) and the pair mask. cos/sin ``c``, ``s`` are already rounded to the dtype."""
    dt = x_ptr.dtype.element_ty
    base = x_ptr + t.to(tl.int64) * x_stride_t + heads[:, None].to(tl.int64) * x_stride_h
    mask = (heads < n_heads)[:, None] & imask[None, :]
    x1 = tl.load(base + o1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + o2[None, :], mask=mask, other=0.0).to(tl.float32)
    # each product rounded to the input dtype, as the eager (Hugging Face) formula does
    y1 = ((x1 * c[None, :]).to(dt).to(tl.float32) - (x2 * s[None, :]).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c[None, :]).to(dt).to(tl.float32) + (x1 * s[None, :]).to(dt).to(tl.float32)).to(dt)
    tl.store(base + o1[None, :], y1, mask=mask)
    tl.store(base + o2[None, :], y2, mask=mask)
    return y1, y2, mask


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, slot_ptr, cs_ptr, n_q, n_k, half, rotary_dim, head_size,
                 q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cs_stride,
                 c_stride_kv, c_stride_blk, c_stride_h, c_stride_tok, q_chunks,
                 IS_NEOX: tl.constexpr, HAS_K: tl.constexpr, WRITE: tl.constexpr, HEADS_Q: tl.constexpr,
                 HEADS_K: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, HEAD_PAD: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token t, head chunk j): chunks ``j < q_chunks`` rotate HEADS_Q query heads, the others
    HEADS_K key heads, so q and k take one launch. With WRITE, a key chunk also stores its rotated keys,
    their pass-through dims (``rotary_dim:head_size``) and the values into the paged cache
    ``[2, blocks, kv_heads, BLOCK_SIZE, head_size]`` at ``slot_mapping[t]`` (nothing for a negative slot),
    as ``write_kv_cache`` does: rope + KV write in one launch."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.arange(0, HALF)
    imask = i < half
    pos = tl.load(pos_ptr + t)
    dt = q_ptr.dtype.element_ty
    c = tl.load(cs_ptr + pos * cs_stride + i, mask=imask, other=0.0).to(dt).to(tl.float32)
    s = tl.load(cs_ptr + pos * cs_stride + half + i, mask=imask, other=0.0).to(dt).to(tl.float32)
    if IS_NEOX:
        o1 = i
        o2 = i + half
    else:
        o1 = 2 * i
        o2 = 2 * i + 1
    if j < q_chunks:  # (names differ from the key branch's: compiled Triton merges same-named values)
        q_heads = j * HEADS_Q + tl.arange(0, HEADS_Q)
        _rope_heads(q_ptr, t, q_heads, n_q, q_stride_t, q_stride_h, c, s, o1, o2, imask)
    elif HAS_K:
        heads = (j - q_chunks) * HEADS_K + tl.arange(0, HEADS_K)
        y1, y2, mask = _rope_heads(k_ptr, t, heads, n_k, k_stride_t, k_stride_h, c, s, o1, o2, imask)
        if WRITE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                cdt = cache_ptr.dtype.element_ty
                hmask = heads < n_k
                dst = (cache_ptr + (slot // BLOCK_SIZE) * c_stride_blk + heads[:, None].to(tl.int64) * c_stride_h
                       + (slot % BLOCK_SIZE) * c_stride_tok)
                tl.store(dst + o1[None, :], y1.to(cdt), mask=mask)
                tl.store(dst + o2[None, :], y2.to(cdt), mask=mask)
                if REST > 0:  # partial rotary: the key's remaining dims pass through unrotated
                    r = rotary_dim + tl.arange(0, REST)
                    rmask = hmask[:, None] & (r < head_size)[None, :]
                    kr = tl.load(k_ptr + t.to(tl.int64) * k_stride_t + heads[:, None].to(tl.int64) * k_stride_h
                                 + r[None, :], mask=rmask)
                    tl.store(dst + r[None, :], kr.to(cdt), mask=rmask)
                d = tl.arange(0, HEAD_PAD)
                vmask = hmask[:, None] & (d < head_size)[None, :]
                vv = tl.load(v_ptr + t.to(tl.int64) * v_stride_t + heads[:, None].to(tl.int64) * v_stride_h
                             + d[None, :], mask=vmask)
                tl.store(dst + c_stride_kv + d[None, :], vv.to(cdt), mask=vmask)


def _heads_per_program(n_heads: int, half_pad: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n_heads, 1)), 4096 // half_pad))


def rope(positions: torch.Tensor, q3: torch.Tensor, k3: torch.Tensor | None, cos_sin_cache: torch.Tensor,
         rotary_dim: int, is_neox: bool, value: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None,
         slot_mapping: torch.Tensor | None = None) -> None:
    """Rotate q3 ([T, heads, head_size]) and k3 ([T, kv_heads, head_size] or None), both with a unit stride on
    the last dim, in place, in one launch. With ``kv_cache`` (layout [2, blocks, kv_heads, block_size,
    head_size]) the same launch writes the rotated keys and ``value`` at ``slot_mapping`` (int64, contiguous;
    negative slots skipped)."""
    t, n_q, head_size = q3.shape
    n_k = k3.shape[1] if k3 is not None else 0
    half = rotary_dim // 2
    half_pad = triton.next_power_of_2(half)
    heads_q = _heads_per_program(n_q, half_pad)
    heads_k = _heads_per_program(n_k, half_pad)
    q_chunks = triton.cdiv(n_q, heads_q)
    k_chunks = triton.cdiv(n_k, heads_k) if k3 is not None else 0
    write = kv_cache is not None
    if not t or not (q_chunks + k_chunks):
        return
    k = k3 if k3 is not None else q3
    v = value if write else k
    cache = kv_cache if write else q3
    slots = slot_mapping if write else positions
    cst = kv_cache.stride() if write else (0, 0, 0, 0, 0)
    rest = head_size - rotary_dim
    _rope_kernel[(t, q_chunks + k_chunks)](
        positions, q3, k, v, cache, slots, cos_sin_cache, n_q, n_k, half, rotary_dim, head_size,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        cst[0], cst[1], cst[2], cst[3], q_chunks,
        IS_NEOX=is_neox, HAS_K=k3 is not None, WRITE=write, HEADS_Q=heads_q, HEADS_K=heads_k, HALF=half_pad,
        REST=triton.next_power_of_2(rest) if rest > 0 and write else 0,
        HEAD_PAD=triton.next_power_of_2(head_size), BLOCK_SIZE=kv_cache.shape[3] if write else 1, num_warps=4, PDL=PDL, launch_pdl=PDL)


# ----------------------------------------------------------------------------------------------------
# Paged KV cache: [2, num_blocks, num_kv_heads, block_size, head_size]
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, head_size, k_stride_t, k_stride_h, v_stride_t,
                     v_stride_h, c_stride_kv, c_stride_blk, c_stride_h, c_stride_tok,
                     BLOCK_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, HEAD_PAD)
        dmask = d < head_size
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        dst = cache_ptr + blk * c_stride_blk + h * c_stride_h + off * c_stride_tok + d
        k = tl.load(k_ptr + t.to(tl.int64) * k_stride_t + h * k_stride_h + d, mask=dmask)
        v = tl.load(v_ptr + t.to(tl.int64) * v_stride_t + h * v_stride_h + d, mask=dmask)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(dst + c_stride_kv, v.to(cache_ptr.dtype.element_ty), mask=dmask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    t, kv_heads, head_size = key.shape
    block_size = kv_cache.shape[3]
    if t:
        _write_kv_kernel[(t, kv_heads)](
            key, value, kv_cache, slot_mapping, head_size, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            BLOCK_SIZE=block_size, HEAD_PAD=triton.next_power_of_2(head_size), num_warps=1, PDL=PDL, launch_pdl=PDL)


# ----------------------------------------------------------------------------------------------------
# Paged attention: one kernel for decodes, prefills and chunked prefills
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks hold program ``target``: block b starts at qsl[b] // BLOCK_Q + b."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if val <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _online_softmax(s, offs_n, n_ok, q_pos, m_i, l_i, scale, soft_cap, window, USE_WINDOW: tl.constexpr,
                    USE_CAP: tl.constexpr, LIB: tl.constexpr):
    """One online-softmax step over a key tile's raw scores ``s`` [rows, keys]: scale, soft cap, the causal
    (and window) mask, the new running max and sum. Returns the probabilities (unnormalized), the factor
    that rescales the running output, the new max and the new sum."""
    s = s * scale
    if USE_CAP:
        s = soft_cap * _tanh(s / soft_cap, LIB)
    vis = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
    if USE_WINDOW:
        vis = vis & (offs_n[None, :] > q_pos[:, None] - window)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_acc_ptr, part_ml_ptr, cnt_ptr,
    scale, soft_cap, window, num_seqs, num_tokens, num_heads, head_size, num_splits,
    q_stride_t, q_stride_h, o_stride_t, o_stride_h,
    kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok, bt_stride, group,
    BLOCK_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr,
    SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
    LIB: tl.constexpr, PDL: tl.constexpr = False, DECODE: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    _pdl_enter(PDL)
    # program: (query block of one sequence, KV head, KV split). Its BLOCK_M rows are BLOCK_Q query
    # tokens x group query heads sharing this KV head (GQA packed into the M dimension of the dots).
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        # every sequence has at most one query token (max_query_len == 1, BLOCK_Q == 1): program b is
        # sequence b, no search (its log2(seqs) dependent loads were a serial prologue of every program)
        b = pid
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + b)  # with the offsets, not after them: one round trip, not two
        qb = 0
    else:
        b = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        qb = pid - (q_start // BLOCK_Q + b)
    if qb * BLOCK_Q < q_len:
        if not DECODE:
            seq_len = tl.load(seq_lens_ptr + b)
        ctx = seq_len - q_len  # position of the sequence's first query token

        offs_m = tl.arange(0, BLOCK_M)
        tok = qb * BLOCK_Q + offs_m // group  # token index within the sequence's queries
        head = kvh * group + offs_m % group
        row_ok = (offs_m < BLOCK_Q * group) & (tok < q_len)
        q_pos = ctx + tok
        offs_d = tl.arange(0, HEAD_PAD)
        d_ok = offs_d < head_size
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        first_pos = ctx + qb * BLOCK_Q
        k_hi = tl.minimum(first_pos + BLOCK_Q, seq_len)  # keys [k_lo, k_hi) can be visible to this block
        k_lo = 0
        if USE_WINDOW:
            k_lo = tl.maximum(first_pos - window + 1, 0)
        tile_lo = k_lo // TILE_N
        tile_hi = tl.cdiv(k_hi, TILE_N)
        active = num_splits
        if SPLIT:
            # a graph's split count is planned for the longest context; a shorter one leaves the last
            # splits empty (no keys: they store m = -inf, l = 0), and the merge reads only the active ones
            per = tl.maximum(tl.cdiv(tile_hi - tile_lo, num_splits), 1)
            active = tl.cdiv(tile_hi - tile_lo, per)
            t0 = tile_lo + split * per
            t1 = tl.minimum(t0 + per, tile_hi)
        else:
            t0 = tile_lo
            t1 = tile_hi

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        kv_base = kv_ptr + kvh.to(tl.int64) * kv_stride_h
        bt_row = bt_ptr + b.to(tl.int64) * bt_stride
        if PREFETCH:
            # Software pipeline by hand (decode: each program is a chain of dependent loads, so its time is
            # their latency, not their bytes): while tile t is attended, tile t + 1's keys and values are
            # in flight (through block numbers loaded one iteration earlier) and tile t + 2's block
            # numbers too, so a tile costs at most one memory round trip instead of three (block table,
            # keys, then values after the softmax). Tiles past the split's last are fully masked (no access).
            offs_t = tl.arange(0, TILE_N)
            hi = tl.minimum(k_hi, t1 * TILE_N)  # this split's keys end here
            offs_n = t0 * TILE_N + offs_t
            n_ok = offs_n < hi
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            kv_off = blk * kv_stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * kv_stride_tok
            k = tl.load(kv_base + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(kv_base + kv_stride_kv + kv_off[:, None] + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            nx = offs_n + TILE_N
            nx_ok = nx < hi
            blk_x = tl.load(bt_row + nx // BLOCK_SIZE, mask=nx_ok, other=0).to(tl.int64)
            for t in range(t0, t1):
                offs_n = t * TILE_N + offs_t
                n_ok = offs_n < k_hi
                nx = offs_n + TILE_N
                nx_ok = nx < hi
                off_x = blk_x * kv_stride_blk + (nx % BLOCK_SIZE).to(tl.int64) * kv_stride_tok
                k_x = tl.load(kv_base + off_x[None, :] + offs_d[:, None], mask=nx_ok[None, :] & d_ok[:, None],
                              other=0.0)
                v_x = tl.load(kv_base + kv_stride_kv + off_x[:, None] + offs_d[None, :],
                              mask=nx_ok[:, None] & d_ok[None, :], other=0.0)
                ny = nx + TILE_N
                ny_ok = ny < hi
                blk_x = tl.load(bt_row + ny // BLOCK_SIZE, mask=ny_ok, other=0).to(tl.int64)
                if IEEE:
                    s = tl.dot(q, k.to(q.dtype), input_precision="ieee")
                else:
                    s = tl.dot(q, k.to(q.dtype))
                p, alpha, m_new, l_i = _online_softmax(s, offs_n, n_ok, q_pos, m_i, l_i, scale, soft_cap, window,
                                                       USE_WINDOW, USE_CAP, LIB)
                if IEEE:
                    pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
                acc = acc * alpha[:, None] + pv
                m_i = m_new
                k = k_x
                v = v_x
        else:
            for t in range(t0, t1):
                offs_n = t * TILE_N + tl.arange(0, TILE_N)
                n_ok = offs_n < k_hi
                blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
                kv_off = blk * kv_stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * kv_stride_tok
                k = tl.load(kv_base + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                k = k.to(q.dtype)
                if IEEE:
                    s = tl.dot(q, k, input_precision="ieee")
                else:
                    s = tl.dot(q, k)
                p, alpha, m_new, l_i = _online_softmax(s, offs_n, n_ok, q_pos, m_i, l_i, scale, soft_cap, window,
                                                       USE_WINDOW, USE_CAP, LIB)
                v = tl.load(kv_base + kv_stride_kv + kv_off[:, None] + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
                if IEEE:
                    pv = tl.dot(p.to(q.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(q.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        if SPLIT:
            # partial results [split, token, head]: unnormalized acc, running max and sum
            idx = (split * num_tokens + q_rows) * num_heads + head
            tl.store(part_acc_ptr + idx[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + 2 * idx, m_i, mask=row_ok)
            tl.store(part_ml_ptr + 2 * idx + 1, l_i, mask=row_ok)
            if FUSED_MERGE:
                # the last split of this (query block, KV head) to arrive merges all splits' partials
                tl.debug_barrier()  # every thread's partial stores precede the release below
                slot = cnt_ptr + pid * tl.num_programs(1) + kvh
                arrived = tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu")
                if arrived == num_splits - 1:
                    _merge_rows(part_acc_ptr, part_ml_ptr, out_ptr, q_rows, head, row_ok, offs_d, d_ok, num_tokens,
                                num_heads, active, o_stride_t, o_stride_h, NUM_SPLITS, BLOCK_M, HEAD_PAD)
                    tl.atomic_xchg(slot, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + q_rows[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_rows(part_acc_ptr, part_ml_ptr, out_ptr, q_rows, head, row_ok, offs_d, d_ok, num_tokens, num_heads,
                num_splits, o_stride_t, o_stride_h, NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_PAD: tl.constexpr):
    """Merge the first ``num_splits`` partials of BLOCK_M (token, head) rows, in split order. Unrolled over
    NUM_SPLITS (num_splits rounded up to a power of two: few compiled variants; the extra splits are masked
    and add exactly nothing), so every split's loads are in flight at once (a runtime loop waited for each
    in turn: slower than a second kernel). Loads bypass L1 (.cg): other programs of this launch wrote them."""
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    for sp in tl.static_range(NUM_SPLITS):
        ok = row_ok & (tl.full([BLOCK_M], sp, tl.int32) < num_splits)
        idx = (sp * num_tokens + q_rows) * num_heads + head
        m = tl.load(part_ml_ptr + 2 * idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_ml_ptr + 2 * idx + 1, mask=ok, other=0.0, cache_modifier=".cg")
        a = tl.load(part_acc_ptr + idx[:, None] * HEAD_PAD + offs_d[None, :], mask=ok[:, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m_max, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_max - m_safe)  # 0 while m_max is -inf
        w = tl.exp(m - m_safe)  # 0 for an empty split (m = -inf)
        denom = denom * alpha + w * l
        acc = acc * alpha[:, None] + a * w[:, None]
        m_max = m_new
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(out_ptr + q_rows[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_tokens, num_heads, head_size, num_splits,
                         o_stride_t, o_stride_h, SPLITS: tl.constexpr, HEAD_PAD: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    s_ok = sp < num_splits
    idx = (sp * num_tokens + t) * num_heads + h
    m = tl.load(part_ml_ptr + 2 * idx, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + 2 * idx + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    denom = tl.sum(w * l, 0)
    d = tl.arange(0, HEAD_PAD)
    acc = tl.load(part_acc_ptr + idx[:, None] * HEAD_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / denom
    tl.store(out_ptr + t * o_stride_t + h * o_stride_h + d, out.to(out_ptr.dtype.element_ty), mask=d < head_size)


def paged_attention(query, kv_cache, block_table, seq_lens, query_start_loc, scale, sliding_window,
                    logits_soft_cap, plan) -> torch.Tensor:
    """``plan`` comes from ``accel_backend_cuda.attention_plan`` (block shapes, grid, splits)."""
    num_tokens, num_heads, head_size = query.shape
    kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    head_pad = plan.head_pad
    split = plan.num_splits > 1
    if split:
        part_acc = torch.empty((plan.num_splits, num_tokens, num_heads, head_pad), dtype=torch.float32,
                               device=query.device)
        part_ml = torch.empty((plan.num_splits, num_tokens, num_heads, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out
    grid = (plan.num_q_programs, kv_heads, plan.num_splits)
    cnt = counters(query.device, plan.num_q_programs * kv_heads) if split and FUSED_MERGE else None
    _paged_attention_kernel[grid](
        query, kv_cache, block_table, seq_lens, query_start_loc, out, part_acc, part_ml,
        cnt if cnt is not None else seq_lens,
        float(scale), float(logits_soft_cap or 0.0), int(sliding_window or 0), seq_lens.shape[0], num_tokens,
        num_heads, head_size, plan.num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_table.stride(0),
        num_heads // kv_heads, BLOCK_SIZE=block_size, HEAD_PAD=head_pad, BLOCK_M=plan.block_m,
        BLOCK_Q=plan.block_q, TILE_N=plan.tile_n, USE_WINDOW=bool(sliding_window),
        USE_CAP=bool(logits_soft_cap), SPLIT=split, FUSED_MERGE=cnt is not None,
        NUM_SPLITS=triton.next_power_of_2(plan.num_splits) if cnt is not None else 1, IEEE=_tl_dtype_ieee(query.dtype),
        LIB=LIBDEVICE, num_warps=plan.num_warps, num_stages=plan.num_stages, PDL=PDL, launch_pdl=PDL,
        DECODE=plan.decode, PREFETCH=plan.prefetch)
    if split and cnt is None:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, num_tokens, num_heads, head_size, plan.num_splits, out.stride(0),
            out.stride(1), SPLITS=triton.next_power_of_2(plan.num_splits), HEAD_PAD=head_pad, num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# Fused experts: grouped GEMM over the (token, choice) pairs sorted by expert
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _moe_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, num_experts, logits_stride, scaling,
                     TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, SOFTMAX: tl.constexpr,
                     HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr = False):
    """One token per program: scores (softmax or sigmoid, float32), top-k by score (+ correction bias) with
    ties to the lower expert id, weights of the chosen experts (renormalized, scaled)."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < num_experts
    x = tl.load(logits_ptr + t * logits_stride + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        e = tl.where(ok, tl.exp(x - tl.max(x, 0)), 0.0)
        scores = e / tl.sum(e, 0)
    else:
        scores = tl.where(ok, tl.sigmoid(x), 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))
    koffs = tl.arange(0, BLOCK_K)
    wts = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, 0)
        idx = tl.min(tl.where(choice == best, offs, BLOCK_E), 0)  # the lowest id among ties
        w = tl.sum(tl.where(offs == idx, scores, 0.0), 0)
        wts = tl.where(koffs == j, w, wts)
        ids = tl.where(koffs == j, idx, ids)
        choice = tl.where(offs == idx, float("-inf"), choice)
    if RENORM:
        wts = wts / tl.sum(wts, 0)
    wts = wts * scaling
    kok = koffs < TOP_K
    tl.store(w_ptr + t * TOP_K + koffs, wts, mask=kok)
    tl.store(ids_ptr + t * TOP_K + koffs, ids, mask=kok)


def moe_topk(router_logits: torch.Tensor, top_k: int, softmax: bool, renormalize: bool,
             bias: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ungrouped routing in one launch; ``router_logits`` [T, E] with a unit last stride."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _moe_topk_kernel[(num_tokens,)](
            router_logits, bias if bias is not None else router_logits, weights, ids, num_experts,
            router_logits.stride(0), float(scaling), TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_E=triton.next_power_of_2(num_experts), SOFTMAX=softmax, HAS_BIAS=bias is not None,
            RENORM=renormalize, num_warps=1 if num_experts <= 256 else 4, PDL=PDL, launch_pdl=PDL)
    return weights, ids


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, sorted_pair_ptr, block_expert_ptr, act_ptr, num_pairs, hidden, inter,
                        x_stride, w_stride_e, w_stride_n, w_stride_k, TOPK: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr, LIB: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + offs_m)
        m_ok = pair < num_pairs
        tok = (pair // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * x_stride + offs_k[None, :]
        w_base = w_ptr + e * w_stride_e
        g_ptrs = w_base + offs_n[None, :].to(tl.int64) * w_stride_n + offs_k[:, None] * w_stride_k
        u_ptrs = g_ptrs + inter * w_stride_n
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = (k0 + offs_k) < hidden
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * w_stride_k
            u_ptrs += BLOCK_K * w_stride_k
        dt = act_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)  # the matmul's output in the input dtype, as the reference rounds it
        u = acc_u.to(dt).to(tl.float32)
        a_out = _activation(g, ACT, False)  # MoE activations: silu or gelu (erf)
        tl.store(act_ptr + offs_m[:, None].to(tl.int64) * inter + offs_n[None, :], (a_out * u).to(dt),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(act_ptr, w_ptr, sorted_pair_ptr, block_expert_ptr, out_ptr, num_pairs, hidden,
                     inter, w_stride_e, w_stride_n, w_stride_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + offs_m)
        m_ok = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * inter + offs_k[None, :]
        b_ptrs = w_ptr + e * w_stride_e + offs_n[None, :].to(tl.int64) * w_stride_n + offs_k[:, None] * w_stride_k
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = (k0 + offs_k) < inter
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bw = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, bw, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bw, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * w_stride_k
        # y in the input dtype (the reference's matmul output); the weighted fp32 sum happens in _moe_sum_kernel
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, weights_ptr, ids_ptr, out_ptr, hidden, TOPK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[t] = sum_j w[t, j] * y[t * TOPK + j] in float32; pairs whose expert is elsewhere (id < 0) add 0."""
    _pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(weights_ptr + t * TOPK + j)
        here = tl.load(ids_ptr + t * TOPK + j) >= 0
        y = tl.load(y_ptr + (t * TOPK + j) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(here, w * y, 0.0)  # a select: an unwritten (even NaN) row of y never leaks in
    tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_experts(hidden_states, w13, w2, topk_weights, local_ids, act, align, cfg_up, cfg_down) -> torch.Tensor:
    """``local_ids``: [num_tokens, top_k] int64 local expert ids (-1: held elsewhere); ``align``:
    (sorted_pair [cap], block_expert [num_blocks]) from ``accel_backend_cuda.moe_align``."""
    num_tokens, hidden = hidden_states.shape
    top_k = local_ids.shape[1]
    num_pairs = num_tokens * top_k
    inter = w2.shape[2]
    sorted_pair, block_expert = align
    num_blocks = block_expert.shape[0]
    dt = hidden_states.dtype
    ieee = _tl_dtype_ieee(dt)
    act_buf = torch.empty((sorted_pair.shape[0], inter), dtype=dt, device=hidden_states.device)
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    y = torch.empty((num_pairs, hidden), dtype=dt, device=hidden_states.device)  # every local pair is written
    bm = cfg_up["BLOCK_M"]
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg_up["BLOCK_N"]))](
        hidden_states, w13, sorted_pair, block_expert, act_buf, num_pairs, hidden, inter, hidden_states.stride(0),
        w13.stride(0), w13.stride(1), w13.stride(2), TOPK=top_k, ACT=act, BLOCK_M=bm, BLOCK_N=cfg_up["BLOCK_N"],
        BLOCK_K=cfg_up["BLOCK_K"], IEEE=ieee, LIB=LIBDEVICE, num_warps=cfg_up["num_warps"],
        num_stages=cfg_up["num_stages"], PDL=PDL, launch_pdl=PDL)
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden, cfg_down["BLOCK_N"]))](
        act_buf, w2, sorted_pair, block_expert, y, num_pairs, hidden, inter, w2.stride(0),
        w2.stride(1), w2.stride(2), BLOCK_M=bm, BLOCK_N=cfg_down["BLOCK_N"], BLOCK_K=cfg_down["BLOCK_K"],
        IEEE=ieee, num_warps=cfg_down["num_warps"], num_stages=cfg_down["num_stages"], PDL=PDL, launch_pdl=PDL)
    out = torch.empty_like(hidden_states)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    block = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](y, weights, local_ids.reshape(-1).contiguous(), out,
                                                               hidden, TOPK=top_k, BLOCK=block, num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# Fused experts, decode (few pairs): no sort, no padding; each routed expert's weights streamed once
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _moe_slot(ids_ptr, map_ptr, slot, num_pairs, HAS_MAP: tl.constexpr, BY_EXPERT: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """The local expert program row ``slot`` works for and the pairs routed to it.

    Returns ``(e, rows, work)``: ``rows`` [BLOCK_M] marks the pairs whose local expert is ``e``. BY_EXPERT:
    slot ``e`` is local expert ``e`` (works when any pair chose it). Otherwise slot ``p`` is pair ``p`` and
    works when ``p`` is the first pair of its expert (later pairs of the same expert are its rows), so each
    routed expert's weights are read by exactly one program row, in one pass, for all its pairs."""
    offs_m = tl.arange(0, BLOCK_M)
    m_in = offs_m < num_pairs
    ids = tl.load(ids_ptr + offs_m, mask=m_in, other=0)
    if HAS_MAP:
        ids = tl.load(map_ptr + ids, mask=m_in, other=-1)
    ids = tl.where(m_in, ids, -1)
    if BY_EXPERT:
        e = slot
        rows = ids == e
        work = tl.max(rows.to(tl.int32), 0) > 0
    else:
        e = tl.load(ids_ptr + slot)
        if HAS_MAP:
            e = tl.load(map_ptr + e)
        rows = ids == e
        first = tl.min(tl.where(rows, offs_m, BLOCK_M), 0)
        work = (e >= 0) & (first == slot)
    return e, rows, work


@triton.jit
def _moe_chunk_pairs(rows, c0, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The ``c0``-th to ``c0 + BLOCK_R - 1``-th pairs (in pair order) that ``rows`` [BLOCK_M] marks, as
    ``(pairs [BLOCK_R], ok [BLOCK_R])``: a compact row tile, so a dot over an expert's pairs costs
    BLOCK_R rows however many pairs the launch routes (rank by a prefix sum, gathered by a match matrix)."""
    offs_m = tl.arange(0, BLOCK_M)
    rank = tl.cumsum(rows.to(tl.int32), 0) - 1
    j = c0 + tl.arange(0, BLOCK_R)
    match = rows[None, :] & (rank[None, :] == j[:, None])
    pairs = tl.sum(tl.where(match, offs_m[None, :], 0), 1)
    ok = tl.sum(match.to(tl.int32), 1) > 0
    return pairs, ok


@triton.jit
def _moe_decode_up_rows(x_ptr, w_ptr, act_ptr, e, pairs, ok, hidden, inter, x_stride, w_stride_e, w_stride_n,
                        TOPK: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr):
    """act[pairs, n tile] = act(x[tok] @ gate^T) * (x[tok] @ up^T) for the rows ``ok`` of ``pairs``."""
    tok = (pairs // TOPK).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tok[:, None] * x_stride
    g_rows = w_ptr + e.to(tl.int64) * w_stride_e + offs_n[:, None].to(tl.int64) * w_stride_n
    u_rows = g_rows + inter * w_stride_n
    acc_g = tl.zeros([pairs.shape[0], BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([pairs.shape[0], BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < hidden
        a = tl.load(x_rows + kk[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.load(u_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc_g = tl.dot(a, tl.trans(g), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, tl.trans(u), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, tl.trans(g), acc_g)
            acc_u = tl.dot(a, tl.trans(u), acc_u)
    dt = act_ptr.dtype.element_ty
    gv = acc_g.to(dt).to(tl.float32)  # the matmul's output in the input dtype, as the reference rounds it
    uv = acc_u.to(dt).to(tl.float32)
    av = _activation(gv, ACT, False)  # MoE activations: silu or gelu (erf)
    tl.store(act_ptr + pairs[:, None].to(tl.int64) * inter + offs_n[None, :], (av * uv).to(dt),
             mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_decode_up_kernel(x_ptr, w_ptr, ids_ptr, map_ptr, act_ptr, num_pairs, hidden, inter, x_stride,
                          w_stride_e, w_stride_n, TOPK: tl.constexpr, ACT: tl.constexpr, HAS_MAP: tl.constexpr,
                          BY_EXPERT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):
    """Program (slot, n tile): BLOCK_N gate rows and the matching BLOCK_N up rows of one routed expert
    (unit stride on k) times all its pairs' tokens; act_and_mul in registers; act [num_pairs, inter].
    BLOCK_R < BLOCK_M: the expert's pairs go through the dot BLOCK_R at a time (compact, gathered rows;
    the weight tile is re-read from L2 for each further chunk); else all BLOCK_M pairs ride in one masked tile."""
    _pdl_enter(PDL)
    e, rows, work = _moe_slot(ids_ptr, map_ptr, tl.program_id(0), num_pairs, HAS_MAP, BY_EXPERT, BLOCK_M)
    if work:
        if BLOCK_R < BLOCK_M:
            count = tl.sum(rows.to(tl.int32), 0)
            for c0 in range(0, count, BLOCK_R):
                pairs, ok = _moe_chunk_pairs(rows, c0, BLOCK_M, BLOCK_R)
                _moe_decode_up_rows(x_ptr, w_ptr, act_ptr, e, pairs, ok, hidden, inter, x_stride, w_stride_e,
                                    w_stride_n, TOPK, ACT, BLOCK_N, BLOCK_K, IEEE)
        else:
            _moe_decode_up_rows(x_ptr, w_ptr, act_ptr, e, tl.arange(0, BLOCK_M), rows, hidden, inter, x_stride,
                                w_stride_e, w_stride_n, TOPK, ACT, BLOCK_N, BLOCK_K, IEEE)


@triton.jit
def _moe_decode_down_rows(act_ptr, w_ptr, y_ptr, e, pairs, ok, hidden, inter, w_stride_e, w_stride_n,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """y[pairs, n tile] = act[pairs] @ w2[e][n tile]^T for the rows ``ok``, rounded to the input dtype."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + pairs[:, None].to(tl.int64) * inter
    w_rows = w_ptr + e.to(tl.int64) * w_stride_e + offs_n[:, None].to(tl.int64) * w_stride_n
    acc = tl.zeros([pairs.shape[0], BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < inter
        a = tl.load(a_rows + kk[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    tl.store(y_ptr + pairs[:, None].to(tl.int64) * hidden + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_decode_down_kernel(act_ptr, w_ptr, ids_ptr, map_ptr, wts_ptr, y_ptr, out_ptr, cnt_ptr, num_pairs,
                            num_tokens, slots, hidden, inter, w_stride_e, w_stride_n, TOPK: tl.constexpr,
                            HAS_MAP: tl.constexpr, BY_EXPERT: tl.constexpr, REDUCE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
                            PDL: tl.constexpr = False):
    """Program (slot, n tile): y[pair, n tile] = act[pair] @ w2[e][n tile]^T for the pairs of one routed
    expert (BLOCK_R at a time as in the up kernel), rounded to the input dtype (the reference's matmul
    output). With REDUCE, the last of the ``slots`` programs of an n tile to arrive (a counter per n tile)
    sums every token's top_k rows of y in choice order, weighted, in float32, and stores out (pairs held
    elsewhere add exactly 0)."""
    _pdl_enter(PDL)
    pid_n = tl.program_id(1)
    e, rows, work = _moe_slot(ids_ptr, map_ptr, tl.program_id(0), num_pairs, HAS_MAP, BY_EXPERT, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    if work:
        if BLOCK_R < BLOCK_M:
            count = tl.sum(rows.to(tl.int32), 0)
            for c0 in range(0, count, BLOCK_R):
                pairs, ok = _moe_chunk_pairs(rows, c0, BLOCK_M, BLOCK_R)
                _moe_decode_down_rows(act_ptr, w_ptr, y_ptr, e, pairs, ok, hidden, inter, w_stride_e, w_stride_n,
                                      BLOCK_N, BLOCK_K, IEEE)
        else:
            _moe_decode_down_rows(act_ptr, w_ptr, y_ptr, e, tl.arange(0, BLOCK_M), rows, hidden, inter, w_stride_e,
                                  w_stride_n, BLOCK_N, BLOCK_K, IEEE)
    if REDUCE:
        tl.debug_barrier()  # every thread's y stores precede the release below
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == slots - 1:
            offs_t = tl.arange(0, BLOCK_T)
            t_ok = offs_t < num_tokens
            tot = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(TOPK):
                pair = offs_t * TOPK + j
                idj = tl.load(ids_ptr + pair, mask=t_ok, other=0)
                if HAS_MAP:
                    idj = tl.load(map_ptr + idj, mask=t_ok, other=-1)
                here = t_ok & (idj >= 0)
                wj = tl.load(wts_ptr + pair, mask=here, other=0.0).to(tl.float32)
                yj = tl.load(y_ptr + pair[:, None].to(tl.int64) * hidden + offs_n[None, :],
                             mask=here[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
                tot += tl.where(here[:, None], wj[:, None] * yj, 0.0)
            tl.store(out_ptr + offs_t[:, None].to(tl.int64) * hidden + offs_n[None, :],
                     tot.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


def fused_experts_decode(hidden_states, w13, w2, topk_weights, topk_ids, expert_map, act, plan) -> torch.Tensor:
    """Few (token, choice) pairs: two launches, no sort. ``topk_ids`` [num_tokens, top_k] int32 (global ids,
    contiguous), ``expert_map`` int32 or None, ``topk_weights`` contiguous; w13/w2 with unit stride on their
    last dim; ``plan`` from ``accel_backend_cuda.moe_decode_plan``."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    inter = w2.shape[2]
    dev = hidden_states.device
    dt = hidden_states.dtype
    out = torch.empty_like(hidden_states)
    if num_pairs == 0:
        return out
    ieee = _tl_dtype_ieee(dt)
    has_map = expert_map is not None
    emap = expert_map if has_map else topk_ids
    slots = plan["slots"]
    up, down = plan["up"], plan["down"]
    act_buf = torch.empty((num_pairs, inter), dtype=dt, device=dev)
    y = torch.empty((num_pairs, hidden), dtype=dt, device=dev)
    _moe_decode_up_kernel[(slots, triton.cdiv(inter, up["BLOCK_N"]))](
        hidden_states, w13, topk_ids, emap, act_buf, num_pairs, hidden, inter, hidden_states.stride(0),
        w13.stride(0), w13.stride(1), TOPK=top_k, ACT=act, HAS_MAP=has_map, BY_EXPERT=plan["BY_EXPERT"],
        BLOCK_M=plan["BLOCK_M"], BLOCK_R=plan["BLOCK_R"], BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"], IEEE=ieee,
        num_warps=up["num_warps"], num_stages=up["num_stages"], PDL=PDL, launch_pdl=PDL)
    n_tiles = triton.cdiv(hidden, down["BLOCK_N"])
    cnt = counters(dev, n_tiles)
    _moe_decode_down_kernel[(slots, n_tiles)](
        act_buf, w2, topk_ids, emap, topk_weights, y, out, cnt if cnt is not None else out, num_pairs, num_tokens,
        slots, hidden, inter, w2.stride(0), w2.stride(1), TOPK=top_k, HAS_MAP=has_map,
        BY_EXPERT=plan["BY_EXPERT"], REDUCE=cnt is not None, BLOCK_M=plan["BLOCK_M"], BLOCK_R=plan["BLOCK_R"],
        BLOCK_N=down["BLOCK_N"],
        BLOCK_K=down["BLOCK_K"], BLOCK_T=triton.next_power_of_2(num_tokens), IEEE=ieee,
        num_warps=down["num_warps"], num_stages=down["num_stages"], PDL=PDL, launch_pdl=PDL)
    if cnt is None:  # no counter buffer (first call inside a graph capture): a second kernel sums
        ids = topk_ids.reshape(-1).to(torch.int64)
        if has_map:
            ids = expert_map.to(torch.int64)[ids]
        block = min(1024, triton.next_power_of_2(hidden))
        _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](
            y, topk_weights.reshape(-1).to(torch.float32), ids, out, hidden, TOPK=top_k, BLOCK=block, num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# W8A8: dynamic per-token int8 quantization
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _int8_quant_kernel(x_ptr, q_ptr, s_ptr, k, x_stride, BLOCK: tl.constexpr, LIB: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < k
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
    q = _rint(x * inv, LIB)
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(q_ptr + row * k + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, tl.math.div_rn(amax, 127.0))


def dynamic_int8_quant(x2: torch.Tensor):
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m and k:
        block = triton.next_power_of_2(k)
        _int8_quant_kernel[(m,)](x2, q, s, k, x2.stride(0), BLOCK=block, LIB=LIBDEVICE,
                                 num_warps=4 if block <= 4096 else 8, PDL=PDL, launch_pdl=PDL)
    elif m:
        s.zero_()
    return q, s


# ----------------------------------------------------------------------------------------------------
# Small-M dense linear (decode): y = x @ w.T + b, the weight streamed once by every SM
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _linear_small_m_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, x_stride,
                           w_stride, o_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                           ACT: tl.constexpr = -1, LIB: tl.constexpr = False, PDL: tl.constexpr = False):
    """Program (n tile, k split): BLOCK_N weight rows over one K range of ``k_per_split`` (a multiple of
    BLOCK_K), all M (<= BLOCK_M) rows of x. With SPLIT, fp32 partials go to ``ws`` [splits, M, N] and the
    last split of an n tile to arrive (a counter per n tile; REDUCE) sums them in split order, adds the bias
    and stores (without REDUCE, _split_sum_kernel does that); otherwise the program stores directly.
    Accumulation in float32, one rounding at the end.

    ACT >= 0 (act_and_mul_linear): x is ``[M, 2 K]`` = ``[gate | up]`` and the product's input column k is
    ``act(gate[k]) * up[k]`` (ACT as in :func:`_activation`), computed in float32 at the x load and rounded
    to x's dtype (the unfused path stores act_and_mul's output in that dtype before the GEMM reads it), so
    no intermediate is written."""
    _pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * x_stride
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_hi
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if ACT >= 0:  # x holds the gates; the ups sit K columns further
            u = tl.load(x_rows + K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = (_activation(x.to(tl.float32), ACT, LIB) * u.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if USE_DOT:
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    out_mask = m_ok[:, None] & n_ok[None, :]
    mn = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + mn, acc, mask=out_mask)
        if REDUCE:
            tl.debug_barrier()  # every thread's partial stores precede the release below
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        else:
            arrived = 0
        if REDUCE and arrived == NUM_SPLITS - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sp in tl.static_range(NUM_SPLITS):  # unrolled: every split's partial loads in flight at once
                acc += tl.load(ws_ptr + sp * M * N + mn, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None].to(tl.int64) * o_stride + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * o_stride + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_sum_kernel(ws_ptr, b_ptr, out_ptr, M, N, splits, o_stride, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Fallback reduction of the split partials (when no counter buffer is available)."""
    _pdl_enter(PDL)
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in range(0, splits):
        acc += tl.load(ws_ptr + (sp * M + m) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * o_stride + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def linear_small_m(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   cfg: dict[str, int], act: int = -1) -> torch.Tensor:
    """x2 [M, K] and weight [N, K], both with a unit stride on K; ``cfg`` from accel_backend_cuda.linear_plan
    (BLOCK_M >= M, BLOCK_N, BLOCK_K, SPLIT_K, USE_DOT, num_warps, num_stages). ``act`` >= 0: x2 is
    [M, 2 K] = [gate | up] and the product reads ``act(gate) * up`` (0 silu, 1 gelu, 2 gelu tanh)."""
    m = x2.shape[0]
    n, k = weight.shape
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    bk = cfg["BLOCK_K"]
    splits = max(1, min(cfg["SPLIT_K"], triton.cdiv(k, bk)))
    k_per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    split = splits > 1
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if split else out
    cnt = counters(x2.device, n_tiles) if split else None
    _linear_small_m_kernel[(n_tiles, splits)](
        x2, weight, bias if bias is not None else out, out, ws, cnt if cnt is not None else out, m, n, k, k_per,
        x2.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, SPLIT=split,
        REDUCE=cnt is not None, NUM_SPLITS=splits if cnt is not None else 1, USE_DOT=bool(cfg["USE_DOT"]),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, IEEE=_tl_dtype_ieee(x2.dtype), ACT=act,
        LIB=LIBDEVICE, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], PDL=PDL, launch_pdl=PDL)
    if split and cnt is None:  # partials written, not reduced (no counter buffer): a second kernel sums them
        block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, block))](ws, bias if bias is not None else out, out, m, n, splits,
                                                      out.stride(0), HAS_BIAS=bias is not None, BLOCK=block,
                                                      num_warps=4, PDL=PDL, launch_pdl=PDL)
    return out


# ----------------------------------------------------------------------------------------------------
# Persistent decode of one dense pre-norm decoder layer (Llama family), one launch, one token
# ----------------------------------------------------------------------------------------------------

#: phases of _decoder_layer_kernel: 0 add + norm + qkv, 1 rotary + KV write + attention, 2 o_proj,
#: 3 add + norm + gate_up + silu * up, 4 down_proj
DECODER_PHASES = 5
#: slots per program of the benchmark timeline (CONFIG["decoder_layer"]["trace"]): 0 entry, 1 after the PDL
#: wait, 2 qkv stored, 3 after barrier 0, 4 attention done, 5 after barrier 1, 6 o_proj stored, 7 after
#: barrier 2, 8 gate_up stored, 9 after barrier 3, 10 down stored (the end), 11 attention's partials
#: stored and counted (a program with a split item), 12 attention merged (the last split of a KV head)
TRACE_POINTS = 16
_TRACE_POINTS = tl.constexpr(TRACE_POINTS)
#: polls of the grid barrier's generation word before a program gives up and flags an error (bar[2]);
#: far beyond any real wait (a phase takes microseconds), it turns a deadlock into wrong numbers + a flag
SPIN_LIMIT = 1 << 20
_BARRIERS: dict[tuple[torch.device, int], torch.Tensor] = {}


#: int64 words after the barrier's four: the persistent layer's per-KV-group ready flags (FLAGS; at most 63
#: groups, one bit each of an int64 mask)
MAX_READY_FLAGS = 64
_MAX_FLAGS = tl.constexpr(MAX_READY_FLAGS)


def barrier_state(device: torch.device, nprog: int) -> torch.Tensor | None:
    """Grid-barrier words of launches of ``nprog`` programs on ``device``, int64 ``[4]``, allocated once and
    outside any graph capture (None inside one before they exist). As int32 (``.view(torch.int32)``) words
    0-2 are the generation barrier's ``[arrived, generation, error]``; int64 word 2 is the counting
    barrier's arrival count (it only grows, by ``nprog`` per barrier: one buffer per grid size) and word 3
    its error flag. A program that waited :data:`SPIN_LIMIT` polls sets its error word. Words 4.. are the
    ready flags of :func:`_o_proj_by_group` (:data:`MAX_READY_FLAGS`)."""
    key = (device, nprog)
    buf = _BARRIERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(4 + MAX_READY_FLAGS, dtype=torch.int64, device=device)
        _BARRIERS[key] = buf
    return buf


@triton.jit
def _grid_sync(bar_ptr, nprog, SPIN_LIMIT: tl.constexpr):
    """Grid-wide barrier of a persistent launch (every program resident: the grid is at most one program
    per SM). Sense by generation: read the generation, arrive; the last to arrive zeroes the count and
    bumps the generation (release); the others poll it (volatile loads), then acquire. Stores of every
    thread before the call are visible to every program after it (the CTA barrier orders them before
    the acq_rel arrival, as in the split-K merge)."""
    tl.debug_barrier()
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
    else:
        cur = tl.load(bar_ptr + 1, volatile=True)
        spins = 0
        while (cur == gen) & (spins < SPIN_LIMIT):
            cur = tl.load(bar_ptr + 1, volatile=True)
            spins += 1
        if spins >= SPIN_LIMIT:
            tl.atomic_xchg(bar_ptr + 2, 1, sem="relaxed", scope="gpu")
        tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _count_arrive(cnt_ptr, nprog):
    """Arrival at the counting grid barrier: one acq_rel add on an int64 count that only grows (so no reset
    and no generation word); returns the count that ends this program's round (the next multiple of
    ``nprog`` above its own arrival). The release is a ``MEMBAR.GPU`` in the arriving thread, which also
    waits for that thread's outstanding *loads*: loads meant to overlap the wait go after this call."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    return (arrived // nprog + 1) * nprog


@triton.jit
def _count_wait(cnt_ptr, target, SPIN_LIMIT: tl.constexpr):
    """Volatile polls of the count until it reaches ``target`` (from :func:`_count_arrive`); after
    SPIN_LIMIT polls the error word (``cnt_ptr + 1``) is set. What programs read of each other's output
    afterwards they read with ``.cg`` loads (L2, where the releases made it visible; the arrival's acquire
    invalidated L1)."""
    cur = tl.load(cnt_ptr, volatile=True)
    spins = 0
    while (cur < target) & (spins < SPIN_LIMIT):
        cur = tl.load(cnt_ptr, volatile=True)
        spins += 1
    if spins >= SPIN_LIMIT:
        tl.atomic_xchg(cnt_ptr + 1, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _grid_sync_count(cnt_ptr, nprog, SPIN_LIMIT: tl.constexpr):
    """Counting grid barrier: :func:`_count_arrive` then :func:`_count_wait`. One atomic per program
    instead of the generation barrier's three."""
    _count_wait(cnt_ptr, _count_arrive(cnt_ptr, nprog), SPIN_LIMIT)


@triton.jit
def _phase_arrive(bar_ptr, nprog, BARRIER: tl.constexpr, SPLIT: tl.constexpr):
    """First half of the barrier between two phases (see :func:`_phase_wait`): with SPLIT and the counting
    barrier, the arrival; otherwise nothing (0)."""
    if SPLIT and BARRIER == 1:
        return _count_arrive(bar_ptr + 2, nprog)
    else:
        return tl.zeros([], dtype=tl.int64)


@triton.jit
def _phase_wait(bar_ptr, nprog, target, SPIN_LIMIT: tl.constexpr, BARRIER: tl.constexpr, SYNC_TWICE: tl.constexpr,
                SPLIT: tl.constexpr):
    """The barrier between two phases, or with SPLIT its second half: BARRIER 0 the generation barrier on
    the int32 words (never split), 1 the counting barrier on int64 word 2. A program issues its first
    weight loads of the next phase between :func:`_phase_arrive` and this call, so that they overlap the
    wait without holding back the arrival (the release waits for them otherwise). SYNC_TWICE (benchmark
    only) waits twice, to time one barrier."""
    if BARRIER == 0:
        _grid_sync(bar_ptr.to(tl.pointer_type(tl.int32), bitcast=True), nprog, SPIN_LIMIT)
        if SYNC_TWICE:
            _grid_sync(bar_ptr.to(tl.pointer_type(tl.int32), bitcast=True), nprog, SPIN_LIMIT)
    else:
        if SPLIT:
            _count_wait(bar_ptr + 2, target, SPIN_LIMIT)
        else:
            _grid_sync_count(bar_ptr + 2, nprog, SPIN_LIMIT)
        if SYNC_TWICE:
            _grid_sync_count(bar_ptr + 2, nprog, SPIN_LIMIT)


@triton.jit
def _phase_sync(bar_ptr, nprog, SPIN_LIMIT: tl.constexpr, BARRIER: tl.constexpr, SYNC_TWICE: tl.constexpr,
                SPLIT: tl.constexpr):
    """The whole barrier between two phases (nothing to issue in between)."""
    _phase_wait(bar_ptr, nprog, _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT), SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)


@triton.jit
def _stamp(trace_ptr, pid, POINT: tl.constexpr, TRACE: tl.constexpr):
    """Benchmark timeline (TRACE only): the global nanosecond timer when program ``pid`` reaches POINT,
    stored at ``trace[pid, POINT]`` (an int64 ``[programs, TRACE_POINTS]`` buffer). Read after the CTA
    barrier the phases already end with, so it is when the slowest warp got there."""
    if TRACE:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(trace_ptr + pid * _TRACE_POINTS + POINT, t)


@triton.jit
def _weight_rows(w_ptr, unit, N, K, TN: tl.constexpr, K_PAD: tl.constexpr, R3: tl.constexpr = False):
    """Rows ``unit * TN ..`` of a contiguous ``[N, K]`` weight, whole (``[TN, K_PAD]``, zeros outside);
    streamed once, so evicted first from L2. R3: as ``[TN, K_PAD // 256, 256]`` (row, chunk, element),
    which Triton lays out with one warp per row (see :func:`_row_sums`)."""
    if R3:
        rows = unit * TN + tl.arange(0, TN)[:, None, None]
        k = tl.arange(0, K_PAD // 256)[None, :, None] * 256 + tl.arange(0, 256)[None, None, :]
        return tl.load(w_ptr + rows.to(tl.int64) * K + k, mask=(rows < N) & (k < K), other=0.0,
                       eviction_policy="evict_first")
    else:
        rows = unit * TN + tl.arange(0, TN)
        k = tl.arange(0, K_PAD)
        return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=(rows < N)[:, None] & (k < K)[None, :],
                       other=0.0, eviction_policy="evict_first")


@triton.jit
def _x_rows(x_ptr, K, TN: tl.constexpr, K_PAD: tl.constexpr, R3: tl.constexpr):
    """The vector ``x`` (``[K]`` at ``x_ptr``, written by another program or before a CTA barrier: read
    through L2) as float32, shaped to multiply :func:`_weight_rows` tiles: ``[K_PAD]``, or with R3 a
    ``[TN, K_PAD // 256, 256]`` copy per row, loaded in that shape so that it gets the tile's layout (a
    broadcast would convert the tile's layout through shared memory instead)."""
    if R3:
        rows = tl.arange(0, TN)[:, None, None]
        k = tl.arange(0, K_PAD // 256)[None, :, None] * 256 + tl.arange(0, 256)[None, None, :]
        return tl.load(x_ptr + k + rows * 0, mask=(k < K) & (rows < TN), other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        k = tl.arange(0, K_PAD)
        return tl.load(x_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _row_sums(w, x, R3: tl.constexpr):
    """``w @ x`` of a weight tile and :func:`_x_rows` (float32 ``[TN]``). The 2-D tile has its warps along
    K, so each row ends in a warp shuffle tree *and* a cross-warp sum through shared memory; the R3 tile
    has a warp per row: in-thread sums over the chunks, then one shuffle tree."""
    if R3:
        return tl.sum(tl.sum(w.to(tl.float32) * x, axis=1), axis=1)
    else:
        return tl.sum(w.to(tl.float32) * x[None, :], axis=1)


@triton.jit
def _residual_row(hid_ptr, res_ptr, k, k_ok, HAS_RES: tl.constexpr):
    """``hidden + residual`` rounded to the dtype (fused_add_rms_norm's residual output), as float32."""
    x = tl.load(hid_ptr + k, mask=k_ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + k, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(hid_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _post_attention_residual(hid_ptr, res_ptr, o_ptr, res_out_ptr, pid, k, k_ok, HAS_RES: tl.constexpr):
    """``r2 = (hid + res) + o`` (each sum rounded to the dtype, as the two fused_add_rms_norm calls store
    it), recomputed by every program from the inputs and o_proj's output; program 0 stores it as the
    layer's residual output. Float32 of the rounded values."""
    dt = hid_ptr.dtype.element_ty
    r = _residual_row(hid_ptr, res_ptr, k, k_ok, HAS_RES)
    o = tl.load(o_ptr + k, mask=k_ok, other=0.0, cache_modifier=".cg")
    r2 = (r + o.to(tl.float32)).to(dt).to(tl.float32)
    if pid == 0:
        tl.store(res_out_ptr + k, r2.to(dt), mask=k_ok)
    return r2


@triton.jit
def _rms_normed(r, w_ptr, k, k_ok, H, eps, dt: tl.constexpr):
    """rms_norm of the float32 row ``r`` with the rounding of _rms_norm_kernel (float32 of the result)."""
    rstd = tl.rsqrt(tl.sum(r * r, axis=0) / H + eps)
    w = tl.load(w_ptr + k, mask=k_ok, other=0.0).to(dt).to(tl.float32)
    return ((r * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)


@triton.jit
def _weight_ring(w_ptr, pid, nprog, N, K, TN: tl.constexpr, K_PAD: tl.constexpr, DEPTH: tl.constexpr,
                 R3: tl.constexpr = False):
    """This program's first DEPTH (1-3) row tiles ``pid, pid + nprog, ..`` of ``[N, K]``, requested before
    a wait; slots past DEPTH repeat the first (no registers, unused)."""
    w0 = _weight_rows(w_ptr, pid, N, K, TN, K_PAD, R3)
    w1 = w0
    w2 = w0
    if DEPTH >= 2:
        w1 = _weight_rows(w_ptr, pid + nprog, N, K, TN, K_PAD, R3)
    if DEPTH >= 3:
        w2 = _weight_rows(w_ptr, pid + 2 * nprog, N, K, TN, K_PAD, R3)
    return w0, w1, w2


@triton.jit
def _gemv_rows(w0, w1, w2, w_ptr, x, out_ptr, pid, nprog, N, K, TN: tl.constexpr, K_PAD: tl.constexpr,
               DEPTH: tl.constexpr = 1, R3: tl.constexpr = False):
    """``out[n] = x . w[n]`` for this program's row tiles ``pid, pid + nprog, ..`` of ``[N, K]``; ``w0``..
    hold the first DEPTH tiles already (:func:`_weight_ring`, loaded before the wait that precedes this
    phase). DEPTH tiles are in flight while one is reduced."""
    for u in range(pid, tl.cdiv(N, TN), nprog):
        wn = _weight_rows(w_ptr, u + DEPTH * nprog, N, K, TN, K_PAD, R3)
        acc = _row_sums(w0, x, R3)
        rows = u * TN + tl.arange(0, TN)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)
        if DEPTH == 1:
            w0 = wn
        elif DEPTH == 2:
            w0 = w1
            w1 = wn
        else:
            w0 = w1
            w1 = w2
            w2 = wn


@triton.jit
def _stream_rows(x_ptr, w_ptr, out_ptr, pid, nprog, N, K, GATE_OFF, TN: tl.constexpr, BK: tl.constexpr,
                 STAGES: tl.constexpr, GATED: tl.constexpr, LIB: tl.constexpr):
    """One-row ``out[n] = x . w[n]`` over this program's row tiles ``pid, pid + nprog, ..`` of TN rows, as
    one flattened loop over (tile, k chunk) with float32 FMA accumulators ``[TN, BK]`` (no dot, so no
    padded rows): Triton's pipeliner may stage the ``[TN, BK]`` weight chunks in shared memory, STAGES
    deep, which registers alone cannot hold. GATED: ``w`` rows ``n`` and ``n + GATE_OFF`` are gate and up, and the
    output is ``silu(gate) * up`` (each rounded to the dtype first, as silu_and_mul reads them)."""
    dt = out_ptr.dtype.element_ty
    n_tiles = tl.cdiv(N, TN)
    k_tiles = tl.cdiv(K, BK)
    mine = tl.cdiv(tl.maximum(n_tiles - pid, 0), nprog)
    acc = tl.zeros([TN, BK], dtype=tl.float32)
    acc_u = tl.zeros([TN, BK], dtype=tl.float32)
    for it in tl.range(0, mine * k_tiles, num_stages=STAGES):
        t = pid + (it // k_tiles) * nprog
        ki = it % k_tiles
        rows = t * TN + tl.arange(0, TN)
        r_ok = rows < N
        offs_k = ki * BK + tl.arange(0, BK)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        wp = w_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
        w = tl.load(wp, mask=r_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            wu = tl.load(wp + GATE_OFF * K, mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                         eviction_policy="evict_first")
            acc_u += wu.to(tl.float32) * x[None, :]
        if ki == k_tiles - 1:
            y = tl.sum(acc, axis=1)
            if GATED:
                y = _activation(y.to(dt).to(tl.float32), 0, LIB) * tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
                acc_u = tl.zeros([TN, BK], dtype=tl.float32)
            tl.store(out_ptr + rows, y.to(dt), mask=r_ok)
            acc = tl.zeros([TN, BK], dtype=tl.float32)


@triton.jit
def _rope_pair(x1, x2, c, s, dt: tl.constexpr):
    """Rotated halves (dtype), each product rounded to the dtype as _rope_heads does."""
    y1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _split_tiles(seq_len, sp, num_splits, TILE_N: tl.constexpr):
    """Split ``sp``'s key tiles ``[t0, t1)`` of the cached keys (``seq_len - 1``: the new key is in
    registers), the number of splits that have any, and the cached length."""
    n_old = seq_len - 1
    ntiles = tl.cdiv(n_old, TILE_N)
    per = tl.maximum(tl.cdiv(ntiles, num_splits), 1)
    active = tl.maximum(tl.cdiv(ntiles, per), 1)
    t0 = sp * per
    return t0, tl.minimum(t0 + per, ntiles), active, n_old


@triton.jit
def _kv_tile(kv_base, bt_ptr, t, n_lim, kv_stride_kv, kv_stride_blk, kv_stride_tok, o1, o2, d,
             dt: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Cached keys (two rotary halves, ``[D/2, TILE_N]``) and values (``[TILE_N, D]``) of key tile ``t``
    through the block table; positions at or past ``n_lim`` are masked (zeros, no access)."""
    offs_n = t * TILE_N + tl.arange(0, TILE_N)
    n_ok = offs_n < n_lim
    blk = tl.load(bt_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    kv_off = blk * kv_stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * kv_stride_tok
    kt1 = tl.load(kv_base + kv_off[None, :] + o1[:, None], mask=n_ok[None, :], other=0.0).to(dt)
    kt2 = tl.load(kv_base + kv_off[None, :] + o2[:, None], mask=n_ok[None, :], other=0.0).to(dt)
    v = tl.load(kv_base + kv_stride_kv + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(dt)
    return kt1, kt2, v, n_ok


@triton.jit
def _rope_offsets(D: tl.constexpr, IS_NEOX: tl.constexpr):
    """Offsets of the two rotary halves within a head (NeoX: the two halves; GPT-J: even and odd)."""
    i = tl.arange(0, D // 2)
    if IS_NEOX:
        return i, i + D // 2
    else:
        return 2 * i, 2 * i + 1


@triton.jit
def _cos_sin(pos_ptr, cs_ptr, cs_stride, D: tl.constexpr):
    """The rotary cos and sin halves (float32 ``[D/2]``) of the position at ``pos_ptr``."""
    i = tl.arange(0, D // 2)
    pos = tl.load(pos_ptr)
    return (tl.load(cs_ptr + pos * cs_stride + i).to(tl.float32),
            tl.load(cs_ptr + pos * cs_stride + D // 2 + i).to(tl.float32))


@triton.jit
def _attention_first_tile(pos_ptr, seq_ptr, bt_ptr, cs_ptr, kv_ptr, item, n_items, num_splits, cs_stride,
                          kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok, D: tl.constexpr,
                          TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_NEOX: tl.constexpr):
    """What work item ``item`` of phase 1 reads that no phase of this launch writes: the rotary cos/sin
    of the position and its split's first tile of cached keys and values (earlier steps wrote them). A
    program loads it before the barrier that ends phase 0, so the loads wait with the barrier instead of
    after it. An item past ``n_items`` gets a fully masked tile."""
    dt = kv_ptr.dtype.element_ty  # the model's dtype too: the host declines a cache of another dtype
    o1, o2 = _rope_offsets(D, IS_NEOX)
    d = tl.arange(0, D)
    c, s = _cos_sin(pos_ptr, cs_ptr, cs_stride, D)
    ok = item < n_items
    g = tl.where(ok, item // num_splits, 0)
    t0, t1, active, n_old = _split_tiles(tl.load(seq_ptr), item % num_splits, num_splits, TILE_N)
    kt1, kt2, v, n_ok = _kv_tile(kv_ptr + g.to(tl.int64) * kv_stride_h, bt_ptr, t0, tl.where(ok & (t0 < t1), n_old, 0),
                                 kv_stride_kv, kv_stride_blk, kv_stride_tok, o1, o2, d, dt, TILE_N, BLOCK_SIZE)
    return c, s, kt1, kt2, v, n_ok


@triton.jit
def _attend_tile(y1, y2, kt1, kt2, v, n_ok, m_i, l_i, acc, scale, dt: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step of the group's rotated queries over a key tile (masked keys add nothing)."""
    if IEEE:
        sc = tl.dot(y1, kt1, input_precision="ieee") + tl.dot(y2, kt2, input_precision="ieee")
    else:
        sc = tl.dot(y1, kt1) + tl.dot(y2, kt2)
    return _softmax_step(sc, n_ok, v, m_i, l_i, acc, scale, dt, IEEE)


@triton.jit
def _softmax_step(sc, n_ok, v, m_i, l_i, acc, scale, dt: tl.constexpr, IEEE: tl.constexpr):
    """The online-softmax update of a tile's raw scores ``sc`` [rows, keys] and its values ``v``."""
    sc = tl.where(n_ok[None, :], sc * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(sc - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(dt), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(dt), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _join_halves(y1, y2, ROWS: tl.constexpr, D: tl.constexpr, IS_NEOX: tl.constexpr):
    """Whole heads ``[ROWS, D]`` from the two rotary halves ``[ROWS, D/2]`` (:func:`_rope_offsets`' order:
    NeoX the first and second halves, GPT-J the even and odd elements)."""
    pair = tl.join(y1, y2)  # [ROWS, D/2, 2]: element (i, 0) is y1's i-th, (i, 1) y2's
    if IS_NEOX:
        pair = tl.permute(pair, (0, 2, 1))  # [ROWS, 2, D/2]: y1's half, then y2's
    return tl.reshape(pair, [ROWS, D])


@triton.jit
def _decoder_attention(qkv_ptr, seq_ptr, slot_ptr, bt_ptr, kv_ptr, att_ptr, part_acc_ptr, part_ml_ptr, cnt_ptr,
                       item, num_splits, scale, kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok,
                       c, s, kt1, kt2, v, n_ok, trace_ptr, pid, flag_ptr, epoch,
                       NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                       TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       IS_NEOX: tl.constexpr, IEEE: tl.constexpr, TRACE: tl.constexpr, PIPE: tl.constexpr = 0,
                       FLAGS: tl.constexpr = False):
    """Work item (KV head g, split sp) of phase 1: the group's query heads and the new key rotated (from the
    qkv buffer), the new key and value stored at the slot (split 0), attention of the group over the cached
    keys of split sp's tiles, the new token folded in by the last active split, then the split-K merge by
    the last split of g to arrive (or a direct store when one split has every key: the other splits of
    g then do nothing more, and its merge counter is not touched). ``c``, ``s`` and the split's first
    key/value tile (``kt1``, ``kt2``, ``v``, ``n_ok``) come from :func:`_attention_first_tile`.

    PIPE > 0 (the rows kernel): the cached keys go through the paged kernel's loop instead, Triton's software
    pipeline PIPE stages deep (``cp.async`` of the next tiles' block numbers, keys and values while one is
    attended), the rotated query halves joined into whole heads so each tile is one dot; the given tile is
    not used (the rows kernel passes zeros).

    FLAGS (the persistent layer without a barrier after attention): the program that completes group g's
    output (the direct store, or the merge) then stores ``epoch`` in ``flag_ptr[g]`` (release)."""
    dt = qkv_ptr.dtype.element_ty
    GROUP: tl.constexpr = NQ // NKV
    g = item // num_splits
    sp = item % num_splits
    r = tl.arange(0, GROUP_PAD)
    r_ok = r < GROUP
    head = g * GROUP + r
    o1, o2 = _rope_offsets(D, IS_NEOX)
    d = tl.arange(0, D)
    c = c.to(dt).to(tl.float32)
    s = s.to(dt).to(tl.float32)
    qrow = qkv_ptr + head[:, None] * D
    q1 = tl.load(qrow + o1[None, :], mask=r_ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
    q2 = tl.load(qrow + o2[None, :], mask=r_ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
    y1, y2 = _rope_pair(q1, q2, c[None, :], s[None, :], dt)
    kn = qkv_ptr + NQ * D + g * D
    k1 = tl.load(kn + o1, cache_modifier=".cg").to(tl.float32)
    k2 = tl.load(kn + o2, cache_modifier=".cg").to(tl.float32)
    ky1, ky2 = _rope_pair(k1, k2, c, s, dt)
    vn = tl.load(qkv_ptr + (NQ + NKV) * D + g * D + d, cache_modifier=".cg")
    kv_base = kv_ptr + g.to(tl.int64) * kv_stride_h
    if sp == 0:
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:
            cdt = kv_ptr.dtype.element_ty
            dst = kv_base + (slot // BLOCK_SIZE) * kv_stride_blk + (slot % BLOCK_SIZE) * kv_stride_tok
            tl.store(dst + o1, ky1.to(cdt))
            tl.store(dst + o2, ky2.to(cdt))
            tl.store(dst + kv_stride_kv + d, vn.to(cdt))
    t0, t1, active, n_old = _split_tiles(tl.load(seq_ptr), sp, num_splits, TILE_N)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    if PIPE > 0:
        qh = _join_halves(y1, y2, GROUP_PAD, D, IS_NEOX)
        for t in tl.range(t0, t1, num_stages=PIPE):
            offs_n = t * TILE_N + tl.arange(0, TILE_N)
            keys_ok = offs_n < n_old
            blk = tl.load(bt_ptr + offs_n // BLOCK_SIZE, mask=keys_ok, other=0).to(tl.int64)
            kv_off = blk * kv_stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * kv_stride_tok
            kt = tl.load(kv_base + kv_off[None, :] + d[:, None], mask=keys_ok[None, :], other=0.0).to(dt)
            if IEEE:
                sc = tl.dot(qh, kt, input_precision="ieee")
            else:
                sc = tl.dot(qh, kt)
            vt = tl.load(kv_base + kv_stride_kv + kv_off[:, None] + d[None, :], mask=keys_ok[:, None], other=0.0).to(dt)
            m_i, l_i, acc = _softmax_step(sc, keys_ok, vt, m_i, l_i, acc, scale, dt, IEEE)
    else:
        # the first tile as given (all masked when the split has none: it adds nothing), then the rest
        m_i, l_i, acc = _attend_tile(y1, y2, kt1, kt2, v, n_ok, m_i, l_i, acc, scale, dt, IEEE)
        for t in range(t0 + 1, t1):
            kt1, kt2, v, n_ok = _kv_tile(kv_base, bt_ptr, t, n_old, kv_stride_kv, kv_stride_blk, kv_stride_tok, o1,
                                         o2, d, dt, TILE_N, BLOCK_SIZE)
            m_i, l_i, acc = _attend_tile(y1, y2, kt1, kt2, v, n_ok, m_i, l_i, acc, scale, dt, IEEE)
    if sp == active - 1:  # the new token (always visible to itself)
        s_new = (tl.sum(y1.to(tl.float32) * ky1.to(tl.float32)[None, :], 1)
                 + tl.sum(y2.to(tl.float32) * ky2.to(tl.float32)[None, :], 1)) * scale
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
    if active == 1:  # one split holds every key (always so with one split): no partials, no merge
        if sp == 0:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(att_ptr + head[:, None] * D + d[None, :], out.to(att_ptr.dtype.element_ty), mask=r_ok[:, None])
            if FLAGS:
                tl.debug_barrier()  # every thread's stores precede the release
                tl.atomic_xchg(flag_ptr + g, epoch, sem="release", scope="gpu")
    else:
        idx = sp * NQ + head
        tl.store(part_acc_ptr + idx[:, None] * D + d[None, :], acc, mask=r_ok[:, None])
        tl.store(part_ml_ptr + 2 * idx, m_i, mask=r_ok)
        tl.store(part_ml_ptr + 2 * idx + 1, l_i, mask=r_ok)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(cnt_ptr + g, 1, sem="acq_rel", scope="gpu")
        _stamp(trace_ptr, pid, 11, TRACE)
        if arrived == num_splits - 1:
            zero = tl.zeros([GROUP_PAD], dtype=tl.int64)
            _merge_rows(part_acc_ptr, part_ml_ptr, att_ptr, zero, head, r_ok, d, d < D, 1, NQ, active, 0, D,
                        NUM_SPLITS, GROUP_PAD, D)
            if FLAGS:
                tl.debug_barrier()  # every thread's stores precede the release
                tl.atomic_xchg(flag_ptr + g, epoch, sem="release", scope="gpu")
            _stamp(trace_ptr, pid, 12, TRACE)
            tl.atomic_xchg(cnt_ptr + g, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


@triton.jit
def _rope_attention_rows_kernel(qkv_ptr, pos_ptr, seq_ptr, slot_ptr, bt_ptr, cs_ptr, kv_ptr, att_ptr, part_acc_ptr,
                                part_ml_ptr, cnt_ptr, num_splits, scale, qkv_stride, bt_stride, cs_stride,
                                kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok,
                                NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                                TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                                IS_NEOX: tl.constexpr, IEEE: tl.constexpr, PIPE: tl.constexpr = 0,
                                PDL: tl.constexpr = False):
    """Rotary + KV-cache write + decode attention of T sequences (one new token each) in one launch: program
    (item = KV head x split, sequence b) is the persistent layer's phase-1 work item on row b of the qkv
    GEMM's output (:func:`_decoder_attention`): the group's queries and the new key rotated in registers,
    the new key and value stored at the slot, attention over the cached keys, the new token folded in from
    registers, the split-K merge by the last split to arrive. The item's first key tile, cos and sin are
    requested before the PDL wait (earlier steps wrote them; the previous kernel, the qkv GEMM, does not).
    Partials ``[T, num_splits, NQ, D]`` / ``[T, num_splits, NQ, 2]``, counters ``[T, NKV]``. PIPE > 0: the
    cached keys through Triton's pipelined loop (:func:`_decoder_attention`), only cos/sin before the wait."""
    item = tl.program_id(0)  # a sequence's items are neighbours in launch order (one block-table row)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    bt_b = bt_ptr + b64 * bt_stride
    if PIPE > 0:  # the pipelined loop loads every tile itself
        c, s = _cos_sin(pos_ptr + b, cs_ptr, cs_stride, D)
        kt1, kt2, v, n_ok = 0, 0, 0, 0
    else:
        c, s, kt1, kt2, v, n_ok = _attention_first_tile(pos_ptr + b, seq_ptr + b, bt_b, cs_ptr, kv_ptr, item,
                                                        NKV * num_splits, num_splits, cs_stride, kv_stride_kv,
                                                        kv_stride_blk, kv_stride_h, kv_stride_tok, D, TILE_N,
                                                        BLOCK_SIZE, IS_NEOX)
    _pdl_enter(PDL)
    part = b64 * num_splits * NQ
    _decoder_attention(qkv_ptr + b64 * qkv_stride, seq_ptr + b, slot_ptr + b, bt_b, kv_ptr, att_ptr + b64 * NQ * D,
                       part_acc_ptr + part * D, part_ml_ptr + part * 2, cnt_ptr + b * NKV, item, num_splits, scale,
                       kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok, c, s, kt1, kt2, v, n_ok, att_ptr, 0,
                       cnt_ptr, 0, NQ, NKV, D, GROUP_PAD, TILE_N, BLOCK_SIZE, NUM_SPLITS, IS_NEOX, IEEE, False, PIPE)


def rope_attention_rows(qkv: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, cos_sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, scale: float, num_heads: int, num_kv_heads: int, is_neox: bool,
                        max_seq_len: int, num_sms: int) -> torch.Tensor:
    """``rope_and_write_kv_cache`` then decode ``paged_attention`` for T sequences with one new token each,
    in one launch (:func:`_rope_attention_rows_kernel`). ``qkv`` ``[T, (NQ + 2 NKV) D]`` (unit stride on
    its rows), full-width rotary, the cache in this backend's layout and the model's dtype. Returns the
    attention output ``[T, NQ D]``; the new keys and values are stored at ``slot_mapping`` (a negative slot
    is skipped). The split count: programs (T x KV heads) below ``split_below`` x SMs split the keys up to
    ``split_target`` x SMs programs (``CONFIG["rows_attention"]``)."""
    cfg = CONFIG["rows_attention"]
    t = qkv.shape[0]
    head_size, block_size = kv_cache.shape[4], kv_cache.shape[3]
    dev, dt = qkv.device, qkv.dtype
    tile_n = cfg["TILE_N"]
    busy = t * num_kv_heads
    splits = 1
    if busy < cfg["split_below"] * num_sms:
        splits = max(1, min(cfg["max_splits"], triton.cdiv(int(cfg["split_target"] * num_sms), busy),
                            triton.cdiv(max(max_seq_len - 1, 1), tile_n)))
    cnt = counters(dev, t * num_kv_heads) if splits > 1 else None
    if cnt is None:
        splits = 1
    att = torch.empty((t, num_heads * head_size), dtype=dt, device=dev)
    part_acc = torch.empty((t, splits, num_heads, head_size), dtype=torch.float32, device=dev)
    part_ml = torch.empty((t, splits, num_heads, 2), dtype=torch.float32, device=dev)
    st = kv_cache.stride()
    _rope_attention_rows_kernel[(num_kv_heads * splits, t)](
        qkv, positions, seq_lens, slot_mapping, block_table, cos_sin_cache, kv_cache, att, part_acc, part_ml,
        cnt if cnt is not None else seq_lens, splits, float(scale), qkv.stride(0), block_table.stride(0),
        cos_sin_cache.stride(0), st[0], st[1], st[2], st[3], NQ=num_heads, NKV=num_kv_heads, D=head_size,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)), TILE_N=tile_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=triton.next_power_of_2(splits), IS_NEOX=bool(is_neox), IEEE=_tl_dtype_ieee(dt),
        PIPE=int(cfg.get("pipe_stages", 0)), num_warps=cfg["num_warps"], PDL=PDL, launch_pdl=PDL)
    return att


#: decode layers of 2+ tokens (accel_backend_cuda.decoder_layer_rows): the fused rotary + attention launch.
#: enabled: 0 = those layers run op by op (the model's path: rotary, then paged attention); min_programs:
#: only where its programs (tokens x KV heads) exceed this many x SMs. Below that the paged kernel's
#: prefetching loop is faster than these items (H200, session 14: batch 16 1.101 vs 1.087 ms Llama, 1.341
#: vs 1.329 Mixtral; batch 64 1.265 vs 1.289 and 1.637 vs 1.659 for the fused launch).
CONFIG["rows_attention"] = {"enabled": 1, "min_programs": 1.0, "TILE_N": 64, "num_warps": 4, "split_below": 1.0,
                            "split_target": 2, "max_splits": 16, "pipe_stages": 0}


@triton.jit
def _router_rows(w_ptr, c, E, H, RC: tl.constexpr, H_PAD: tl.constexpr):
    """Rows ``c * RC ..`` of the router ``[E, H]`` (zeros past E): read by every program, so cached."""
    rows = c * RC + tl.arange(0, RC)
    k = tl.arange(0, H_PAD)
    return tl.load(w_ptr + rows[:, None] * H + k[None, :], mask=(rows < E)[:, None] & (k < H)[None, :], other=0.0)


@triton.jit
def _moe_route_and_gate_up(hid_ptr, res_ptr, o_ptr, res_out_ptr, w_post_ptr, w_router_ptr, w13_ptr, act_ptr,
                           moe_ids_ptr, moe_wts_ptr, lg_ptr, bar_ptr, trace_ptr, xs_row, pid, nprog, eps,
                           H: tl.constexpr, H_PAD: tl.constexpr, I: tl.constexpr, TN_GU: tl.constexpr,
                           HAS_RES: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, RC: tl.constexpr,
                           TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, RENORM: tl.constexpr, R3: tl.constexpr,
                           WAIT: tl.constexpr, SPIN_LIMIT: tl.constexpr, BARRIER: tl.constexpr,
                           SYNC_TWICE: tl.constexpr, SPLIT: tl.constexpr, LIB: tl.constexpr, TRACE: tl.constexpr):
    """Phase 3 of a MOE layer (see _decoder_layer_kernel): add + norm, router, softmax top-k, the chosen
    experts' gate/up + SiLU. WAIT: the barrier after o_proj comes first (the router's first rows are
    requested between its arrival and its wait)."""
    dt = hid_ptr.dtype.element_ty
    kh = tl.arange(0, H_PAD)
    kh_ok = kh < H
    if WAIT:
        tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
    wr = _router_rows(w_router_ptr, 0, E, H, RC, H_PAD)
    if WAIT:
        _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
        _stamp(trace_ptr, pid, 7, TRACE)
    r2 = _post_attention_residual(hid_ptr, res_ptr, o_ptr, res_out_ptr, pid, kh, kh_ok, HAS_RES)
    x = _rms_normed(r2, w_post_ptr, kh, kh_ok, H, eps, dt)
    ke = tl.arange(0, E_PAD)
    if E_PAD == RC:
        lg = tl.sum(wr.to(tl.float32) * x[None, :], axis=1).to(dt).to(tl.float32)
    else:  # RC rows at a time through this program's row of lg
        lg_row = lg_ptr + pid.to(tl.int64) * E_PAD
        for c in range(E_PAD // RC):
            if c > 0:
                wr = _router_rows(w_router_ptr, c, E, H, RC, H_PAD)
            rows = c * RC + tl.arange(0, RC)
            tl.store(lg_row + rows, tl.sum(wr.to(tl.float32) * x[None, :], axis=1).to(dt).to(tl.float32))
        tl.debug_barrier()
        lg = tl.load(lg_row + ke)
    # softmax in float32 (moe_topk's scores), then TOPK argmaxes, ties toward the lower id
    lg = tl.where(ke < E, lg, float("-inf"))
    p = tl.exp(lg - tl.max(lg, axis=0))
    p = p / tl.sum(p, axis=0)
    cand = tl.where(ke < E, p, -1.0)
    kj = tl.arange(0, TOPK_PAD)
    ids = tl.zeros([TOPK_PAD], dtype=tl.int32)
    wts = tl.zeros([TOPK_PAD], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.max(cand, axis=0)
        e = tl.min(tl.where(cand == best, ke, E_PAD), axis=0)
        ids = tl.where(kj == j, e, ids)
        wts = tl.where(kj == j, best, wts)
        cand = tl.where(ke == e, -2.0, cand)
    if RENORM:
        wts = wts / tl.sum(wts, axis=0)
    tl.store(moe_ids_ptr + pid * TOPK_PAD + kj, ids)
    tl.store(moe_wts_ptr + pid * TOPK_PAD + kj, wts)
    if R3:  # through this program's scratch row, to load it in the tiles' layout
        tl.store(xs_row + kh, x.to(dt), mask=kh_ok)
        tl.debug_barrier()
        x = _x_rows(xs_row, H, TN_GU, H_PAD, True)
    # act rows j * I + i: tile u is rows (u * TN_GU) % I of expert ids[u * TN_GU // I] (TN_GU divides I)
    PER: tl.constexpr = I // TN_GU
    n_units = TOPK * PER
    e0 = tl.sum(tl.where(kj == pid // PER, ids, 0), axis=0).to(tl.int64)
    base = w13_ptr + e0 * (2 * I * H)
    nu = tl.where(pid < n_units, I, 0)
    wg = _weight_rows(base, pid % PER, nu, H, TN_GU, H_PAD, R3)
    wu = _weight_rows(base + I * H, pid % PER, nu, H, TN_GU, H_PAD, R3)
    for u in range(pid, n_units, nprog):
        un = u + nprog
        en = tl.sum(tl.where(kj == un // PER, ids, 0), axis=0).to(tl.int64)
        base_n = w13_ptr + en * (2 * I * H)
        nn = tl.where(un < n_units, I, 0)
        wg_next = _weight_rows(base_n, un % PER, nn, H, TN_GU, H_PAD, R3)
        wu_next = _weight_rows(base_n + I * H, un % PER, nn, H, TN_GU, H_PAD, R3)
        gate = _row_sums(wg, x, R3).to(dt).to(tl.float32)
        up = _row_sums(wu, x, R3).to(dt).to(tl.float32)
        a = _activation(gate, 0, LIB) * up
        rows = u * TN_GU + tl.arange(0, TN_GU)
        tl.store(act_ptr + rows, a.to(dt))
        wg = wg_next
        wu = wu_next
    _stamp(trace_ptr, pid, 8, TRACE)


@triton.jit
def _moe_down(act_ptr, w2_ptr, moe_ids_ptr, moe_wts_ptr, out_ptr, bar_ptr, trace_ptr, pid, nprog, H: tl.constexpr,
              I: tl.constexpr, I_PAD: tl.constexpr, TN: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
              WAIT: tl.constexpr, SPIN_LIMIT: tl.constexpr, BARRIER: tl.constexpr, SYNC_TWICE: tl.constexpr,
              SPLIT: tl.constexpr, TRACE: tl.constexpr):
    """Phase 4 of a MOE layer: ``out[n] = sum_j w_j * round(act_j . w2[e_j][n])`` over this program's row
    tiles, the expert choice read back from this program's rows of moe_ids / moe_wts (phase 3 wrote them);
    the next (tile, expert) is in flight while one is reduced."""
    dt = out_ptr.dtype.element_ty
    ki = tl.arange(0, I_PAD)
    k_ok = ki < I
    ids_row = moe_ids_ptr + pid * TOPK_PAD
    wts_row = moe_wts_ptr + pid * TOPK_PAD
    if WAIT:
        tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
    e0 = tl.load(ids_row).to(tl.int64)
    w = _weight_rows(w2_ptr + e0 * (H * I), pid, H, I, TN, I_PAD)
    if WAIT:
        _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
        _stamp(trace_ptr, pid, 9, TRACE)
    for u in range(pid, tl.cdiv(H, TN), nprog):
        acc = tl.zeros([TN], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            if j + 1 < TOPK:
                en = tl.load(ids_row + j + 1).to(tl.int64)
                w_next = _weight_rows(w2_ptr + en * (H * I), u, H, I, TN, I_PAD)
            else:
                w_next = _weight_rows(w2_ptr + e0 * (H * I), u + nprog, H, I, TN, I_PAD)
            a = tl.load(act_ptr + j * I + ki, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            y = tl.sum(w.to(tl.float32) * a[None, :], axis=1).to(dt).to(tl.float32)
            acc += tl.load(wts_row + j) * y
            w = w_next
        rows = u * TN + tl.arange(0, TN)
        tl.store(out_ptr + rows, acc.to(dt), mask=rows < H)
    _stamp(trace_ptr, pid, 10, TRACE)


@triton.jit
def _o_proj_by_group(w, att_ptr, flag_ptr, epoch, err_ptr, o_ptr, w_o_ptr, pid, nprog, H, NQD: tl.constexpr,
                     TN: tl.constexpr, NQD_PAD: tl.constexpr, R3: tl.constexpr, NKV: tl.constexpr, GD: tl.constexpr,
                     POLL: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """o_proj of this program's row tile ``w`` (loaded by the caller) without a grid barrier after attention:
    the attention output's columns ``[g GD, (g + 1) GD)`` (KV group g) are added as soon as g's ready flag
    holds ``epoch`` (volatile polls of all NKV flags; each pass loads the newly ready groups' columns,
    ``.cg``, masked in x's layout, and adds their partial products), so the tile's products overlap the
    slower groups' attention. POLL off (one phase per launch: the kernel boundary has ordered attention
    before this): one group a pass, every group ready. More row tiles than programs: the later tiles once
    every group is in. After SPIN_LIMIT polls the error word ``err_ptr`` is set."""
    dt = o_ptr.dtype.element_ty
    ALL: tl.constexpr = (1 << NKV) - 1
    kg = tl.arange(0, _MAX_FLAGS)
    if R3:
        kx = (tl.arange(0, TN)[:, None, None] * 0 + tl.arange(0, NQD_PAD // 256)[None, :, None] * 256
              + tl.arange(0, 256)[None, None, :])
    else:
        kx = tl.arange(0, NQD_PAD)
    grp = (kx // GD).to(tl.int64)
    acc = tl.zeros([TN], dtype=tl.float32)
    done = tl.zeros([], dtype=tl.int64)
    spins = 0
    while (done != ALL) & (spins < SPIN_LIMIT):
        if POLL:
            f = tl.load(flag_ptr + kg, mask=kg < NKV, other=-1, volatile=True)
            bits = tl.sum(tl.where((f == epoch) & (kg < NKV), tl.full([_MAX_FLAGS], 1, tl.int64) << kg.to(tl.int64), 0),
                          axis=0)
            new = bits & ~done
        else:
            rest = ALL & ~done
            new = rest & (-rest)
        if new != 0:
            x = tl.load(att_ptr + kx, mask=(((new >> grp) & 1) != 0) & (kx < NQD), other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            acc += _row_sums(w, x, R3)
            done = done | new
        spins += 1
    if spins >= SPIN_LIMIT:
        tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
    rows = pid * TN + tl.arange(0, TN)
    tl.store(o_ptr + rows, acc.to(dt), mask=rows < H)
    if pid + nprog < tl.cdiv(H, TN):  # the later tiles as the barrier path does them (next tile in flight)
        w = _weight_rows(w_o_ptr, pid + nprog, H, NQD, TN, NQD_PAD, R3)
        _gemv_rows(w, w, w, w_o_ptr, _x_rows(att_ptr, NQD, TN, NQD_PAD, R3), o_ptr, pid + nprog, nprog, H, NQD, TN,
                   NQD_PAD, 1, R3)


@triton.jit
def _decoder_layer_kernel(
    hid_ptr, res_ptr, pos_ptr, slot_ptr, bt_ptr, seq_ptr,
    w_in_ptr, w_qkv_ptr, w_o_ptr, w_post_ptr, w_gu_ptr, w_d_ptr, cs_ptr, kv_ptr,
    qkv_ptr, att_ptr, part_acc_ptr, part_ml_ptr, o_ptr, act_ptr, hid_out_ptr, res_out_ptr, cnt_ptr, bar_ptr,
    xs_ptr, trace_ptr, w_router_ptr, moe_ids_ptr, moe_wts_ptr, lg_ptr,
    eps, scale, nprog, num_splits, cs_stride, kv_stride_kv, kv_stride_blk, kv_stride_h, kv_stride_tok,
    H: tl.constexpr, H_PAD: tl.constexpr, I: tl.constexpr, I_PAD: tl.constexpr, NQ: tl.constexpr,
    NKV: tl.constexpr, D: tl.constexpr, NQD_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, TN: tl.constexpr, TN_O: tl.constexpr, TN_GU: tl.constexpr,
    TN_DOWN: tl.constexpr,
    HAS_RES: tl.constexpr, IS_NEOX: tl.constexpr, IEEE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    SPIN_LIMIT: tl.constexpr, LIB: tl.constexpr, DOT: tl.constexpr = 0,
    BK: tl.constexpr = 256, STAGES: tl.constexpr = 4, BARRIER: tl.constexpr = 1, SYNC_TWICE: tl.constexpr = False,
    PDL: tl.constexpr = False, TRACE: tl.constexpr = False, SPLIT: tl.constexpr = True,
    DEPTH_QKV: tl.constexpr = 3, DEPTH_DOWN: tl.constexpr = 1, ROWS3: tl.constexpr = 0,
    MOE: tl.constexpr = False, E: tl.constexpr = 1, E_PAD: tl.constexpr = 1, RC: tl.constexpr = 1,
    TOPK: tl.constexpr = 1, TOPK_PAD: tl.constexpr = 1, RENORM: tl.constexpr = False, FLAGS: tl.constexpr = False,
):
    """One decoder layer of a one-token decode, phases FIRST..LAST of DECODER_PHASES in one launch.

    With FIRST < LAST the grid is persistent (at most one program per SM, all resident) and the phases are
    separated by :func:`_grid_sync`; each phase's first weight tile is loaded *before* the wait that
    precedes it (weights never depend on the step), so the weight stream does not stop at phase
    boundaries, and phase 0's before the PDL wait, so it overlaps the previous layer's tail; attention's
    cos/sin and first cached key/value tile are requested before phase 0's barrier likewise. Launched one
    phase at a time (FIRST == LAST, the kernel boundary as the barrier) it computes the same thing: that
    is how the interpreter runs it.

    Math and rounding as the layered ops (fused_add_rms_norm, linear, rope_and_write_kv_cache,
    paged_attention, silu_and_mul, linear): ``r = hid + res``; ``qkv = norm(r) @ Wqkv^T``; rotary of q and
    the new k; k, v stored at the slot; ``att = attention(q, cache + new k, v)``; ``o = att @ Wo^T``;
    ``r2 = r + o`` (-> res_out); ``act = silu(g) * u`` of ``norm(r2) @ Wgu^T``; ``hid_out = act @ Wd^T``.
    Every intermediate is rounded to the model dtype where the layered path stores it.

    DOT (a name kept from the measured tensor-core variant, removed: slower at every H200 config, see
    docs/cuda-notes.md "Session 6"): the projections run as :func:`_stream_rows` (FMA over weight chunks
    Triton pipelines through shared memory, STAGES deep; 126 registers a thread against 247) instead of
    register tiles prefetched across the barriers (DOT 0, the default: 0.920 vs 0.930 ms); the normalized
    rows then go through this program's row of the scratch ``xs`` ``[programs, H_PAD]``.

    MOE (a Mixtral layer, hook API 1.5): the feed-forward is routed experts. Phase 3 computes the router's
    logits ``norm(r2) @ Wr^T`` (E rows, rounded to the dtype; RC rows at a time, the first RC requested
    during the barrier, more through this program's row of ``lg`` ``[programs, E_PAD]``), their float32
    softmax and top-k (ties toward the lower id; renormalized with RENORM) in every program, the same in
    each; stores the choice in this program's rows of ``moe_ids`` / ``moe_wts`` ``[programs, TOPK_PAD]``
    and ``act[j * I + i] = silu(g) * u`` of the chosen experts' gate/up rows (``w_gu`` is w13 ``[E, 2 I,
    H]``, TN_GU rows of one expert a tile: TN_GU divides I). Phase 4 is ``hid_out = sum_j w_j * (act_j @
    w2[e_j]^T)`` (``w_d`` is w2 ``[E, H, I]``; each expert's product rounded to the dtype, the weighted sum
    in float32, as fused_experts), the first expert's first tile requested during the barrier.

    FLAGS (needs the split counting barrier): no grid barrier between attention and o_proj. The program that
    completes a KV group's attention output stores the launch's epoch (the phase-0 barrier's round count,
    which only grows, so the flags need no reset) in the group's ready flag (``bar_ptr[4 + g]``); o_proj
    (:func:`_o_proj_by_group`) adds each group's columns as soon as its flag shows the epoch.
    """
    dt = hid_ptr.dtype.element_ty
    pid = tl.program_id(0)
    kh = tl.arange(0, H_PAD)
    kh_ok = kh < H
    NQD: tl.constexpr = NQ * D
    QKV_N: tl.constexpr = (NQ + 2 * NKV) * D
    xs_row = xs_ptr + pid.to(tl.int64) * H_PAD
    if FIRST == 0:
        if DOT:
            _pdl_enter(PDL)
            r = _residual_row(hid_ptr, res_ptr, kh, kh_ok, HAS_RES)
            tl.store(xs_row + kh, _rms_normed(r, w_in_ptr, kh, kh_ok, H, eps, dt).to(dt), mask=kh_ok)
            tl.debug_barrier()
            _stream_rows(xs_row, w_qkv_ptr, qkv_ptr, pid, nprog, QKV_N, H, 0, TN, BK, STAGES, False, LIB)
        else:
            _stamp(trace_ptr, pid, 0, TRACE)
            # before the PDL wait: weights are constant
            R3_QKV: tl.constexpr = (ROWS3 & 1) != 0
            w0, w1, w2 = _weight_ring(w_qkv_ptr, pid, nprog, QKV_N, H, TN, H_PAD, DEPTH_QKV, R3_QKV)
            _pdl_enter(PDL)
            _stamp(trace_ptr, pid, 1, TRACE)
            r = _residual_row(hid_ptr, res_ptr, kh, kh_ok, HAS_RES)
            x = _rms_normed(r, w_in_ptr, kh, kh_ok, H, eps, dt)
            if R3_QKV:  # through this program's scratch row, to load it in the tiles' layout
                tl.store(xs_row + kh, x.to(dt), mask=kh_ok)
                tl.debug_barrier()
                x = _x_rows(xs_row, H, TN, H_PAD, True)
            _gemv_rows(w0, w1, w2, w_qkv_ptr, x, qkv_ptr, pid, nprog, QKV_N, H, TN, H_PAD, DEPTH_QKV, R3_QKV)
        _stamp(trace_ptr, pid, 2, TRACE)
    else:
        _pdl_enter(PDL)
    epoch = tl.zeros([], dtype=tl.int64)
    if FIRST <= 1 and LAST >= 1:
        n_items = NKV * num_splits
        if FIRST < 1:
            tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
            epoch = tok
        # what attention reads that this launch does not write, requested during the barrier (so its
        # latency overlaps the wait instead of following it)
        c, s, kt1, kt2, v, n_ok = _attention_first_tile(
            pos_ptr, seq_ptr, bt_ptr, cs_ptr, kv_ptr, pid, n_items, num_splits, cs_stride, kv_stride_kv,
            kv_stride_blk, kv_stride_h, kv_stride_tok, D, TILE_N, BLOCK_SIZE, IS_NEOX)
        if FIRST < 1:
            _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
            _stamp(trace_ptr, pid, 3, TRACE)
        for item in range(pid, n_items, nprog):
            if item != pid:  # a later item (more items than programs) loads its own after the barrier
                c, s, kt1, kt2, v, n_ok = _attention_first_tile(
                    pos_ptr, seq_ptr, bt_ptr, cs_ptr, kv_ptr, item, n_items, num_splits, cs_stride, kv_stride_kv,
                    kv_stride_blk, kv_stride_h, kv_stride_tok, D, TILE_N, BLOCK_SIZE, IS_NEOX)
            _decoder_attention(qkv_ptr, seq_ptr, slot_ptr, bt_ptr, kv_ptr, att_ptr, part_acc_ptr, part_ml_ptr,
                               cnt_ptr, item, num_splits, scale, kv_stride_kv, kv_stride_blk, kv_stride_h,
                               kv_stride_tok, c, s, kt1, kt2, v, n_ok, trace_ptr, pid, bar_ptr + 4, epoch, NQ, NKV,
                               D, GROUP_PAD, TILE_N, BLOCK_SIZE, NUM_SPLITS, IS_NEOX, IEEE, TRACE, 0,
                               FLAGS and FIRST < 1)
        _stamp(trace_ptr, pid, 4, TRACE)
    if FIRST <= 2 and LAST >= 2:
        if DOT:
            if FIRST < 2:
                _phase_sync(bar_ptr, nprog, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
            _stream_rows(att_ptr, w_o_ptr, o_ptr, pid, nprog, H, NQD, 0, TN_O, BK, STAGES, False, LIB)
        else:
            R3_O: tl.constexpr = (ROWS3 & 2) != 0
            if FLAGS:
                w = _weight_rows(w_o_ptr, pid, H, NQD, TN_O, NQD_PAD, R3_O)
                _o_proj_by_group(w, att_ptr, bar_ptr + 4, epoch, bar_ptr + 3, o_ptr, w_o_ptr, pid, nprog, H, NQD,
                                 TN_O, NQD_PAD, R3_O, NKV, (NQ // NKV) * D, FIRST < 2, SPIN_LIMIT)
                _stamp(trace_ptr, pid, 5, TRACE)
            else:
                if FIRST < 2:
                    tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
                w = _weight_rows(w_o_ptr, pid, H, NQD, TN_O, NQD_PAD, R3_O)
                if FIRST < 2:
                    _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
                    _stamp(trace_ptr, pid, 5, TRACE)
                x = _x_rows(att_ptr, NQD, TN_O, NQD_PAD, R3_O)
                _gemv_rows(w, w, w, w_o_ptr, x, o_ptr, pid, nprog, H, NQD, TN_O, NQD_PAD, 1, R3_O)
            _stamp(trace_ptr, pid, 6, TRACE)
    if FIRST <= 3 and LAST >= 3 and DOT:
        if FIRST < 3:
            _phase_sync(bar_ptr, nprog, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
        r2 = _post_attention_residual(hid_ptr, res_ptr, o_ptr, res_out_ptr, pid, kh, kh_ok, HAS_RES)
        tl.store(xs_row + kh, _rms_normed(r2, w_post_ptr, kh, kh_ok, H, eps, dt).to(dt), mask=kh_ok)
        tl.debug_barrier()
        _stream_rows(xs_row, w_gu_ptr, act_ptr, pid, nprog, I, H, I, TN_GU, BK, STAGES, True, LIB)
    if FIRST <= 3 and LAST >= 3 and MOE:
        _moe_route_and_gate_up(hid_ptr, res_ptr, o_ptr, res_out_ptr, w_post_ptr, w_router_ptr, w_gu_ptr, act_ptr,
                               moe_ids_ptr, moe_wts_ptr, lg_ptr, bar_ptr, trace_ptr, xs_row, pid, nprog, eps, H, H_PAD,
                               I, TN_GU, HAS_RES, E, E_PAD, RC, TOPK, TOPK_PAD, RENORM, (ROWS3 & 4) != 0, FIRST < 3,
                               SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT, LIB, TRACE)
    if FIRST <= 3 and LAST >= 3 and not DOT and not MOE:
        if FIRST < 3:
            tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
        R3_GU: tl.constexpr = (ROWS3 & 4) != 0
        wg = _weight_rows(w_gu_ptr, pid, I, H, TN_GU, H_PAD, R3_GU)
        wu = _weight_rows(w_gu_ptr + I * H, pid, I, H, TN_GU, H_PAD, R3_GU)
        if FIRST < 3:
            _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
            _stamp(trace_ptr, pid, 7, TRACE)
        r2 = _post_attention_residual(hid_ptr, res_ptr, o_ptr, res_out_ptr, pid, kh, kh_ok, HAS_RES)
        x = _rms_normed(r2, w_post_ptr, kh, kh_ok, H, eps, dt)
        if R3_GU:  # through this program's scratch row, to load it in the tiles' layout
            tl.store(xs_row + kh, x.to(dt), mask=kh_ok)
            tl.debug_barrier()
            x = _x_rows(xs_row, H, TN_GU, H_PAD, True)
        for u in range(pid, tl.cdiv(I, TN_GU), nprog):
            wg_next = _weight_rows(w_gu_ptr, u + nprog, I, H, TN_GU, H_PAD, R3_GU)
            wu_next = _weight_rows(w_gu_ptr + I * H, u + nprog, I, H, TN_GU, H_PAD, R3_GU)
            gate = _row_sums(wg, x, R3_GU).to(dt).to(tl.float32)
            up = _row_sums(wu, x, R3_GU).to(dt).to(tl.float32)
            a = _activation(gate, 0, LIB) * up
            rows = u * TN_GU + tl.arange(0, TN_GU)
            tl.store(act_ptr + rows, a.to(dt), mask=rows < I)
            wg = wg_next
            wu = wu_next
        _stamp(trace_ptr, pid, 8, TRACE)
    if LAST >= 4 and DOT:
        if FIRST < 4:
            _phase_sync(bar_ptr, nprog, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
        _stream_rows(act_ptr, w_d_ptr, hid_out_ptr, pid, nprog, H, I, 0, TN_DOWN, BK, STAGES, False, LIB)
    if LAST >= 4 and MOE:
        _moe_down(act_ptr, w_d_ptr, moe_ids_ptr, moe_wts_ptr, hid_out_ptr, bar_ptr, trace_ptr, pid, nprog, H, I, I_PAD,
                  TN_DOWN, TOPK, TOPK_PAD, FIRST < 4, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT, TRACE)
    if LAST >= 4 and not DOT and not MOE:
        ki = tl.arange(0, I_PAD)
        if FIRST < 4:
            tok = _phase_arrive(bar_ptr, nprog, BARRIER, SPLIT)
        w0, w1, w2 = _weight_ring(w_d_ptr, pid, nprog, H, I, TN_DOWN, I_PAD, DEPTH_DOWN)
        if FIRST < 4:
            _phase_wait(bar_ptr, nprog, tok, SPIN_LIMIT, BARRIER, SYNC_TWICE, SPLIT)
            _stamp(trace_ptr, pid, 9, TRACE)
        x = tl.load(act_ptr + ki, mask=ki < I, other=0.0, cache_modifier=".cg").to(tl.float32)
        _gemv_rows(w0, w1, w2, w_d_ptr, x, hid_out_ptr, pid, nprog, H, I, TN_DOWN, I_PAD, DEPTH_DOWN)
        _stamp(trace_ptr, pid, 10, TRACE)


#: the compiled kernel of the latest launch of some launchers (benchmarks read its registers and IR)
LAST_COMPILED: dict[str, object] = {}
#: launch parameters of the persistent decoder layer (bench/cuda/bench_persistent.py sweeps them)
CONFIG["decoder_layer"] = {"num_warps": 8, "TN": 8, "TN_O": 8, "TN_GU": 8, "TN_DOWN": 4, "TILE_N": 32, "max_splits": 16,
                           "programs": None,  # programs: None = one per SM
                           "DOT": 0, "BK": 512, "STAGES": 8, "BARRIER": 1, "SPLIT": 1, "DEPTH_QKV": 3, "DEPTH_DOWN": 1,
                           "ROWS3": 7,
                           # FLAGS 1: o_proj starts on each KV group's columns as its attention is stored, no
                           # grid barrier between (session 15: built, interpreter-checked, not measured); taken
                           # only with SPLIT 1, BARRIER 1 and DOT 0 (its epoch is the split counting barrier's)
                           "FLAGS": 0,
                           # MOE layers (moe_tiles): the router in chunks of at most this many elements, and
                           # rows of a down tile (each chosen expert's, in turn)
                           "router_elems": 32768, "TN_DOWN_MOE": 16,
                           # benchmark-only knobs: stop after this phase (wrong numbers), wait twice per barrier,
                           # a timeline buffer (int64 [launches, programs, TRACE_POINTS]: launch i of the
                           # layer writes row trace_next % launches, see _stamp)
                           "last_phase": None, "sync_twice": False, "trace": None, "trace_next": 0}


#: Register-tile budgets, in weight elements per tile (the most rows a tile may have is this over the
#: padded width). The configuration measured on the H200 at the Llama-1B shape (session 9: qkv 8 x 2048 in
#: a ring of 4, o_proj 8 x 2048, gate and up 8 x 2048 each, all three as ROWS3 tiles; down 4 x 8192) uses
#: 236 registers a thread (Triton 3.6), no local memory. Wider layers get fewer rows per tile so the tiles
#: stay this size (Llama-8B shape: 248 registers, no local memory, no ROWS3 tiles: see rows3_mask;
#: tests/backends/cuda/test_cuda_compile.py checks both).
TILE_ELEMS = {"TN": 16384, "TN_O": 32768, "TN_GU": 16384, "TN_DOWN": 32768}
#: The widest vectors a program keeps in registers that compiled without local memory (Llama-8B shape):
#: the hidden state, the attention output (heads x head_size) and the activation. Wider layers are declined.
MAX_PERSISTENT_WIDTH = {"hidden": 4096, "attention": 4096, "intermediate": 16384}


def decoder_layer_tiles(h_pad: int, nqd_pad: int, i_pad: int, cfg: dict) -> dict[str, int]:
    """Rows per register tile of each projection (powers of two): the configured rows, fewer where the
    padded width would make a tile larger than :data:`TILE_ELEMS`."""
    widths = {"TN": h_pad, "TN_O": nqd_pad, "TN_GU": h_pad, "TN_DOWN": i_pad}
    return {k: max(1, min(cfg[k], TILE_ELEMS[k] // w)) for k, w in widths.items()}


def rows3_mask(h_pad: int, nqd_pad: int, cfg: dict) -> int:
    """The projections (bits: 1 qkv, 2 o_proj, 4 gate_up) whose tiles go as ``[rows, chunks, 256]`` (a warp
    per row): the configured ones whose input width is 256 to 2048 (a thread then holds a copy of at most
    64 elements of x; wider rows would spill)."""
    ok = {1: h_pad, 2: nqd_pad, 4: h_pad}
    return sum(bit for bit, w in ok.items() if int(cfg["ROWS3"]) & bit and 256 <= w <= 2048)


_RESIDENT: dict[tuple, int] = {}


def _check_resident(args, kwargs, nprog: int, num_sms: int) -> None:
    """A persistent launch's programs must all be resident at once (grid barriers wait for every one):
    compile without launching, then compare ``nprog`` with what the SMs hold (registers, shared memory,
    threads). Cached per launch configuration. RuntimeError when they would not fit."""
    key = (nprog, num_sms, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    per_sm = _RESIDENT.get(key)
    if per_sm is None:
        ck = _decoder_layer_kernel.warmup(*args, grid=(nprog,), **kwargs)
        ck._init_handles()
        threads = kwargs["num_warps"] * 32
        props = torch.cuda.get_device_properties(args[0].device)
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        regs = getattr(props, "regs_per_multiprocessor", 65536)
        per_sm = min(regs // max(ck.n_regs * threads, 1), smem // max(ck.metadata.shared + 1024, 1024),
                     props.max_threads_per_multi_processor // threads)
        _RESIDENT[key] = per_sm
    if nprog > per_sm * num_sms:
        raise RuntimeError(f"the persistent decoder layer needs its {nprog} programs resident at once; this "
                           f"launch configuration fits {per_sm} per SM x {num_sms} SMs: lower "
                           "CONFIG['decoder_layer']['programs'] (None: one per SM)")


def moe_tiles(h_pad: int, inter: int, num_experts: int, cfg: dict) -> dict[str, int]:
    """Tiles of a MOE layer's phases 3-4: router rows a chunk (RC, the whole router up to
    ``router_elems`` elements), gate/up rows a tile (TN_GU: a power of two that divides the expert's
    intermediate size, so a tile is one expert's), down rows a tile (TN_DOWN_MOE, within the TN_DOWN
    register budget)."""
    e_pad = triton.next_power_of_2(num_experts)
    rc = max(1, min(e_pad, _pow2_floor(max(1, cfg["router_elems"] // h_pad))))
    tn_gu = decoder_layer_tiles(h_pad, 1, 1, cfg)["TN_GU"]
    while inter % tn_gu:
        tn_gu //= 2
    i_pad = triton.next_power_of_2(inter)
    tn_down = max(1, min(cfg["TN_DOWN_MOE"], _pow2_floor(max(1, TILE_ELEMS["TN_DOWN"] // i_pad))))
    return {"E_PAD": e_pad, "RC": rc, "TN_GU": tn_gu, "TN_DOWN": tn_down}


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def decoder_layer_decode(hidden, residual, positions, slot_mapping, block_table, seq_lens, w_in, w_qkv, w_o,
                         w_post, w_gu, w_down, cos_sin_cache, kv_cache, eps, scale, num_heads, num_kv_heads,
                         is_neox, max_seq_len, num_sms, persistent=None, moe=None):
    """One token (``hidden`` ``[1, H]``) through a dense Llama decoder layer; returns ``(hidden_out,
    residual_out)``, each ``[1, H]``. Arguments as checked by accel_backend_cuda.decoder_layer_decode:
    contiguous weights, ``[2, blocks, kv_heads, block_size, head_size]`` cache, full-width rotary.
    ``persistent`` None: one launch on a GPU, one launch per phase in the interpreter. ``moe``: a Mixtral
    layer (``{"router": [E, H], "top_k": k, "renormalize": bool}``; ``w_gu`` is w13 ``[E, 2 I, H]``,
    ``w_down`` w2 ``[E, H, I]``), as checked by accel_backend_cuda.moe_decoder_layer_decode."""
    cfg = CONFIG["decoder_layer"]
    h = hidden.shape[-1]
    inter = w_down.shape[-1]
    if moe is not None and cfg["DOT"]:
        raise ValueError("the MOE persistent layer has register tiles only: set CONFIG['decoder_layer']['DOT'] = 0")
    head_size = kv_cache.shape[4]
    block_size = kv_cache.shape[3]
    dev = hidden.device
    dt = hidden.dtype
    persistent = (not INTERPRET) if persistent is None else persistent
    nprog = cfg["programs"] or num_sms
    bar = barrier_state(dev, nprog) if persistent else None
    if persistent and bar is None:
        raise RuntimeError("the persistent decoder layer's barrier words must exist before graph capture "
                           "(run the layer once eagerly first)")
    tile_n = cfg["TILE_N"]
    splits = max(1, min(cfg["max_splits"], max(1, nprog // num_kv_heads), triton.cdiv(max(max_seq_len - 1, 1), tile_n)))
    cnt = counters(dev, num_kv_heads) if splits > 1 else None
    if splits > 1 and cnt is None:
        splits = 1
    qkv = torch.empty(((num_heads + 2 * num_kv_heads) * head_size,), dtype=dt, device=dev)
    att = torch.empty((num_heads * head_size,), dtype=dt, device=dev)
    part_acc = torch.empty((splits, num_heads, head_size), dtype=torch.float32, device=dev)
    part_ml = torch.empty((splits, num_heads, 2), dtype=torch.float32, device=dev)
    o = torch.empty((h,), dtype=dt, device=dev)
    top_k = moe["top_k"] if moe is not None else 1
    act = torch.empty((top_k * inter,), dtype=dt, device=dev)
    hid_out = torch.empty((1, h), dtype=dt, device=dev)
    res_out = torch.empty((1, h), dtype=dt, device=dev)
    group = num_heads // num_kv_heads
    st = kv_cache.stride()
    rows3 = rows3_mask(triton.next_power_of_2(h), triton.next_power_of_2(num_heads * head_size), cfg)
    xs = torch.empty((nprog, triton.next_power_of_2(h)), dtype=dt, device=dev) if cfg["DOT"] or rows3 else o
    last = DECODER_PHASES - 1 if cfg.get("last_phase") is None else cfg["last_phase"]  # < 4: benchmark only
    trace = cfg.get("trace")
    if trace is not None:  # benchmark only: rows picked at launch (a captured graph replays the same rows)
        trace = trace[cfg["trace_next"] % trace.shape[0]]
        cfg["trace_next"] += 1
    phases = [(0, last)] if persistent else [(p, p) for p in range(last + 1)]
    tiles = decoder_layer_tiles(triton.next_power_of_2(h), triton.next_power_of_2(num_heads * head_size),
                                triton.next_power_of_2(inter), cfg)
    moe_consts = {}
    if moe is not None:
        mt = moe_tiles(triton.next_power_of_2(h), inter, moe["router"].shape[0], cfg)
        tiles.update(TN_GU=mt["TN_GU"], TN_DOWN=mt["TN_DOWN"])
        topk_pad = triton.next_power_of_2(top_k)
        moe_consts = dict(MOE=True, E=moe["router"].shape[0], E_PAD=mt["E_PAD"], RC=mt["RC"], TOPK=top_k,
                          TOPK_PAD=topk_pad, RENORM=bool(moe["renormalize"]))
        moe_bufs = (moe["router"], torch.empty((nprog, topk_pad), dtype=torch.int32, device=dev),
                    torch.empty((nprog, topk_pad), dtype=torch.float32, device=dev),
                    torch.empty((nprog, mt["E_PAD"]), dtype=torch.float32, device=dev) if mt["RC"] < mt["E_PAD"]
                    else part_ml)
    else:
        moe_bufs = (w_in, seq_lens, part_ml, part_ml)
    args = (hidden, residual if residual is not None else hidden, positions, slot_mapping, block_table, seq_lens,
            w_in, w_qkv, w_o, w_post, w_gu, w_down, cos_sin_cache, kv_cache,
            qkv, att, part_acc, part_ml, o, act, hid_out, res_out, cnt if cnt is not None else seq_lens,
            bar if bar is not None else seq_lens, xs, trace if trace is not None else seq_lens, *moe_bufs,
            float(eps), float(scale), nprog, splits, cos_sin_cache.stride(0), st[0], st[1], st[2], st[3])
    consts = dict(
        H=h, H_PAD=triton.next_power_of_2(h), I=inter, I_PAD=triton.next_power_of_2(inter), NQ=num_heads,
        NKV=num_kv_heads, D=head_size, NQD_PAD=triton.next_power_of_2(num_heads * head_size),
        GROUP_PAD=max(16, triton.next_power_of_2(group)), TILE_N=tile_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=triton.next_power_of_2(splits), **tiles, **moe_consts, HAS_RES=residual is not None, IS_NEOX=bool(is_neox), IEEE=_tl_dtype_ieee(dt),
        SPIN_LIMIT=SPIN_LIMIT, LIB=LIBDEVICE, DOT=int(cfg["DOT"]), BK=cfg["BK"], STAGES=cfg["STAGES"],
        BARRIER=cfg["BARRIER"], SYNC_TWICE=bool(cfg.get("sync_twice")), num_warps=cfg["num_warps"], PDL=PDL,
        TRACE=trace is not None, SPLIT=bool(cfg["SPLIT"]),
        DEPTH_QKV=cfg["DEPTH_QKV"], DEPTH_DOWN=cfg["DEPTH_DOWN"], ROWS3=rows3, launch_pdl=PDL,
        # ready flags instead of the barrier after attention: their epoch is the split counting barrier's
        FLAGS=bool(cfg.get("FLAGS")) and bool(cfg["SPLIT"]) and cfg["BARRIER"] == 1 and not cfg["DOT"]
        and num_kv_heads < MAX_READY_FLAGS)
    for first, last in phases:
        if persistent and first != last:
            _check_resident(args, {**consts, "FIRST": first, "LAST": last}, nprog, num_sms)
        LAST_COMPILED["decoder_layer"] = _decoder_layer_kernel[(nprog,)](*args, FIRST=first, LAST=last, **consts)
    return hid_out, res_out
