"""Batch-64 decode attention at the Llama-1B shape, for Nsight Compute (issue 11, session 14).

    ncu --clock-control none --kernel-name regex:'_paged_attention_kernel|_rope_attention_rows_kernel' \\
        --launch-skip 1 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python3 bench/cuda/ncu_attention.py

Runs, twice each (the first launch of each compiles), the paged attention kernel of a batch-64 decode step
(the plain loop the plan picks there: 512 programs) and the fused rotary + attention launch the layer uses
there (``rope_attention_rows``), 32 / 8 heads of 64, block 16, contexts 129-248 (the benchmark's), random
bf16 cache. The numbers are not checked here (the kit and bench_small_m.py check them).
"""

import torch

import accel_backend_cuda as C
from accel_backend_cuda import _triton_kernels as K

B, NQ, NKV, D, BS = 64, 32, 8, 64, 16
dev, dt = "cuda", torch.bfloat16
g = torch.Generator().manual_seed(0)
seq = torch.randint(129, 249, (B,), generator=g)
blocks = (seq + BS - 1) // BS
table = torch.zeros(B, int(blocks.max()) + 1, dtype=torch.int32)
perm = torch.randperm(int(blocks.sum()) + 1, generator=g)
i = 0
for b in range(B):
    table[b, : blocks[b]] = perm[i : i + blocks[b]]
    i += int(blocks[b])
cache = torch.randn(2, int(blocks.sum()) + 1, NKV, BS, D, generator=g).to(dt).to(dev)
table, seq = table.to(dev), seq.to(torch.int32).to(dev)
q = torch.randn(B, NQ, D, generator=g).to(dt).to(dev)
qkv = torch.randn(B, (NQ + 2 * NKV) * D, generator=g).to(dt).to(dev)
pos = (seq - 1).long()
slots = table[torch.arange(B, device=dev), (seq - 1) // BS].long() * BS + ((seq - 1) % BS).long()
cs = torch.randn(4096, D, generator=g).to(dt).to(dev)
for _ in range(2):
    C.accel_paged_attention(query=q, kv_cache=cache, block_table=table, seq_lens=seq,
                            query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=dev), max_query_len=1,
                            max_seq_len=256, scale=D**-0.5, sliding_window=None, logits_soft_cap=None)
for _ in range(2):
    K.rope_attention_rows(qkv, pos, slots, table, seq, cs, cache, D**-0.5, NQ, NKV, True, 256,
                          C._num_sms(torch.device(dev)))
torch.cuda.synchronize()
print("done")
