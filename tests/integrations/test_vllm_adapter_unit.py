"""The vLLM adapter's pieces that need no vLLM engine: env parsing, config mapping, backend/device check,
and the opaque fused_experts op (checked against the reference backend's function it wraps).

These run in the pytest process; ``accel_models.integrations.vllm`` imports vLLM only inside functions,
so the tests that do not build adapter classes run without vLLM installed.
"""

from __future__ import annotations

import pytest
import torch

from accel_models import resolve_ops
from accel_models.integrations import vllm as av
from accel_models.models.registry import supported_architectures


def test_override_env_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    archs = frozenset(supported_architectures())
    for off in ("", "0", "false", " OFF "):
        assert av.override_architectures(off) == frozenset()
    for on in ("1", "true", "ALL"):
        assert av.override_architectures(on) == archs
    assert av.override_architectures("MixtralForCausalLM, LlamaForCausalLM,") == {"MixtralForCausalLM",
                                                                                 "LlamaForCausalLM"}
    monkeypatch.setenv(av.OVERRIDE_ENV, "Qwen2ForCausalLM")
    assert av.override_architectures() == {"Qwen2ForCausalLM"}
    monkeypatch.delenv(av.OVERRIDE_ENV)
    assert av.override_architectures() == frozenset()


@pytest.mark.parametrize("bad,hint", [("GPT2LMHeadModel", "Zoo architectures"),
                                      ("AccelLlamaForCausalLM", "without the 'Accel' prefix")])
def test_override_env_rejects_unknown_architectures(bad: str, hint: str) -> None:
    with pytest.raises(ValueError) as err:
        av.override_architectures(f"LlamaForCausalLM,{bad}")
    msg = str(err.value)
    assert av.OVERRIDE_ENV in msg and repr(bad) in msg and hint in msg and "Qwen2ForCausalLM" in msg


def test_zoo_config_takes_the_zoo_architecture_from_the_adapter() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers builds the HF config")
    hf = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    hf.architectures = ["AccelQwen2ForCausalLM"]  # what hf_overrides leaves in vLLM's hf_config
    cfg = av.zoo_config(hf, "Qwen2ForCausalLM")
    assert type(cfg).__name__ == "Qwen2Config"
    assert cfg.architectures == ["Qwen2ForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (64, 3, 1)
    assert cfg.tie_word_embeddings is True
    assert hf.architectures == ["AccelQwen2ForCausalLM"]  # vLLM's config is not modified


def test_backend_for_another_device_is_refused_with_a_clear_message() -> None:
    ops = resolve_ops("reference")
    av._check_backend_device(ops, "cuda")  # the reference is pure torch: any device

    class FakeTable:
        backend, device_type = "npu", "npu"

    with pytest.raises(ValueError, match=r"'npu'.*runs on 'npu' devices.*vLLM runs this model on 'cpu'.*ACCEL_BACKEND"):
        av._check_backend_device(FakeTable(), "cpu")  # type: ignore[arg-type]


def _naive_fused_experts(x, w13, w2, topk_weights, topk_ids):
    """Independent float64 loop over tokens and their experts (SwiGLU)."""
    x, w13, w2, tw = x.double(), w13.double(), w2.double(), topk_weights.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e] @ x[t]
            out[t] += tw[t, j] * (w2[e] @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


def test_opaque_fused_experts_matches_a_naive_loop_and_compiles_fullgraph() -> None:
    ops = av.opaque_op_table(resolve_ops("reference"))
    assert ops.providers["fused_experts"] == "reference"
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 7, 16, 32, 4, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).int()

    def call(x, w13, w2, topk_weights, topk_ids):
        return ops.fused_experts(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                                 activation="silu", expert_map=None)

    expected = _naive_fused_experts(x, w13, w2, topk_weights, topk_ids)
    eager = call(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(eager.double(), expected, rtol=1e-5, atol=1e-5)
    # fullgraph=True is what vLLM compiles with: the data-dependent expert grouping inside the op must
    # not be traced (it is, and fails, when the reference function is called directly).
    compiled = torch.compile(call, fullgraph=True, backend="eager")(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
