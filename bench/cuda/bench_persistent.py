"""The persistent decoder-layer kernel (issue 11) against the layered ops, on one GPU: numbers, then time.

    python bench/cuda/bench_persistent.py --out DIR [--prompt 128] [--steps 32] [--configs JSON]

Model: the Llama-3.2-1B shape of bench_decode.py (random bf16 weights, saved with transformers and loaded
with accel_models.load_model on the CUDA backend), one sequence, a 128-token prompt prefilled through the
layered path. A decode step is embedding -> 16 layers -> final norm -> tied LM head, either

* layered: ``ModelRunner.execute`` (the zoo's layers and the CUDA backend's ops, as ``LLM`` runs them), or
* persistent: the same embedding/norm/LM head with each layer one ``decoder_layer_decode`` launch
  (``_triton_kernels._decoder_layer_kernel``, phases separated by grid barriers),

both captured as CUDA graphs over the same persistent input buffers and KV cache.

Checks: (1) one layer in float64 (the reference backend's ops on upcast weights, as the interpreter test
does) against the persistent layer and the layered ops, each in bf16, for layers 0 and 7; (2) ``steps``
greedy decode steps where each step runs both graphs from the same cache state (persistent first, then
layered, which rewrites the same slot): relative logits difference and argmax agreement per step; (3) the
barrier's error word stays 0 (no program ever waited out SPIN_LIMIT).

Times: median graph replay of each (200 replays, in alternating rounds), against the bandwidth floor
(bench_decode.step_bytes over the measured copy bandwidth). ``--configs`` (a JSON list of dicts) times
more launch configs of the persistent kernel (``_triton_kernels.CONFIG["decoder_layer"]`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
from _timing import replay_us  # noqa: E402

RES: dict = {"errors": []}


def log(*a) -> None:
    print(*a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def layer_weights(layer) -> dict[str, torch.Tensor]:
    return {"input_norm_weight": layer.input_layernorm.weight, "qkv_weight": layer.self_attn.qkv_proj.weight,
            "o_weight": layer.self_attn.o_proj.weight, "post_norm_weight": layer.post_attention_layernorm.weight,
            "gate_up_weight": layer.mlp.gate_up_proj.weight, "down_weight": layer.mlp.down_proj.weight}


def compiled_info() -> dict:
    import accel_backend_cuda._triton_kernels as K

    ck = K.LAST_COMPILED.get("decoder_layer")
    if ck is None:
        return {}
    ttg = ck.asm.get("ttgir", "")
    info = {"n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
            "shared": ck.metadata.shared, "async_copies": ttg.count("async_copy_global_to_local"),
            "tma": ttg.count("async_tma"), "local_alloc": ttg.count("local_alloc")}
    return info


#: (name, start point, end point, start reduce, end reduce) of the trace's critical path through a layer
#: (points of _triton_kernels._stamp): a phase runs from the first program's release of the barrier before
#: it to the last program's arrival at the barrier after it; a barrier from that arrival to the first release
SEGMENTS = [("qkv", 1, 2), ("barrier0", 2, 3), ("attention", 3, 4), ("barrier1", 4, 5), ("o_proj", 5, 6),
            ("barrier2", 6, 7), ("gate_up", 7, 8), ("barrier3", 8, 9), ("down", 9, 10)]


def trace_summary(tr: torch.Tensor) -> dict:
    """Per-segment microseconds from timelines ``[samples, layers, programs, points]`` (ns): the
    critical path of each layer (a phase from the earliest program's start to the latest's end, a
    barrier from the latest arrival to the earliest release) and, for phases, the median program's own
    duration; between layers, from the latest program's end to the next layer's first PDL release.
    Medians over samples and the middle layers (the first and last differ: no residual, no next layer)."""
    t = tr.double()
    out = {}
    mid = slice(1, t.shape[1] - 1)
    for name, a, b in SEGMENTS:
        if name.startswith("barrier"):
            crit = t[:, :, :, b].amin(2) - t[:, :, :, a].amax(2)
        else:
            crit = t[:, :, :, b].amax(2) - t[:, :, :, a].amin(2)
        own = (t[:, :, :, b] - t[:, :, :, a]).median(2).values
        out[name] = {"critical_us": float(crit[:, mid].median()) / 1e3, "median_program_us": float(own[:, mid].median()) / 1e3}
    gap = t[:, 1:, :, 1].amin(2) - t[:, :-1, :, 10].amax(2)
    out["between_layers"] = {"critical_us": float(gap.median()) / 1e3}
    # the head start PDL gives: the next layer's earliest entry before this layer's latest end
    early = t[:, :-1, :, 10].amax(2) - t[:, 1:, :, 0].amin(2)
    out["next_entry_before_end"] = {"critical_us": float(early.median()) / 1e3}
    layer = t[:, 1:, :, 1].amin(2) - t[:, :-1, :, 1].amin(2)
    out["layer"] = {"critical_us": float(layer.median()) / 1e3}
    # attention programs: with an item (stamp 11 written) vs idle; the merge's end
    has = t[:, :, :, 11] > 0
    att = t[:, :, :, 4] - t[:, :, :, 3]
    out["attention_item_programs"] = {"count": int(has[0, 0].sum()),
                                      "median_program_us": float(att[has].median()) / 1e3 if has.any() else None,
                                      "partials_stored_us": float((t[:, :, :, 11] - t[:, :, :, 3])[has].median()) / 1e3
                                      if has.any() else None}
    m = t[:, :, :, 12] > 0
    if m.any():
        out["attention_merge"] = {"count": int(m[0, 0].sum()),
                                  "merged_after_barrier_us": float((t[:, :, :, 12] - t[:, :, :, 3])[m].median()) / 1e3}
    return out


def take_trace(K, C, fn, pool, nprog: int, layers: int, samples: int = 20) -> dict:
    """Capture ``fn`` with the layer's timeline on (one row per layer launch), replay it ``samples``
    times, and summarize (trace_summary); the capture's replay time beside it (the stamps cost a little)."""
    cfg = K.CONFIG["decoder_layer"]
    buf = torch.zeros(layers, nprog, K.TRACE_POINTS, dtype=torch.int64, device="cuda")
    cfg["trace"], cfg["trace_next"] = buf, 0
    try:
        fn()
        torch.cuda.synchronize()
        cfg["trace_next"] = 0
        g = C.accel_capture_graph(fn=fn, device=torch.device("cuda"), pool=pool)
    finally:
        cfg["trace"], cfg["trace_next"] = None, 0
    rows = []
    for _ in range(samples + 3):
        buf.zero_()
        g.replay()
        torch.cuda.synchronize()
        rows.append(buf.clone())
    tr = torch.stack(rows[3:]).cpu()
    summ = trace_summary(tr)
    summ["traced_replay_ms"] = median_replay(g, 100)
    del g
    return summ


