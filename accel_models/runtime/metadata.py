"""The attention-metadata builder: one step's model inputs in persistent buffers.

Every tensor a step needs (input ids, positions, slot mapping, query start locations, sequence lengths,
block table, logits indices) lives in a buffer allocated once, sized by ``max_num_seqs``,
``max_num_batched_tokens`` and the blocks per sequence. A step fills the leading part of each buffer and
hands out views of it, so the addresses never change: a decode step of a fixed batch size can later be
captured as a device graph (CUDA graph, ACL graph) and replayed with new contents.

The host side is a set of numpy arrays (cheap to fill from Python); on a device other than the CPU each
step copies them into device buffers of the same shapes (one copy per buffer). On the CPU the device
buffers *are* the host arrays (shared memory), so there is no copy at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from accel_models.context import AttentionMetadata


def device_event(device: torch.device) -> Any:
    """A device-agnostic event recorded now on ``device``'s current stream (``torch.Event``: CUDA, or a
    PrivateUse1 device such as the NPU), or None where the device has no events (the CPU)."""
    if device.type == "cpu":
        return None
    try:
        ev = torch.Event(device=device)
        ev.record()
    except (RuntimeError, AttributeError, TypeError):
        return None
    return ev


@dataclass
class StepInputs:
    """What one model step consumes (views of the persistent buffers)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: rows of the hidden states whose logits are needed


class InputBuffers:
    """Persistent host and device buffers for the inputs of one step."""

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_blocks_per_seq: int,
                 device: torch.device | str | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device if device is not None else "cpu")
        T, B = max_num_batched_tokens, max_num_seqs
        specs = {  # name: (shape, dtype, fill)
            "input_ids": ((T,), np.int64, 0),
            "positions": ((T,), np.int64, 0),
            "slot_mapping": ((T,), np.int64, -1),
            "query_start_loc": ((B + 1,), np.int32, 0),
            "seq_lens": ((B,), np.int32, 0),
            "block_table": ((B, max_blocks_per_seq), np.int32, 0),
            "logits_indices": ((T,), np.int64, 0),
        }
        self._on_host = self.device.type == "cpu"
        # All buffers are views of one byte buffer (each at an 8-byte aligned offset), so a step's inputs
        # reach the device in ONE host-to-device copy (pinned host memory where the device runtime offers it) instead of one per buffer.
        offsets, nbytes = {}, 0
        for k, (shape, dt, _) in specs.items():
            offsets[k] = nbytes
            nbytes += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 8) * 8
        # input_ids come first: a step whose ids are already on the device (written there by the previous
        # step's greedy graph) copies only the bytes after them
        assert offsets["input_ids"] == 0, "input_ids must be the first buffer (keep_device_ids skips a prefix)"
        self._ids_nbytes = offsets["positions"]
        # Two host staging buffers on a device (one on the CPU, where the host arrays are the inputs): with
        # overlapped steps (the LLM's async_scheduling) the host fills one while the copy of the other may
        # still be queued behind the running step; :meth:`flip` switches, after that copy is done.
        self._stagings: list[torch.Tensor] = []
        self._hosts: list[dict[str, np.ndarray]] = []
        self._copied: list[Any] = [None, None]  # per staging: an event recorded after its last copy
        for _ in range(1 if self._on_host else 2):
            staging = torch.zeros(nbytes, dtype=torch.uint8)
            if not self._on_host:
                try:  # page-locked for the device's runtime (CUDA, or a PrivateUse1 device such as the NPU)
                    staging = staging.pin_memory()
                except RuntimeError:  # no runtime to pin for: pageable memory works, the copy is only slower
                    pass
            raw = staging.numpy()
            host = {}
            for k, (shape, dt, fill) in specs.items():
                n = int(np.prod(shape)) * np.dtype(dt).itemsize
                host[k] = raw[offsets[k] : offsets[k] + n].view(dt).reshape(shape)
                host[k][...] = fill
            self._stagings.append(staging)
            self._hosts.append(host)
        self._cur = 0
        self._staging = self._stagings[0]
        self.host = self._hosts[0]
        if self._on_host:
            self.dev = {k: torch.from_numpy(v) for k, v in self.host.items()}
        else:
            self._dev_bytes = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            tdt = {np.int64: torch.int64, np.int32: torch.int32}
            self.dev = {k: self._dev_bytes[offsets[k] : offsets[k] + int(np.prod(shape)) * np.dtype(dt).itemsize]
                        .view(tdt[dt]).view(shape) for k, (shape, dt, _) in specs.items()}

    def flip(self) -> None:
        """Make the other staging buffer :attr:`host` (waiting for its last host-to-device copy). A runtime
        that fills the next step's inputs while the device may not yet have taken the last ones calls this
        first; on the CPU it does nothing."""
        if self._on_host:
            return
        self._cur ^= 1
        ev = self._copied[self._cur]
        if ev is not None:
            ev.synchronize()
            self._copied[self._cur] = None
        self._staging = self._stagings[self._cur]
        self.host = self._hosts[self._cur]

    def prepare(self, num_tokens: int, num_seqs: int, num_logits: int, max_query_len: int,
                max_seq_len: int, num_block_cols: int, keep_device_ids: bool = False) -> StepInputs:
        """Publish the first ``num_tokens`` / ``num_seqs`` entries (already written into :attr:`host`).
        ``keep_device_ids``: leave the device's input ids as they are (the previous step wrote them there)."""
        if not self._on_host:
            skip = self._ids_nbytes if keep_device_ids else 0
            self._dev_bytes[skip:].copy_(self._staging[skip:], non_blocking=True)
            self._copied[self._cur] = device_event(self.device)
        d = self.dev
        h = self.host
        md = AttentionMetadata(
            query_start_loc=d["query_start_loc"][: num_seqs + 1],
            seq_lens=d["seq_lens"][:num_seqs],
            block_table=d["block_table"][:num_seqs, : max(num_block_cols, 1)],
            slot_mapping=d["slot_mapping"][:num_tokens],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            num_actual_tokens=num_tokens,
            query_start_loc_host=h["query_start_loc"][: num_seqs + 1].tolist(),
            seq_lens_host=h["seq_lens"][:num_seqs].tolist(),
        )
        return StepInputs(input_ids=d["input_ids"][:num_tokens], positions=d["positions"][:num_tokens],
                          attn_metadata=md, logits_indices=d["logits_indices"][:num_logits])


