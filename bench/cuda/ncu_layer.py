"""One Llama-1B-shaped layer through the persistent kernel's phases, for Nsight Compute (issue 11).

    ncu --clock-control none --kernel-name regex:'_decoder_layer_kernel|_linear_small_m_kernel' \\
        --launch-skip 6 --launch-count 6 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy python3 bench/cuda/ncu_layer.py

Runs the layer twice one phase per launch (``persistent=False``: the same phase code without grid
barriers, so each phase is its own kernel for the profiler and a replay cannot wait on a barrier), each
time followed by the layered path's gate_up projection (the small-M split-K kernel) as the peer of
phase 3. Random bf16 weights, a 144-token context; the numbers are not checked here (bench_persistent.py
and the interpreter tests check them).
"""

import torch

import accel_backend_cuda as C

H, I, NQ, NKV, D, BS, CTX = 2048, 8192, 32, 8, 64, 16, 144
dev, dt = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)


def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)


w = dict(input_norm_weight=1 + 0.1 * rnd(H), qkv_weight=rnd((NQ + 2 * NKV) * D, H, scale=H**-0.5),
         o_weight=rnd(H, NQ * D, scale=(NQ * D) ** -0.5), post_norm_weight=1 + 0.1 * rnd(H),
         gate_up_weight=rnd(2 * I, H, scale=H**-0.5), down_weight=rnd(H, I, scale=I**-0.5))
blocks = CTX // BS + 2
cache = rnd(2, blocks, NKV, BS, D)
table = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
cs = torch.randn(4096, D, device=dev)
x, res = rnd(1, H), rnd(1, H)
pos = torch.tensor([CTX], device=dev)
for _ in range(2):
    C.decoder_layer_decode(x, res, pos, **w, eps=1e-5, cos_sin_cache=cs, num_heads=NQ, num_kv_heads=NKV, head_size=D,
                           is_neox=True, scale=D**-0.5, kv_cache=cache, slot_mapping=torch.tensor([CTX], device=dev),
                           block_table=table, seq_lens=torch.tensor([CTX + 1], dtype=torch.int32, device=dev),
                           max_seq_len=CTX + 1, persistent=False)
    C.accel_linear(x=x, weight=w["gate_up_weight"], bias=None, prepared=None)
torch.cuda.synchronize()
print("done")