def median_replay(graph, n: int = 200) -> float:
    """Milliseconds per replay: 10 untimed, then the median of ``n`` (bench/cuda/_timing.py)."""
    return replay_us(graph, reps=n, warmup=10) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--configs", default="[]")
    ap.add_argument("--trace", action="store_true", help="timeline of the default and of each config")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # the "layered" side must stay op by op: the model's layers would otherwise take the persistent kernel
    # through the decoder_layer_decode hook at one-token steps (this script calls the kernel directly)
    os.environ["ACCEL_CUDA_PERSISTENT"] = "0"

    import accel_backend_cuda as C
    import accel_backend_cuda._triton_kernels as K
    from accel_models import load_model
    from accel_models.runner import ModelRunner, build_attn_metadata

    props = torch.cuda.get_device_properties(0)
    RES["device"] = {"name": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                     "triton": __import__("triton").__version__, "pdl": K.PDL,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log("device", RES["device"])
    bw = bd.copy_bandwidth()
    RES["copy_bw_TBps"] = bw / 1e12
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")

    path = Path("/tmp/bench_persistent_llama")
    hf, cfg = bd.build_hf("llama-1b", False, path)
    model = load_model(path, backend="cuda", dtype=torch.bfloat16, device="cuda")
    torch.cuda.empty_cache()
    max_len = args.prompt + args.steps + 64
    runner = ModelRunner(model, max_model_len=max_len, num_blocks=2 * (max_len // 16 + 2))
    mm = model.model
    layers = list(mm.layers)
    a0 = layers[0].self_attn
    nh, nkv, hd = a0.num_heads, a0.num_kv_heads, a0.head_dim
    rope = a0.rotary_emb
    eps = layers[0].input_layernorm.variance_epsilon
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    kv_bytes = lambda ctx: len(layers) * 2 * nkv * hd * 2 * ctx  # noqa: E731

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, cfg.vocab_size, (args.prompt,), generator=g).tolist()
    logits = runner.step({0: prompt})[0]
    state = runner._seqs[0]
    runner._grow(0, state, max_len)  # every block the run will need, so the block table is fixed
    n = len(state.tokens)
    blocks = state.blocks

    # persistent input buffers (both graphs read them)
    ids = torch.zeros(1, dtype=torch.int64, device="cuda")
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    md = build_attn_metadata([1], [n + 1], [blocks], runner.block_size, "cuda")
    md.max_seq_len = max_len  # plan attention for the longest context, as the runtime's graphs do

    def publish(token: int, p: int) -> None:
        ids.fill_(token)
        pos.fill_(p)
        md.seq_lens.fill_(p + 1)
        md.slot_mapping.fill_(blocks[p // runner.block_size] * runner.block_size + p % runner.block_size)

    def layered():
        return runner.execute(ids, pos, md, float_logits=False)

    def persistent():
        with torch.inference_mode():
            h = mm.embed_input_ids(ids)
            res = None
            for layer in layers:
                h, res = C.decoder_layer_decode(
                    h, res, pos, **layer_weights(layer), eps=eps, cos_sin_cache=rope.cos_sin_cache,
                    num_heads=nh, num_kv_heads=nkv, head_size=hd, is_neox=rope.is_neox, scale=a0.scaling,
                    kv_cache=runner.kv_caches[layer.self_attn.attn.prefix], slot_mapping=md.slot_mapping,
                    block_table=md.block_table, seq_lens=md.seq_lens, max_seq_len=md.max_seq_len)
            h, _ = mm.norm(h, res)
            return model.compute_logits(h)

    token = int(logits[-1].float().argmax())
    # (1) one layer in float64
    try:
        import accel_backend_reference as R

        publish(token, n)
        checks = []
        with torch.inference_mode():
            x0 = mm.embed_input_ids(ids)
            for li in (0, 7):
                layer = layers[li]
                w = {k: v.double() for k, v in layer_weights(layer).items()}
                hid = x0 if li == 0 else torch.randn_like(x0) * 0.5
                res = None if li == 0 else torch.randn_like(x0)
                cache = runner.kv_caches[layer.self_attn.attn.prefix]
                # float64: the cached keys/values of the prompt read back through the CUDA layout
                past = [cache[:, blocks[p // runner.block_size], :, p % runner.block_size] for p in range(n)]
                past_k = torch.stack([t[0] for t in past]).double()
                past_v = torch.stack([t[1] for t in past]).double()
                hd64 = hid.double()
                if res is None:
                    r64, x64 = hd64, R.accel_rms_norm(x=hd64, weight=w["input_norm_weight"], eps=eps)
                else:
                    x64, r64 = R.accel_fused_add_rms_norm(x=hd64, residual=res.double(), weight=w["input_norm_weight"], eps=eps)
                qkv = x64 @ w["qkv_weight"].T
                q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
                q, k = R.accel_rotary_embedding(positions=pos, query=q.clone(), key=k.clone(),
                                                cos_sin_cache=rope.cos_sin_cache.double(), head_size=hd,
                                                rotary_dim=hd, is_neox=rope.is_neox)
                keys = torch.cat([past_k, k.view(1, nkv, hd)]).repeat_interleave(nh // nkv, 1)
                vals = torch.cat([past_v, v.view(1, nkv, hd)]).repeat_interleave(nh // nkv, 1)
                p_ = torch.softmax(torch.einsum("hd,shd->hs", q.view(nh, hd), keys) * a0.scaling, -1)
                att = torch.einsum("hs,shd->hd", p_, vals).reshape(1, -1)
                x2, r2 = R.accel_fused_add_rms_norm(x=att @ w["o_weight"].T, residual=r64,
                                                    weight=w["post_norm_weight"], eps=eps)
                out64 = R.accel_silu_and_mul(x=x2 @ w["gate_up_weight"].T) @ w["down_weight"].T
                fo, fr = C.decoder_layer_decode(
                    hid, res, pos, **layer_weights(layer), eps=eps, cos_sin_cache=rope.cos_sin_cache,
                    num_heads=nh, num_kv_heads=nkv, head_size=hd, is_neox=rope.is_neox, scale=a0.scaling,
                    kv_cache=cache, slot_mapping=md.slot_mapping, block_table=md.block_table,
                    seq_lens=md.seq_lens, max_seq_len=md.max_seq_len)
                from accel_models.context import ForwardContext, forward_context

                with forward_context(ForwardContext(md, runner.kv_caches)):
                    lo, lr = layer(pos, hid, res)
                row = {"layer": li, "persistent_vs_f64": rel(fo, out64), "layered_vs_f64": rel(lo, out64),
                       "persistent_res_vs_f64": rel(fr, r2), "layered_res_vs_f64": rel(lr, r2)}
                checks.append(row)
                log("layer check", row)
        RES["layer_checks"] = checks
    except Exception as exc:
        RES["errors"].append(f"layer check: {exc}\n{traceback.format_exc()}")
        log("layer check FAILED", exc)

    # graphs
    publish(token, n)
    persistent()  # eager once: compiles, allocates the barrier words outside the capture
    torch.cuda.synchronize()
    g_layered = C.accel_capture_graph(fn=layered, device=torch.device("cuda"), pool=None)
    g_persist = C.accel_capture_graph(fn=persistent, device=torch.device("cuda"), pool=g_layered.pool)

    # (2) greedy steps, both graphs from the same cache state
    steps = []
    p = n
    for _ in range(args.steps):
        publish(token, p)
        lp = g_persist.replay().float().clone()
        ll = g_layered.replay().float().clone()
        steps.append({"pos": p, "rel": rel(lp, ll), "argmax_equal": int(lp.argmax()) == int(ll.argmax())})
        token = int(ll.argmax())
        p += 1
    RES["steps"] = steps
    bar = K.barrier_state(torch.device("cuda"), props.multi_processor_count)
    RES["barrier_words"] = bar.tolist()
    agree = sum(s["argmax_equal"] for s in steps)
    log(f"greedy steps: argmax agree {agree}/{len(steps)}, max rel logits {max(s['rel'] for s in steps):.2e}, "
        f"barrier words {RES['barrier_words']}")

    # (3) time
    ctx = p
    floor_ms = (weight_bytes + kv_bytes(ctx)) / bw * 1e3
    RES["floor_ms"] = floor_ms
    times = {"layered": [], "persistent": []}
    for _ in range(3):
        times["layered"].append(median_replay(g_layered))
        times["persistent"].append(median_replay(g_persist))
    RES["replay_ms"] = times
    RES["compiled_default"] = compiled_info()
    log("default config", K.CONFIG["decoder_layer"], "compiled", RES["compiled_default"])
    log(f"floor {floor_ms:.3f} ms (ctx {ctx}); layered {times['layered']} ms; persistent {times['persistent']} ms")
    nprog = K.CONFIG["decoder_layer"]["programs"] or props.multi_processor_count

    def traced() -> dict | None:
        if not args.trace:
            return None
        try:
            publish(token, p)
            tr = take_trace(K, C, persistent, g_layered.pool, nprog, len(layers))
            log("trace", json.dumps(tr))
            return tr
        except Exception as exc:
            RES["errors"].append(f"trace: {exc}\n{traceback.format_exc()}")
            log("trace FAILED", str(exc)[:500])
            return None

    RES["trace_default"] = traced()

    sweep = []
    base = dict(K.CONFIG["decoder_layer"])
    for over in json.loads(args.configs):
        try:
            K.CONFIG["decoder_layer"].update(over)
            publish(token, p)
            persistent()
            torch.cuda.synchronize()
            gp = C.accel_capture_graph(fn=persistent, device=torch.device("cuda"), pool=g_layered.pool)
            lp = gp.replay().float().clone()
            ll = g_layered.replay().float().clone()
            t = [median_replay(gp) for _ in range(2)]
            sweep.append({"config": over, "replay_ms": t, "rel_vs_layered": rel(lp, ll),
                          "argmax_equal": int(lp.argmax()) == int(ll.argmax()), "compiled": compiled_info()})
            del gp
            sweep[-1]["trace"] = traced()
            log("config", sweep[-1])
        except Exception as exc:
            RES["errors"].append(f"config {over}: {exc}\n{traceback.format_exc()}")
            log("config FAILED", over, str(exc)[:500])
        finally:
            K.CONFIG["decoder_layer"].clear()
            K.CONFIG["decoder_layer"].update(base)
    RES["sweep"] = sweep
    RES["barrier_words_end"] = K.barrier_state(torch.device("cuda"), props.multi_processor_count).tolist()
    (args.out / "persistent.json").write_text(json.dumps(RES, indent=1, default=str))
    lay, per = min(times["layered"]), min(times["persistent"])
    log("\n| path | graph replay ms | x floor |\n|---|---:|---:|")
    log(f"| floor ({bw / 1e12:.2f} TB/s copy) | {floor_ms:.3f} | 1.00 |")
    log(f"| layered ops | {lay:.3f} | {lay / floor_ms:.2f} |")
    log(f"| persistent layer kernel | {per:.3f} | {per / floor_ms:.2f} |")
    for s in sweep:
        log(f"| persistent {s['config']} | {min(s['replay_ms']):.3f} | {min(s['replay_ms']) / floor_ms:.2f} |")
    if RES["errors"]:
        log("ERRORS:\n" + "\n".join(e[:2000] for e in RES["errors"]))


if __name__ == "__main__":
    main()
