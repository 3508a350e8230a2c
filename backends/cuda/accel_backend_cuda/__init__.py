"""The CUDA backend: Triton kernels for the accel-models ops, cuBLAS (through torch) where it already wins.

Importing this module never needs a GPU or Triton: the kernels live in ``_triton_kernels`` and load on the
first op call. ``accel_backend_info`` says whether the backend is usable here (a CUDA device and an
importable Triton) and, if not, why.

This file holds everything that runs on the host: availability, argument checks, the KV-cache layout,
launch planning (:func:`attention_plan`) and the expert sort (:func:`moe_align`). They are plain Python and
torch, so CI checks them without a GPU.

KV-cache layout: ``[2, num_blocks, num_kv_heads, block_size, head_size]`` (keys, then values). A block of
one KV head is one contiguous ``block_size x head_size`` tile, which is what attention reads.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

import accel_backend_reference
from accel_models import BackendInfo, KVCacheLayout, argcheck, hookimpl

NAME = "cuda"
PRIORITY = 100  # above the reference (-100): auto-selection picks CUDA wherever it is usable
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_SIZE = 256
MAX_HIDDEN = 65536  # rms_norm / int8 quant keep one row in registers
#: moe_topk's one-launch kernel keeps a token's expert scores and its top-k in registers
MOE_TOPK_MAX_EXPERTS = 4096
MOE_TOPK_MAX_K = 16
TRITON_MOE_TOPK = True  # False: plain torch (the benchmark flips it to compare)
#: Shared memory a kernel's pipelined tiles may take (H100: 227 KiB per block; some left for the epilogue).
SMEM_BUDGET = 216 * 1024
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 tensor-core dots
KV_LAYOUT = "[2, num_blocks, num_kv_heads, block_size, head_size]"


def _version() -> str | None:
    try:
        return importlib.metadata.version("accel-backend-cuda")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


def _interpret() -> bool:
    """Triton's interpreter (CPU tensors) is on: the CPU-side tests run the kernels this way."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def availability() -> tuple[bool, str | None]:
    """``(available, reason)``: a CUDA device of compute capability 8.0+ and an importable Triton."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        how = (f"torch {torch.__version__} is built for CUDA {build} but sees no device"
               if build else f"torch {torch.__version__} is a CPU-only build")
        return False, (f"no CUDA device: torch.cuda.is_available() is False ({how}); run on a machine with an "
                       "NVIDIA GPU and a CUDA build of torch")
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed: `pip install triton` (it ships with CUDA builds of torch)"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install must not break backend discovery
        return False, f"Triton failed to import: {type(exc).__name__}: {exc}"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_COMPUTE_CAPABILITY:
        return False, (f"the CUDA device has compute capability {cap[0]}.{cap[1]}; the Triton kernels need "
                       f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (Ampere, Hopper, ...)")
    return True, None


@hookimpl
def accel_backend_info() -> BackendInfo:
    try:
        available, reason = availability()
    except Exception as exc:  # never raise from backend_info
        available, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
    return BackendInfo(name=NAME, device_type="cuda", available=available, reason=reason, dist_backend="nccl",
                       priority=PRIORITY, version=_version())


class CudaGraph:
    """A captured ``torch.cuda.CUDAGraph`` and the outputs its replays overwrite."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any, pool: Any) -> None:
        self.graph = graph
        self.outputs = outputs
        self.pool = pool

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


#: warm-up runs before capture (Triton JIT, cuBLAS workspaces and autotuning happen outside the graph)
GRAPH_WARMUP_RUNS = 2


