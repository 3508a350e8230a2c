"""Backend discovery, selection and binding.

Backends are pluggy plugins found through the ``accel_models.backends`` entry-point group (the reference
backend too). Selection picks one backend per process (or per ``use_backend`` block); binding resolves each
op once to a plain function, so a forward pass never goes through pluggy.

Environment (programmatic arguments and :func:`use_backend` win over all of these):

``ACCEL_BACKEND``       backend name; unset or ``auto`` picks the usable backend with the highest priority.
``ACCEL_OPS``           per-op overrides, ``"paged_attention=reference,rms_norm=npu"``; a fused op may be
                        set to ``composite`` (``"act_and_mul_linear=composite"``) to bind its composite.
``ACCEL_STRICT``        ``1``: no fallback to the reference; a backend lacking an op is an error.
``ACCEL_PLUGINS``       comma list: load only these plugins (the reference is always loaded).
``ACCEL_PLUGINS_BLOCK`` comma list: never load these plugins.
``ACCEL_TRACE``         ``1``: every bound op call goes through a wrapper that logs it (debugging only).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import inspect
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from accel_models import composites, hookspecs
from accel_models.types import HOOKSPEC_API_VERSION, BackendInfo

logger = logging.getLogger("accel_models.backends")

ENTRY_POINT_GROUP = "accel_models.backends"
REFERENCE = "reference"

#: Every op name, in hookspec order (hook ``accel_<op>``).
OP_NAMES: tuple[str, ...] = tuple(
    name[len("accel_") :]
    for name, fn in vars(hookspecs).items()
    if name.startswith("accel_") and callable(fn) and name != "accel_backend_info"
)
#: Backend-level hooks that are no numeric op: strict mode does not require them (their reference answer,
#: e.g. "no device graphs", is always correct) and the conformance kit does not check them (API 1.1).
OPTIONAL_OPS: tuple[str, ...] = ("capture_graph",)
#: Ops that must come from one backend: a cache is readable only by the backend that laid it out.
KV_CACHE_GROUP: tuple[str, ...] = ("kv_cache_layout", "allocate_kv_cache", "write_kv_cache", "paged_attention")
#: Likewise: a prepared weight is readable only by the backend that prepared it (API 1.2).
LINEAR_GROUP: tuple[str, ...] = ("prepare_linear", "linear")
#: Every group of ops bound from one backend, in fallback and in per-op overrides.
OP_GROUPS: tuple[tuple[str, ...], ...] = (KV_CACHE_GROUP, LINEAR_GROUP)
#: Numeric ops whose reference is plain torch that runs on every device (dense matmul, the greedy argmax
#: of API 1.6): strict mode does not require them, the conformance kit checks them when a backend has them.
PORTABLE_OPS: tuple[str, ...] = (*LINEAR_GROUP, "argmax")
#: Fused ops (API 1.3) -> the ops each one fuses. A backend may implement a fused op; where the selected
#: backend does not, or where the ops it fuses do not all come from the one backend that implements it
#: natively (a native rope_and_write_kv_cache writes its own backend's cache layout, a native
#: act_and_mul_linear reads its own backend's prepared weight), the table binds a **composite**
#: (:mod:`accel_models.composites`) that calls the same table's primitive ops. Composites are no fallback
#: (``OpTable.fallbacks`` leaves them out), strict mode does not require fused ops, and their provider is
#: :data:`COMPOSITE`.
COMPOSITE_OPS: dict[str, tuple[str, ...]] = {
    "rope_and_write_kv_cache": ("rotary_embedding", *KV_CACHE_GROUP),
    "act_and_mul_linear": ("silu_and_mul", "gelu_and_mul", *LINEAR_GROUP),
    # API 1.4: a whole decoder layer at decode; its composite declines (None: the layer runs op by op)
    "decoder_layer_decode": ("rms_norm", "fused_add_rms_norm", "rotary_embedding", *KV_CACHE_GROUP, *LINEAR_GROUP,
                             "silu_and_mul"),
    # API 1.5: a whole Mixtral-style layer at decode; its composite declines likewise
    "moe_decoder_layer_decode": ("rms_norm", "fused_add_rms_norm", "rotary_embedding", *KV_CACHE_GROUP,
                                 *LINEAR_GROUP, "moe_topk", "fused_experts"),
}
#: The provider name of an op bound as a composite (reserved: no backend may take it).
COMPOSITE = "composite"
#: Every op that is not a fused op.
PRIMITIVE_OPS: tuple[str, ...] = tuple(op for op in OP_NAMES if op not in COMPOSITE_OPS)

_SPEC_PARAMS: dict[str, tuple[str, ...]] = {
    op: tuple(inspect.signature(getattr(hookspecs, f"accel_{op}")).parameters) for op in OP_NAMES
}


class BackendError(RuntimeError):
    """A backend cannot be selected or bound; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------
