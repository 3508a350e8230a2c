"""Verify and time the CUDA backend on one GPU: ops, models, generation, kernel benchmarks.

    python bench/cuda/run_all.py --out DIR [--sections ops,big,models,generate,bench,tune] [--examples 20]

Sections (each runs even if an earlier one failed; failures are recorded, the exit code says if any):

* ``ops``       the conformance kit (accel_models.testing): every op, hypothesis-drawn shapes (odd sizes,
                strided inputs), float32 and bfloat16, against the reference backend in float64.
* ``big``       serving-sized cases the kit's small shapes miss (long-context decode through split-K, mixed
                prefill/decode batches, sliding window, soft cap, head sizes 64/80/128/256, every block
                size, bench-sized fused experts), against the reference in float64 on the GPU.
* ``models``    every zoo family against Hugging Face transformers on tiny checkpoints (tests/models/
                hf_cases.py), float32 and bfloat16; plus the kit's model check against the reference backend.
* ``generate``  greedy generation through accel_models.LLM: the cuda backend on the GPU against the
                reference backend on the CPU, float32, token ids must be identical.
* ``bench``     per-kernel time against its floor (bytes moved / measured copy bandwidth; FLOPs / measured
                bf16 matmul rate where that is larger), beside the plain-PyTorch way of computing it.
* ``tune``      a few launch configs of the attention and fused-experts kernels (chooses the defaults).

Writes DIR/results.json (everything), DIR/summary.md (the tables), and prints the summary last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS: dict = {"sections": {}, "failures": []}
CASES_LIMIT = 0
DEV = "cuda"  # --device cpu: a dry run of the script's logic through Triton's interpreter (TRITON_INTERPRET=1)
LOG = None


def log(*args) -> None:
    msg = " ".join(str(a) for a in args)
    print(msg, flush=True)
    if LOG is not None:
        LOG.write(msg + "\n")
        LOG.flush()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((o - r).norm() / r.norm().clamp(min=1e-300))


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double().cpu() - ref.detach().double().cpu()).abs().max())


def fail(section: str, what: str) -> None:
    RESULTS["failures"].append(f"{section}: {what}")
    log(f"FAIL [{section}] {what}")


# ----------------------------------------------------------------------------------------------------
# environment and ceilings
# ----------------------------------------------------------------------------------------------------


def environment() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bf16 per buffer
    x = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms_mm = bench_ms(lambda: a @ b)
    flops = 2 * 8192**3 / (ms_mm * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": flops}


# ----------------------------------------------------------------------------------------------------
# ops: the conformance kit
# ----------------------------------------------------------------------------------------------------


def section_ops(examples: int) -> dict:
    from accel_models.testing.conformance import run_conformance

    report = run_conformance("cuda", device=DEV, max_examples=examples, allow_unavailable=DEV == "cpu")
    rows = []
    for r in report.ops:
        rows.append({"op": r.op, "status": r.status, "worst_ratio": r.worst, "cases": r.cases,
                     "dtypes": list(r.dtypes), "message": r.message})
        if r.status in ("fail", "error"):
            fail("ops", f"{r.op}: {r.message}")
        log(f"  {r.op:20s} {r.status:5s} worst err/tol {r.worst:.3g} over {r.cases} cases {r.message[:150]}")
    return {"ops": rows}


# ----------------------------------------------------------------------------------------------------
# big: serving-sized cases against the reference in float64 (on the GPU)
# ----------------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # normwise relative error vs float64


def _ops():
    from accel_models import resolve_ops

    return resolve_ops("cuda", strict=True, allow_unavailable=DEV == "cpu"), resolve_ops("reference", strict=True)


def build_paged(ops, dtype, kv_heads, head_size, block_size, seq_lens, q_lens, *, gen, device=DEV):
    """A cache holding random K/V for every context position (written with ops.write_kv_cache), the
    block table (blocks shuffled), and the float64 copies for the reference."""
    batch = len(seq_lens)
    blocks_per = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(blocks_per) + 1
    perm = torch.randperm(total, generator=gen).tolist()
    bt = torch.zeros(batch, max(blocks_per) + 1, dtype=torch.int32)
    i = 0
    for b in range(batch):
        bt[b, : blocks_per[b]] = torch.tensor(perm[i : i + blocks_per[b]], dtype=torch.int32)
        i += blocks_per[b]
    slots = torch.cat([bt[b, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size
                       for b, s in enumerate(seq_lens)])
    n = int(sum(seq_lens))
    k = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    cache = ops.allocate_kv_cache(num_blocks=total, block_size=block_size, num_kv_heads=kv_heads,
                                  head_size=head_size, dtype=dtype, device=torch.device(device))
    cache.fill_(float("nan"))  # never read a slot nothing wrote
    ops.write_kv_cache(key=k.to(device), value=v.to(device), kv_cache=cache, slot_mapping=slots.to(device))
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    meta = dict(block_table=bt, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
                max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return cache, meta, (k, v, slots, total)


def attention_case(ops, ref, dtype, *, heads, kv_heads, head_size, block_size, seq_lens, q_lens, window=None,
                   cap=None, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cache, meta, (k, v, slots, total) = build_paged(ops, dtype, kv_heads, head_size, block_size, seq_lens, q_lens,
                                                    gen=gen)
    q = torch.randn(sum(q_lens), heads, head_size, generator=gen).to(dtype)
    kw = dict(scale=head_size**-0.5, sliding_window=window, logits_soft_cap=cap)
    out = ops.paged_attention(query=q.to(DEV), kv_cache=cache, **{k_: t.to(DEV) if torch.is_tensor(t) else t
                                                                  for k_, t in meta.items()}, **kw)
    rcache = ref.allocate_kv_cache(num_blocks=total, block_size=block_size, num_kv_heads=kv_heads,
                                   head_size=head_size, dtype=torch.float64, device=torch.device(DEV))
    ref.write_kv_cache(key=k.double().to(DEV), value=v.double().to(DEV), kv_cache=rcache, slot_mapping=slots.to(DEV))
    m = {k_: t.to(DEV) if torch.is_tensor(t) else t for k_, t in meta.items()}
    exp = ref.paged_attention(query=q.double().to(DEV), kv_cache=rcache, **m, **kw)
    # the reference backend in the tested dtype: how far the plain-torch computation lands (context)
    rcache_lo = rcache.to(dtype)
    ref_lo = ref.paged_attention(query=q.to(DEV), kv_cache=rcache_lo, **m, **kw)
    res = {"rel_err": rel_err(out, exp), "max_err": max_err(out, exp), "reference_same_dtype_rel_err": rel_err(ref_lo, exp),
           "finite": bool(torch.isfinite(out).all())}
    del cache, rcache, rcache_lo
    return res


def section_big() -> dict:
    import accel_backend_cuda as C

    ops, ref = _ops()
    out = []
    cases = [
        ("decode ctx 4096, B=4, 32/8 heads, d128, split-K", dict(heads=32, kv_heads=8, head_size=128, block_size=16,
         seq_lens=[4096, 4000, 1, 2500], q_lens=[1, 1, 1, 1])),
        ("decode ctx 512, B=16, 16/2 heads, d64, bs 32", dict(heads=16, kv_heads=2, head_size=64, block_size=32,
         seq_lens=[512 - 7 * i for i in range(16)], q_lens=[1] * 16)),
        ("mixed: 2 prefills + chunk + 3 decodes, d128, bs 64", dict(heads=8, kv_heads=2, head_size=128, block_size=64,
         seq_lens=[300, 77, 1000, 5, 999, 130], q_lens=[300, 77, 200, 1, 1, 1])),
        ("mixed, sliding window 64 + soft cap 30, d80, bs 16", dict(heads=12, kv_heads=4, head_size=80, block_size=16,
         seq_lens=[513, 200, 1200, 64], q_lens=[513, 1, 100, 3], window=64, cap=30.0)),
        ("prefill 2x1024, MHA 4/4, d256, bs 128", dict(heads=4, kv_heads=4, head_size=256, block_size=128,
         seq_lens=[1024, 1024], q_lens=[1024, 1024])),
        ("decode GQA 7 (odd), ctx 3000, window 1000, d96", dict(heads=7, kv_heads=1, head_size=96, block_size=16,
         seq_lens=[3000, 1500], q_lens=[1, 1], window=1000)),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for name, kw in cases:
            try:
                r = attention_case(ops, ref, dtype, **kw, seed=len(out))
                ok = r["finite"] and r["rel_err"] <= max(TOL[dtype], 2 * r["reference_same_dtype_rel_err"])
                r.update(case=name, op="paged_attention", dtype=str(dtype)[6:], ok=ok)
                if not ok:
                    fail("big", f"paged_attention {name} {dtype}: rel err {r['rel_err']:.3g}")
            except Exception as exc:
                r = {"case": name, "op": "paged_attention", "dtype": str(dtype)[6:], "ok": False, "error": repr(exc)}
                fail("big", f"paged_attention {name} {dtype}: {exc!r}")
                traceback.print_exc()
            out.append(r)
            log(f"  {r}")
    # fused experts at bench size and a Mixtral-like one, plus routing
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for (tokens, e, h, inter, k, em) in ((64, 128, 2048, 768, 8, False), (1000, 8, 1024, 1792, 2, False),
                                               (300, 64, 512, 320, 6, True)):
            name = f"fused_experts T={tokens} E={e} H={h} I={inter} top{k}" + (" expert_map" if em else "")
            try:
                x = (torch.randn(tokens, h, generator=g) * 0.5).to(dtype).to(DEV)
                w13 = (torch.randn(e, 2 * inter, h, generator=g) / math.sqrt(h)).to(dtype).to(DEV)
                w2 = (torch.randn(e, h, inter, generator=g) / math.sqrt(inter)).to(dtype).to(DEV)
                logits = torch.randn(tokens, e, generator=g).to(DEV)
                tw, ti = ops.moe_topk(router_logits=logits, top_k=k, scoring_func="softmax", renormalize=True,
                                      num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                                      routed_scaling_factor=1.0)
                rw, ri = ref.moe_topk(router_logits=logits.double(), top_k=k, scoring_func="softmax", renormalize=True,
                                      num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                                      routed_scaling_factor=1.0)
                emap = None
                w13_, w2_ = w13, w2
                if em:  # this rank holds the odd experts
                    emap = torch.full((e,), -1, dtype=torch.int32)
                    emap[1::2] = torch.arange(e // 2, dtype=torch.int32)
                    emap = emap.to(DEV)
                    w13_, w2_ = w13[1::2].contiguous(), w2[1::2].contiguous()
                got = ops.fused_experts(hidden_states=x, w13=w13_, w2=w2_, topk_weights=tw, topk_ids=ti,
                                        activation="silu", expert_map=emap)
                exp = ref.fused_experts(hidden_states=x.double(), w13=w13_.double(), w2=w2_.double(), topk_weights=tw,
                                        topk_ids=ti, activation="silu", expert_map=emap)
                lo = ref.fused_experts(hidden_states=x, w13=w13_, w2=w2_, topk_weights=tw, topk_ids=ti,
                                       activation="silu", expert_map=emap)
                r = {"case": name, "op": "fused_experts", "dtype": str(dtype)[6:], "rel_err": rel_err(got, exp),
                     "max_err": max_err(got, exp), "reference_same_dtype_rel_err": rel_err(lo, exp),
                     "topk_ids_equal": bool((ti.long() == ri.long()).all()), "topk_weights_max_err": max_err(tw, rw)}
                r["ok"] = r["topk_ids_equal"] and r["rel_err"] <= max(TOL[dtype], 2 * r["reference_same_dtype_rel_err"])
                if not r["ok"]:
                    fail("big", f"{name} {dtype}: {r}")
            except Exception as exc:
                r = {"case": name, "op": "fused_experts", "dtype": str(dtype)[6:], "ok": False, "error": repr(exc)}
                fail("big", f"{name} {dtype}: {exc!r}")
                traceback.print_exc()
            out.append(r)
            log(f"  {r}")
    # large norm / rotary / activation rows (bench shapes) against float64
    for dtype in (torch.float32, torch.bfloat16):
        try:
            x = torch.randn(8192, 4096, generator=g).to(dtype).to(DEV)
            res = torch.randn(8192, 4096, generator=g).to(dtype).to(DEV)
            w = (1 + 0.1 * torch.randn(4096, generator=g)).to(dtype).to(DEV)
            o, ro = ops.fused_add_rms_norm(x=x, residual=res, weight=w, eps=1e-6)
            eo, ero = ref.fused_add_rms_norm(x=x.double(), residual=res.double(), weight=w.double(), eps=1e-6)
            lo, _ = ref.fused_add_rms_norm(x=x, residual=res, weight=w, eps=1e-6)
            r = {"case": "fused_add_rms_norm 8192x4096", "op": "fused_add_rms_norm", "dtype": str(dtype)[6:],
                 "rel_err": rel_err(o, eo), "max_err": max_err(o, eo), "residual_rel_err": rel_err(ro, ero),
                 "reference_same_dtype_rel_err": rel_err(lo, eo)}
            r["ok"] = r["rel_err"] <= max(TOL[dtype], 2 * r["reference_same_dtype_rel_err"])
            out.append(r)
            log(f"  {r}")
            pos = torch.randint(0, 8192, (4096,), generator=g)
            inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
            ang = torch.arange(8192, dtype=torch.float64)[:, None] * inv[None, :]
            cs = torch.cat([ang.cos(), ang.sin()], -1).float()
            for neox, rd in ((True, 128), (False, 64)):
                inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
                ang = torch.arange(8192, dtype=torch.float64)[:, None] * inv[None, :]
                cs = torch.cat([ang.cos(), ang.sin()], -1).float()
                q = torch.randn(4096, 32 * 128, generator=g).to(dtype)
                k = torch.randn(4096, 8, 128, generator=g).to(dtype)
                cq, ck = ops.rotary_embedding(positions=pos.to(DEV), query=q.to(DEV), key=k.to(DEV), cos_sin_cache=cs.to(DEV),
                                              head_size=128, rotary_dim=rd, is_neox=neox)
                eq, ek = ref.rotary_embedding(positions=pos, query=q.double(), key=k.double(), cos_sin_cache=cs.double(),
                                              head_size=128, rotary_dim=rd, is_neox=neox)
                lq, _ = ref.rotary_embedding(positions=pos, query=q, key=k, cos_sin_cache=cs, head_size=128,
                                             rotary_dim=rd, is_neox=neox)
                r = {"case": f"rotary 4096 tok 32/8 heads d128 rot{rd} {'neox' if neox else 'gptj'}", "op": "rotary_embedding",
                     "dtype": str(dtype)[6:], "rel_err": max(rel_err(cq, eq), rel_err(ck, ek)),
                     "max_err": max(max_err(cq, eq), max_err(ck, ek)), "reference_same_dtype_rel_err": rel_err(lq, eq)}
                r["ok"] = r["rel_err"] <= max(TOL[dtype], 2 * r["reference_same_dtype_rel_err"])
                out.append(r)
                log(f"  {r}")
            xa = torch.randn(4096, 2 * 14336, generator=g).to(dtype).to(DEV)
            for name, f_c, f_r in (("silu_and_mul", lambda t: ops.silu_and_mul(x=t), lambda t: ref.silu_and_mul(x=t)),
                                   ("gelu_and_mul tanh", lambda t: ops.gelu_and_mul(x=t, approximate="tanh"),
                                    lambda t: ref.gelu_and_mul(x=t, approximate="tanh"))):
                got, exp, lo = f_c(xa), f_r(xa.double()), f_r(xa)
                r = {"case": f"{name} 4096x2x14336", "op": name.split()[0], "dtype": str(dtype)[6:],
                     "rel_err": rel_err(got, exp), "max_err": max_err(got, exp),
                     "reference_same_dtype_rel_err": rel_err(lo, exp)}
                r["ok"] = r["rel_err"] <= max(TOL[dtype], 2 * r["reference_same_dtype_rel_err"])
                out.append(r)
                log(f"  {r}")
            del xa
        except Exception as exc:
            fail("big", f"norm/rotary/act {dtype}: {exc!r}")
            traceback.print_exc()
    for r in out:
        if r.get("ok") is False and "error" not in r and not any(r["case"] in f for f in RESULTS["failures"]):
            fail("big", f"{r['case']} {r['dtype']}: rel err {r.get('rel_err')}")
    torch.cuda.empty_cache()
    return {"cases": out, "plan_example": repr(C.attention_plan(
        num_tokens=64, num_seqs=64, num_heads=32, num_kv_heads=8, head_size=128, max_query_len=1,
        max_seq_len=4096, num_sms=torch.cuda.get_device_properties(0).multi_processor_count))}


# ----------------------------------------------------------------------------------------------------
# models vs transformers, and the kit's model check
# ----------------------------------------------------------------------------------------------------


def section_models(tmp: Path) -> dict:
    out: dict = {"hf": [], "kit": []}
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    try:
        import hf_cases
    except Exception as exc:
        out["hf_skipped"] = f"tests/models/hf_cases.py not importable: {exc!r}"
        log("  hf parity skipped:", out["hf_skipped"])
        hf_cases = None
    if hf_cases is not None:
        from accel_models.loader import load_model
        from accel_models.runner import ModelRunner

        for case in hf_cases.CASES[: CASES_LIMIT or None]:
            try:
                path, hf = hf_cases.checkpoint(case, tmp)
                ref32 = hf_cases.hf_logits(hf, hf_cases.SEQUENCES)
                scale = max(r.abs().max().item() for r in ref32)
                hf_bf16 = hf_cases.build_hf(case).to(torch.bfloat16)  # same seed -> same weights
                hf_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()})
                ref_bf = hf_cases.hf_logits(hf_bf16, hf_cases.SEQUENCES)
                hf_bf_err = max((o.float() - r).abs().max().item() for o, r in zip(ref_bf, ref32)) / scale
                row = {"case": case.name}
                for dtype in ("float32", "bfloat16"):
                    model = load_model(path, dtype=dtype, device=DEV, ops=_ops()[0])
                    ours = ModelRunner(model).forward_sequences(hf_cases.SEQUENCES)
                    err = max((o.float().cpu() - r).abs().max().item() for o, r in zip(ours, ref32)) / scale
                    tol = 1e-5 if dtype == "float32" else 2 * hf_bf_err + 1.6e-2
                    row[dtype] = err
                    row[f"{dtype}_tol"] = tol
                    if not err <= tol:
                        fail("models", f"{case.name} {dtype}: {err:.3g} > {tol:.3g}")
                    # prefill in chunks then decode through the cache, on the cuda backend
                    if dtype == "float32":
                        runner = ModelRunner(model, block_size=16)
                        a = hf_cases.SEQUENCES[0]
                        got = [runner.step({"a": a[:5]})["a"], runner.step({"a": a[5:8]})["a"]]
                        got += [runner.step({"a": [t]})["a"] for t in a[8:]]
                        inc = (torch.cat(got).float().cpu() - ref32[0]).abs().max().item() / scale
                        row["incremental_float32"] = inc
                        if not inc <= 1e-5:
                            fail("models", f"{case.name} chunked prefill + decode: {inc:.3g}")
                    del model
                row["hf_bf16_own_err"] = hf_bf_err
                out["hf"].append(row)
                log(f"  {row}")
            except Exception as exc:
                fail("models", f"{case.name}: {exc!r}")
                traceback.print_exc()
                out["hf"].append({"case": case.name, "error": repr(exc)})
    try:
        from accel_models.testing.models import run_model_checks

        out["kit"] = run_model_checks("cuda", device=DEV, allow_unavailable=DEV == "cpu")
        for m in out["kit"]:
            log(f"  kit {m}")
            if m["status"] == "fail":
                fail("models", f"kit {m}")
    except Exception as exc:
        fail("models", f"kit: {exc!r}")
    return out


def section_generate(tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import hf_cases
    from accel_models import LLM, SamplingParams

    rows = []
    prompts = [[3, 17, 42, 5, 99], [9, 8, 7], [100], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    names = ["llama-gqa-hd32-default", "mistral-sliding4", "qwen3-hd64", "mixtral-8x2", "qwen2moe-60x4-shared",
             "qwen3moe-8x2"]
    for name in names[: CASES_LIMIT or None]:
        if name not in hf_cases.CASES_BY_NAME:
            continue
        try:
            path, _ = hf_cases.checkpoint(hf_cases.CASES_BY_NAME[name], tmp)
            params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
            res = {}
            # (a --device cpu dry run has no usable cuda backend: it runs the reference on both sides)
            for label, backend, device in (("cuda", "cuda" if DEV != "cpu" else "reference", DEV),
                                           ("reference", "reference", "cpu")):
                with LLM(path, backend=backend, dtype="float32", device=device, max_model_len=64) as llm:
                    res[label] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
            same = res["cuda"] == res["reference"]
            rows.append({"model": name, "identical": same, "tokens": sum(map(len, res["cuda"])),
                         "cuda": res["cuda"], "reference": res["reference"]})
            log(f"  generate {name}: identical={same}")
            if not same:
                fail("generate", f"{name}: cuda {res['cuda']} != reference {res['reference']}")
        except Exception as exc:
            fail("generate", f"{name}: {exc!r}")
            traceback.print_exc()
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------------


def section_bench(ceil: dict, tune: bool) -> dict:
    import accel_backend_cuda as C
    import accel_backend_cuda._triton_kernels as K

    ops, ref = _ops()
    bw, fl = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    rows = []

    def row(name, bytes_, flops, ours, torch_ms, torch_name, extra=None):
        floor = max(bytes_ / bw, flops / fl) * 1e3
        r = {"kernel": name, "bytes": bytes_, "flops": flops, "floor_ms": floor, "ours_ms": ours,
             "ours_over_floor": ours / floor, "torch": torch_name, "torch_ms": torch_ms,
             "speedup_vs_torch": torch_ms / ours if torch_ms else None}
        if extra:
            r.update(extra)
        rows.append(r)
        log(f"  {name}: ours {ours:.4f} ms, floor {floor:.4f} ms ({ours / floor:.2f}x), {torch_name} {torch_ms:.4f} ms")

    dt = torch.bfloat16
    # rms_norm and fused add
    T, H = 8192, 4096
    x = torch.randn(T, H, device=DEV, dtype=dt)
    res = torch.randn(T, H, device=DEV, dtype=dt)
    w = torch.randn(H, device=DEV, dtype=dt)
    eager = lambda: ref.rms_norm(x=x, weight=w, eps=1e-6)  # noqa: E731
    row("rms_norm 8192x4096 bf16", 2 * T * H * 2, 0, bench_ms(lambda: ops.rms_norm(x=x, weight=w, eps=1e-6)),
        bench_ms(eager), "torch eager formula",
        {"torch_F_rms_norm_ms": bench_ms(lambda: torch.nn.functional.rms_norm(x, (H,), w, 1e-6))})
    row("fused_add_rms_norm 8192x4096 bf16", 4 * T * H * 2, 0,
        bench_ms(lambda: ops.fused_add_rms_norm(x=x, residual=res, weight=w, eps=1e-6)),
        bench_ms(lambda: ref.fused_add_rms_norm(x=x, residual=res, weight=w, eps=1e-6)), "torch eager formula")
    del x, res
    # rotary: 8192 tokens, 32 q heads + 8 kv heads, d128, neox, in place
    T = 8192
    q = torch.randn(T, 32 * 128, device=DEV, dtype=dt)
    k = torch.randn(T, 8 * 128, device=DEV, dtype=dt)
    pos = torch.randint(0, 8192, (T,), device=DEV)
    cs = torch.randn(8192, 128, device=DEV, dtype=torch.float32)
    byts = 2 * (q.numel() + k.numel()) * 2 + T * 8 + T * 128 * 4
    row("rotary neox 8192 tok 32+8 heads d128 bf16", byts, 0,
        bench_ms(lambda: ops.rotary_embedding(positions=pos, query=q, key=k, cos_sin_cache=cs, head_size=128,
                                              rotary_dim=128, is_neox=True)),
        bench_ms(lambda: ref.rotary_embedding(positions=pos, query=q, key=k, cos_sin_cache=cs, head_size=128,
                                              rotary_dim=128, is_neox=True)), "torch eager formula")
    del q, k
    # silu_and_mul
    xa = torch.randn(4096, 2 * 14336, device=DEV, dtype=dt)
    row("silu_and_mul 4096x2x14336 bf16", xa.numel() * 2 * 3 // 2, 0, bench_ms(lambda: ops.silu_and_mul(x=xa)),
        bench_ms(lambda: ref.silu_and_mul(x=xa)), "torch eager formula")
    del xa
    torch.cuda.empty_cache()

    # paged attention decode: B=64, 32 q heads / 8 kv heads, d128, block 16
    g = torch.Generator().manual_seed(0)
    attn_tune = {}
    for ctx in (512, 4096):
        B, Hq, Hk, D, bs = 64, 32, 8, 128, 16
        nb = B * ctx // bs
        cache = torch.randn(2, nb, Hk, bs, D, device=DEV, dtype=dt)
        bt = torch.randperm(nb, generator=g).view(B, ctx // bs).to(torch.int32).to(DEV)
        meta = dict(block_table=bt, seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=DEV),
                    query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=DEV), max_query_len=1,
                    max_seq_len=ctx, scale=D**-0.5, sliding_window=None, logits_soft_cap=None)
        qd = torch.randn(B, Hq, D, device=DEV, dtype=dt)
        fn = lambda: ops.paged_attention(query=qd, kv_cache=cache, **meta)  # noqa: E731
        byts = B * ctx * Hk * D * 2 * 2 + 2 * qd.numel() * 2 + bt.numel() * 4
        if tune:
            base = dict(K.CONFIG["attn_decode"])
            for tile, warps, stages in ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 3),
                                        (64, 8, 3), (32, 2, 4)):
                K.CONFIG["attn_decode"] = dict(base, TILE_N=tile, num_warps=warps, num_stages=stages)
                try:
                    attn_tune[f"ctx{ctx} tile{tile} w{warps} s{stages}"] = bench_ms(fn)
                except Exception as exc:
                    attn_tune[f"ctx{ctx} tile{tile} w{warps} s{stages}"] = repr(exc)[:100]
            K.CONFIG["attn_decode"] = base
        # split-K on vs off
        plan = C.attention_plan(num_tokens=B, num_seqs=B, num_heads=Hq, num_kv_heads=Hk, head_size=D,
                                max_query_len=1, max_seq_len=ctx, num_sms=torch.cuda.get_device_properties(0).multi_processor_count,
                                config=K.CONFIG)
        nosplit = C.AttentionPlan(**{**plan.__dict__, "num_splits": 1})
        t_nosplit = bench_ms(lambda: K.paged_attention(qd, cache, bt, meta["seq_lens"], meta["query_start_loc"],
                                                       D**-0.5, None, None, nosplit))
        # plain PyTorch: the reference backend's vectorized paged attention; and SDPA on contiguous K/V
        kc = cache[0].permute(0, 2, 1, 3)[bt.long()].reshape(B, ctx, Hk, D).transpose(1, 2).contiguous()
        vc = cache[1].permute(0, 2, 1, 3)[bt.long()].reshape(B, ctx, Hk, D).transpose(1, 2).contiguous()
        qs = qd.view(B, Hq, 1, D)
        sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))
        rcache = cache.permute(0, 1, 3, 2, 4).contiguous()  # the reference layout
        torch_ms = bench_ms(lambda: ref.paged_attention(query=qd, kv_cache=rcache, **meta))
        # correctness at the bench shape too
        o = fn()
        e = torch.nn.functional.scaled_dot_product_attention(qs.double(), kc.double(), vc.double(), enable_gqa=True)
        row(f"paged_attention decode B=64 ctx {ctx} 32/8 heads d128 bf16", byts, 4 * B * Hq * ctx * D,
            bench_ms(fn), torch_ms, "reference (torch gather+matmul)",
            {"splits": plan.num_splits, "no_split_ms": t_nosplit, "torch_sdpa_contiguous_ms": sdpa,
             "rel_err_vs_float64": rel_err(o.view(B, Hq, 1, D), e)})
        del cache, kc, vc, rcache
        torch.cuda.empty_cache()
    # small batch, long context: split-K spreads 4 x 8 (sequence, KV head) programs over the SMs
    B, ctx, Hq, Hk, D, bs = 4, 16384, 32, 8, 128, 16
    nb = B * ctx // bs
    cache = torch.randn(2, nb, Hk, bs, D, device=DEV, dtype=dt)
    bt = torch.randperm(nb, generator=g).view(B, ctx // bs).to(torch.int32).to(DEV)
    meta = dict(block_table=bt, seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=DEV),
                query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=DEV), max_query_len=1,
                max_seq_len=ctx, scale=D**-0.5, sliding_window=None, logits_soft_cap=None)
    qd = torch.randn(B, Hq, D, device=DEV, dtype=dt)
    plan = C.attention_plan(num_tokens=B, num_seqs=B, num_heads=Hq, num_kv_heads=Hk, head_size=D, max_query_len=1,
                            max_seq_len=ctx, num_sms=torch.cuda.get_device_properties(0).multi_processor_count,
                            config=K.CONFIG)
    nosplit = C.AttentionPlan(**{**plan.__dict__, "num_splits": 1})
    t_nosplit = bench_ms(lambda: K.paged_attention(qd, cache, bt, meta["seq_lens"], meta["query_start_loc"],
                                                   D**-0.5, None, None, nosplit))
    rcache = cache.permute(0, 1, 3, 2, 4).contiguous()
    torch_ms = bench_ms(lambda: ref.paged_attention(query=qd, kv_cache=rcache, **meta))
    del rcache
    kc = cache[0].permute(0, 2, 1, 3)[bt.long()].reshape(B, ctx, Hk, D).transpose(1, 2).contiguous()
    vc = cache[1].permute(0, 2, 1, 3)[bt.long()].reshape(B, ctx, Hk, D).transpose(1, 2).contiguous()
    qs = qd.view(B, Hq, 1, D)
    sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))
    row(f"paged_attention decode B=4 ctx {ctx} 32/8 heads d128 bf16 (split-K)",
        B * ctx * Hk * D * 2 * 2 + 2 * qd.numel() * 2, 4 * B * Hq * ctx * D,
        bench_ms(lambda: ops.paged_attention(query=qd, kv_cache=cache, **meta)), torch_ms,
        "reference (torch gather+matmul)", {"splits": plan.num_splits, "no_split_ms": t_nosplit,
                                            "torch_sdpa_contiguous_ms": sdpa})
    del cache, kc, vc
    torch.cuda.empty_cache()
    # prefill: 4 x 2048 causal (compute-bound)
    B, S, Hq, Hk, D, bs = 4, 2048, 32, 8, 128, 16
    nb = B * S // bs
    cache = torch.randn(2, nb, Hk, bs, D, device=DEV, dtype=dt)
    bt = torch.arange(nb, dtype=torch.int32, device=DEV).view(B, S // bs)
    qp = torch.randn(B * S, Hq, D, device=DEV, dtype=dt)
    meta = dict(block_table=bt, seq_lens=torch.full((B,), S, dtype=torch.int32, device=DEV),
                query_start_loc=torch.arange(0, B * S + 1, S, dtype=torch.int32, device=DEV), max_query_len=S,
                max_seq_len=S, scale=D**-0.5, sliding_window=None, logits_soft_cap=None)
    kc = cache[0].permute(0, 2, 1, 3)[bt.long()].reshape(B, S, Hk, D).transpose(1, 2).contiguous()
    vc = cache[1].permute(0, 2, 1, 3)[bt.long()].reshape(B, S, Hk, D).transpose(1, 2).contiguous()
    qs = qp.view(B, S, Hq, D).transpose(1, 2)
    fn = lambda: ops.paged_attention(query=qp, kv_cache=cache, **meta)  # noqa: E731
    prefill_tune = {}
    if tune:
        base = dict(K.CONFIG["attn_prefill"])
        for bm, tile, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (64, 32, 4, 3),
                                        (128, 128, 8, 2)):
            K.CONFIG["attn_prefill"] = dict(base, BLOCK_M=bm, TILE_N=tile, num_warps=warps, num_stages=stages)
            try:
                prefill_tune[f"bm{bm} tile{tile} w{warps} s{stages}"] = bench_ms(fn)
            except Exception as exc:
                prefill_tune[f"bm{bm} tile{tile} w{warps} s{stages}"] = repr(exc)[:100]
        K.CONFIG["attn_prefill"] = base
    sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, is_causal=True, enable_gqa=True))
    flops = 4 * B * Hq * D * S * (S + 1) / 2
    row("paged_attention prefill 4x2048 causal 32/8 heads d128 bf16", (2 * qp.numel() + cache.numel()) * 2, flops,
        bench_ms(fn), sdpa, "torch SDPA (flash, contiguous K/V)")
    del cache, kc, vc, qp
    torch.cuda.empty_cache()

    # fused experts: Qwen3-30B-A3B-like (E=128, top 8, hidden 2048, moe intermediate 768)
    E, Hh, I, topk = 128, 2048, 768, 8
    w13 = (torch.randn(E, 2 * I, Hh, device=DEV, dtype=dt) / 45)
    w2 = (torch.randn(E, Hh, I, device=DEV, dtype=dt) / 28)
    moe_tune = {}
    for T in (64, 4096):
        x = torch.randn(T, Hh, device=DEV, dtype=dt)
        logits = torch.randn(T, E, device=DEV)
        tw, ti = ops.moe_topk(router_logits=logits, top_k=topk, scoring_func="softmax", renormalize=True,
                              num_expert_group=None, topk_group=None, e_score_correction_bias=None,
                              routed_scaling_factor=1.0)
        touched = int(torch.unique(ti).numel())
        fn = lambda: ops.fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti,  # noqa: E731
                                       activation="silu", expert_map=None)
        if tune:
            large = T * topk >= 4 * E * 16
            keys = ("moe_large", "moe_down_large") if large else ("moe_small", "moe_small")
            base = {kk: dict(K.CONFIG[kk]) for kk in set(keys)}
            cands = ([(64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                      (64, 128, 64, 4, 4)] if large else
                     [(16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 64, 64, 4, 4), (32, 64, 128, 4, 3),
                      (16, 32, 256, 4, 3)])
            for bm, bn, bk, warps, stages in cands:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
                for kk in set(keys):
                    K.CONFIG[kk] = dict(cfg)
                try:
                    moe_tune[f"T{T} bm{bm} bn{bn} bk{bk} w{warps} s{stages}"] = bench_ms(fn)
                except Exception as exc:
                    moe_tune[f"T{T} bm{bm} bn{bn} bk{bk} w{warps} s{stages}"] = repr(exc)[:100]
            K.CONFIG.update(base)
        torch_ms = bench_ms(lambda: ref.fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti,
                                                      activation="silu", expert_map=None), warmup=5, rep=30)
        byts = touched * 3 * Hh * I * 2 + 2 * x.numel() * 2
        flops = 2 * T * topk * 3 * Hh * I
        row(f"fused_experts T={T} E=128 top8 H=2048 I=768 bf16", byts, flops, bench_ms(fn), torch_ms,
            "reference (torch loop over experts)", {"experts_touched": touched})
    del w13, w2
    torch.cuda.empty_cache()
    return {"rows": rows, "tune": {"attn_decode": attn_tune, "attn_prefill": prefill_tune, "moe": moe_tune},
            "config": K.CONFIG}


# ----------------------------------------------------------------------------------------------------


def summary(env: dict, ceil: dict | None) -> str:
    lines = [f"# CUDA backend run: {env.get('gpu')} ({env.get('sms')} SMs), {env.get('date')}",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), Triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, Python {env.get('python')}"]
    if ceil:
        lines.append(f"measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
                     f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    s = RESULTS["sections"]
    if "ops" in s and "ops" in s["ops"]:
        lines += ["", "## ops (conformance kit, fp32+bf16, worst |err|/tol, <= 1 passes)", "",
                  "| op | result | worst | cases |", "|---|---|---|---|"]
        for r in s["ops"]["ops"]:
            lines.append(f"| {r['op']} | {r['status']} | {r['worst_ratio']:.3g} | {r['cases']} |")
    if "big" in s and "cases" in s["big"]:
        lines += ["", "## serving-sized cases (normwise rel err vs float64; reference backend in the same dtype)", "",
                  "| case | dtype | ok | rel err | max abs err | reference rel err |", "|---|---|---|---|---|---|"]
        for r in s["big"]["cases"]:
            lines.append(f"| {r['case']} | {r['dtype']} | {r.get('ok')} | {r.get('rel_err', float('nan')):.3g} | "
                         f"{r.get('max_err', float('nan')):.3g} | {r.get('reference_same_dtype_rel_err', float('nan')):.3g} |")
    if "models" in s and "hf" in s["models"]:
        lines += ["", "## models vs transformers (max |diff| / max |logit|)", "",
                  "| case | fp32 | bf16 (tol) | fp32 chunked prefill+decode |", "|---|---|---|---|"]
        for r in s["models"]["hf"]:
            if "error" in r:
                lines.append(f"| {r['case']} | error: {r['error'][:80]} | | |")
            else:
                lines.append(f"| {r['case']} | {r['float32']:.2e} | {r['bfloat16']:.2e} ({r['bfloat16_tol']:.2e}) | "
                             f"{r.get('incremental_float32', float('nan')):.2e} |")
        if s["models"].get("hf_skipped"):
            lines.append(f"skipped: {s['models']['hf_skipped']}")
        for m in s["models"].get("kit", []):
            lines.append(f"- kit model check {m['model']} {m['dtype']}: {m['status']} {m['error']}")
    if "generate" in s and "rows" in s["generate"]:
        lines += ["", "## greedy generation, cuda (GPU) vs reference (CPU), fp32", ""]
        for r in s["generate"]["rows"]:
            lines.append(f"- {r['model']}: identical={r['identical']} ({r['tokens']} tokens)")
    if "bench" in s and "rows" in s["bench"]:
        lines += ["", "## kernels (median ms; floor = max(bytes / copy bw, flops / matmul rate))", "",
                  "| kernel | ours | floor | ours/floor | plain PyTorch | torch ms | speedup |", "|---|---|---|---|---|---|---|"]
        for r in s["bench"]["rows"]:
            lines.append(f"| {r['kernel']} | {r['ours_ms']:.4f} | {r['floor_ms']:.4f} | {r['ours_over_floor']:.2f} | "
                         f"{r['torch']} | {r['torch_ms']:.4f} | {r['speedup_vs_torch']:.1f}x |")
        for r in s["bench"]["rows"]:
            extra = {k: v for k, v in r.items() if k in ("splits", "no_split_ms", "torch_sdpa_contiguous_ms",
                                                          "torch_F_rms_norm_ms", "experts_touched", "rel_err_vs_float64")}
            if extra:
                lines.append(f"- {r['kernel']}: {extra}")
        for name, t in s["bench"].get("tune", {}).items():
            if t:
                best = min((v, k) for k, v in t.items() if isinstance(v, float))
                lines.append(f"- tune {name}: best {best[1]} {best[0]:.4f} ms; all: " +
                             ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items()))
    for name, sec in s.items():
        lines.append(f"- section {name}: {sec.get('seconds', 0):.0f} s" + (f" ERROR {sec['error']}" if "error" in sec else ""))
    lines += ["", f"FAILURES ({len(RESULTS['failures'])}):"] + [f"- {f}" for f in RESULTS["failures"][:40]]
    return "\n".join(lines)


def main() -> int:
    global LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "cuda" / "results"))
    ap.add_argument("--sections", default="ops,big,models,generate,bench,tune")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", type=int, default=0, help="models/generate: only the first N cases (dry runs)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    global CASES_LIMIT
    CASES_LIMIT = args.cases
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = open(out / "log.txt", "a")
    sections = args.sections.split(",")
    if DEV == "cuda":
        os.environ.setdefault("ACCEL_BACKEND", "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are fp32
    torch.backends.cudnn.allow_tf32 = False
    env = environment() if DEV == "cuda" else {"device": DEV}
    RESULTS["env"] = env
    log(json.dumps(env))
    import accel_models

    log("backends:", [(b.name, b.usable, b.reason) for b in accel_models.list_backends()])
    ceil = None
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "accel_cuda_ckpts"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in (("ceilings",) if DEV == "cuda" else ()) + tuple(sections):
        if name == "tune":
            continue
        t0 = time.time()
        log(f"== {name}")
        try:
            if name == "ceilings":
                ceil = ceilings()
                RESULTS["ceilings"] = ceil
                log(f"  copy {ceil['copy_bytes_per_s'] / 1e12:.3f} TB/s, bf16 mm {ceil['bf16_flops_per_s'] / 1e12:.0f} TF/s")
                continue
            fn = {"ops": lambda: section_ops(args.examples), "big": section_big,
                  "models": lambda: section_models(tmp), "generate": lambda: section_generate(tmp),
                  "bench": lambda: section_bench(ceil, "tune" in sections)}[name]
            RESULTS["sections"][name] = fn()
        except Exception as exc:
            traceback.print_exc()
            RESULTS["sections"][name] = {"error": repr(exc)[:500]}
            fail(name, f"section crashed: {exc!r}"[:300])
        finally:
            if name != "ceilings":
                RESULTS["sections"].setdefault(name, {})["seconds"] = time.time() - t0
            (out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    text = summary(env, ceil)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 1 if RESULTS["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
