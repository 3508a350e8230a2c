"""Every Triton kernel of the CUDA backend compiles for a Hopper GPU (sm90), without a GPU.

The interpreter tests (test_cuda_interpret.py) check the kernels' math but not what only the compiler
checks: a kernel that passed every interpreter test failed to compile on the H100 (an if/else that merged
differently shaped values). Here the interpreter tests run once more in a subprocess with a recording plugin
(_record_launches.py) that notes every launch (argument dtypes, constexpr values, num_warps/num_stages);
each distinct launch is then compiled by Triton for sm90 (its bundled ptxas), with programmatic dependent
launch on as on the H100. A kernel the interpreter tests never launch fails the coverage check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the CUDA backend's kernels need Triton")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles for a GPU target: runs outside the interpreter")
    out_file = tmp_path_factory.mktemp("launches") / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "ACCEL_RECORD_LAUNCHES": str(out_file),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_record_launches",
                          str(HERE / "test_cuda_interpret.py")], capture_output=True, text=True, env=env,
                         cwd=HERE.parents[2])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return json.loads(out_file.read_text())


def _variants(launches):
    """One compile per (kernel, constexprs, argument dtypes); the first launch options seen for it."""
    seen = {}
    for rec in launches:
        types = {n: d.get("ptr") and "*" + d["ptr"] or d.get("type") for n, d in rec["args"].items()}
        key = json.dumps([rec["kernel"], rec["constexprs"], types], sort_keys=True, default=str)
        seen.setdefault(key, (rec, types))
    return list(seen.values())


def _compile(rec, types):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import accel_backend_cuda._triton_kernels as k

    fn = getattr(k, rec["kernel"])
    names = fn.arg_names
    consts = dict(rec["constexprs"])
    if "PDL" in names:
        consts["PDL"] = True  # as launched on sm90+
    signature, constexprs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            signature[n] = "constexpr"
            constexprs[(i,)] = consts[n]
        elif n in types and types[n] is not None:
            signature[n] = types[n]
        elif n in rec["args"]:  # None (an absent optional pointer): a constexpr None, as Triton passes it
            signature[n] = "constexpr"
            constexprs[(i,)] = None
        else:  # a defaulted constexpr the launch did not pass
            signature[n] = "constexpr"
            constexprs[(i,)] = fn.params[i].default
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=rec["options"])


def test_every_kernel_launch_compiles_for_sm90(launches):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"Triton without its NVIDIA backend: {exc}")
    import accel_backend_cuda._triton_kernels as k

    kernels = {n for n in dir(k) if n.endswith("_kernel") and hasattr(getattr(k, n), "arg_names")}
    launched = {r["kernel"] for r in launches}
    assert kernels <= launched, f"kernels no interpreter test launches (so never compile-checked): {kernels - launched}"
    failures = []
    variants = _variants(launches)
    for rec, types in variants:
        try:
            _compile(rec, types)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, with its launch
            failures.append(f"{rec['kernel']} {rec['constexprs']}: {type(exc).__name__}: {str(exc)[:600]}")
    assert not failures, f"{len(failures)} of {len(variants)} launches do not compile for sm90:\n" + "\n".join(failures)


SHAPES = {"llama-1b": dict(H=2048, I=8192, NQ=32, NKV=8, D=64), "llama-8b": dict(H=4096, I=14336, NQ=32, NKV=8, D=128),
          # Mixtral layers (hook API 1.5's moe_decoder_layer_decode): I is one expert's intermediate size
          "mixtral-small": dict(H=2048, I=1024, NQ=32, NKV=8, D=64, E=16, TOPK=2),
          "mixtral-8x7b": dict(H=4096, I=14336, NQ=32, NKV=8, D=128, E=8, TOPK=2)}


def _local_memory_bytes(compiled) -> int | None:
    """Stack + local bytes a thread of the compiled kernel uses (register spills), from Triton's bundled
    cuobjdump; None when it is not there."""
    import re
    import shutil
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() and not shutil.which("cuobjdump"):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool) if tool.exists() else "cuobjdump", "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+).*LOCAL:(\d+)", out)
    return int(m.group(1)) + int(m.group(2)) if m else None


@pytest.mark.parametrize("shape, dot, barrier, flags", [
    (s, d, b, f) for s in sorted(SHAPES) for d, b, f in ((0, 1, False), (2, 0, False), (0, 1, True))
    if d == 0 or "E" not in SHAPES[s]])  # MOE: register tiles only
def test_persistent_decoder_layer_compiles_for_sm90(shape, dot, barrier, flags):
    """The interpreter runs _decoder_layer_kernel one phase per launch (its programs run one after another,
    so a grid barrier would wait forever); the persistent variant (all phases, grid barriers, volatile
    polls) is compiled here with the tiles and launch options the GPU uses, at the measured Llama-1B shape
    and the widest accepted one (Llama-8B), and as a Mixtral layer (MOE) at both sizes. The default path must keep its tiles in registers: local
    memory (spills) made the wider shape's first tiles slow, so the host shrinks tiles with the width."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"Triton without its NVIDIA backend: {exc}")
    import accel_backend_cuda._triton_kernels as k

    cfg = k.CONFIG["decoder_layer"]
    dims = SHAPES[shape]
    moe = "E" in dims
    pads = {n: triton.next_power_of_2(v) for n, v in (("H", dims["H"]), ("I", dims["I"]), ("NQD", dims["NQ"] * dims["D"]))}
    tiles = k.decoder_layer_tiles(pads["H"], pads["NQD"], pads["I"], cfg)
    moe_consts = {}
    if moe:
        m = k.moe_tiles(pads["H"], dims["I"], dims["E"], cfg)
        tiles.update(TN_GU=m["TN_GU"], TN_DOWN=m["TN_DOWN"])
        moe_consts = dict(MOE=True, E=dims["E"], E_PAD=m["E_PAD"], RC=m["RC"], TOPK=dims["TOPK"],
                          TOPK_PAD=triton.next_power_of_2(dims["TOPK"]), RENORM=True)
    consts = dict(H=dims["H"], H_PAD=pads["H"], I=dims["I"], I_PAD=pads["I"], NQ=dims["NQ"], NKV=dims["NKV"], D=dims["D"],
                  NQD_PAD=pads["NQD"], GROUP_PAD=16, TILE_N=cfg["TILE_N"], BLOCK_SIZE=16, NUM_SPLITS=16,
                  **tiles, **moe_consts, HAS_RES=True, IS_NEOX=True,
                  IEEE=False, FIRST=0, LAST=k.DECODER_PHASES - 1, SPIN_LIMIT=k.SPIN_LIMIT, LIB=True, DOT=dot,
                  BK=cfg["BK"], STAGES=cfg["STAGES"], BARRIER=barrier, SYNC_TWICE=False, PDL=True, TRACE=False, SPLIT=bool(cfg["SPLIT"]), ROWS3=k.rows3_mask(pads["H"], pads["NQD"], cfg),
                  DEPTH_QKV=cfg["DEPTH_QKV"], DEPTH_DOWN=cfg["DEPTH_DOWN"], FLAGS=flags)
    ptrs = {"pos_ptr": "i64", "slot_ptr": "i64", "bt_ptr": "i32", "seq_ptr": "i32", "cnt_ptr": "i32", "bar_ptr": "i64",
            "part_acc_ptr": "fp32", "part_ml_ptr": "fp32", "trace_ptr": "i64", "moe_ids_ptr": "i32",
            "moe_wts_ptr": "fp32", "lg_ptr": "fp32"}
    fn = k._decoder_layer_kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts or fn.params[i].is_constexpr:  # a constexpr not set here keeps its default
            signature[n] = "constexpr"
            constexprs[(i,)] = consts.get(n, fn.params[i].default)
        elif n.endswith("_ptr"):
            signature[n] = "*" + ptrs.get(n, "bf16")
            # as a launch specializes torch's (16-byte aligned) tensors: without it the weight loads are
            # 2-byte loads and the register count is not the GPU's
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[n] = "fp32" if n in ("eps", "scale") else "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    if dot == cfg["DOT"]:
        spilled = _local_memory_bytes(compiled)
        assert spilled in (None, 0), f"{shape}: {spilled} bytes of local memory a thread (register spills)"
        # the weight tiles are loaded 16 bytes at a time (what the register budget of TILE_ELEMS assumes)
        weight_loads = re.findall(r"ld\.global\.L1::evict_first\S*", compiled.asm["ptx"])
        assert weight_loads and all(".v4." in ld for ld in weight_loads), sorted(set(weight_loads))