# Registry: the plugin manager and what each plugin said about itself
# ----------------------------------------------------------------------------------------------------


@dataclass
class BackendRecord:
    """One plugin as the registry sees it."""

    name: str
    plugin: Any | None = None
    info: BackendInfo | None = None
    error: str | None = None  # why the plugin could not be loaded or described
    version: str | None = None
    source: str = "entry point"
    ops: frozenset[str] = field(default_factory=frozenset)

    @property
    def usable(self) -> bool:
        return self.error is None and self.info is not None and self.info.available

    @property
    def reason(self) -> str | None:
        """Why this backend is unusable here (None if usable)."""
        if self.error is not None:
            return self.error
        if self.info is None:
            return "no backend info"
        return None if self.info.available else (self.info.reason or "reported unavailable (no reason given)")


def _split_env(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


class Registry:
    """The plugin manager plus one :class:`BackendRecord` per plugin."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, BackendRecord] = {}
        if load_entry_points:
            self._load_entry_points()

    # -- loading ------------------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        allow = set(_split_env("ACCEL_PLUGINS"))
        block = set(_split_env("ACCEL_PLUGINS_BLOCK")) - {REFERENCE}
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:
                continue  # the same distribution visible twice on sys.path
            seen.add(ep.name)
            if ep.name != REFERENCE and ((allow and ep.name not in allow) or ep.name in block):
                continue
            version = ep.dist.version if ep.dist is not None else None
            try:
                plugin = ep.load()
            except BaseException as exc:  # a broken plugin must never break the others
                if isinstance(exc, KeyboardInterrupt):
                    raise
                msg = f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}"
                logger.debug("plugin %s: %s\n%s", ep.name, msg, traceback.format_exc())
                self.records[ep.name] = BackendRecord(ep.name, error=msg, version=version)
                continue
            self.register(plugin, ep.name, version=version, source="entry point")

    def register(self, plugin: Any, name: str, *, version: str | None = None, source: str = "inline") -> BackendRecord:
        """Register a backend plugin (a module or object with hookimpls) under ``name``.

        Errors are recorded on the returned record (and make the backend unusable), never raised.
        """
        if name in self.records and self.records[name].plugin is not None:
            self.unregister(name)
        record = BackendRecord(name, plugin=plugin, version=version, source=source)
        self.records[name] = record
        if name == COMPOSITE:
            record.error = (f"the name {COMPOSITE!r} is reserved (it names ops bound as composites of a "
                            "backend's primitive ops): register the backend under another name")
            record.plugin = None
            return record
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            record.error = f"rejected by the plugin manager: {exc}"
            record.plugin = None
            return record
        record.ops = frozenset(op for op in OP_NAMES if self._impl(op, name) is not None)
        info_impl = self._impl("backend_info", name)
        if info_impl is None:
            record.error = "does not implement accel_backend_info()"
            return record
        try:
            info = info_impl.function()
            if not isinstance(info, BackendInfo):
                info = BackendInfo.model_validate(info)
        except Exception as exc:
            record.error = f"accel_backend_info() raised {type(exc).__name__}: {exc}"
            return record
        record.info = info
        if info.name != name:
            record.error = f"reports name {info.name!r} but is registered as {name!r}"
        elif info.api_version != HOOKSPEC_API_VERSION:
            record.error = (
                f"written for hookspec API {info.api_version}, but accel-models provides API "
                f"{HOOKSPEC_API_VERSION}: install a version of the backend built for this accel-models"
            )
        return record

    def unregister(self, name: str) -> None:
        record = self.records.pop(name, None)
        if record is not None and record.plugin is not None:
            with contextlib.suppress(ValueError):
                self.pm.unregister(name=name)

    # -- queries ------------------------------------------------------------------------------------

    def _impl(self, op: str, backend: str) -> pluggy.HookImpl | None:
        caller = getattr(self.pm.hook, f"accel_{op}")
        for impl in caller.get_hookimpls():
            if impl.plugin_name == backend:
                return impl
        return None

    def describe(self) -> str:
        """One line per installed backend: usable, or why not."""
        lines = []
        for rec in sorted(self.records.values(), key=lambda r: r.name):
            lines.append(f"  - {rec.name}: " + ("usable" if rec.usable else f"unusable: {rec.reason}"))
        return "\n".join(lines) if lines else "  (none)"


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry() -> None:
    """Forget all plugins; the next call reloads entry points (tests; after changing ACCEL_PLUGINS)."""
    global _registry
    with _registry_lock:
        _registry = None


def register_backend(plugin: Any, name: str, *, version: str | None = None) -> BackendRecord:
    """Register an in-process backend (not installed as a package), e.g. in a test or a notebook."""
    return get_registry().register(plugin, name, version=version, source="inline")


def unregister_backend(name: str) -> None:
    get_registry().unregister(name)


# ----------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    backend: str | None = None
    strict: bool | None = None
    ops: Mapping[str, str] | None = None


_SELECTION: contextvars.ContextVar[_Selection | None] = contextvars.ContextVar("accel_models_selection", default=None)


@contextlib.contextmanager
def use_backend(
    backend: str | None = None, *, strict: bool | None = None, ops: Mapping[str, str] | str | None = None
) -> Iterator[None]:
    """Select a backend (and optionally strict mode and per-op overrides) for the block; wins over env.

    >>> with accel_models.use_backend("reference"):
    ...     model = accel_models.load_model(path)
    """
    if isinstance(ops, str):
        ops = parse_ops_override(ops, source="use_backend(ops=...)")
    token = _SELECTION.set(_Selection(backend, strict, dict(ops) if ops is not None else None))
    try:
        yield
    finally:
        _SELECTION.reset(token)


def parse_ops_override(spec: str, *, source: str = "ACCEL_OPS") -> dict[str, str]:
    """Parse ``"op=backend,op=backend"``; unknown op names are an error."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, backend = item.partition("=")
        op, backend = op.strip(), backend.strip()
        if not sep or not op or not backend:
            raise BackendError(f"{source}: {item!r} is not of the form op=backend (e.g. 'rms_norm=reference')")
        if op not in OP_NAMES:
            raise BackendError(f"{source}: unknown op {op!r}; ops are: {', '.join(OP_NAMES)}")
        out[op] = backend
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _auto_select(reg: Registry) -> str:
    usable = [r for r in reg.records.values() if r.usable]
    if not usable:
        raise BackendError(f"no usable accel-models backend is installed:\n{reg.describe()}")
    # highest priority first; the reference only when nothing else is usable; ties by name.
    usable.sort(key=lambda r: (r.name == REFERENCE, -(r.info.priority if r.info else 0), r.name))
    return usable[0].name


def _selected_name(reg: Registry, backend: str | None) -> str:
    sel = _SELECTION.get()
    name = backend or (sel.backend if sel else None) or os.environ.get("ACCEL_BACKEND", "").strip() or "auto"
    return _auto_select(reg) if name == "auto" else name


def _check_backend(reg: Registry, name: str, *, allow_unavailable: bool, what: str) -> BackendRecord:
    rec = reg.records.get(name)
    if rec is None:
        raise BackendError(
            f"{what} {name!r} is not installed. Installed backends:\n{reg.describe()}\n"
            f"Install its package (e.g. `pip install accel-backend-{name}`) or pick one of those."
        )
    if rec.error is not None or (not rec.usable and not allow_unavailable):
        raise BackendError(f"{what} {name!r} is installed but unusable here: {rec.reason}")
    return rec


def get_backend(name: str | None = None, *, allow_unavailable: bool = False) -> BackendInfo:
    """The :class:`BackendInfo` of ``name``, or of the backend selection would pick now."""
    reg = get_registry()
    rec = _check_backend(reg, _selected_name(reg, name), allow_unavailable=allow_unavailable, what="backend")
    assert rec.info is not None
    return rec.info


@dataclass(frozen=True)
class BackendStatus:
    """A row of :func:`list_backends`."""

    name: str
    usable: bool
    reason: str | None
    info: BackendInfo | None
    version: str | None
    ops: frozenset[str]
    source: str


def list_backends() -> list[BackendStatus]:
    """Every installed backend plugin, usable or not (with the reason)."""
    reg = get_registry()
    return [
        BackendStatus(r.name, r.usable, r.reason, r.info, r.version, r.ops, r.source)
        for r in sorted(reg.records.values(), key=lambda r: (r.name != REFERENCE, r.name))
    ]


# ----------------------------------------------------------------------------------------------------
# Binding
# ----------------------------------------------------------------------------------------------------


class OpTable:
    """The bound ops of one selection: ``ops.rms_norm(x=..., weight=..., eps=...)``.

    Each op is a plain function attribute (a direct call, no pluggy). ``providers`` maps each op name
    to the backend that provides it, or to ``"composite"`` for a fused op bound as a composite of this
    table's primitives; ``backend`` is the selected backend, ``info`` its description.
    """

    backend: str
    info: BackendInfo
    providers: Mapping[str, str]
    strict: bool

    def __init__(self, backend: str, info: BackendInfo, functions: Mapping[str, Callable[..., Any]],
                 providers: Mapping[str, str], strict: bool) -> None:
        self.backend = backend
        self.info = info
        self.providers = dict(providers)
        self.strict = strict
        for op, fn in functions.items():
            setattr(self, op, fn)

    @property
    def device_type(self) -> str:
        return self.info.device_type

    @property
    def fallbacks(self) -> list[str]:
        """Ops not provided by the selected backend (optional hooks such as capture_graph and the dense
        matmul ops, which every device's torch runs, not counted)."""
        return [op for op, p in self.providers.items()
                if p != self.backend and p != COMPOSITE and op not in OPTIONAL_OPS and op not in PORTABLE_OPS]

    @property
    def composites(self) -> list[str]:
        """Fused ops bound as composites of this table's primitive ops (API 1.3)."""
        return [op for op, p in self.providers.items() if p == COMPOSITE]

    def __repr__(self) -> str:
        fb = self.fallbacks
        return (f"OpTable(backend={self.backend!r}, fallbacks={fb if fb else 'none'}, "
                f"composites={self.composites or 'none'})")

    # Declared for type checkers; set per instance in __init__.
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    gelu_and_mul: Callable[..., Any]
    kv_cache_layout: Callable[..., Any]
    allocate_kv_cache: Callable[..., Any]
    write_kv_cache: Callable[..., Any]
    paged_attention: Callable[..., Any]
    moe_topk: Callable[..., Any]
    fused_experts: Callable[..., Any]
    dynamic_int8_quant: Callable[..., Any]
    int8_scaled_mm: Callable[..., Any]
    prepare_linear: Callable[..., Any]
    linear: Callable[..., Any]
    capture_graph: Callable[..., Any]
    rope_and_write_kv_cache: Callable[..., Any]
    act_and_mul_linear: Callable[..., Any]


def _check_signature(op: str, backend: str, fn: Callable[..., Any]) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [p for p in _SPEC_PARAMS[op] if p not in params]
    if missing:
        raise BackendError(
            f"backend {backend!r} implements accel_{op} without the keyword(s) {missing}: bound ops are "
            f"called with every keyword of the hookspec ({', '.join(_SPEC_PARAMS[op])}), so the "
            "implementation must accept them all (pluggy's argument filtering is bypassed for speed)"
        )


def _traced(op: str, provider: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        shapes = {k: tuple(v.shape) if hasattr(v, "shape") else v for k, v in kwargs.items()}
        logger.info("op %s [%s] %s", op, provider, shapes)
        return fn(**kwargs)

    return wrapper


def resolve_ops(
    backend: str | None = None,
    *,
    strict: bool | None = None,
    allow_unavailable: bool = False,
    ops: Mapping[str, str] | str | None = None,
) -> OpTable:
    """Resolve every op once and return the bound :class:`OpTable`.

    Args:
        backend: backend name; None takes :func:`use_backend`'s, else ``ACCEL_BACKEND``, else auto.
        strict: no fallback (None takes :func:`use_backend`'s, else ``ACCEL_STRICT``). Fused ops are never
            required: without a native one, their composite is bound.
        allow_unavailable: bind a backend that reports itself unusable here (tests that run its ops
            through an emulation or another implementation of its kernels); normal selection never does.
        ops: per-op overrides (a mapping or ``"op=backend,..."``), merged over ``ACCEL_OPS``. A fused op
            may be overridden to ``"composite"``, or to a backend that implements it and provides every op
            it fuses in this table.

    Raises:
        BackendError: the backend is not installed, unusable, of another API version, lacks ops in
            strict mode, or an override names an unknown op or backend.
    """
    reg = get_registry()
    sel = _SELECTION.get()
    name = _selected_name(reg, backend)
    rec = _check_backend(reg, name, allow_unavailable=allow_unavailable, what="backend")
    if strict is None:
        strict = sel.strict if sel is not None and sel.strict is not None else _env_flag("ACCEL_STRICT")

    # Sources merge in order of precedence (env, then use_backend, then the argument). The KV-cache group
    # moves together: an override of any member applies to all of them, so each source's group override
    # is expanded before merging (a later source's group override replaces an earlier one's whole).
    if isinstance(ops, str):
        ops = parse_ops_override(ops, source="ops=")
    sources = [("ACCEL_OPS", parse_ops_override(os.environ.get("ACCEL_OPS", "")))]
    if sel is not None and sel.ops:
        sources.append(("use_backend(ops=...)", dict(sel.ops)))
    if ops:
        for op in ops:
            if op not in OP_NAMES:
                raise BackendError(f"ops=: unknown op {op!r}; ops are: {', '.join(OP_NAMES)}")
        sources.append(("ops=", dict(ops)))
    overrides: dict[str, str] = {}
    for source, src_overrides in sources:
        for group in OP_GROUPS:
            group_overrides = {src_overrides[op] for op in group if op in src_overrides}
            if len(group_overrides) > 1:
                why = ("a cache written in one backend's layout is readable only by that backend's ops"
                       if group is KV_CACHE_GROUP else "a weight prepared by one backend is readable only by it")
                what = "KV-cache ops" if group is KV_CACHE_GROUP else "linear ops"
                raise BackendError(
                    f"{source}: per-op overrides put the {what} {group} on different backends "
                    f"({sorted(group_overrides)}); they must come from one backend, since {why}"
                )
            if group_overrides:
                (g,) = group_overrides
                for op in group:
                    src_overrides[op] = g
        overrides.update(src_overrides)

    missing = [op for op in PRIMITIVE_OPS
               if op not in rec.ops and op not in overrides and op not in OPTIONAL_OPS and op not in PORTABLE_OPS]
    if strict and missing:
        raise BackendError(
            f"strict mode: backend {name!r} does not implement {', '.join(missing)}; implement them "
            "(see accel_models/hookspecs.py) or allow fallback to the reference backend"
        )
    group_fallback = {op for group in OP_GROUPS if any(o not in rec.ops for o in group) for op in group}

    for op, provider in overrides.items():
        if provider == COMPOSITE and op not in COMPOSITE_OPS:
            raise BackendError(f"override {op}={COMPOSITE}: only the fused ops ({', '.join(COMPOSITE_OPS)}) have "
                               "composites; name a backend for this op")

    providers: dict[str, str] = {}
    for op in PRIMITIVE_OPS:
        if op in overrides:
            provider = overrides[op]
            prec = _check_backend(reg, provider, allow_unavailable=allow_unavailable,
                                  what=f"override {op}={provider}: backend")
            if op not in prec.ops:
                raise BackendError(f"override {op}={provider}: backend {provider!r} does not implement {op}")
        elif op in group_fallback:  # a backend with part of a group: the whole group falls back
            provider = REFERENCE
        else:
            provider = name if op in rec.ops else REFERENCE
        providers[op] = provider
    for op, parts in COMPOSITE_OPS.items():
        part_providers = {providers[p] for p in parts}
        if op in overrides:
            provider = overrides[op]
            if provider != COMPOSITE:
                prec = _check_backend(reg, provider, allow_unavailable=allow_unavailable,
                                      what=f"override {op}={provider}: backend")
                if op not in prec.ops:
                    raise BackendError(f"override {op}={provider}: backend {provider!r} does not implement {op}; "
                                       f"use {op}={COMPOSITE} for the composite of the table's own ops")
                if part_providers != {provider}:
                    others = {p: providers[p] for p in parts if providers[p] != provider}
                    raise BackendError(
                        f"override {op}={provider}: a native {op} does the work of {', '.join(parts)} and must "
                        f"come from the backend that provides them all, but here {others}; override those "
                        f"to {provider!r} too, or use {op}={COMPOSITE}")
        else:
            # native only from the one backend that provides every op it fuses; else the composite
            (only,) = part_providers if len(part_providers) == 1 else (None,)
            prec = reg.records.get(only) if only is not None else None
            provider = only if prec is not None and op in prec.ops else COMPOSITE
        providers[op] = provider

    functions: dict[str, Callable[..., Any]] = {}
    trace = _env_flag("ACCEL_TRACE")
    for op, provider in providers.items():
        if provider == COMPOSITE:
            continue  # built below, over the bound primitives
        if provider == REFERENCE and provider != name:
            _check_backend(reg, REFERENCE, allow_unavailable=False, what="fallback backend")
        impl = reg._impl(op, provider)
        if impl is None:
            raise BackendError(f"backend {provider!r} has no implementation of {op} (and none to fall back to)")
        _check_signature(op, provider, impl.function)
        functions[op] = _traced(op, provider, impl.function) if trace else impl.function
    for op, provider in providers.items():
        if provider == COMPOSITE:
            fn = composites.FACTORIES[op](functions)
            functions[op] = _traced(op, provider, fn) if trace else fn

    assert rec.info is not None
    return OpTable(name, rec.info, functions, providers, bool(strict))
