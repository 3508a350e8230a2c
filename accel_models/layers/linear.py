"""The parallel linear family (vLLM's layout): weights ``[out, in]``, sharded by the TP group's rank.

Sharding lives in each parameter's ``weight_loader(param, loaded_weight, shard_id=None)``: it receives the
*full* checkpoint tensor and copies this rank's slice. The product itself is the bound ``linear`` op (plain
``F.linear`` unless the backend has a faster GEMM); the backend's ``prepare_linear`` runs once in
``process_weights_after_loading`` (after the loader filled every weight) and its result is dropped whenever
a weight loader writes to the weight again, so a prepared copy is never stale.

* :class:`ReplicatedLinear`: every rank holds the whole weight.
* :class:`ColumnParallelLinear`: output features split over ranks (``Y_r = X W_r^T``).
* :class:`MergedColumnParallelLinear`: several column-parallel outputs stored as one (gate/up).
* :class:`QKVParallelLinear`: q, k and v stored as one; KV heads replicate when TP > num KV heads.
* :class:`RowParallelLinear`: input features split over ranks; partial products are all-reduced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accel_models.context import get_build_context
from accel_models.layers.utils import (
    copy_checked,
    divide,
    expect_shards,
    mark_loaded,
    new_param,
    set_weight_attrs,
)


class LinearBase(nn.Module):
    """Binds the TP group and dtype at construction; ``forward`` returns ``(output, output_bias)`` like vLLM."""

    def __init__(self, input_size: int, output_size: int, *, skip_bias_add: bool = False, prefix: str = "") -> None:
        super().__init__()
        ctx = get_build_context()
        self.prefix = prefix
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.tp_group = ctx.tp_group
        self.tp_rank = ctx.tp_group.rank
        self.tp_size = ctx.tp_group.world_size
        self._ctx = ctx
        self._linear = ctx.ops.linear
        self._prepare_linear = ctx.ops.prepare_linear
        self._act_and_mul_linear = ctx.ops.act_and_mul_linear
        #: what the backend's prepare_linear returned for the current weight (None: not prepared)
        self.linear_prepared: Any = None

    def _make_params(self, out_features: int, in_features: int, bias: bool,
                     dtype: torch.dtype | None = None) -> None:
        self.weight = new_param(self._ctx, out_features, in_features, dtype=dtype)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        expect_shards(self.weight, self._expected_shards())
        if bias:
            self.bias = new_param(self._ctx, out_features, dtype=dtype)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader})
            expect_shards(self.bias, self._expected_shards())
        else:
            self.register_parameter("bias", None)

    def _expected_shards(self) -> set[Any] | None:
        return None

    def process_weights_after_loading(self) -> None:
        """Let the backend prepare the loaded weight once (called by the loader after every weight is in)."""
        self.linear_prepared = self._prepare_linear(weight=self.weight)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(x=x, weight=self.weight, bias=bias, prepared=self.linear_prepared)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_rank}/{self.tp_size}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (routers, small gates).

    ``params_dtype``: the weight's dtype when it is not the model's (DeepSeek's float32 router); the
    input must then come in that dtype too.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, *, skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add=skip_bias_add, prefix=prefix)
        self._make_params(output_size, input_size, bias, dtype=params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        if shard_id is not None:
            raise ValueError(f"{self.prefix}: ReplicatedLinear takes no shard id (got {shard_id!r})")
        copy_checked(param.data, loaded_weight)
        mark_loaded(param, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        return self._matmul(x, bias), (self.bias if self.skip_bias_add else None)


class ColumnParallelLinear(LinearBase):
    """``Y = X W^T + b`` with ``W``'s rows (output features) split over the TP ranks.

    ``gather_output`` all-gathers the shards so every rank sees the full output; otherwise each rank
    returns its ``output_size / tp`` features (the input of a following :class:`RowParallelLinear`).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, *, gather_output: bool = False,
                 skip_bias_add: bool = False, prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add=skip_bias_add, prefix=prefix)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size, f"{prefix}: output size")
        self._make_params(self.output_size_per_partition, input_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        if shard_id is not None:
            raise ValueError(f"{self.prefix}: ColumnParallelLinear takes no shard id (got {shard_id!r})")
        size = param.shape[0]
        full = (size * self.tp_size, *param.shape[1:])
        if tuple(loaded_weight.shape) != full:
            raise ValueError(f"shape mismatch ({self.prefix}): checkpoint tensor has shape "
                             f"{tuple(loaded_weight.shape)}, expected {full}")
        copy_checked(param.data, loaded_weight.narrow(0, self.tp_rank * size, size), self.prefix)
        mark_loaded(param, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        out = self._matmul(x, bias)
        if self.gather_output and self.tp_size > 1:
            out = self.tp_group.all_gather(out, dim=-1)
        return out, (self.bias if self.skip_bias_add else None)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stored as one weight (e.g. gate and up).

    The checkpoint holds them separately; ``weight_loader(param, w, shard_id=i)`` loads the ``i``-th
    (``shard_id=None`` takes the already-merged ``[sum(output_sizes), in]`` tensor). Each rank keeps rows
    ``[r * n_i / tp, (r + 1) * n_i / tp)`` of every projection, concatenated in order.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, *, gather_output: bool = False,
                 skip_bias_add: bool = False, prefix: str = "") -> None:
        self.output_sizes = list(output_sizes)
        tp = get_build_context().tp_group.world_size
        for i, n in enumerate(self.output_sizes):
            divide(n, tp, f"{prefix}: output size {i}")
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output=gather_output,
                         skip_bias_add=skip_bias_add, prefix=prefix)

    def _expected_shards(self) -> set[Any] | None:
        return set(range(len(self.output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        if shard_id is None:  # the merged tensor: split it and load each part
            if loaded_weight.shape[0] != sum(self.output_sizes):
                raise ValueError(f"{self.prefix}: merged tensor has {loaded_weight.shape[0]} rows, expected "
                                 f"{sum(self.output_sizes)} ({' + '.join(map(str, self.output_sizes))})")
            start = 0
            for i, n in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, start, n), i)
                start += n
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"{self.prefix}: shard_id must be an int in [0, {len(self.output_sizes)}), got {shard_id!r}")
        full = self.output_sizes[shard_id]
        if loaded_weight.shape[0] != full:
            raise ValueError(f"shape mismatch ({self.prefix} shard {shard_id}): checkpoint tensor has shape "
                             f"{tuple(loaded_weight.shape)}, expected {full} rows")
        size = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_checked(param.data.narrow(0, offset, size), loaded_weight.narrow(0, self.tp_rank * size, size),
                     f"{self.prefix} shard {shard_id}")
        mark_loaded(param, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections stored as one weight ``[(H + 2 Hk) * D / tp, hidden]`` per rank.

    Query heads split evenly over ranks. KV heads split too when ``tp <= Hk``; when ``tp > Hk`` each KV
    head is replicated on ``tp / Hk`` ranks (rank ``r`` holds KV head ``r // (tp / Hk)``), as in vLLM.
    ``weight_loader(param, w, shard_id)`` with ``shard_id`` in ``{"q", "k", "v"}`` takes the full
    checkpoint projection; ``shard_id=None`` takes the fused ``[(H + 2 Hk) * D, hidden]`` tensor.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 bias: bool = True, *, skip_bias_add: bool = False, prefix: str = "") -> None:
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp = get_build_context().tp_group.world_size
        self.num_heads = divide(total_num_heads, tp, f"{prefix}: number of attention heads")
        if tp >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp, self.total_num_kv_heads, f"{prefix}: KV heads replicate only when tp")
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp, f"{prefix}: number of KV heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_size
        super().__init__(hidden_size, output_size, bias, gather_output=False, skip_bias_add=skip_bias_add,
                         prefix=prefix)

    def _expected_shards(self) -> set[Any] | None:
        return {"q", "k", "v"}

    def _shard_rows(self, shard_id: str) -> tuple[int, int, int]:
        """(offset in this rank's weight, rows, start row in the full checkpoint tensor)."""
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard_id == "q":
            return 0, q, self.tp_rank * q
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        return (q if shard_id == "k" else q + kv), kv, kv_rank * kv

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        full_q = self.total_num_heads * self.head_size
        full_kv = self.total_num_kv_heads * self.head_size
        if shard_id is None:  # fused q|k|v checkpoint tensor
            if loaded_weight.shape[0] != full_q + 2 * full_kv:
                raise ValueError(f"{self.prefix}: fused qkv tensor has {loaded_weight.shape[0]} rows, expected "
                                 f"{full_q + 2 * full_kv}")
            for sid, start, n in (("q", 0, full_q), ("k", full_q, full_kv), ("v", full_q + full_kv, full_kv)):
                self.weight_loader(param, loaded_weight.narrow(0, start, n), sid)
            return
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"{self.prefix}: shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        full = full_q if shard_id == "q" else full_kv
        if loaded_weight.shape[0] != full or (param.dim() == 2 and tuple(loaded_weight.shape[1:]) != tuple(param.shape[1:])):
            expected = (full, *param.shape[1:])
            raise ValueError(f"shape mismatch ({self.prefix} {shard_id}): checkpoint tensor has shape "
                             f"{tuple(loaded_weight.shape)}, expected {expected}")
        offset, rows, start = self._shard_rows(shard_id)
        copy_checked(param.data.narrow(0, offset, rows), loaded_weight.narrow(0, start, rows), f"{self.prefix} {shard_id}")
        mark_loaded(param, shard_id)


