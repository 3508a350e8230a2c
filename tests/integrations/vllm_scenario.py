"""One vLLM engine run, in a fresh Python process (tests/integrations/test_vllm.py starts one per scenario).

    python vllm_scenario.py SPEC.json

SPEC is a JSON object:
    model:          checkpoint directory
    architecture:   None (the checkpoint's own, i.e. vLLM's class unless ACCEL_VLLM_OVERRIDE says otherwise)
                    or a name passed as hf_overrides={"architectures": [name]}, e.g. "AccelLlamaForCausalLM"
    enforce_eager:  bool (False: vLLM's default compiled path)
    multiprocess:   bool (True: leave VLLM_ENABLE_V1_MULTIPROCESSING unset: engine core and worker are
                    spawned processes, which must load the plugin themselves)
    probe_backend:  bool (register an in-process accel-models backend "probe" that counts its rms_norm
                    calls; select it with ACCEL_BACKEND=probe in the environment)
    prompts:        list of token-id lists
    max_tokens:     int
    tensor_parallel_size: int (default 1; more needs multiprocess)
    out:            path of the JSON result: greedy token ids and top-5 logprobs per prompt (generated and
                    prompt tokens), the class vLLM instantiated, the accel-models backend it bound, the
                    probe's call count
"""

from __future__ import annotations

import json
import os
import sys
import time

NUM_LOGPROBS = 5


def _model_info(model):  # runs inside the worker (pickled by value in multiprocess mode)
    cls = type(model)
    ops = getattr(model, "accel_ops", None)
    return {
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "accel_backend": None if ops is None else ops.backend,
        "accel_providers": None if ops is None else dict(ops.providers),
        "tp": None if ops is None else {"rank": model.model.layers[0].self_attn.o_proj.tp_rank,
                                        "world_size": model.model.layers[0].self_attn.o_proj.tp_size},
        # set by vLLM's support_torch_compile: whether it compiles this model, and whether it has
        "torch_compile": {"enabled": not getattr(model, "do_not_compile", True),
                          "compiled": bool(getattr(model, "compiled", False))},
    }


def _importable_model_info():
    """``_model_info`` from this file imported as the module ``vllm_scenario`` (the test puts this directory
    on PYTHONPATH): vLLM's engine core pickles it by reference for its workers, and they import it."""
    import vllm_scenario

    return vllm_scenario._model_info


def _logprob_dicts(steps):
    out = []
    for step in steps or []:
        if step is None:  # the first prompt token has no logprob
            out.append(None)
            continue
        # vLLM returns the top-k plus the sampled token; keep the top-k by rank
        top = {str(tok): lp.logprob for tok, lp in step.items() if lp.rank is not None and lp.rank <= NUM_LOGPROBS}
        out.append(top)
    return out


def _register_probe_backend():
    """A backend that takes rms_norm and fused_add_rms_norm (counting calls) and leaves the rest to the
    reference: proves the zoo inside vLLM runs the ops of the *selected* accel-models backend."""
    import accel_backend_reference as ref

    from accel_models import BackendInfo, hookimpl, register_backend

    class Probe:
        calls = 0

        @hookimpl
        def accel_backend_info(self):
            return BackendInfo(name="probe", device_type="cpu", available=True, reason=None)

        @hookimpl
        def accel_rms_norm(self, x, weight, eps):
            Probe.calls += 1
            return ref.accel_rms_norm(x=x, weight=weight, eps=eps)

        @hookimpl
        def accel_fused_add_rms_norm(self, x, residual, weight, eps):
            Probe.calls += 1
            return ref.accel_fused_add_rms_norm(x=x, residual=residual, weight=weight, eps=eps)

    record = register_backend(Probe(), "probe")
    assert record.usable, record.reason
    return Probe


def run(spec: dict) -> dict:
    t0 = time.time()
    if spec.get("multiprocess"):
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends a function to the worker
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    probe = _register_probe_backend() if spec.get("probe_backend") else None

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if spec.get("tensor_parallel_size", 1) > 1:
        kwargs["tensor_parallel_size"] = spec["tensor_parallel_size"]
    if spec.get("architecture"):
        kwargs["hf_overrides"] = {"architectures": [spec["architecture"]]}
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=spec.get("enforce_eager", True),
        distributed_executor_backend="uni" if spec.get("tensor_parallel_size", 1) == 1 else "mp",
        kv_cache_memory_bytes=64 << 20,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
        **kwargs,
    )
    t_start = time.time() - t0
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=NUM_LOGPROBS,
                            prompt_logprobs=NUM_LOGPROBS, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [_logprob_dicts(o.outputs[0].logprobs) for o in outs],
        "prompt_logprobs": [_logprob_dicts(o.prompt_logprobs) for o in outs],
        **llm.apply_model(_importable_model_info())[0],
        "probe_calls": None if probe is None else probe.calls,
        "startup_s": round(t_start, 1),
        "total_s": round(time.time() - t0, 1),
    }
    return result


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(spec["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
