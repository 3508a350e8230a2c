"""Load a Hugging Face checkpoint directory into a zoo model.

A checkpoint directory holds ``config.json`` and the weights as ``*.safetensors``: one file, or shards
listed by ``model.safetensors.index.json``. Only pickle-free formats are read: a directory with just
``*.bin`` / ``*.pt`` files is refused with the command that converts it.

:func:`load_model` reads the config, builds the model of its architecture under a build context (the bound
op table, TP group, dtype and device), so parameters are created directly on the target device in the
target dtype, then streams the tensors (memory-mapped, one at a time, converted to the dtype) into
``model.load_weights``, which returns the names it loaded. Every parameter must be loaded: a checkpoint
with missing, unexpected or mis-shaped tensors, or a corrupted file, raises
:class:`~accel_models.errors.CheckpointError` naming them, and no model is returned.

``dtype``:

* a ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``; also
  ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"half"``, ``"float"``, ``"double"``);
* ``"auto"``: the checkpoint's dtype (config.json ``dtype``/``torch_dtype``; float32 when it says nothing);
* ``None`` (default): ``"auto"`` on an accelerator, **float32 on a CPU device**. On CPU the reference
  backend is the ground truth and half-precision matmuls are slow or emulated, so a CPU run gets exact
  float32 numbers unless asked otherwise; on an accelerator the checkpoint's own dtype is what it was
  trained and published in.

``device``: None means the selected backend's device type (``"cpu"`` for the reference backend).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from accel_models.config import ModelConfig, dtype_name, load_config, read_json
from accel_models.context import BuildContext, ParallelGroup, build_context
from accel_models.errors import CheckpointError, ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from accel_models.backends import OpTable

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_CONVERT_HINT = (
    "convert it to safetensors first, e.g. with transformers: "
    "`AutoModelForCausalLM.from_pretrained(src, dtype='auto').save_pretrained(dst)` "
    "(save_pretrained writes *.safetensors), and load dst"
)


# ----------------------------------------------------------------------------------------------------
# dtype and device
# ----------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype parameters are created in (see the module docstring for the rules)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype: use float32, bfloat16, float16 or float64")
        return dtype
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        dtype = "auto"
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a torch.dtype or a name such as 'bfloat16' or 'auto', got {dtype!r}")
    if dtype == "auto":
        return config.get_torch_dtype() or torch.float32
    try:
        return getattr(torch, dtype_name(dtype))
    except ValueError as exc:
        raise ValueError(f"{exc}, or 'auto' for the checkpoint's own dtype") from None


def resolve_device(device: torch.device | str | None, ops: OpTable) -> torch.device:
    """``device`` as a torch.device; None: the backend's device type."""
    if device is None:
        device = ops.device_type
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFiles:
    """The safetensors files of a checkpoint and, when sharded, which file holds each tensor."""

    directory: Path
    files: tuple[Path, ...]
    weight_map: Mapping[str, str] | None = None  # tensor name -> file name (sharded checkpoints)


def find_checkpoint_files(path: str | os.PathLike[str]) -> CheckpointFiles:
    """The ``*.safetensors`` files of a checkpoint directory (via the index when there is one).

    Raises CheckpointError: no such directory, an index naming missing shard files, pickle-only weights
    (with the command that converts them), or no weights at all.
    """
    directory = Path(path)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(
            f"{directory} {what}: load_model takes a checkpoint directory holding config.json and *.safetensors"
        )
    index_path = directory / SAFE_INDEX
    if index_path.exists():
        try:
            index = read_json(index_path, "safetensors index")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
        if not isinstance(weight_map, Mapping) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: no usable 'weight_map' (tensor name -> shard file name); re-export the checkpoint"
            )
        shard_names = sorted(set(weight_map.values()))
        bad = [n for n in shard_names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{index_path}: weight_map names shard files that are not plain *.safetensors file names: {bad}")
        missing = [n for n in shard_names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: {len(missing)} of {len(shard_names)} shard files listed in {SAFE_INDEX} are missing: "
                f"{', '.join(missing)}; download them again"
            )
        return CheckpointFiles(directory, tuple(directory / n for n in shard_names), dict(weight_map))
    files = tuple(sorted(directory.glob("*.safetensors")))
    if files:
        return CheckpointFiles(directory, files)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weight files ({', '.join(pickles)}), which are not loaded because "
            f"unpickling can run arbitrary code; {_CONVERT_HINT}"
        )
    raise CheckpointError(f"{directory}: no *.safetensors weight files found")


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: a truncated file, a bad header
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is corrupted or "
            "truncated: download or export it again"
        ) from None