class MetadataBuilder:
    """Fills :class:`InputBuffers` from the scheduled requests of a step."""

    def __init__(self, buffers: InputBuffers, block_size: int) -> None:
        self.buffers = buffers
        self.block_size = block_size

    def build(self, items: list[tuple[list[int] | None, int, int, list[int], int]],
              keep_device_ids: bool = False) -> StepInputs:
        """``items``: per scheduled sequence ``(token_ids, num_computed, num_new, block_table, num_logits)``
        (``token_ids`` None for a one-token step whose token is not on the host: the caller writes it on the
        device, or it is there already, ``keep_device_ids``, and the host-to-device copy leaves it alone)
        where the step computes ``token_ids[num_computed : num_computed + num_new]`` and needs the logits of
        its last ``num_logits`` new tokens (1 to sample, all of them for prompt logprobs, 0 for a chunk
        of a prefill). Returns the step's inputs."""
        h = self.buffers.host
        bs = self.block_size
        t = 0
        n_logits = 0
        max_q = max_s = 0
        cols = 0
        qsl = h["query_start_loc"]
        qsl[0] = 0
        ids, positions, slots, btab = h["input_ids"], h["positions"], h["slot_mapping"], h["block_table"]
        for b, (tokens, start, n, table, k) in enumerate(items):
            end = start + n
            if n == 1:  # a decode token: scalar writes (no temporary arrays), the common case per step
                # tokens None: the token is not on the host yet (an overlapped step's ids are on the device;
                # on the CPU the host array is the device buffer, so it must not be overwritten here)
                if tokens is not None:
                    ids[t] = tokens[start]
                positions[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t : t + n] = tokens[start:end]
                pos = np.arange(start, end, dtype=np.int64)
                positions[t : t + n] = pos
                blocks = np.asarray(table, dtype=np.int64)
                slots[t : t + n] = blocks[pos // bs] * bs + pos % bs
            nb = len(table)
            btab[b, :nb] = table
            cols = max(cols, nb)
            h["seq_lens"][b] = end
            t += n
            qsl[b + 1] = t
            if k == 1:
                h["logits_indices"][n_logits] = t - 1
                n_logits += 1
            elif k:
                h["logits_indices"][n_logits : n_logits + k] = np.arange(t - k, t)
                n_logits += k
            max_q = max(max_q, n)
            max_s = max(max_s, end)
        return self.buffers.prepare(t, len(items), n_logits, max_q, max_s, cols, keep_device_ids)
