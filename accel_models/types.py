"""Plain data types shared by the core and the backends (pydantic models)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Major version of the hookspec API. A backend declares the version it was written for in
#: :class:`BackendInfo.api_version`; the core refuses to bind a backend whose major version differs,
#: because bound ops are called directly with every keyword of the spec (no pluggy argument filtering).
#: Adding a new hook is not a breaking change (backends that lack it fall back to the reference);
#: changing the keywords or the math of an existing hook is, and bumps this number.
HOOKSPEC_API_VERSION = 1


class BackendInfo(BaseModel):
    """What a backend says about itself (returned by its ``accel_backend_info`` hook)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="backend name; equals its entry-point name")
    device_type: str = Field(description='torch device type its ops run on: "cpu", "cuda", "npu", "gcu", ...')
    available: bool = Field(description="whether the backend can run on this machine")
    reason: str | None = Field(description="why it is unusable here (None when available)")
    dist_backend: str = Field(default="gloo", description='torch.distributed backend: "gloo", "nccl", "hccl", "eccl"')
    priority: int = Field(default=0, description="auto-selection picks the usable backend with the highest priority")
    api_version: int = Field(default=HOOKSPEC_API_VERSION, description="hookspec API major version it was written for")
    version: str | None = Field(default=None, description="the backend distribution's version")

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        if not v or not v.replace("_", "a").replace("-", "a").isalnum():
            raise ValueError(f"backend name {v!r} must be a non-empty identifier (letters, digits, '_', '-')")
        return v


class KVCacheLayout(BaseModel):
    """A backend's KV-cache layout, as declared by its ``accel_kv_cache_layout`` hook.

    The cache tensor itself is opaque to everyone but the backend's own ``write_kv_cache`` and
    ``paged_attention``; the runtime only needs the block sizes and the bytes per token slot.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description='a short name of the layout, e.g. "[2, blocks, block_size, kv_heads, head_size]"')
    block_sizes: tuple[int, ...] = Field(description="supported block sizes (tokens per block); the first is the default")
    bytes_per_token: int = Field(description="bytes one token slot of one layer occupies (keys and values together)")

    @field_validator("block_sizes")
    @classmethod
    def _non_empty(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("block_sizes must be a non-empty tuple of positive integers")
        return v