def check_checkpoint_files(ckpt: CheckpointFiles) -> dict[str, Path]:
    """Open every file's header (cheap: memory-mapped) and return tensor name -> file.

    Done before the model is built, so a corrupted file, a tensor stored twice or an index that disagrees
    with its shards fails fast. Raises CheckpointError naming the file.
    """
    where: dict[str, Path] = {}
    for path in ckpt.files:
        with _open(path) as f:
            names = list(f.keys())
        for name in names:
            if name in where:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {where[name].name} and in {path.name}")
            where[name] = path
    if ckpt.weight_map is not None:
        wrong = sorted(n for n, file in ckpt.weight_map.items() if n not in where or where[n].name != file)
        if wrong:
            shown = ", ".join(f"{n} (index: {ckpt.weight_map[n]}, found: {where[n].name if n in where else 'nowhere'})"
                              for n in wrong[:10])
            more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
            raise CheckpointError(
                f"{ckpt.directory}: {SAFE_INDEX} disagrees with the shard files for {len(wrong)} tensor(s): {shown}{more}"
            )
    return where


class LazyTensor:
    """A checkpoint tensor not read yet: its name, shape and dtype, and reads of the whole or a slice.

    For tensor parallelism a rank reads only its shard: ``lazy[rows_start:rows_end]`` reads just those rows
    from the memory-mapped file (safetensors' ``get_slice``).
    """

    def __init__(self, handle: Any, path: Path, name: str, dtype: torch.dtype | None) -> None:
        self._handle, self.path, self.name, self._cast = handle, path, name, dtype
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._cast) if self._cast is not None and t.is_floating_point() else t

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            return self._convert(self._slice[index])
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r}: {exc} (the file is corrupted)") from None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Read ``length`` entries from ``start`` along ``dim`` only (what a TP weight_loader takes)."""
        dim = dim % self.ndim
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self[index]

    def materialize(self) -> torch.Tensor:
        try:
            return self._convert(self._handle.get_tensor(self.name))
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r}: {exc} (the file is corrupted)") from None


