"""The real torch-npu wheel's op schemas, and a checker of recorded torch_npu calls against them.

The wheel is downloaded with ``pip download torch-npu==2.13.0 --no-deps`` (never installed) into a cache
directory reused across runs, and read as a zip:

* ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``: every op's schema (``func:`` lines);
* ``torch_npu/utils/custom_ops.py`` / ``torch_npu/utils/exposed_api.py``: which ops ``torch_npu.<name>``
  exposes as Python attributes;
* ``torch_npu/_op_plugin_docs.py``: the op documentation the emulation is written from;
* ``torch_npu/op_plugin/atb/_atb_api_docs.py`` and ``_atb_ops.py``: the ATB ops (``_npu_reshape_and_cache``,
  ``_npu_paged_attention``, ...). Their schemas live only in ``lib/libop_plugin_atb.so`` (and a C++ header),
  so a call to one cannot be checked and fails the check; this backend calls none of them.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TORCH_NPU_VERSION = "2.13.0"
SCHEMA_PATH = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCS_PATH = "torch_npu/_op_plugin_docs.py"
ATB_DOCS_PATH = "torch_npu/op_plugin/atb/_atb_api_docs.py"
ATB_OPS_PATH = "torch_npu/op_plugin/atb/_atb_ops.py"
CUSTOM_OPS_PATH = "torch_npu/utils/custom_ops.py"
EXPOSED_API_PATH = "torch_npu/utils/exposed_api.py"


def cache_dir() -> Path:
    """Where the wheel is kept between runs (``ACCEL_NPU_WHEEL_CACHE`` overrides)."""
    env = os.environ.get("ACCEL_NPU_WHEEL_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "accel-models-torch-npu-wheel"


def fetch_wheel(timeout: float = 60.0) -> tuple[Path | None, str]:
    """The cached wheel, downloading it first if needed. Returns (path, "") or (None, why it failed)."""
    directory = cache_dir()
    pattern = f"torch_npu-{TORCH_NPU_VERSION}-*.whl"
    found = sorted(glob.glob(str(directory / pattern)))
    if found:
        return Path(found[0]), ""
    directory.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", f"torch-npu=={TORCH_NPU_VERSION}", "--no-deps",
            "--disable-pip-version-check", "-q", "--retries", "1", "--timeout", "15", "-d", str(directory)]
    # This interpreter's platform first; else the Linux x86_64 CPython 3.11 wheel (the schemas are the same).
    attempts = [base, base + ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]]
    errors = []
    for cmd in attempts:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"`pip download` timed out after {timeout:.0f} s")
            continue
        found = sorted(glob.glob(str(directory / pattern)))
        if proc.returncode == 0 and found:
            return Path(found[0]), ""
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        errors.append(lines[-1] if lines else f"`pip download` exited with {proc.returncode}")
        if "No matching distribution" not in (proc.stderr or ""):
            break  # a network failure: the platform-pinned retry would fail the same way
    return None, "; ".join(errors)


# ----------------------------------------------------------------------------------------------------
# schema parsing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # as written, e.g. "Tensor(a!)", "Tensor?", "SymInt[]?", "int[2]"
    has_default: bool
    kw_only: bool


@dataclass(frozen=True)
class Schema:
    name: str
    overload: str
    params: tuple[Param, ...]
    text: str

    @property
    def positional(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.kw_only)


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_schema(text: str) -> Schema:
    """Parse ``name[.overload](params) -> returns``."""
    m = re.match(r"\s*([\w]+)(?:\.(\w+))?\((.*)\)\s*->", text)
    if not m:
        raise ValueError(f"unparsable schema: {text!r}")
    name, overload, body = m.group(1), m.group(2) or "", m.group(3)
    params: list[Param] = []
    kw_only = False
    for item in _split_top(body):
        if item == "*":
            kw_only = True
            continue
        decl, eq, _default = item.partition("=")
        ptype, _, pname = decl.strip().rpartition(" ")
        params.append(Param(pname.strip(), ptype.strip(), bool(eq), kw_only))
    return Schema(name, overload, tuple(params), text.strip())


@dataclass
class WheelSchemas:
    """What the checker needs from the wheel."""

    wheel: Path
    schemas: dict[str, list[Schema]] = field(default_factory=dict)  # name -> overloads
    exposed: set[str] = field(default_factory=set)  # names reachable as torch_npu.<name>
    documented: set[str] = field(default_factory=set)  # names with an entry in _op_plugin_docs.py
    files: dict[str, bool] = field(default_factory=dict)  # expected path -> present in the wheel
    atb_documented: set[str] = field(default_factory=set)
    atb_ops: set[str] = field(default_factory=set)


def load(wheel: Path) -> WheelSchemas:
    ws = WheelSchemas(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in (SCHEMA_PATH, DOCS_PATH, ATB_DOCS_PATH, ATB_OPS_PATH, CUSTOM_OPS_PATH, EXPOSED_API_PATH):
            ws.files[path] = path in names
        missing = [p for p in (SCHEMA_PATH, DOCS_PATH, CUSTOM_OPS_PATH) if p not in names]
        if missing:
            raise FileNotFoundError(f"{wheel.name} lacks {missing}: the wheel's layout changed; update "
                                    "tests/backends/npu/npu_wheel_schema.py to the new paths")
        yaml_text = z.read(SCHEMA_PATH).decode("utf-8")
        for m in re.finditer(r"^\s*-?\s*func:\s*(.+?)\s*$", yaml_text, flags=re.M):
            if "(" not in m.group(1):  # the `supported:` section lists bare aten names, not schemas
                continue
            schema = parse_schema(m.group(1))
            ws.schemas.setdefault(schema.name, []).append(schema)
        custom = z.read(CUSTOM_OPS_PATH).decode("utf-8")
        ws.exposed |= set(re.findall(r"^torch_npu\.(\w+)\s*=", custom, flags=re.M))
        if EXPOSED_API_PATH in names:
            exposed_api = z.read(EXPOSED_API_PATH).decode("utf-8")
            ws.exposed |= set(re.findall(r"'(\w+)'", exposed_api))
        docs = z.read(DOCS_PATH).decode("utf-8")
        ws.documented = set(re.findall(r"_add_torch_npu_docstr\(\s*\"(\w+)\"", docs))
        if ATB_DOCS_PATH in names:
            atb = z.read(ATB_DOCS_PATH).decode("utf-8")
            ws.atb_documented = set(re.findall(r"_add_torch_npu_atb_docstr\(\s*\"(\w+)\"", atb))
        if ATB_OPS_PATH in names:  # API_LIST / ATB_API_LIST: the ATB ops, registered from a compiled library
            atb_ops = z.read(ATB_OPS_PATH).decode("utf-8")
            for block in re.findall(r"^\w*API_LIST\s*=\s*\[(.*?)\]", atb_ops, flags=re.M | re.S):
                ws.atb_ops |= set(re.findall(r"'(\w+)'", block))
    return ws


# ----------------------------------------------------------------------------------------------------
# checking a recorded call
# ----------------------------------------------------------------------------------------------------


def _accepts(ptype: str, kind: Any) -> bool:
    """Whether an argument of this described kind (see emulation.describe) binds to a schema type."""
    optional = ptype.endswith("?")
    base = re.sub(r"\(\w!?\)", "", ptype.rstrip("?"))  # drop alias annotations like (a!)
    if kind == "None":
        return optional
    list_m = re.fullmatch(r"(\w+)\[\d*\]", base)
    if list_m:
        elem = list_m.group(1)
        return isinstance(kind, tuple) and kind[0] == "list" and all(_accepts(elem, k) for k in kind[1])
    if base == "Tensor":
        return kind == "Tensor"
    if base in ("int", "SymInt"):
        return kind in ("int", "dtype")  # torch.ops turns a torch.dtype into its ScalarType number
    if base == "float":
        return kind in ("float", "int")
    if base == "bool":
        return kind == "bool"
    if base == "str":
        return kind == "str"
    if base == "ScalarType":
        return kind == "dtype"
    if base == "Scalar":
        return kind in ("int", "float", "bool")
    return False


def check_against(call: Any, schema: Schema) -> list[str]:
    """Errors binding a recorded call (name, args kinds, kwargs kinds) to one schema; [] if it binds."""
    errors = []
    positional = schema.positional
    if len(call.args) > len(positional):
        errors.append(f"{len(call.args)} positional arguments, but only {len(positional)} parameters are "
                      "positional (the rest are keyword-only)")
    bound: dict[str, Any] = {}
    for p, kind in zip(positional, call.args):
        bound[p.name] = kind
    by_name = {p.name: p for p in schema.params}
    for key, kind in call.kwargs:
        if key in ("self", "input"):
            errors.append(f"keyword {key!r}: pass the op's first tensor positionally (its Python name differs "
                          "between torch.ops and torch_npu's bindings)")
            continue
        if key not in by_name:
            errors.append(f"unknown keyword {key!r}")
            continue
        if key in bound:
            errors.append(f"{key!r} given both positionally and by keyword")
        bound[key] = kind
    for p in schema.params:
        if p.name not in bound:
            if not p.has_default:
                errors.append(f"required argument {p.name!r} ({p.type}) not given")
        elif not _accepts(p.type, bound[p.name]):
            errors.append(f"{p.name!r} is {p.type} but got {bound[p.name]}")
    return errors


def check_call(call: Any, ws: WheelSchemas) -> list[str]:
    """Errors of one recorded torch_npu call against the wheel; [] if it is a valid call."""
    overloads = ws.schemas.get(call.name)
    if not overloads:
        where = (" (an ATB op: the wheel ships its schema only inside libop_plugin_atb.so, so it cannot be checked)"
                 if call.name in ws.atb_ops | ws.atb_documented else "")
        return [f"{call}: torch_npu.{call.name} is not declared in {SCHEMA_PATH}{where}"]
    errors = []
    if call.name not in ws.exposed:
        errors.append(f"{call}: {call.name} is declared but not exposed as torch_npu.{call.name} "
                      f"(not in {CUSTOM_OPS_PATH} / {EXPOSED_API_PATH})")
    per_overload = [(s, check_against(call, s)) for s in overloads]
    if any(not errs for _, errs in per_overload):
        return errors
    for s, errs in per_overload:
        errors.append(f"{call} does not bind to `{s.text}`: " + "; ".join(errs))
    return errors