@hookimpl
def accel_capture_graph(fn: Any, device: torch.device, pool: Any) -> CudaGraph | None:
    """CUDA graph of ``fn``: warm-up runs on a side stream (as PyTorch requires), then capture into
    ``pool`` (a fresh pool when None). None when the device is not a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                outputs = fn()
        except Exception as exc:  # e.g. a host synchronization inside fn
            raise RuntimeError(f"CUDA graph capture failed: {type(exc).__name__}: {exc}") from exc
        torch.cuda.synchronize(device)
    return CudaGraph(graph, outputs, pool)


def _kernels() -> ModuleType:
    try:
        return importlib.import_module("accel_backend_cuda._triton_kernels")
    except ImportError as exc:
        raise RuntimeError(f"the CUDA backend needs Triton: {exc}; `pip install triton`") from exc


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------------
# argument checks: accel_models.argcheck's, after the device check only this backend makes
# ----------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: Any) -> None:
    argcheck.check_tensor(name, t)
    if t.device.type != "cuda" and not (_interpret() and t.device.type == "cpu"):
        raise ValueError(f"{name} is on {t.device}; the cuda backend's ops take CUDA tensors "
                         "(build the model on a CUDA device, or select the reference backend)")


def _check_tensors(**tensors: Any) -> None:
    """Each tensor given (None skipped) is a tensor on a CUDA device (or the interpreter's CPU)."""
    for name, t in tensors.items():
        if t is not None:
            _check_tensor(name, t)


def _check_float(name: str, t: Any) -> None:
    _check_tensor(name, t)
    argcheck.check_float(name, t, FLOATS, NAME)


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` with a unit stride on the last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


# ----------------------------------------------------------------------------------------------------
# normalization and activations
# ----------------------------------------------------------------------------------------------------


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_tensors(x=x, weight=weight)
    argcheck.check_rms_norm(x, weight, FLOATS, NAME)
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"x's last dimension {x.shape[-1]} exceeds the cuda backend's limit {MAX_HIDDEN}")


@hookimpl
def accel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(x, weight)
    out, _ = _kernels().rms_norm(_rows("x", x), None, weight, eps)
    return out.view(x.shape)


@hookimpl
def accel_argmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One launch: a program per (row, 4096 columns) packs each element into an order-preserving int64 key
    and ``atomic_max``-es the chunk's best into the row's word; the row's last program stores the index."""
    _check_tensors(x=x, out=out)
    rows = argcheck.check_argmax(x, out, FLOATS, NAME)
    if rows:
        _kernels().argmax_rows(x, out)
    return out


@hookimpl
def accel_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight)
    _check_tensor("residual", residual)
    argcheck.check_fused_add_rms_norm(x, residual, weight, FLOATS, NAME)
    # New output tensors (not in place): same bytes moved, and no aliasing surprises for the caller.
    out, res_out = _kernels().rms_norm(_rows("x", x), _rows("residual", residual), weight, eps)
    return out.view(x.shape), res_out.view(x.shape)


def _act(x: torch.Tensor, act: int) -> torch.Tensor:
    _check_tensor("x", x)
    argcheck.check_gated(x, FLOATS, NAME)
    out = _kernels().act_and_mul(_rows("x", x), act)
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


@hookimpl
def accel_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act(x, 0)


@hookimpl
def accel_gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    argcheck.check_approximate(approximate)
    return _act(x, 1 if approximate == "none" else 2)


# ----------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q and k rotated in place in one launch (``_rope_kernel``: a program per token and head chunk)."""
    _check_tensors(positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    argcheck.check_rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim, FLOATS, NAME)
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q = _unit_stride("query", query, query.dtype)
    k = _unit_stride("key", key, query.dtype) if key is not None else None
    q3 = q if q.dim() == 3 else q.unflatten(1, (-1, head_size))
    k3 = None if k is None else k if k.dim() == 3 else k.unflatten(1, (-1, head_size))
    _kernels().rope(positions, q3, k3, cos_sin_cache, rotary_dim, is_neox)  # in place (allowed by the spec)
    return q, k


def _unit_stride(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}; expected the query's {dtype}")
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------
# paged KV cache and attention
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_kv_cache_layout(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> KVCacheLayout:
    argcheck.check_dtype("KV-cache dtype", dtype, FLOATS, NAME)
    if not 0 < head_size <= MAX_HEAD_SIZE:
        raise ValueError(f"head_size {head_size} is not supported by the cuda attention kernel; supported: "
                         f"1..{MAX_HEAD_SIZE}")
    if num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads must be positive, got {num_kv_heads}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return KVCacheLayout(name=KV_LAYOUT, block_sizes=BLOCK_SIZES, bytes_per_token=2 * num_kv_heads * head_size * itemsize)


@hookimpl
def accel_allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    argcheck.check_allocate_kv_cache(num_blocks, block_size, BLOCK_SIZES, NAME)
    accel_kv_cache_layout(num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda" and not (_interpret() and device.type == "cpu"):
        raise ValueError(f"device {device} is not a CUDA device; the cuda backend's KV cache lives on the GPU")
    return torch.empty((2, num_blocks, num_kv_heads, block_size, head_size), dtype=dtype, device=device)


def _check_cache(kv_cache: Any) -> None:
    _check_float("kv_cache", kv_cache)
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3] not in BLOCK_SIZES \
            or kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache has shape {tuple(kv_cache.shape)}; the cuda layout is {KV_LAYOUT} with "
                         f"block_size in {BLOCK_SIZES} (allocate it with allocate_kv_cache)")


@hookimpl
def accel_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _check_cache(kv_cache)
    _check_tensor("slot_mapping", slot_mapping)
    _check_float("key", key)
    _check_float("value", value)
    argcheck.check_write_kv_cache(key, value, slot_mapping, kv_cache.shape[2], kv_cache.shape[4])
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _kernels().write_kv_cache(key, value, kv_cache, slot_mapping.contiguous())


@hookimpl
def accel_rope_and_write_kv_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
    is_neox: bool,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch (``_rope_kernel`` with WRITE): query and key rotated in place, the rotated keys and the
    values stored at their slots (slot -1 skipped), as rotary_embedding then write_kv_cache compute them."""
    _check_cache(kv_cache)
    _check_tensors(positions=positions, query=query, key=key, value=value, cos_sin_cache=cos_sin_cache,
                   slot_mapping=slot_mapping)
    argcheck.check_rope_and_write_kv_cache(positions, query, key, value, cos_sin_cache, head_size, rotary_dim,
                                           slot_mapping, kv_cache.shape[2], kv_cache.shape[4], FLOATS, NAME)
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q = _unit_stride("query", query, query.dtype)
    k = _unit_stride("key", key, query.dtype)
    v = _unit_stride("value", value, query.dtype)
    _kernels().rope(positions, q, k, cos_sin_cache, rotary_dim, is_neox, value=v, kv_cache=kv_cache,
                    slot_mapping=slot_mapping.contiguous())
    return q, k


@dataclass(frozen=True)
class AttentionPlan:
    """Launch shape of one paged-attention call (host-side; see ``_paged_attention_kernel``)."""

    block_m: int  # rows per program: block_q query tokens x the GQA group of query heads
    block_q: int  # query tokens per program
    tile_n: int  # keys per inner-loop step (independent of the KV block size)
    head_pad: int  # head_size rounded up to a power of two (>= 16 for the dots)
    num_q_programs: int  # grid axis 0: an upper bound on the query blocks of all sequences
    num_splits: int  # grid axis 2: KV ranges computed apart and merged (split-K; 1 = none)
    num_warps: int
    num_stages: int
    #: every sequence has at most one query token (max_query_len == 1): one program per sequence, found
    #: by its index instead of a search over query_start_loc
    decode: bool = False
    #: the decode loop with the next tile's keys and values in flight while one is attended (config
    #: ``prefetch_*``; see ``_paged_attention_kernel``)
    prefetch: bool = False


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def attention_plan(*, num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_size: int,
                   max_query_len: int, max_seq_len: int, num_sms: int,
                   config: dict[str, dict[str, int]] | None = None, itemsize: int = 2,
                   workspace_limit_bytes: int = 256 << 20) -> AttentionPlan:
    """Choose the block shapes, the grid and the split-K factor for a batch.

    Decode-like batches (every sequence's query rows fit one 16-row tile) use small tiles; when their
    programs (sequences x KV heads) would not fill the GPU, the KV range is split so each SM gets work,
    and a second small kernel merges the partial softmaxes.
    """
    if config is None:
        config = {
            "attn_decode": {"BLOCK_M": 16, "TILE_N": 64, "num_warps": 4, "num_stages": 2, "split_keys": 64,
                            "split_below": 0.5, "split_target": 4, "prefetch_below": 1.0,
                            "prefetch_elems": 8192, "prefetch_warps": 8, "prefetch_stages": 1,
                            "busy_elems": 8192},
            "attn_prefill": {"BLOCK_M": 64, "TILE_N": 32, "num_warps": 4, "num_stages": 3},
        }
    group = num_heads // num_kv_heads
    head_pad = max(16, _pow2(head_size))
    decode_like = max_query_len * group <= 16
    cfg = config["attn_decode" if decode_like else "attn_prefill"]
    block_m = max(cfg["BLOCK_M"], _pow2(group), 16)
    block_q = max(1, min(block_m // group, _pow2(max(max_query_len, 1))))
    tile_n = cfg["TILE_N"]
    num_stages = cfg["num_stages"]

    def smem() -> int:  # the query tile plus num_stages pipelined K and V tiles
        return (block_m * head_pad + num_stages * 2 * tile_n * head_pad) * itemsize

    while smem() > SMEM_BUDGET and tile_n > 16:
        tile_n //= 2
    while smem() > SMEM_BUDGET and num_stages > 1:
        num_stages -= 1
    decode = max_query_len <= 1 and block_q == 1
    num_q_programs = num_seqs if decode else num_tokens // block_q + num_seqs
    busy = max(1, -(-num_tokens // block_q)) * num_kv_heads  # programs that do work (about)
    splits = 1
    # Split-K over the keys when the programs would leave SMs idle: long contexts in chunks of 256+ keys
    # below 2x SMs programs; and (decode) short contexts in chunks of one key tile while the programs
    # fill under split_below x SMs (a short context's cost is its latency, not its bytes).
    target = cfg.get("split_target", 4)
    for below, keys in ((2.0, 256), (cfg.get("split_below", 0.0), cfg.get("split_keys", 256))):
        keys = max(tile_n, keys)
        if busy < below * num_sms and max_seq_len > keys:
            splits = min(math.ceil(target * num_sms / busy), -(-max_seq_len // keys), 32)
            break
    if splits > 1:
        per_split = num_tokens * num_heads * (head_pad + 2) * 4
        splits = max(1, min(splits, workspace_limit_bytes // max(per_split, 1)))
    # The hand-pipelined key loop (next tile's keys and values in flight) where each SM has at most about
    # one program: there a program's chain of dependent loads is the kernel's time. With more programs
    # than SMs the plain loop (its 2-stage pipeline, shorter per-tile code) measured faster (session 14:
    # batch 16 x 8 KV heads 6.3 us against 8.4 at head size 64; batch 64 16.2-22 against 14.2). Wider
    # tiles there (fewer round trips).
    warps = cfg["num_warps"]
    prefetch = (decode_like and busy <= cfg.get("prefetch_below", 0.0) * num_sms
                and (splits == 1 or bool(cfg.get("prefetch_splits", 0))))
    if prefetch:
        tile_n = max(16, min(128, cfg.get("prefetch_elems", 8192) // head_pad))
        warps = cfg.get("prefetch_warps", warps)
        num_stages = cfg.get("prefetch_stages", num_stages)
        while smem() > SMEM_BUDGET and tile_n > 16:
            tile_n //= 2
    elif decode and splits == 1 and busy > num_sms and cfg.get("busy_elems"):
        # More programs than SMs (every one resident, short of loads in flight: session 14's ncu): the plain
        # loop over tiles of busy_elems keys x head elements (H200, head size 64, sessions 14-15: 128-key
        # tiles 11.7-11.8 us against 14.1-14.2 at batch 64, 8.1 against 9.7 at 32; wider heads keep theirs)
        tile_n = max(tile_n, min(128, cfg["busy_elems"] // head_pad))
        while smem() > SMEM_BUDGET and tile_n > 16:
            tile_n //= 2
    return AttentionPlan(block_m=block_m, block_q=block_q, tile_n=tile_n, head_pad=head_pad,
                         num_q_programs=num_q_programs, num_splits=splits, num_warps=warps,
                         num_stages=num_stages, decode=decode, prefetch=prefetch)


@hookimpl
def accel_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    _check_float("query", query)
    _check_cache(kv_cache)
    _check_tensors(block_table=block_table, seq_lens=seq_lens, query_start_loc=query_start_loc)
    _, _, kv_heads, _, head_size = kv_cache.shape
    batch = argcheck.check_paged_attention(query, block_table, seq_lens, query_start_loc, kv_heads, head_size)
    if sliding_window is not None and sliding_window < 0:
        raise ValueError(f"sliding_window must be None or positive, got {sliding_window}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    kern = _kernels()
    plan = attention_plan(num_tokens=query.shape[0], num_seqs=batch, num_heads=query.shape[1],
                          num_kv_heads=kv_heads, head_size=head_size, max_query_len=int(max_query_len),
                          max_seq_len=int(max_seq_len), num_sms=_num_sms(query.device), config=kern.CONFIG,
                          itemsize=query.element_size())
    return kern.paged_attention(query, kv_cache, block_table, seq_lens.contiguous(), query_start_loc.contiguous(),
                                scale, sliding_window, logits_soft_cap, plan)


# ----------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_moe_topk(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    num_expert_group: int | None,
    topk_group: int | None,
    e_score_correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Triton launch for ungrouped routing (Mixtral, Qwen-MoE: a decode step's ~7 small torch kernels per
    MoE layer were ~0.2 ms of the Mixtral step); grouped top-k (DeepSeek) through the reference's torch code."""
    _check_tensors(router_logits=router_logits, e_score_correction_bias=e_score_correction_bias)
    num_tokens, num_experts, grouped = argcheck.check_moe_topk(
        router_logits, top_k, scoring_func, num_expert_group, topk_group, e_score_correction_bias, FLOATS, NAME)
    if not grouped and top_k <= MOE_TOPK_MAX_K and num_experts <= MOE_TOPK_MAX_EXPERTS and TRITON_MOE_TOPK:
        logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
        bias = None if e_score_correction_bias is None else e_score_correction_bias.contiguous()
        return _kernels().moe_topk(logits, top_k, scoring_func == "softmax", renormalize, bias,
                                   routed_scaling_factor)
    # grouped top-k (DeepSeek) and shapes past the kernel: the reference's torch code, which runs on the GPU
    # as it is (float32 math, no host synchronization, stable ties) and is the contract's definition
    return accel_backend_reference.accel_moe_topk(
        router_logits=router_logits, top_k=top_k, scoring_func=scoring_func, renormalize=renormalize,
        num_expert_group=num_expert_group, topk_group=topk_group, e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=routed_scaling_factor)


def fit_moe_config(cfg: dict[str, int], itemsize: int, *, gate_up: bool) -> dict[str, int]:
    """Shrink a fused-experts tile config until its pipelined tiles fit :data:`SMEM_BUDGET`.

    Per stage the gate/up kernel holds an activation tile ``BLOCK_M x BLOCK_K`` and two weight tiles
    ``BLOCK_K x BLOCK_N``; the down kernel one of each. float32 (4 bytes) needs smaller tiles than bf16.
    """
    cfg = dict(cfg)

    def need() -> int:
        per_stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + (2 if gate_up else 1) * cfg["BLOCK_K"] * cfg["BLOCK_N"]
        return cfg["num_stages"] * per_stage * itemsize

    while need() > SMEM_BUDGET and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    while need() > SMEM_BUDGET and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    while need() > SMEM_BUDGET and cfg["num_stages"] > 1:
        cfg["num_stages"] -= 1
    return cfg


def moe_align(local_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, choice) pairs by expert and pad each expert's run to a multiple of ``block_m``.

    Args:
        local_ids: ``[num_pairs]`` int64 local expert id of each pair (pair ``i`` is token ``i // top_k``),
            ``-1`` for pairs routed to experts another rank holds.

    Returns:
        ``(sorted_pair, block_expert)``: ``sorted_pair`` ``[num_blocks * block_m]`` int32 holds pair indices
        in expert order, padded with ``num_pairs``; ``block_expert`` ``[num_blocks]`` int32 is the expert of
        each block of ``block_m`` rows (``-1`` for blocks past the end). No host synchronization: the sizes
        are bounds known on the host (``num_pairs // block_m + min(num_experts, num_pairs) + 1`` blocks).
    """
    num_pairs = local_ids.numel()
    dev = local_ids.device
    num_blocks = num_pairs // block_m + min(num_experts, num_pairs) + 1
    cap = num_blocks * block_m
    e = torch.where(local_ids < 0, num_experts, local_ids)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, e, torch.ones_like(e))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(e, stable=True).indices
    se = e[order]
    sec = se.clamp(max=num_experts - 1)
    dest = pad_start[sec] + torch.arange(num_pairs, device=dev) - cnt_start[sec]
    dest = torch.where(se < num_experts, dest, cap)  # pairs held elsewhere go to a dummy slot
    sorted_pair = torch.full((cap + 1,), num_pairs, dtype=torch.int32, device=dev)
    sorted_pair.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pair[:cap], block_expert


#: fused_experts' decode path (:func:`moe_decode_plan`; ``_triton_kernels.CONFIG["moe_decode"]`` overrides):
#: up to ``max_pairs`` (token, choice) pairs, two launches that read each routed expert once, no sort.
#: H100 sweep (docs/cuda-notes.md "fused_experts decode path"): it beat the sorted grouped GEMM at every
#: measured size of the Mixtral-small layer, 2 to 128 pairs. H200, session 12 (compact 16-row dot tiles):
#: 68 us against 124 at 128 pairs, 93 against 154 at 256 (bench/cuda/results/moe-decode-h200-s12); above
#: 256 unmeasured, so the sorted path keeps those (prefill). Tiles: session 13's H200 sweep at 8/16/64
#: tokens with the 16-row tiles (bench_moe_decode.py --sweep-tokens 8,16,64; 48.5 / 58.7 us at 16 / 64
#: tokens against 57.5 / 67.1 with the H100's 32-row tiles, 43.3 against 41.1 at 8; Mixtral batch 16 / 64
#: end to end 1.342 / 1.661 ms against 1.473 / 1.762).
MOE_DECODE_CONFIG: dict[str, Any] = {
    "max_pairs": 256,
    # rows of the dot tile an expert's pairs go through (BLOCK_R, a chunk loop above it); None: one tile of
    # all the launch's pairs (BLOCK_M), masked, as before session 12
    "rows": 16,
    "up": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    # up to this many pairs, the earlier (narrower) tiles: at 8 tokens (16 pairs) they took 41.1 us against
    # the wide tiles' 43.3 in the same session-13 call; end to end Mixtral batch 2/4/8 0.815/0.937/1.160 ms
    # against 0.867/0.987/1.186 with the wide tiles (bench/cuda/results/decode-h200-s13/small-tiles)
    "small": {"max_pairs": 16, "up": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
              "down": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}},
}


def moe_decode_plan(num_pairs: int, num_local: int, hidden: int, inter: int, itemsize: int = 2,
                    config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Launch plan of fused_experts' decode path for ``num_pairs`` (token, choice) pairs, or None for the
    sorted grouped GEMM.

    Decode routes a handful of pairs: the time is the routed experts' weight bytes, and the grouped GEMM's
    sort (~15 small torch kernels), its padding of each expert to a 16-row block and its few wide programs
    (24 for gate/up at one token) dominate. This path launches two kernels whose program rows are
    "slots": one per local expert when there are at least as many pairs as experts (BY_EXPERT), else one
    per pair (the first pair of each expert works for all the pairs of that expert, the others exit), times
    narrow n tiles, so every routed expert's weights are read once, spread over many SMs. The routing is
    read as one ``BLOCK_M`` = max(16, pow2(num_pairs)) vector; an expert's pairs go through the dots
    ``BLOCK_R`` = min(BLOCK_M, pow2(config ``rows``)) rows at a time, gathered compactly (a chunk loop when
    an expert has more; later chunks re-read the weight tile, mostly from L2), so the tensor-core work
    follows the pairs an expert has, not the launch's: a 128-row tile of 8 real rows made the 64-token
    step compute-bound. With ``BLOCK_R == BLOCK_M`` all pairs ride in one masked tile (masked rows load
    nothing). Tiles: config ``up``/``down``, or ``small``'s up to its ``max_pairs``; they shrink (k first,
    then stages) until the pipelined stages fit :data:`SMEM_BUDGET`.
    """
    cfg = (config or {}).get("moe_decode") or MOE_DECODE_CONFIG
    if num_pairs < 1 or num_pairs > cfg["max_pairs"] or hidden < 1 or inter < 1:
        return None
    block_m = max(16, _pow2(num_pairs))
    rows = cfg.get("rows")
    block_r = block_m if rows is None else min(block_m, max(16, _pow2(int(rows))))
    by_expert = num_local <= num_pairs

    def tile(t: dict[str, int], n: int, k: int, weights: int) -> dict[str, int]:
        t = dict(t)
        t["BLOCK_N"] = max(16, min(t["BLOCK_N"], _pow2(n)))
        t["BLOCK_K"] = max(16, min(t["BLOCK_K"], _pow2(k)))

        def need() -> int:
            return t["num_stages"] * (block_r + weights * t["BLOCK_N"]) * t["BLOCK_K"] * itemsize

        while need() > SMEM_BUDGET and t["BLOCK_K"] > 32:
            t["BLOCK_K"] //= 2
        while need() > SMEM_BUDGET and t["num_stages"] > 1:
            t["num_stages"] -= 1
        return t

    small = cfg.get("small")
    tiles = small if small is not None and num_pairs <= small["max_pairs"] else cfg
    return {"BLOCK_M": block_m, "BLOCK_R": block_r, "BY_EXPERT": by_expert, "slots": num_local if by_expert else num_pairs,
            "up": tile(tiles["up"], inter, hidden, 2), "down": tile(tiles["down"], hidden, inter, 1)}


@hookimpl
def accel_fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    _check_tensors(hidden_states=hidden_states, w13=w13, w2=w2, topk_ids=topk_ids, topk_weights=topk_weights,
                   expert_map=expert_map)
    num_tokens, _, num_local, _ = argcheck.check_fused_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, FLOATS, NAME)
    kern = _kernels()
    plan = None
    if hidden_states.device.type == "cuda" or _interpret():
        plan = moe_decode_plan(topk_ids.numel(), num_local, hidden_states.shape[1], w2.shape[2],
                               hidden_states.element_size(), kern.CONFIG)
    if plan is not None:
        x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
        return kern.fused_experts_decode(
            x, w13 if w13.stride(-1) == 1 else w13.contiguous(), w2 if w2.stride(-1) == 1 else w2.contiguous(),
            topk_weights.contiguous(), topk_ids.contiguous(), None if expert_map is None else expert_map.contiguous(),
            0 if activation == "silu" else 1, plan)
    ids = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        ids = expert_map.to(torch.int64)[ids]
    num_pairs = ids.numel()
    large = num_pairs >= 4 * num_local * 16  # about 64+ pairs per expert: compute-bound tiles
    itemsize = hidden_states.element_size()
    cfg_up = fit_moe_config(kern.CONFIG["moe_large" if large else "moe_small"], itemsize, gate_up=True)
    cfg_down = fit_moe_config(kern.CONFIG["moe_down_large" if large else "moe_small"], itemsize, gate_up=False)
    cfg_down = {**cfg_down, "BLOCK_M": cfg_up["BLOCK_M"]}  # both kernels walk the same sorted blocks
    align = moe_align(ids, num_local, cfg_up["BLOCK_M"])
    x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
    return kern.fused_experts(x, w13.contiguous(), w2.contiguous(), topk_weights, ids.view(num_tokens, -1),
                              0 if activation == "silu" else 1, align, cfg_up, cfg_down)


# ----------------------------------------------------------------------------------------------------
# dense linear
# ----------------------------------------------------------------------------------------------------

#: Small-M linear defaults (the H100 sweep in docs/cuda-notes.md; ``_triton_kernels.CONFIG["linear"]``
#: overrides). Up to ``max_m`` rows and from ``min_bytes`` of weight the Triton kernel beat cuBLAS there;
#: smaller weights (qkv/o_proj of a 1B model) are launch-latency bound and tie, so they stay on cuBLAS.
LINEAR_CONFIG: dict[str, Any] = {
    "max_m": 16, "min_bytes": 24 << 20, "target": 2, "min_k": 1024,
    "small_m": 8,  # rows up to here: long k tiles, 2 stages; above: shorter tiles, 4 stages
    "small": {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
    "large": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    # act_and_mul_linear up to act_fma_m rows: no 16-row dot but a BLOCK_M = pow2(m) FMA tile, so the
    # float32 activation at the x loads is computed for the real rows only (the dot pads to 16 rows: at
    # M = 1 it computed 16x the activations and held a 16 x BLOCK_K float32 tile per program)
    "act_fma_m": 4,
    "act_fma": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    # more than max_m rows, up to wide["max_m"], for weights of wide["min_bytes"] .. wide["max_bytes"] only, on
    # this tile and split (None: cuBLAS above max_m). For an A/B of Llama-1B's down_proj (33.5 MB) at batch
    # 17-64, where cuBLAS runs a split-K GEMM plus a reduce kernel, neither with PDL; the tile is session 10's
    # best for that shape at 64 rows in isolation (15.2 vs cuBLAS 15.0 us). Not measured end to end: off.
    "wide": None,
}
#: the wide entry an A/B sets (bench/cuda/results/decode-h200-s15/call4.sh)
WIDE_DOWN = {"max_m": 64, "min_bytes": 30 << 20, "max_bytes": 40 << 20, "BLOCK_N": 64, "BLOCK_K": 128,
             "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}


def linear_plan(m: int, n: int, k: int, num_sms: int, config: dict[str, Any] | None = None,
                itemsize: int = 2, act: bool = False) -> dict[str, int] | None:
    """Launch config of the small-M linear kernel for ``[m, k] x [n, k]^T``, or None for cuBLAS.

    Decode's projections read an ``n x k`` weight for a handful of rows: the time is the weight's bytes
    over the bandwidth the grid sustains. The grid is ``ceil(n / BLOCK_N)`` weight-row tiles times
    ``SPLIT_K`` ranges of k, split until about ``target x SMs`` programs stream (each range at least
    ``min_k`` long); the last split of a tile to finish sums the partials (one launch). The rows go
    through a 16-row dot (tensor cores; x is tiny next to the weight), so every m up to 16 costs the same.
    ``act`` (act_and_mul_linear): up to ``act_fma_m`` rows, an FMA tile of ``pow2(m)`` rows instead.
    """
    cfg = {**LINEAR_CONFIG, **((config or {}).get("linear") or {})}
    wide = cfg.get("wide")
    if (m > cfg["max_m"] and wide and not act and m <= wide["max_m"]
            and wide["min_bytes"] <= n * k * itemsize <= wide["max_bytes"]):
        return {"BLOCK_M": max(16, _pow2(m)), "BLOCK_N": wide["BLOCK_N"], "BLOCK_K": wide["BLOCK_K"],
                "SPLIT_K": max(1, min(wide["SPLIT_K"], k // wide["BLOCK_K"])), "USE_DOT": 1,
                "num_warps": wide["num_warps"], "num_stages": wide["num_stages"]}
    if m < 1 or m > cfg["max_m"] or n * k * itemsize < cfg["min_bytes"]:
        return None
    fma = act and m <= cfg["act_fma_m"]
    tile = cfg["act_fma"] if fma else cfg["small"] if m <= cfg["small_m"] else cfg["large"]
    block_n, block_k = tile["BLOCK_N"], tile["BLOCK_K"]
    tiles = -(-n // block_n)
    split = max(1, min(-(-cfg["target"] * num_sms // tiles), k // max(cfg["min_k"], block_k)))
    return {"BLOCK_M": _pow2(m) if fma else max(16, _pow2(m)), "BLOCK_N": block_n, "BLOCK_K": block_k,
            "SPLIT_K": split, "USE_DOT": 0 if fma else 1, "num_warps": tile["num_warps"],
            "num_stages": tile["num_stages"]}


@hookimpl
def accel_prepare_linear(weight: torch.Tensor) -> None:
    """Nothing to prepare: the small-M kernel reads the weight in place (its launch plan depends on the
    rows of each call and is a few integer operations). No extra memory."""
    _check_tensor("weight", weight)
    argcheck.check_prepare_linear(weight, FLOATS, NAME)
    return None


@hookimpl
def accel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any) -> torch.Tensor:
    """Small M (decode): a Triton kernel that streams the weight with every SM (split-K, one launch);
    otherwise, and for weights whose k is not unit-stride, ``torch.nn.functional.linear`` (cuBLAS)."""
    _check_tensors(x=x, weight=weight, bias=bias)
    k, n = argcheck.check_linear(x, weight, bias, FLOATS, NAME)
    m = x.numel() // k if k else 0
    plan = None
    if weight.stride(-1) == 1 and weight.stride(0) >= k and (x.device.type == "cuda" or _interpret()):
        kern = _kernels()
        plan = linear_plan(m, n, k, _num_sms(x.device), kern.CONFIG, x.element_size())
    if plan is None:
        return torch.nn.functional.linear(x, weight, bias)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    out = _kernels().linear_small_m(_rows("x", x), weight, bias, plan)
    return out.view(*x.shape[:-1], n)


#: Weight bytes from which act_and_mul_linear takes the fused small-M kernel (None: the linear's
#: ``min_bytes``). Below it, as for linear, the activation kernel and the linear (two launches).
#: Off by default: on the H100 the fused kernel took 57.8 us at the Llama-1B down_proj (M = 1) against
#: 15.9 us for act_and_mul + the small-M linear (bench/cuda/check_fused.py, session 3: a 16-row dot tile
#: activated 16 padded rows); with the FMA tile of the real rows (act_fma_m) 19.4 us against 16.1 (session
#: 4): with PDL the separate activation launch costs ~1 us, less than the fused kernel loses.
ACT_LINEAR_MIN_BYTES: int | None = 1 << 62
_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # _triton_kernels._activation's ACT


@hookimpl
def accel_act_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prepared: Any,
                             activation: str) -> torch.Tensor:
    """act_and_mul then linear (this backend's, as the composite), unless ``ACT_LINEAR_MIN_BYTES`` is set:
    then decode-sized rows with a weight that large take one launch, the small-M split-K kernel computing
    ``act(gate) * up`` at its x loads (rounded to x's dtype there, as act_and_mul's stored output is). Off
    by default: measured slower on the H100 (see ACT_LINEAR_MIN_BYTES)."""
    _check_tensors(x=x, weight=weight, bias=bias)
    k, n = argcheck.check_act_and_mul_linear(x, weight, bias, activation, FLOATS, NAME)
    act = _ACT_CODES[activation]
    m = x.numel() // (2 * k) if k else 0
    plan = None
    if weight.stride(-1) == 1 and weight.stride(0) >= k and (x.device.type == "cuda" or _interpret()):
        kern = _kernels()
        cfg = {**LINEAR_CONFIG, **(kern.CONFIG.get("linear") or {})}
        min_bytes = cfg.get("act_min_bytes", ACT_LINEAR_MIN_BYTES)  # a config's entry wins (null: min_bytes)
        if min_bytes is not None:
            cfg["min_bytes"] = min_bytes
        plan = linear_plan(m, n, k, _num_sms(x.device), {"linear": cfg}, x.element_size(), act=True)
    if plan is None:
        return accel_linear(x=_act(x, act), weight=weight, bias=bias, prepared=prepared)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    out = _kernels().linear_small_m(_rows("x", x), weight, bias, plan, act)
    return out.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------------


@hookimpl
def accel_dynamic_int8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("x", x)
    argcheck.check_dynamic_int8_quant(x, FLOATS, NAME)
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"x's last dimension {x.shape[1]} exceeds the cuda backend's limit {MAX_HIDDEN}")
    return _kernels().dynamic_int8_quant(_rows("x", x))


def _int_mm_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Padded sizes torch._int_mm (cuBLASLt int8) accepts: m > 16, k and n multiples of 8."""
    return max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8


@hookimpl
def accel_int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """cuBLASLt int8 GEMM (torch._int_mm, exact int32 accumulation), zero-padded to the shapes it takes."""
    _check_tensors(a=a, b=b)
    m, k, n = argcheck.check_int8_scaled_mm(a, b, scale_a, scale_b, out_dtype, FLOATS, NAME)
    if a.device.type == "cuda":
        mp, kp, np_ = _int_mm_padding(m, k, n)
        ap = a if (mp, kp) == (m, k) else torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
        bp = b if (np_, kp) == (n, k) else torch.nn.functional.pad(b, (0, kp - k, 0, np_ - n))
        acc = torch._int_mm(ap, bp.t())[:m, :n].to(torch.float32)
    else:  # the interpreter's CPU tensors
        acc = (a.to(torch.int32) @ b.to(torch.int32).t()).to(torch.float32)
    out = acc * scale_a.to(torch.float32) * scale_b.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# persistent decode of a dense decoder layer (hook API 1.4: decoder_layer_decode)
# ----------------------------------------------------------------------------------------------------


def decoder_layer_unsupported(hidden_states: torch.Tensor, weights: dict[str, torch.Tensor], head_size: int,
                              num_heads: int, num_kv_heads: int, rotary_dim: int, kv_cache: torch.Tensor) -> str | None:
    """Why :func:`decoder_layer_decode` does not run this layer (None: it does). It takes one token of a
    dense Llama-style layer: no biases, full-width rotary, SiLU, contiguous weights of the hidden state's
    dtype, a power-of-two head size of 32..256, at most 16 query heads per KV head, and widths up to
    ``_triton_kernels.MAX_PERSISTENT_WIDTH`` (wider ones would spill the kernel's registers)."""
    if hidden_states.dim() != 2 or hidden_states.shape[0] != 1:
        return f"one token per call (hidden_states is {tuple(hidden_states.shape)})"
    why = _attention_half_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim, kv_cache)
    if why:
        return why
    limit = _kernels().MAX_PERSISTENT_WIDTH
    down = weights["w2"] if "w2" in weights else weights["down"]
    widths = {"hidden": hidden_states.shape[-1], "attention": num_heads * head_size, "intermediate": down.shape[-1]}
    for what, width in widths.items():
        if width > limit[what]:
            return f"{what} width {width} exceeds {limit[what]} (the kernel's register tiles would spill)"
    return None


def _attention_half_unsupported(hidden_states: torch.Tensor, weights: dict[str, torch.Tensor], head_size: int,
                                num_heads: int, num_kv_heads: int, rotary_dim: int,
                                kv_cache: torch.Tensor) -> str | None:
    """Why the fused rotary + attention work items (the persistent layer's phase 1, and
    ``_triton_kernels.rope_attention_rows``) do not take this layer (None: they do)."""
    if rotary_dim != head_size:
        return f"partial rotary (rotary_dim {rotary_dim} != head_size {head_size})"
    if head_size not in (32, 64, 128, 256):
        return f"head_size {head_size} is not a power of two in 32..256"
    if num_kv_heads <= 0 or num_heads % num_kv_heads or num_heads // num_kv_heads > 16:
        return f"{num_heads} query heads over {num_kv_heads} KV heads"
    for name, w in weights.items():
        if w.dtype != hidden_states.dtype or not w.is_contiguous():
            return f"weight {name} is {w.dtype}, contiguous={w.is_contiguous()}"
    if kv_cache.dtype != hidden_states.dtype:
        return f"KV cache dtype {kv_cache.dtype} != {hidden_states.dtype}"
    return None


def rows_layer_unsupported(hidden_states: torch.Tensor, weights: dict[str, torch.Tensor], head_size: int,
                           num_heads: int, num_kv_heads: int, rotary_dim: int, kv_cache: torch.Tensor) -> str | None:
    """Why :func:`decoder_layer_rows` does not run this decode layer of 2+ tokens (None: it does): one
    token (the persistent kernel's), ``CONFIG["rows_attention"]["enabled"]`` off, too few tokens (programs
    = tokens x KV heads at most ``min_programs`` x SMs: there the paged kernel's prefetching loop wins), or
    what the fused rotary + attention launch does not take (partial rotary, an odd head size, a cache of
    another dtype)."""
    if hidden_states.dim() != 2 or hidden_states.shape[0] < 2:
        return f"two or more tokens per call (hidden_states is {tuple(hidden_states.shape)})"
    cfg = _kernels().CONFIG["rows_attention"]
    if not cfg["enabled"]:
        return "CONFIG['rows_attention']['enabled'] is off"
    programs = hidden_states.shape[0] * num_kv_heads
    sms = _num_sms(hidden_states.device)
    if programs <= cfg.get("min_programs", 0.0) * sms:
        return (f"{programs} attention programs ({hidden_states.shape[0]} tokens x {num_kv_heads} KV heads) fill at "
                f"most CONFIG['rows_attention']['min_programs'] x {sms} SMs")
    return _attention_half_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim,
                                       kv_cache)


def decoder_layer_rows(hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                       input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
                       post_norm_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor, num_heads: int,
                       num_kv_heads: int, is_neox: bool, scale: float, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       max_seq_len: int,
                       feed_forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step of T >= 2 sequences through a Llama-style layer as this backend's ops run it, except
    that rotary, the KV-cache write and attention are one launch (``_triton_kernels.rope_attention_rows``:
    no rotated q/k round trip through memory, one launch fewer a layer). ``feed_forward(x)`` is the MLP or
    the MoE block on the post-attention-normed rows. Returns ``(hidden_out, residual_out)``."""
    if residual is None:
        residual, x = hidden_states, accel_rms_norm(x=hidden_states, weight=input_norm_weight, eps=eps)
    else:
        x, residual = accel_fused_add_rms_norm(x=hidden_states, residual=residual, weight=input_norm_weight, eps=eps)
    qkv = accel_linear(x=x, weight=qkv_weight, bias=None, prepared=None)
    att = _kernels().rope_attention_rows(
        _rows("qkv", qkv), positions, slot_mapping, block_table if block_table.stride(-1) == 1 else block_table.contiguous(),
        seq_lens, cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous(), kv_cache, scale,
        num_heads, num_kv_heads, is_neox, max_seq_len, _num_sms(hidden_states.device))
    o = accel_linear(x=att, weight=o_weight, bias=None, prepared=None)
    x, residual = accel_fused_add_rms_norm(x=o, residual=residual, weight=post_norm_weight, eps=eps)
    return feed_forward(x), residual


def _check_decoder_layer_shapes(hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                                weights: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int,
                                head_size: int, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                                seq_lens: torch.Tensor) -> None:
    """ValueError naming the argument whose shape does not fit the layer ``hidden_states`` ``[T, hidden]``
    (the kernel reads every weight by the hidden size and head counts, so a wrong shape would read past it)."""
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [num_tokens, hidden], got {tuple(hidden_states.shape)}")
    t, h = hidden_states.shape
    want = {"input_norm_weight": (h,), "post_norm_weight": (h,),
            "qkv_weight": ((num_heads + 2 * num_kv_heads) * head_size, h), "o_weight": (h, num_heads * head_size)}
    names = {"input_norm_weight": "input_norm", "post_norm_weight": "post_norm", "qkv_weight": "qkv",
             "o_weight": "o", "gate_up_weight": "gate_up", "down_weight": "down", "router_weight": "router",
             "w13": "w13", "w2": "w2"}
    if "router" in weights:  # a MOE layer: experts [E, 2 I, H] / [E, H, I], router [E, H]
        num_experts = weights["router"].shape[0] if weights["router"].dim() == 2 else -1
        inter = weights["w2"].shape[-1] if weights["w2"].dim() == 3 else -1
        want.update(router_weight=(num_experts, h), w13=(num_experts, 2 * inter, h), w2=(num_experts, h, inter))
        what = f"{num_experts} experts of intermediate {inter}"
    else:
        inter = weights["down"].shape[-1] if weights["down"].dim() == 2 else -1
        want.update(gate_up_weight=(2 * inter, h), down_weight=(h, inter))
        what = f"intermediate {inter}"
    for arg, shape in want.items():
        got = tuple(weights[names[arg]].shape)
        if got != shape or inter <= 0 or min(shape) <= 0:
            raise ValueError(f"{arg} has shape {got}; this layer (hidden {h}, {num_heads} heads, {num_kv_heads} KV "
                             f"heads of {head_size}, {what}) needs {shape}")
    if residual is not None and tuple(residual.shape) != (t, h):
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected hidden_states' {(t, h)}")
    for name, x in (("positions", positions), ("slot_mapping", slot_mapping), ("seq_lens", seq_lens)):
        if tuple(x.shape) != (t,):
            raise ValueError(f"{name} must be [{t}] (one per token), got {tuple(x.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != t:
        raise ValueError(f"block_table must be [{t}, max_blocks], got {tuple(block_table.shape)}")


def decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float,
    cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int, is_neox: bool, scale: float,
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    max_seq_len: int, persistent: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense pre-norm decoder layer (Llama: ``fused_add_rms_norm``, qkv ``linear``,
    ``rope_and_write_kv_cache``, ``paged_attention``, o ``linear``, ``fused_add_rms_norm``, gate_up
    ``linear``, ``silu_and_mul``, down ``linear``) for one decode token in one persistent launch
    (``_triton_kernels._decoder_layer_kernel``). Returns ``(hidden_out, residual_out)`` as the layer's
    ``forward`` does; the new key and value are stored at ``slot_mapping[0]``. ``max_seq_len`` plans the
    attention splits (a graph captured for max_model_len stays valid for shorter contexts)."""
    _check_cache(kv_cache)
    weights = {"input_norm": input_norm_weight, "qkv": qkv_weight, "o": o_weight, "post_norm": post_norm_weight,
               "gate_up": gate_up_weight, "down": down_weight}
    _check_tensors(hidden_states=hidden_states, residual=residual, positions=positions, slot_mapping=slot_mapping,
                   block_table=block_table, seq_lens=seq_lens, cos_sin_cache=cos_sin_cache, **weights)
    _check_decoder_layer_shapes(hidden_states, residual, positions, weights, num_heads, num_kv_heads, head_size,
                                slot_mapping, block_table, seq_lens)
    why = decoder_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads,
                                    cos_sin_cache.shape[1], kv_cache)
    if why:
        raise ValueError(f"decoder_layer_decode does not support this layer: {why}")
    return _kernels().decoder_layer_decode(
        hidden_states, residual, positions, slot_mapping, block_table, seq_lens, input_norm_weight, qkv_weight,
        o_weight, post_norm_weight, gate_up_weight, down_weight,
        cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous(), kv_cache, eps, scale,
        num_heads, num_kv_heads, is_neox, max_seq_len, _num_sms(hidden_states.device), persistent)


def _whole_layer_may_run(hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                         weights: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, head_size: int,
                         rotary_dim: int, cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         block_table: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    """The whole-layer hooks' common gate: False (decline) with ``ACCEL_CUDA_PERSISTENT=0``, off a GPU
    (outside the interpreter) or for a cos/sin cache that is not ``rotary_dim`` wide; a ValueError naming
    the argument whose shape does not fit the layer (:func:`_check_decoder_layer_shapes`)."""
    if os.environ.get("ACCEL_CUDA_PERSISTENT", "1") == "0":
        return False
    _check_decoder_layer_shapes(hidden_states, residual, positions, weights, num_heads, num_kv_heads, head_size,
                                slot_mapping, block_table, seq_lens)
    if hidden_states.device.type != "cuda" and not _interpret():
        return False
    return rotary_dim == cos_sin_cache.shape[-1]


@hookimpl
def accel_decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor, eps: float,
    cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int, rotary_dim: int,
    is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One decode token through the persistent layer kernel (:func:`decoder_layer_decode`); 2+ tokens
    through :func:`decoder_layer_rows` (the ops, with rotary and attention in one launch); None (the layer
    runs op by op) for partial rotary, odd head sizes or dtypes, or ``ACCEL_CUDA_PERSISTENT=0``."""
    weights = {"input_norm": input_norm_weight, "qkv": qkv_weight, "o": o_weight, "post_norm": post_norm_weight,
               "gate_up": gate_up_weight, "down": down_weight}
    if not _whole_layer_may_run(hidden_states, residual, positions, weights, num_heads, num_kv_heads, head_size,
                                rotary_dim, cos_sin_cache, slot_mapping, block_table, seq_lens):
        return None
    if rows_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim,
                              kv_cache) is None:
        def mlp(x: torch.Tensor) -> torch.Tensor:
            gate_up = accel_linear(x=x, weight=gate_up_weight, bias=None, prepared=None)
            return accel_act_and_mul_linear(x=gate_up, weight=down_weight, bias=None, prepared=None, activation="silu")

        return decoder_layer_rows(hidden_states, residual, positions, input_norm_weight, qkv_weight, o_weight,
                                  post_norm_weight, eps, cos_sin_cache, num_heads, num_kv_heads, is_neox, scale,
                                  kv_cache, slot_mapping, block_table, seq_lens, max_seq_len, mlp)
    if decoder_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim,
                                 kv_cache) is not None:
        return None
    return decoder_layer_decode(hidden_states, residual, positions, input_norm_weight, qkv_weight, o_weight,
                                post_norm_weight, gate_up_weight, down_weight, eps, cos_sin_cache, num_heads,
                                num_kv_heads, head_size, is_neox, scale, kv_cache, slot_mapping, block_table,
                                seq_lens, max_seq_len)


# ----------------------------------------------------------------------------------------------------
# persistent decode of a Mixtral (MoE) decoder layer (hook API 1.5: moe_decoder_layer_decode)
# ----------------------------------------------------------------------------------------------------

#: the most experts and the largest top_k the MOE persistent layer routes (its top-k runs in registers)
MAX_PERSISTENT_EXPERTS = 256
MAX_PERSISTENT_TOP_K = 8


def moe_decoder_layer_unsupported(hidden_states: torch.Tensor, weights: dict[str, torch.Tensor], head_size: int,
                                  num_heads: int, num_kv_heads: int, rotary_dim: int, kv_cache: torch.Tensor,
                                  top_k: int) -> str | None:
    """Why :func:`moe_decoder_layer_decode` does not run this layer (None: it does): what
    :func:`decoder_layer_unsupported` declines, more than :data:`MAX_PERSISTENT_EXPERTS` experts, a top_k
    outside 1..:data:`MAX_PERSISTENT_TOP_K` (or above the expert count), or the streamed (DOT) variant."""
    why = decoder_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim, kv_cache)
    if why:
        return why
    num_experts = weights["router"].shape[0]
    if num_experts > MAX_PERSISTENT_EXPERTS:
        return f"{num_experts} experts (at most {MAX_PERSISTENT_EXPERTS})"
    if not 1 <= top_k <= min(num_experts, MAX_PERSISTENT_TOP_K):
        return f"top_k {top_k} of {num_experts} experts (1..{min(num_experts, MAX_PERSISTENT_TOP_K)})"
    if _kernels().CONFIG["decoder_layer"]["DOT"]:
        return "CONFIG['decoder_layer']['DOT'] is set (the MOE layer has register tiles only)"
    return None


def moe_decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
    renormalize: bool, eps: float, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int,
    is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int, persistent: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mixtral decoder layer (the dense layer's attention half, then ``fused_add_rms_norm``, the router
    ``linear``, ``moe_topk`` (softmax) and ``fused_experts`` (SiLU)) for one decode token in one
    persistent launch (``_triton_kernels._decoder_layer_kernel`` with MOE). Returns ``(hidden_out,
    residual_out)``; the new key and value are stored at ``slot_mapping[0]``."""
    _check_cache(kv_cache)
    weights = {"input_norm": input_norm_weight, "qkv": qkv_weight, "o": o_weight, "post_norm": post_norm_weight,
               "router": router_weight, "w13": w13, "w2": w2}
    _check_tensors(hidden_states=hidden_states, residual=residual, positions=positions, slot_mapping=slot_mapping,
                   block_table=block_table, seq_lens=seq_lens, cos_sin_cache=cos_sin_cache, **weights)
    _check_decoder_layer_shapes(hidden_states, residual, positions, weights, num_heads, num_kv_heads, head_size,
                                slot_mapping, block_table, seq_lens)
    why = moe_decoder_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads,
                                        cos_sin_cache.shape[1], kv_cache, top_k)
    if why:
        raise ValueError(f"moe_decoder_layer_decode does not support this layer: {why}")
    return _kernels().decoder_layer_decode(
        hidden_states, residual, positions, slot_mapping, block_table, seq_lens, input_norm_weight, qkv_weight,
        o_weight, post_norm_weight, w13, w2,
        cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous(), kv_cache, eps, scale,
        num_heads, num_kv_heads, is_neox, max_seq_len, _num_sms(hidden_states.device), persistent,
        moe={"router": router_weight, "top_k": int(top_k), "renormalize": bool(renormalize)})


@hookimpl
def accel_moe_decoder_layer_decode(
    hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
    input_norm_weight: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
    post_norm_weight: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
    renormalize: bool, eps: float, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int,
    rotary_dim: int, is_neox: bool, scale: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One decode token of a Mixtral layer through the persistent kernel (:func:`moe_decoder_layer_decode`);
    2+ tokens through :func:`decoder_layer_rows` (router, top-k and fused_experts as the MoE block); None
    (the layer runs op by op) where :func:`moe_decoder_layer_unsupported` says why, or with
    ``ACCEL_CUDA_PERSISTENT=0``."""
    weights = {"input_norm": input_norm_weight, "qkv": qkv_weight, "o": o_weight, "post_norm": post_norm_weight,
               "router": router_weight, "w13": w13, "w2": w2}
    if not _whole_layer_may_run(hidden_states, residual, positions, weights, num_heads, num_kv_heads, head_size,
                                rotary_dim, cos_sin_cache, slot_mapping, block_table, seq_lens):
        return None
    if not 1 <= top_k <= router_weight.shape[0]:
        return None  # op by op, moe_topk says what is wrong (the rows path would have written the cache first)
    if rows_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim,
                              kv_cache) is None:
        def moe(x: torch.Tensor) -> torch.Tensor:
            logits = accel_linear(x=x, weight=router_weight, bias=None, prepared=None)
            weights_, ids = accel_moe_topk(router_logits=logits, top_k=top_k, scoring_func="softmax",
                                           renormalize=renormalize, num_expert_group=None, topk_group=None,
                                           e_score_correction_bias=None, routed_scaling_factor=1.0)
            return accel_fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=weights_, topk_ids=ids,
                                       activation="silu", expert_map=None)

        return decoder_layer_rows(hidden_states, residual, positions, input_norm_weight, qkv_weight, o_weight,
                                  post_norm_weight, eps, cos_sin_cache, num_heads, num_kv_heads, is_neox, scale,
                                  kv_cache, slot_mapping, block_table, seq_lens, max_seq_len, moe)
    if moe_decoder_layer_unsupported(hidden_states, weights, head_size, num_heads, num_kv_heads, rotary_dim, kv_cache,
                                     top_k) is not None:
        return None
    return moe_decoder_layer_decode(hidden_states, residual, positions, input_norm_weight, qkv_weight, o_weight,
                                    post_norm_weight, router_weight, w13, w2, top_k, renormalize, eps, cos_sin_cache,
                                    num_heads, num_kv_heads, head_size, is_neox, scale, kv_cache, slot_mapping,
                                    block_table, seq_lens, max_seq_len)
