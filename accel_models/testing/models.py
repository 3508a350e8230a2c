"""Model-level conformance: tiny zoo models on a backend against the same models on the reference backend.

Op checks prove each op in isolation; this proves they compose (and that the backend's KV-cache layout
survives a real prefill + decode). Weights are random (seeded) and identical on both sides; logits of a
mixed batch are compared through each backend's own paged path.
"""

from __future__ import annotations

from typing import Any

import torch

from accel_models.backends import resolve_ops
from accel_models.context import BuildContext, build_context

#: tiny configs (hidden 64, 2 layers): dense GQA models, a sparse one, and DeepSeek's latent attention + MoE
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 97, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "deepseek_v3": {  # MLA in the latent cache where the backend takes one 64-channel key head (the rotary
        # key 32 + the latent 32), else expanded; grouped sigmoid routing with the correction bias (16 experts
        # in 4 groups, 2 of them per token), a shared expert, a dense first layer
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
        "n_routed_experts": 16, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
        "moe_intermediate_size": 32, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "deepseek_v2": {  # MLA in the expanded cache (4 key/value heads of 64: [rotary 32 | non-rotary 32], value
        # heads 48 zero-padded), no low-rank query, softmax top-2 of 8 plus two shared experts
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 48,
        "mla_cache": "expanded", "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
        "moe_intermediate_size": 32, "first_k_dense_replace": 1, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": True, "hidden_act": "silu",
    },
}

#: max |logits - reference logits| / max |reference logits|, per dtype
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _build(config: Any, ops: Any, dtype: torch.dtype, device: Any) -> torch.nn.Module:
    from accel_models.models.registry import get_model_class

    cls = get_model_class(config.architectures[0])
    with build_context(BuildContext(ops=ops, params_dtype=dtype, device=device)), torch.device(device):
        model = cls(config)
    return model.eval()  # built in ``dtype`` (float32 islands such as DeepSeek's router stay float32)


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            state[name] = p.cpu()
            continue
        base = 1.0 if name.endswith("norm.weight") else 0.0
        state[name] = base + 0.08 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return state


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t.to(own[name].dtype))


#: how close (in choice-score units: softmax probabilities, or sigmoid scores plus the correction bias; group
#: scores for expert groups) the experts the backend and the reference chose differently must be for the
#: difference to count as a near-tie that rounding may break either way
ROUTING_TIE = 1e-2


