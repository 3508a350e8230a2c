"""End-to-end decode speed on one GPU (issue 11): accel_models.LLM (CUDA backend, graphs on and off) beside
transformers' generate on the same weights, a compiled pure-PyTorch decode (static KV cache,
torch.compile mode="reduce-overhead") and the memory-bandwidth floor.

    python bench/cuda/bench_decode.py --out DIR [--quick] [--batches 1,16,64] [--gen 64]

Models (random weights, bf16, written as real checkpoints with transformers' save_pretrained in /tmp):
a Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied)
and a small Mixtral (hidden 2048, 16 layers, 32/8 heads, 16 experts top-2, intermediate 1024, vocab 32000).
Prompts: 128 random tokens per sequence. A decode step's time is the median interval between engine steps
over the steady decode of a G-token run (step_ms; prefill excluded); tokens/s = batch / step time.
Greedy steps replay the greedy graph (argmax in the graph, ids written into the next step's input buffer);
"argmax after the graph" is the same engine with that turned off (``DecodeGraphs.sample_in_graph``): the
plain graph, then the argmax kernels and the ids copy launched after it, as before the greedy graphs.

Floor: bytes a step must read (every weight once, the experts a batch routes to in expectation, the tied
embedding once as the LM head; the KV cache of the mean context) over the copy bandwidth measured here.
Writes DIR/results.json and DIR/summary.md, prints the summary last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
RES: dict = {"rows": [], "errors": [], "identity": []}


def log(*a) -> None:
    print(*a, flush=True)


def sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20)."""
    n = 1 << 29
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ts = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        sync()
        ts.append(s.elapsed_time(e) / 1e3)
    t = sorted(ts[5:])[len(ts[5:]) // 2]
    del a, b
    return 2 * n * 2 / t


# ----------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------


def hf_config(name: str, quick: bool):
    import transformers

    if name == "llama-1b":
        kw = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0)
        if quick:
            kw.update(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **kw)
    kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
              tie_word_embeddings=False)
    if quick:
        kw.update(vocab_size=4096, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    return transformers.MixtralConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **kw)


def build_hf(name: str, quick: bool, path: Path):
    import transformers

    cfg = hf_config(name, quick)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model, cfg


def step_bytes(model, cfg, batch: int, ctx: float) -> float:
    """Bytes one decode step must read at least (see the module docstring)."""
    E = getattr(cfg, "num_local_experts", 0)
    k = getattr(cfg, "num_experts_per_tok", 0)
    touched = 0.0
    if E:  # expected number of distinct experts hit: E * (1 - P(a token misses an expert) ** batch)
        miss = (E - k) / E
        touched = E * (1 - miss**batch)
    total = 0.0
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for n, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if "embed_tokens" in n:
            b = b if tied else batch * p.shape[1] * p.element_size()  # tied: read whole as the LM head
        elif E and "experts" in n:
            b = b * touched / E
        total += b
    kvh = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * kvh * hd * 2 * ctx * batch
    return total + kv


# ----------------------------------------------------------------------------------------------------
# compiled pure-PyTorch decode (static KV cache)
# ----------------------------------------------------------------------------------------------------