class RowParallelLinear(LinearBase):
    """``Y = X W^T + b`` with ``W``'s columns (input features) split over the TP ranks.

    With ``input_is_parallel`` the input already holds this rank's slice of features (the output of a
    column-parallel layer). The partial products are summed with ``tp_group.all_reduce``; the bias,
    held whole by every rank, is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, *, input_is_parallel: bool = True,
                 reduce_results: bool = True, skip_bias_add: bool = False, prefix: str = "") -> None:
        super().__init__(input_size, output_size, skip_bias_add=skip_bias_add, prefix=prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, f"{prefix}: input size")
        self.weight = new_param(self._ctx, output_size, self.input_size_per_partition)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        expect_shards(self.weight)
        if bias:
            self.bias = new_param(self._ctx, output_size)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader})
            expect_shards(self.bias)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        self.linear_prepared = None  # the weight changes: a prepared copy would be stale
        if shard_id is not None:
            raise ValueError(f"{self.prefix}: RowParallelLinear takes no shard id (got {shard_id!r})")
        if param.dim() == 2:  # the weight: this rank's columns; the bias is whole on every rank
            full = (self.output_size, self.input_size)
            if tuple(loaded_weight.shape) != full:
                raise ValueError(f"shape mismatch ({self.prefix}): checkpoint tensor has shape "
                                 f"{tuple(loaded_weight.shape)}, expected {full}")
            size = param.shape[1]
            loaded_weight = loaded_weight.narrow(1, self.tp_rank * size, size)
        copy_checked(param.data, loaded_weight, self.prefix)
        mark_loaded(param, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel and self.tp_size > 1:
            size = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * size, size)
        return self._reduce_and_bias(self._matmul(x, None))

    def forward_act_and_mul(self, x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(act_and_mul(x))`` as one ``act_and_mul_linear`` op call (API 1.3).

        ``x`` is ``[..., 2 * input_size_per_partition]``, this rank's ``[gate | up]`` (the output of a
        :class:`MergedColumnParallelLinear` of two equal projections), or, without ``input_is_parallel``,
        the full ``[gate | up]`` (``2 * input_size``), of which this rank takes its slice of each half.
        ``activation`` is ``"silu"``, ``"gelu"`` or ``"gelu_tanh"`` (an activation module's ``activation``).
        The all-reduce and the bias are as in :meth:`forward`: the bias is added once, after the reduction.
        """
        if not self.input_is_parallel and self.tp_size > 1:
            size = self.input_size_per_partition
            gate, up = x.chunk(2, dim=-1)
            x = torch.cat((gate.narrow(-1, self.tp_rank * size, size), up.narrow(-1, self.tp_rank * size, size)), -1)
        out = self._act_and_mul_linear(x=x, weight=self.weight, bias=None, prepared=self.linear_prepared,
                                       activation=activation)
        return self._reduce_and_bias(out)

    def _reduce_and_bias(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        if self.bias is not None and not self.skip_bias_add:
            out = out + self.bias
        return out, (self.bias if self.skip_bias_add else None)
