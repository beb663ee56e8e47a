"""Communication against compute per data-parallel training step, on paper: where adding
devices stops paying.

    python bench/comm.py [--d-model 768] [--n-layer 24] [--devices 8] [--tokens 8192 ...]

The parameter count comes from tvq's own parameter tree for the architecture (jax
eval_shape: nothing is allocated). Per step and device, with P parameters in float32
gradients and n devices (ring algorithms, the bandwidth-optimal ones NCCL uses):
  data parallel:  all-reduce of the gradient       2 (n-1)/n · 4P bytes sent
  FSDP:           all-gather of the parameters, forward and backward, and a
                  reduce-scatter of the gradient    3 (n-1)/n · 4P bytes sent
  compute:        ≈ 6 P FLOPs per token (forward 2P, backward 4P) + attention
Compute time takes the given share (--mfu) of the device's dense bf16 peak; link speeds
are nominal per-GPU figures. Communication hides behind compute while comm ≤ compute
(overlap of the gradient all-reduce with the backward pass, which XLA does); the
break-even tokens per device per step is independent of P:
  t* = comm bytes · peak · mfu / (6 P · bandwidth)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINKS = {  # GB/s per GPU, one direction, nominal
    "NVLink 4 (H100 SXM)": 450.0,
    "PCIe 5 x16": 64.0,
    "PCIe 4 x16": 32.0,
    "400 Gb/s InfiniBand": 50.0,
    "100 Gb/s Ethernet": 12.5,
}


def attention_flops_per_token(config) -> float:
    """Forward + backward FLOPs per token of the VQ attention beyond the projections:
    scores and value mixing against at most 2M window keys and the S codeword aggregates,
    per sublayer (×3 for forward + backward)."""
    per_sublayer = (
        2 * config.n_head * (config.mem_len * 2 + config.n_code) * (config.d_k + config.d_v)
    )
    return 3 * per_sublayer * 2 * config.n_layer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--d-k", type=int, default=128)
    parser.add_argument("--d-v", type=int, default=1536)
    parser.add_argument("--n-head", type=int, default=1)
    parser.add_argument("--n-code", type=int, default=512)
    parser.add_argument("--mem-len", type=int, default=512)
    parser.add_argument("--n-vocab", type=int, default=256)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense bf16 peak per device (H100 SXM: 989)",
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the peak reached")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768],
                        help="tokens per device per step")  # fmt: skip
    args = parser.parse_args()

    import jax
    import numpy as np

    from tvq.config import ModelConfig
    from tvq.runtime.model import init_params

    config = ModelConfig(d_model=args.d_model, n_layer=args.n_layer, d_k=args.d_k,
                         d_v=args.d_v, n_head=args.n_head, n_code=args.n_code,
                         mem_len=args.mem_len, n_vocab=args.n_vocab)  # fmt: skip
    shapes = jax.eval_shape(lambda: init_params(config, 0))
    p = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
    n = args.devices
    flops_s = args.peak_tflops * 1e12 * args.mfu
    per_token = 6 * p + attention_flops_per_token(config)
    modes = {"data parallel": 2 * (n - 1) / n * 4 * p, "FSDP": 3 * (n - 1) / n * 4 * p}
    print(f"# comm: d_model {args.d_model}, {args.n_layer} layers, d_k {args.d_k}, d_v "
          f"{args.d_v}, {args.n_code} codes, vocab {args.n_vocab}: {p / 1e6:.1f}M parameters; "
          f"{n} devices at {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s; "
          f"{per_token / 1e9:.2f} GFLOP per token")  # fmt: skip
    for mode, sent in modes.items():
        print(f"\n{mode}: {sent / 1e6:.0f} MB sent per device per step")
        head = (
            "link                    GB/s  comm ms  "
            + "  ".join(f"compute ms @{t:>6}" for t in args.tokens)
            + "  break-even tokens"
        )
        print(head)
        for link, gbs in LINKS.items():
            comm_ms = sent / (gbs * 1e9) * 1e3
            computes = [t * per_token / flops_s * 1e3 for t in args.tokens]
            even = sent * flops_s / (per_token * gbs * 1e9)
            cells = "  ".join(f"{c:>18.1f}" for c in computes)
            print(f"{link:<22} {gbs:5.0f}  {comm_ms:7.1f}  {cells}  {even:17.0f}")


if __name__ == "__main__":
    main()