class TorchDecode(torch.nn.Module):
    """One greedy decode step of Llama/Mixtral over a static KV cache, written for torch.compile."""

    def __init__(self, hf, cfg, batch: int, max_len: int) -> None:
        super().__init__()
        sd = {k: v.detach() for k, v in hf.state_dict().items()}
        P = lambda t: torch.nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        self.L, self.H = cfg.num_hidden_layers, cfg.hidden_size
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = self.H // self.nh
        self.eps = cfg.rms_norm_eps
        self.E = getattr(cfg, "num_local_experts", 0)
        self.k = getattr(cfg, "num_experts_per_tok", 0)
        self.embed = P(sd["model.embed_tokens.weight"])
        self.lm_head = self.embed if cfg.tie_word_embeddings else P(sd["lm_head.weight"])
        self.norm = P(sd["model.norm.weight"])
        self.layers = torch.nn.ModuleList()
        for i in range(self.L):
            p = f"model.layers.{i}."
            m = torch.nn.Module()
            m.ln1, m.ln2 = P(sd[p + "input_layernorm.weight"]), P(sd[p + "post_attention_layernorm.weight"])
            m.wqkv = P(torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
            m.wo = P(sd[p + "self_attn.o_proj.weight"])
            if self.E:
                if p + "mlp.experts.gate_up_proj" in sd:  # transformers 5: stacked experts
                    m.router = P(sd[p + "mlp.gate.weight"])
                    gu, dn = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
                    m.w13 = P(gu if gu.shape[1] == 2 * cfg.intermediate_size else gu.transpose(1, 2))
                    m.w2 = P(dn if dn.shape[1] == self.H else dn.transpose(1, 2))
                else:
                    e = p + "block_sparse_moe.experts."
                    m.router = P(sd[p + "block_sparse_moe.gate.weight"])
                    m.w13 = P(torch.stack([torch.cat([sd[f"{e}{j}.w1.weight"], sd[f"{e}{j}.w3.weight"]])
                                           for j in range(self.E)]))
                    m.w2 = P(torch.stack([sd[f"{e}{j}.w2.weight"] for j in range(self.E)]))
            else:
                m.wgu = P(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
                m.wd = P(sd[p + "mlp.down_proj.weight"])
            self.layers.append(m)
        dev, dt = self.embed.device, self.embed.dtype
        for m in self.layers:  # one K and one V buffer per layer, each written whole by index_copy_ (gpt-fast's
            # layout): a slice of one [L, 2, ...] buffer mutated in place made inductor copy the slice every
            # layer (1 ms per layer at batch 64, 2026-11-23: the compiled baseline at 64 measured 18 ms)
            m.register_buffer("kc", torch.zeros(batch, self.kvh, max_len, self.hd, device=dev, dtype=dt))
            m.register_buffer("vc", torch.zeros(batch, self.kvh, max_len, self.hd, device=dev, dtype=dt))
        rp = getattr(cfg, "rope_parameters", None) or {}
        theta = rp.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, self.hd, 2, device=dev, dtype=torch.float32) / self.hd))
        f = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv)
        self.register_buffer("cos", f.cos())
        self.register_buffer("sin", f.sin())
        self.register_buffer("ar", torch.arange(max_len, device=dev))

    def rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def rope(self, x, cos, sin):
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def moe(self, m, h):
        B = h.shape[0]
        w = torch.softmax(h.float() @ m.router.float().T, -1)
        tw, ti = w.topk(self.k, -1)
        tw = (tw / tw.sum(-1, keepdim=True)).to(h.dtype)
        if B * self.k <= self.E:  # few tokens: gather the routed experts' weights
            w13, w2 = m.w13[ti.flatten()], m.w2[ti.flatten()]
            hk = h.repeat_interleave(self.k, 0)
            g, u = torch.bmm(w13, hk[:, :, None])[..., 0].chunk(2, -1)
            o = torch.bmm(w2, (F.silu(g) * u)[:, :, None])[..., 0].view(B, self.k, -1)
            return (o * tw[..., None]).sum(1)
        g, u = torch.einsum("bh,eoh->beo", h, m.w13).chunk(2, -1)  # every expert, weighted (zeros unrouted)
        dense = torch.zeros(B, self.E, device=h.device, dtype=h.dtype).scatter(1, ti, tw)
        return torch.einsum("bei,ehi->bh", (F.silu(g) * u) * dense[..., None], m.w2)

    def forward(self, ids, pos):
        B = ids.shape[0]
        x = self.embed[ids]
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, hd / 2]
        mask = (self.ar <= pos)[None, None, None, :]
        for i, m in enumerate(self.layers):
            h = self.rms(x, m.ln1)
            q, k, v = (h @ m.wqkv.T).split([self.nh * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
            q = self.rope(q.view(B, self.nh, self.hd), cos, sin)
            k = self.rope(k.view(B, self.kvh, self.hd), cos, sin)
            m.kc.index_copy_(2, pos, k[:, :, None])
            m.vc.index_copy_(2, pos, v.view(B, self.kvh, 1, self.hd))
            a = F.scaled_dot_product_attention(q[:, :, None], m.kc, m.vc, attn_mask=mask, enable_gqa=True)
            x = x + a.reshape(B, -1) @ m.wo.T
            h = self.rms(x, m.ln2)
            if self.E:
                x = x + self.moe(m, h)
            else:
                g, u = (h @ m.wgu.T).chunk(2, -1)
                x = x + (F.silu(g) * u) @ m.wd.T
        return (self.rms(x, self.norm) @ self.lm_head.T).argmax(-1)


def bench_compiled(hf, cfg, batch: int, prompt: int, gen: int, max_len: int) -> float:
    mod = TorchDecode(hf, cfg, batch, max_len)
    for m in mod.layers:  # the prompt's keys and values (content does not change the time)
        m.kc.normal_(0, 0.5)
        m.vc.normal_(0, 0.5)
    step = torch.compile(mod, mode="reduce-overhead", fullgraph=True, dynamic=False)
    ids = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    pos = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        for _ in range(3):  # compile, record, warm
            ids = step(ids, pos).clone()
        sync()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        pos.fill_(prompt)
        s.record()
        for _ in range(gen):
            ids = step(ids, pos).clone()
            pos += 1
        e.record()
        sync()
    del mod, step
    torch._dynamo.reset()
    return s.elapsed_time(e) / 1e3 / gen


# ----------------------------------------------------------------------------------------------------
# transformers generate and accel_models.LLM
# ----------------------------------------------------------------------------------------------------


def bench_hf(hf, prompts: torch.Tensor, gen: int) -> float:
    def run(n):
        sync()
        t = time.perf_counter()
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False)
        sync()
        return time.perf_counter() - t

    with torch.no_grad():
        run(2)
        return (run(gen) - run(1)) / (gen - 1)


def llm_generate(llm, prompts: list[list[int]], n: int):
    from accel_models.runtime.sampling_params import SamplingParams

    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    sync()
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def step_ms(llm, plist: list[list[int]], gen: int, repeats: int = 2) -> tuple[list[float], list, list[float]]:
    """Decode step time in ms: the median interval between consecutive engine steps of a ``gen``-token
    greedy run of ``plist`` (the loop ``generate`` runs, timed per step), over the steady decode (the
    prefill, the first 2 decode steps and the last 2 left out), ``repeats`` times.

    A difference of whole runs, (T(G) - T(1)) / (G - 1), once made a batch-64 step look shorter than its
    own graph replay: a one-off host stall in the short run (tens of ms) shifts every step. The median
    interval is immune to such outliers; the mean of the same intervals is returned too. The garbage
    collector runs before each run. Returns (medians, the last run's tokens, means)."""
    import gc
    import statistics

    from accel_models.runtime.sampling_params import SamplingParams

    medians, means, toks = [], [], None
    sp = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    for r in range(repeats):
        gc.collect()
        sync()
        ids = [f"s{r}-{i}" for i in range(len(plist))]
        for rid, p in zip(ids, plist):
            llm.add_request(rid, p, sp)
        stamps, outs = [], {}
        while llm.has_unfinished_requests():
            for o in llm._step(finished_only=True):
                outs[o.request_id] = o
            stamps.append(time.perf_counter())
        sync()
        steady = [b - a for a, b in zip(stamps[3:-3], stamps[4:-2])]
        medians.append(statistics.median(steady) * 1e3)
        means.append(statistics.fmean(steady) * 1e3)
        toks = [outs[i].outputs[0].token_ids for i in ids]
    return medians, toks, means


def replay_time(llm, batch: int, greedy: bool = False) -> float | None:
    """Device time of the captured graph alone (no runtime work around it), median of 50; ``greedy``: the
    greedy variant (argmax in the graph, ids into the input buffer)."""
    g = llm.graphs
    graphs = None if g is None else (g.greedy_graphs if greedy else g.graphs)
    if graphs is None or batch not in graphs:
        return None
    graph = graphs[batch]
    for _ in range(5):
        graph.replay()
    ts = []
    for _ in range(50):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        sync()
        ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2]


