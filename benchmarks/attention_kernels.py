"""SDPA cost of the head dims attention recovery produces, per backend (CUDA only).

    python benchmarks/attention_kernels.py

``proportional`` folds log-multiplicities into one extra q/k channel, so a 128-dim head
becomes 129, padded to a multiple of 8. This prints what that costs on each SDPA backend
for Wan2.1-1.3B shapes (12 heads, bf16) at 50% of 32,760 tokens kept.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    s, h = 16380, 12
    print(f"{'backend':<18} " + " ".join(f"{f'D={d}':>9}" for d in (128, 136, 144, 160)))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        row = []
        for d in (128, 136, 144, 160):
            q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            try:
                with sdpa_kernel(backend):
                    row.append(f"{bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=128**-0.5)):9.2f}")
            except RuntimeError:
                row.append(f"{'n/a':>9}")
        print(f"{backend.name:<18} " + " ".join(row))
    # D=128 with the per-key bias as a stride-0 expanded attn_mask view (no (Sq, Sk) memory)
    for sk in (16384, 16380):
        q, k, v = (torch.randn(1, h, sk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bias = torch.rand(sk, device="cuda", dtype=torch.bfloat16).log1p()
        mask = bias.view(1, 1, 1, sk).expand(1, h, sk, sk)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                print(f"{backend.name:<18} D=128 + expanded bias, S={sk}: {ms:6.2f} ms, peak extra {extra:7.1f} MiB")
            except RuntimeError as error:
                print(f"{backend.name:<18} D=128 + expanded bias, S={sk}: n/a ({str(error)[:80]})")
    # FlexAttention at D=128 with the log-multiplicity bias as a per-key score_mod (compiled)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.rand(s, device="cuda").log1p()

    def score_mod(score, b, hh, qi, ki):
        return score + bias[ki]

    plain = bench(lambda: flex(q, k, v))
    biased = bench(lambda: flex(q, k, v, score_mod=score_mod))
    print(f"{'FLEX D=128':<18} plain {plain:.2f}  with per-key bias {biased:.2f}")


if __name__ == "__main__":
    main()