class _SharedRouting:
    """Lets the float64 reference route a token to the experts the backend chose where the two differ only at
    a near-tie, so that a model check compares everything but a coin toss.

    In bfloat16 a token whose k-th and (k+1)-th experts score within rounding of each other may go either
    way, and a different expert moves its logits (and, through attention, its sequence's later logits) far
    more than rounding does: transformers' own bfloat16 run of a tiny Mixtral is 0.34 of max |logit| away from
    its float32 run. So each FusedMoE of the backend's model records the experts it chose; the same layer of
    the reference then takes those experts (weights from its own float64 scores, by the hookspec's rule) when
    they differ from its own choice by at most ROUTING_TIE, and notes any larger difference as a routing
    error. Steps where the backend's layer did not call ``moe_topk`` (a whole-layer op) keep the
    reference's own choice.
    """

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module) -> None:
        from collections import deque

        from accel_models.layers import FusedMoE

        self.queues: dict[str, Any] = {}
        self.ties = 0
        self.errors: list[str] = []
        for name, layer in model.named_modules():
            if isinstance(layer, FusedMoE):
                self.queues[name] = deque()
                layer._moe_topk = self._recording(name, layer._moe_topk)
        for name, layer in ref_model.named_modules():
            if isinstance(layer, FusedMoE) and name in self.queues:
                layer._moe_topk = self._following(name, layer, layer._moe_topk)

    def _recording(self, name: str, op: Any) -> Any:
        def moe_topk(**kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = op(**kw)
            self.queues[name].append(ids.detach().to("cpu", torch.int64))
            return weights, ids
        return moe_topk

    def _following(self, name: str, layer: Any, op: Any) -> Any:
        def moe_topk(**kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = op(**kw)
            queue = self.queues[name]
            theirs = queue.popleft() if queue else None
            if theirs is None or theirs.shape != ids.shape:
                return weights, ids
            mine = ids.to(torch.int64)
            differ = (theirs.sort(-1).values != mine.sort(-1).values).any(-1)
            if not differ.any():
                return weights, ids
            logits = kw["router_logits"].to(torch.float64)
            scores = logits.softmax(-1) if kw["scoring_func"] == "softmax" else logits.sigmoid()
            bias = kw["e_score_correction_bias"]
            choice = scores if bias is None else scores + bias.to(torch.float64)
            for row in differ.nonzero().flatten().tolist():
                self._check_tie(name, row, choice[row], set(mine[row].tolist()), set(theirs[row].tolist()), kw)
            picked = scores.gather(1, theirs)
            if kw["renormalize"]:
                picked = picked / picked.sum(-1, keepdim=True)
            return (picked * kw["routed_scaling_factor"]).to(weights.dtype), theirs.to(ids.dtype)
        return moe_topk

    def _check_tie(self, name: str, row: int, choice: torch.Tensor, mine: set[int], theirs: set[int],
                   kw: dict[str, Any]) -> None:
        missing, extra = sorted(mine - theirs), sorted(theirs - mine)
        gap = float(choice[missing].max() - choice[extra].min())
        groups = kw["num_expert_group"]
        if gap > ROUTING_TIE and groups:  # a tie between expert groups moves experts of any score
            per = choice.numel() // groups
            grouped = choice.view(groups, per)
            gscore = grouped.max(-1).values if kw["e_score_correction_bias"] is None else \
                grouped.topk(min(2, per), -1).values.sum(-1)
            only_mine = sorted({e // per for e in mine} - {e // per for e in theirs})
            only_theirs = sorted({e // per for e in theirs} - {e // per for e in mine})
            if only_mine and only_theirs:  # each side used a group the other did not
                gap = min(gap, float(gscore[only_mine].max() - gscore[only_theirs].min()))
        if gap <= ROUTING_TIE:
            self.ties += 1
        else:
            self.errors.append(f"{name} token {row}: experts {sorted(theirs)} where the reference chose "
                               f"{sorted(mine)} ({gap:.3g} apart in choice score)")


def check_model(name: str, backend: str, *, dtype: torch.dtype, device: Any, allow_unavailable: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """A tiny ``name`` model on ``backend`` in ``dtype`` against the float64 reference on the same (rounded)
    weights: a mixed prefill of four prompts, then three decode steps, through each side's paged path. Near-tie
    routing differences are resolved the backend's way (:class:`_SharedRouting`); others fail."""
    from accel_models.config import load_config
    from accel_models.runner import ModelRunner

    config = load_config(dict(TINY_CONFIGS[name]))
    ops = resolve_ops(backend, allow_unavailable=allow_unavailable)
    ref_ops = resolve_ops("reference", strict=True)
    model = _build(config, ops, dtype, device)
    ref_model = _build(config, ref_ops, torch.float64, "cpu")
    state = _randomize(ref_model, seed)
    _load(ref_model, state)
    # the backend's model gets the same values rounded to its dtype; the reference sees the rounded ones too
    _load(model, state)
    held = model.state_dict()  # each tensor rounded to the dtype the backend's model holds it in
    _load(ref_model, {k: v.to(held[k].dtype).to(torch.float64) if v.is_floating_point() else v
                      for k, v in state.items()})

    g = torch.Generator().manual_seed(seed + 1)
    lengths = [1, 7, 23, 40]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    # prefill all, then three decode steps of every sequence, through each backend's paged path
    runner = ModelRunner(model, num_blocks=64, device=device)
    ref_runner = ModelRunner(ref_model, num_blocks=64, device="cpu")
    routing = _SharedRouting(model, ref_model)
    worst = 0.0
    batch = dict(enumerate(prompts))
    for _ in range(4):
        got = runner.step(batch)
        exp = ref_runner.step(batch)
        for sid in batch:
            a, b = got[sid].detach().to("cpu", torch.float64), exp[sid].detach().to(torch.float64)
            if not torch.isfinite(a).all():
                return {"model": name, "dtype": str(dtype).replace("torch.", ""), "status": "fail",
                        "error": "nan", "message": "non-finite logits"}
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)))
        batch = {sid: [int(exp[sid][-1].argmax())] for sid in batch}
    row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "error": f"{worst:.2e}"}
    if routing.errors:
        return {**row, "status": "fail", "message": f"routing differs beyond a near-tie: {routing.errors[0]}"
                + (f" (+{len(routing.errors) - 1} more)" if len(routing.errors) > 1 else "")}
    ok = worst <= MODEL_TOLERANCE[dtype]
    note = f"{routing.ties} near-tie routing choice(s) taken the backend's way" if routing.ties else ""
    return {**row, "status": "pass" if ok else "fail",
            "message": note if ok else f"tolerance {MODEL_TOLERANCE[dtype]:g}" + (f"; {note}" if note else "")}


def check_graphs(name: str, backend: str, *, dtype: torch.dtype, device: Any, allow_unavailable: bool = False,
                 seed: int = 0) -> dict[str, Any]:
    """The backend's device graphs (its ``capture_graph`` hook) give the eager steps' greedy tokens.

    A tiny ``name`` checkpoint (random weights, head size 32) is generated through :class:`accel_models.LLM`
    twice on the backend: eagerly, and with decode graphs of batch 1, 2 and 4 (four prompts, two of which
    cross a KV block during decode, padded to the captured sizes as they finish), once with the greedy token
    taken inside the graph and once sampled after it. The tokens must be identical and graphs must have been
    replayed. Skipped when the backend has no ``capture_graph`` of its own or it captures nothing on
    ``device`` (returns None); a capture that fails is a failure, with the runtime's reason.
    """
    import tempfile

    from accel_models.runtime.demo import llama_config, mixtral_config, write_checkpoint
    from accel_models.runtime.llm import LLM
    from accel_models.runtime.sampling_params import SamplingParams

    row = {"model": f"{name} (graphs)", "dtype": str(dtype).replace("torch.", ""), "error": "-"}
    ops = resolve_ops(backend, allow_unavailable=allow_unavailable)
    if ops.providers["capture_graph"] != backend:
        return {**row, "status": "skip", "message": f"capture_graph from {ops.providers['capture_graph']}"}
    try:
        block = ops.kv_cache_layout(num_kv_heads=2, head_size=32, dtype=dtype).block_sizes[0]
    except ValueError as exc:  # a cache dtype the backend declares unsupported (as the hookspec allows)
        return {**row, "status": "skip", "message": f"KV cache: {exc}"[:200]}
    make = {"llama": llama_config, "mixtral": mixtral_config}[name]
    config = make(384, hidden_size=128, num_heads=4, num_kv_heads=2, max_position_embeddings=block + 64,
                  torch_dtype=str(dtype).replace("torch.", ""))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (block - 6, 5, block - 1, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(backend=ops, dtype=dtype, device=device, max_num_seqs=4, kv_cache_memory=8 << 20, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(tmp, config, seed=seed)
        with LLM(path, graph_batch_sizes=[1, 2, 4], enable_prefix_caching=False, **kw) as llm:
            graphs = llm.graphs
            if graphs is None:
                return {**row, "status": "fail" if llm.graph_capture_failed else "skip",
                        "message": str(llm.graphs_unavailable)[:200]}
            runs = {}
            for in_graph in (True, False):
                graphs.sample_in_graph = in_graph
                before = graphs.replays
                runs[in_graph] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                if graphs.replays == before:
                    return {**row, "status": "fail", "message": "no decode step replayed a graph"}
        with LLM(path, enforce_eager=True, **kw) as llm:
            eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    bad = [("greedy in graph" if k else "sampled after the graph") for k, v in runs.items() if v != eager]
    if bad:
        return {**row, "status": "fail", "message": f"tokens differ from eager steps ({', '.join(bad)})"}
    return {**row, "status": "pass", "message": f"{graphs.replays} replays, tokens = eager"}


def run_model_checks(backend: str, *, quick: bool = False, device: Any = None,
                     allow_unavailable: bool = False) -> list[dict[str, Any]]:
    ops = resolve_ops(backend, allow_unavailable=allow_unavailable)
    if device is None:
        device = ops.device_type if ops.info.available else "cpu"
    names = ["llama", "mixtral"] if quick else list(TINY_CONFIGS)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    results = []
    for name in names:
        for dtype in dtypes:
            try:
                results.append(check_model(name, backend, dtype=dtype, device=device,
                                           allow_unavailable=allow_unavailable))
            except Exception as exc:  # a crash inside the model on this backend is a failure with its reason
                results.append({"model": name, "dtype": str(dtype).replace("torch.", ""), "status": "fail",
                                "error": "-", "message": f"{type(exc).__name__}: {exc}"[:200]})
    # device graphs, where the backend captures its own: bfloat16 (the dtype decode graphs are used in)
    for name in ("llama", "mixtral"):
        try:
            results.append(check_graphs(name, backend, dtype=torch.bfloat16, device=device,
                                        allow_unavailable=allow_unavailable))
        except Exception as exc:
            results.append({"model": f"{name} (graphs)", "dtype": "bfloat16", "status": "fail", "error": "-",
                            "message": f"{type(exc).__name__}: {exc}"[:200]})
    return results