def bench_model(name: str, args, bw: float) -> None:
    from accel_models.runtime.llm import LLM

    path = Path(f"/tmp/bench_decode_{name}")
    t0 = time.perf_counter()
    hf, cfg = build_hf(name, args.quick, path)
    log(f"[{name}] built and saved in {time.perf_counter() - t0:.1f}s")
    max_len = args.prompt + args.gen + 8
    max_b = max(args.batches)
    kv_tok = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    t0 = time.perf_counter()
    llm = LLM(path, backend="cuda", dtype=torch.bfloat16, max_num_seqs=max_b, max_model_len=max_len,
              kv_cache_memory=int(1.25 * kv_tok * max_len * max_b) + (64 << 20),
              max_num_batched_tokens=max(2048, args.prompt * max_b), graph_batch_sizes=args.batches,
              enable_prefix_caching=False)  # every run repeats its prompts: each must prefill them whole
    log(f"[{name}] LLM ready (graphs {sorted(llm.graphs.graphs) if llm.graphs else None}) "
        f"in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(1)
    for b in args.batches:
        prompts = torch.randint(1, cfg.vocab_size, (b, args.prompt), generator=g)
        plist = prompts.tolist()
        row = {"model": name, "batch": b, "prompt": args.prompt, "gen": args.gen}
        ctx = args.prompt + args.gen / 2
        row["floor_ms"] = step_bytes(hf, cfg, b, ctx) / bw * 1e3
        row["floor_bytes_GB"] = step_bytes(hf, cfg, b, ctx) / 1e9
        try:
            llm_generate(llm, plist, 3)  # warm
            graphs = llm.graphs
            r0, e0, p0 = graphs.replays, graphs.eager_decode_steps, llm.scheduler.num_preemptions
            o0 = getattr(llm, "overlapped_steps", 0)
            runs, toks_graph, means = step_ms(llm, plist, args.gen)
            row["ours_graph_mean_ms_runs"] = means
            # over the 4 timed runs: replays, eager decode steps, preemptions; overlapped (async) steps
            row["graph_steps"] = [graphs.replays - r0, graphs.eager_decode_steps - e0, llm.scheduler.num_preemptions - p0]
            row["overlapped_steps"] = getattr(llm, "overlapped_steps", 0) - o0
            row["ours_graph_ms_runs"] = runs
            row["ours_graph_ms"] = min(runs)
            row["graph_replay_ms"] = (replay_time(llm, b) or float("nan")) * 1e3
            row["graph_replay_greedy_ms"] = (replay_time(llm, b, greedy=True) or float("nan")) * 1e3
            row["greedy_replays"] = graphs.greedy_replays
            # the same graphs with the argmax launched after the graph and the ids copied into the next
            # step's inputs (what every step did before the greedy graphs)
            graphs.sample_in_graph = False
            runs_out, toks_out, _ = step_ms(llm, plist, args.gen, repeats=1)
            graphs.sample_in_graph = True
            row["ours_graph_argmax_after_ms"] = min(runs_out)
            row["argmax_after_identical"] = toks_out == toks_graph
            # the same graphs without async scheduling (each step waits for its tokens before the next)
            was = llm.async_scheduling
            llm.async_scheduling = False
            runs_sync, toks_sync, _ = step_ms(llm, plist, args.gen, repeats=1)
            llm.async_scheduling = was
            row["ours_graph_sync_ms"] = min(runs_sync)
            row["async_sync_identical"] = toks_sync == toks_graph
            llm.graphs = None  # graphs off: the same engine, eager steps
            runs_eager, toks_eager, _ = step_ms(llm, plist, args.gen, repeats=1)
            llm.graphs = graphs
            row["ours_eager_ms"] = min(runs_eager)
            same = toks_graph == toks_eager
            nseq = sum(a == e for a, e in zip(toks_graph, toks_eager))
            RES["identity"].append({"model": name, "batch": b, "identical": same, "seqs_identical": nseq,
                                    "seqs": b, "tokens_per_seq": args.gen})
            row["graph_eager_identical"] = same
            log(f"[{name}] b={b} argmax after the graph {row['ours_graph_argmax_after_ms']:.3f} ms (same tokens "
                f"{row['argmax_after_identical']}), greedy replay {row['graph_replay_greedy_ms']:.3f} ms")
            log(f"[{name}] b={b} ours graph {row['ours_graph_ms_runs']} ms (means {row['ours_graph_mean_ms_runs']}; replay {row['graph_replay_ms']:.3f}; "
                f"replays/eager/preemptions {row['graph_steps']}), sync {row['ours_graph_sync_ms']:.3f} ms "
                f"(same tokens {row['async_sync_identical']}, overlapped {row['overlapped_steps']}), "
                f"eager {row['ours_eager_ms']:.3f} ms, identical tokens {same} ({nseq}/{b} seqs)")
        except Exception as exc:
            RES["errors"].append(f"{name} b={b} ours: {exc}\n{traceback.format_exc()}")
            log(f"[{name}] b={b} ours FAILED: {exc}")
            llm.graphs = graphs if "graphs" in locals() else llm.graphs
        if b in args.hf_batches:
            try:
                row["hf_ms"] = bench_hf(hf, prompts.cuda(), args.hf_gen) * 1e3
                log(f"[{name}] b={b} transformers {row['hf_ms']:.2f} ms")
            except Exception as exc:
                RES["errors"].append(f"{name} b={b} hf: {exc}\n{traceback.format_exc()}")
                log(f"[{name}] b={b} transformers FAILED: {exc}")
        if b in args.compiled_batches:
            try:
                t0 = time.perf_counter()
                row["compiled_ms"] = bench_compiled(hf, cfg, b, args.prompt, args.gen, max_len) * 1e3
                log(f"[{name}] b={b} compiled {row['compiled_ms']:.3f} ms (incl. compile "
                    f"{time.perf_counter() - t0:.0f}s)")
            except Exception as exc:
                RES["errors"].append(f"{name} b={b} compiled: {exc}\n{traceback.format_exc()}")
                log(f"[{name}] b={b} compiled FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        RES["rows"].append(row)
        (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
    llm.shutdown()
    del llm, hf
    torch.cuda.empty_cache()


def fmt(v, d=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def summary(bw: float) -> str:
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", "",
             "| model | batch | floor ms | ours (graphs) ms | x floor | tok/s | graph replay ms | greedy graph replay ms "
             "| argmax after the graph ms | ours, no async ms "
             "| ours eager ms | transformers ms | compiled torch ms | graphs = eager tokens | async = no async "
             "| = argmax after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RES["rows"]:
        og = r.get("ours_graph_ms")
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(r['floor_ms'])} | {fmt(og)} | "
            f"{fmt(og / r['floor_ms'] if og else None, 2)} | {fmt(r['batch'] / og * 1e3 if og else None, 0)} | "
            f"{fmt(r.get('graph_replay_ms'))} | {fmt(r.get('graph_replay_greedy_ms'))} | "
            f"{fmt(r.get('ours_graph_argmax_after_ms'))} | {fmt(r.get('ours_graph_sync_ms'))} | {fmt(r.get('ours_eager_ms'))} | "
            f"{fmt(r.get('hf_ms'), 2)} | {fmt(r.get('compiled_ms'))} | {r.get('graph_eager_identical', '-')} | "
            f"{r.get('async_sync_identical', '-')} | {r.get('argmax_after_identical', '-')} |")
    if RES["errors"]:
        lines += ["", f"{len(RES['errors'])} error(s): " + "; ".join(e.splitlines()[0] for e in RES["errors"])]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a check of the script and of graphs")
    ap.add_argument("--models", default="llama-1b,mixtral-small")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--hf-batches", default="1,16,64")
    ap.add_argument("--compiled-batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=120)
    ap.add_argument("--hf-gen", type=int, default=16)
    ap.add_argument("--kernel-config", type=Path, default=None,
                    help="JSON of entries that replace accel_backend_cuda._triton_kernels.CONFIG's (launch configs "
                         "chosen by a sweep in the same run, e.g. bench_moe_decode.py's best.json)")
    args = ap.parse_args()
    if args.kernel_config is not None:
        import importlib

        override = json.loads(args.kernel_config.read_text())
        importlib.import_module("accel_backend_cuda._triton_kernels").CONFIG.update(override)
        RES["kernel_config"] = override
        log(f"kernel config override: {json.dumps(override)}")
    for k in ("batches", "hf_batches", "compiled_batches"):
        setattr(args, k, [int(x) for x in getattr(args, k).split(",") if x])
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    RES["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "argv": sys.argv}
    log(json.dumps(RES["env"]))
    bw = copy_bandwidth()
    RES["copy_bandwidth_Bps"] = bw
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for name in args.models.split(","):
        try:
            bench_model(name, args, bw)
        except Exception as exc:
            RES["errors"].append(f"{name}: {exc}\n{traceback.format_exc()}")
            log(f"[{name}] FAILED: {exc}\n{traceback.format_exc()}")
        (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
    s = summary(bw)
    (args.out / "summary.md").write_text(s + "\n")
    (args.out / "results.json").write_text(json.dumps(RES, indent=1, default=str))
    print("\n" + s)
    return 1 if RES["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
