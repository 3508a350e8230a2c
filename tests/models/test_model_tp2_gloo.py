"""Tensor and expert parallelism for real: two gloo processes load the same checkpoint, each its shard.

Sizes are chosen to exercise the sharding rules: an odd vocabulary (padded to the TP size), a single
KV head (replicated on both ranks), tied embeddings, and MoE under both TP (intermediate sliced) and EP
(whole experts per rank). Rank 0's logits must match transformers' (float32 tolerance). One spawn runs
every configuration (process start-up dominates the cost).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers", reason="transformers builds the checkpoints and the reference logits")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import hf_cases  # noqa: E402
from hf_cases import CASES_BY_NAME, SEQUENCES, checkpoint, hf_logits  # noqa: E402
from tp_gloo_worker import worker  # noqa: E402

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

JOBS = [("llama-mqa-dynamic", False), ("qwen3-hd32-tied-mha", False), ("qwen2moe-60x4-shared", False),
        ("qwen2moe-60x4-shared", True), ("deepseekv3-noaux-yarn", False), ("deepseekv3-noaux-yarn", True),
        ("deepseekv2-lite-yarn", False)]


def _even(name: str) -> hf_cases.Case:
    case = CASES_BY_NAME[name]
    even = dataclasses.replace(case, name=f"{name}-tp2",
                               overrides={**case.overrides, "intermediate_size": 40, "vocab_size": 129})
    hf_cases.CASES_BY_NAME[even.name] = even
    return even


def test_two_ranks_tp_and_ep_match_transformers(tmp_path):
    jobs, refs = [], []
    for i, (name, ep) in enumerate(JOBS):
        path, hf = checkpoint(_even(name), tmp_path)
        jobs.append((path, ep, str(tmp_path / f"logits{i}.pt")))
        refs.append(hf_logits(hf, SEQUENCES))
    mp.spawn(worker, args=(str(tmp_path / "init"), jobs, SEQUENCES), nprocs=2, join=True)
    for (name, ep), (_, _, out), ref in zip(JOBS, jobs, refs):
        ours = torch.load(out)
        scale = max(r.abs().max().item() for r in ref)
        err = max((o - r).abs().max().item() for o, r in zip(ours, ref)) / scale
        assert err <= 1e-5, f"{name} {'EP' if ep else 'TP'}=2: relative error {err:.2e}"