def iter_checkpoint_tensors(
    ckpt: CheckpointFiles | str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    lazy: bool = False,
    seen: set[str] | None = None,
    float32_names: re.Pattern[str] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Stream ``(name, tensor)`` pairs from the checkpoint, one file open at a time.

    Floating-point tensors are converted to ``dtype`` (None: as stored); other tensors keep theirs.
    ``float32_names``: tensors whose names it matches (``search``) become float32 instead when ``dtype`` is
    a 16-bit float (a model's float32 islands, e.g. DeepSeek's router and its correction bias).
    With ``lazy=True`` yields :class:`LazyTensor` objects instead (read on demand, whole or sliced).
    ``seen``, when given, collects the names yielded. Raises CheckpointError naming an unreadable file.
    """
    if not isinstance(ckpt, CheckpointFiles):
        ckpt = find_checkpoint_files(ckpt)
    widen = float32_names is not None and dtype in (torch.float16, torch.bfloat16)
    for path in ckpt.files:
        handle = _open(path)
        # Eager: the file is closed when its tensors are done. Lazy: each LazyTensor keeps the memory map
        # open (closed when the last of them is garbage-collected), so it can be read after iteration.
        with handle if not lazy else contextlib.nullcontext(handle) as f:
            for name in f.keys():
                cast = torch.float32 if widen and float32_names.search(name) else dtype  # type: ignore[union-attr]
                lazy_t = LazyTensor(f, path, name, cast)
                if seen is not None:
                    seen.add(name)
                yield name, (lazy_t if lazy else lazy_t.materialize())


# ----------------------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------------------


def _model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        from accel_models.models.registry import get_model_class
    except ImportError as exc:  # pragma: no cover - only while the zoo is incomplete
        raise UnsupportedModelError(f"the model registry is unavailable: {exc}") from exc
    return get_model_class(config.architecture)


def _construct(model_cls: type[nn.Module], config: ModelConfig) -> nn.Module:
    params = inspect.signature(model_cls).parameters
    if "config" in params:
        return model_cls(config=config, prefix="") if "prefix" in params else model_cls(config=config)
    raise TypeError(f"{model_cls.__name__}.__init__ must accept config= (and prefix=) to be built by load_model")


def _params_to_load(model: nn.Module) -> set[str]:
    """Parameters and persistent buffers: what a checkpoint must provide. Buffers computed at build time
    (rotary caches) are registered with ``persistent=False`` and are not expected."""
    names = {name for name, _ in model.named_parameters()}
    state = set(model.state_dict(keep_vars=True).keys())
    names |= {name for name, _ in model.named_buffers() if name in state}
    return names


def load_model(
    path: str | os.PathLike[str],
    backend: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    ops: OpTable | None = None,
    tp_group: ParallelGroup | None = None,
    ep_enabled: bool = False,
    attention_factory: Any = None,
) -> nn.Module:
    """Build the model of a checkpoint directory and load its weights; returns it in eval mode.

    Args:
        path: a directory with config.json and *.safetensors (single file or sharded with an index).
        backend: the backend whose ops the layers bind (None: the current selection: ``use_backend``,
            ``ACCEL_BACKEND``, else auto). Ignored when ``ops`` is given.
        dtype: parameter dtype: a torch.dtype, a name, ``"auto"`` (the checkpoint's), or None (``"auto"``
            on an accelerator, float32 on CPU).
        device: where parameters live (None: the backend's device type).
        ops: an already resolved op table (``accel_models.resolve_ops(...)``).
        tp_group, ep_enabled, attention_factory: passed to the build context (see
            :class:`~accel_models.context.BuildContext`).

    Raises:
        ConfigError: config.json is missing, malformed or invalid (UnsupportedModelError: unknown architecture).
        CheckpointError: weights missing, unexpected, mis-shaped, pickled or unreadable. Nothing is returned
            on any error.
        ValueError: a bad ``dtype`` or ``device``.
    """
    directory = Path(path)
    if not directory.is_dir():
        find_checkpoint_files(directory)  # raises the clear error
    config = load_config(directory)
    ckpt = find_checkpoint_files(directory)
    stored = check_checkpoint_files(ckpt)
    model_cls = _model_class(config)

    if ops is None:
        from accel_models.backends import resolve_ops

        ops = resolve_ops(backend=backend)
    target = resolve_device(device, ops)
    params_dtype = resolve_dtype(dtype, config, target)

    ctx = BuildContext(
        ops=ops,
        tp_group=tp_group if tp_group is not None else ParallelGroup(),
        ep_enabled=ep_enabled,
        attention_factory=attention_factory,
        params_dtype=params_dtype,
        device=target,
    )
    with build_context(ctx), target, _default_dtype(params_dtype):
        model = _construct(model_cls, config)
    model.requires_grad_(False)

    yielded: set[str] = set()
    # Under tensor parallelism each rank reads only its shard: the weight_loaders narrow lazy tensors
    # (memory-mapped slices) instead of full ones.
    lazy = ctx.tp_group.world_size > 1
    try:
        loaded = model.load_weights(iter_checkpoint_tensors(
            ckpt, params_dtype, seen=yielded, lazy=lazy, float32_names=getattr(model, "float32_weights", None)))
    except (CheckpointError, ConfigError):
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{directory}: loading the weights into {type(model).__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if loaded is None:
        raise TypeError(f"{type(model).__name__}.load_weights must return the set of parameter names it loaded")
    unread = sorted(stored.keys() - yielded)
    if unread:  # a model bug, not a checkpoint problem: tensors would be dropped silently
        raise RuntimeError(
            f"{type(model).__name__}.load_weights stopped before reading {len(unread)} checkpoint tensor(s) "
            f"(e.g. {', '.join(unread[:5])}): it must consume the whole iterable"
        )
    missing = sorted(_params_to_load(model) - set(loaded))
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise CheckpointError(
            f"{directory}: the checkpoint does not provide {len(missing)} parameter(s) of "
            f"{type(model).__name__}: {shown}. Is it complete, and is config.json the one it was saved with?"
        )
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# generation_config.json
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """What the runtime needs from generation_config.json (falling back to config.json's token ids).

    Sampling fields are None when the checkpoint does not set them (the caller's defaults apply).
    """

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None


def _ids(value: Any, field: str, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = [value] if not isinstance(value, list) else value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {field} must be an int or a list of ints, got {value!r}")
    return tuple(values)


def load_generation_config(path: str | os.PathLike[str]) -> GenerationConfig:
    """The generation defaults of a checkpoint directory.

    Reads ``generation_config.json`` when present; eos/bos/pad ids absent there come from config.json.
    Raises ConfigError for malformed JSON or wrongly typed fields.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a checkpoint directory (no such directory)")
    data: dict[str, Any] = {}
    gen_path = directory / "generation_config.json"
    where = str(gen_path)
    if gen_path.exists():
        raw = read_json(gen_path, "generation_config.json")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must hold a JSON object")
        data = dict(raw)
    cfg_path = directory / "config.json"
    base = read_json(cfg_path, "config.json") if cfg_path.exists() else {}
    if not isinstance(base, Mapping):
        base = {}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if data.get(key) is None:
            data[key] = base.get(key)
    bos, pad = _ids(data["bos_token_id"], "bos_token_id", where), _ids(data["pad_token_id"], "pad_token_id", where)

    def number(key: str, kind: type) -> Any:
        value = data.get(key)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
        if not ok:
            raise ConfigError(f"{where}: {key} must be {'a number' if kind is float else kind.__name__}, got {value!r}")
        return kind(value)

    return GenerationConfig(
        eos_token_ids=_ids(data["eos_token_id"], "eos_token_id", where),
        bos_token_id=bos[0] if bos else None,
        pad_token_id=pad[0] if pad else None,
        temperature=number("temperature", float),
        top_p=number("top_p", float),
        top_k=number("top_k", int),
        repetition_penalty=number("repetition_penalty", float),
        max_new_tokens=number("max_new_tokens", int),
        do_sample=number("do_sample", bool),
    )


__all__ = [
    "CheckpointFiles",
    "GenerationConfig",
    "LazyTensor",
    "check_checkpoint_files",
    "find_checkpoint_files",
    "iter_checkpoint_tensors",
    "load_generation_config",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
