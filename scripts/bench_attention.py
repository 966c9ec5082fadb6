"""Benchmark one decode step of slim attention (Triton kernel) against vanilla SDPA decode over K and V (CUDA only).

Shapes
------
* Llama-2-7B-like self-attention: batch 16, 32 heads, head_dim 128 (width 4096), one query, seq 1k .. 16k.
  vanilla: ``F.scaled_dot_product_attention`` over a K and a V cache ``(b, h, n, dk)`` each; also "vanilla+kv",
  which adds the new token's K and V projections (the reads of W_K and W_V that slim's absorb / projection replace).
  slim (input cache ``X: (b, n, 4096)``): ``q_abs = q W_K,i^T`` (batched matmul) + kernel + ``mixed W_V,i``.
* Whisper-large-v3 cross-attention: batch 64, 1500 encoder frames, d 1280, 20 heads; one query, and 5 beams
  (vanilla: a K/V copy per beam, batch 320; slim: one encoder output per input, the 5 beams folded as queries).

Per shape it prints median times (``triton.testing.do_bench``; ``--graph`` adds CUDA-graph timings without launch
overhead), slim / vanilla ratios and achieved bandwidth (logical cache bytes read once / time) as a percentage of a
device-to-device copy measured in the same run. ``--check`` first verifies the kernel against
``hf_slim.absorbed.absorbed_attention`` and the full slim step against vanilla SDPA on K = X W_K, V = X W_V.
``--tune`` times variants of the kernel's launch configuration per shape (see NOTES in
``hf_slim/kernels/slim_decode.py``).

Usage::

    python scripts/bench_attention.py --check            # correctness, then the timings
    python scripts/bench_attention.py --graph --tune     # plus CUDA-graph timings and a config sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int  # inputs (slim cache rows)
    heads: int
    head_dim: int
    d_model: int
    seq: int
    queries: int = 1  # beams folded as queries (slim); vanilla runs batch * queries rows of one query each
    self_attention: bool = True  # vanilla+kv (new token's K/V projections) only makes sense for self-attention


def shapes(args) -> list[Shape]:
    out = [Shape(f"llama b{args.batch} h32 dk128", args.batch, 32, 128, 4096, n) for n in args.seqs]
    wb = args.whisper_batch
    out += [
        Shape(f"whisper-large-v3 cross b{wb} 1q", wb, 20, 64, 1280, 1500, 1, False),
        Shape(f"whisper-large-v3 cross b{wb} 5beams", wb, 20, 64, 1280, 1500, 5, False),
    ]
    return out


class Problem:
    """Random weights / caches for one shape; ``vanilla()``, ``vanilla_kv()``, ``slim()``, ``kernel()`` steps."""

    def __init__(self, shape: Shape, dtype: torch.dtype, precise: bool):
        from hf_slim.kernels import slim_decode_attention

        self.shape, self.dtype, self.precise = shape, dtype, precise
        self.attend = slim_decode_attention
        s, dev = shape, DEVICE
        b, h, dk, d, n, t = s.batch, s.heads, s.head_dim, s.d_model, s.seq, s.queries
        self.scale = dk**-0.5
        gen = torch.Generator(device=dev).manual_seed(0)
        w_scale = d**-0.5
        self.w_k = (torch.randn(d, h * dk, device=dev, generator=gen) * w_scale).to(dtype)  # K = X @ w_k
        self.w_v = (torch.randn(d, h * dk, device=dev, generator=gen) * w_scale).to(dtype)
        self.wk_heads = self.w_k.view(d, h, dk).permute(1, 2, 0).contiguous()  # (h, dk, d)
        self.wv_heads = self.w_v.view(d, h, dk).transpose(0, 1).contiguous()  # (h, d, dk)
        self.wk_heads32 = self.wk_heads.float() if precise else None
        self.x = torch.randn(b, n, d, device=dev, generator=gen, dtype=dtype)  # slim cache
        self.q = torch.randn(b, h, t, dk, device=dev, generator=gen, dtype=dtype)  # per-head queries
        # vanilla: one query per (input, beam), a K and V cache per (input, beam)
        self.q_v = self.q.transpose(1, 2).reshape(b * t, h, 1, dk)
        self.k = torch.randn(b * t, h, n, dk, device=dev, generator=gen, dtype=dtype)
        self.v = torch.randn(b * t, h, n, dk, device=dev, generator=gen, dtype=dtype)
        self.x_new = torch.randn(b * t, 1, d, device=dev, generator=gen, dtype=dtype)
        self.q_abs = self.absorb()

    # -- steps ---------------------------------------------------------------------------------------------------
    def vanilla(self):
        return F.scaled_dot_product_attention(self.q_v, self.k, self.v, scale=self.scale)

    def vanilla_kv(self):
        k_new = self.x_new @ self.w_k  # the new token's projections (reads W_K, W_V like slim's absorb / project)
        v_new = self.x_new @ self.w_v
        return F.scaled_dot_product_attention(self.q_v, self.k, self.v, scale=self.scale), k_new, v_new

    def absorb(self):
        if self.precise:
            return torch.matmul(self.q.float(), self.wk_heads32)  # (b, h, t, d) fp32
        return torch.matmul(self.q, self.wk_heads)  # (b, h, t, d); the kernel rounds to the cache dtype anyway

    def kernel(self, config=None):
        return self.attend(self.q_abs, self.x, scale=self.scale, precise=self.precise, config=config)

    def slim(self):
        mixed = self.attend(self.absorb(), self.x, scale=self.scale, precise=self.precise)  # (b, h, t, d) fp32
        return torch.matmul(mixed.to(self.dtype), self.wv_heads)  # (b, h, t, dk)

    # -- sizes ---------------------------------------------------------------------------------------------------
    def slim_bytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def vanilla_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def measure_copy_bandwidth(do_bench) -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.int16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=500)
    return 2 * 2**31 / (ms * 1e-3)


def check(problem: Problem, tol: float) -> bool:
    """Kernel vs absorbed_attention (first two inputs), and the full slim step vs SDPA on K = X W_K, V = X W_V."""
    from hf_slim.absorbed import absorbed_attention

    p, s = problem, problem.shape
    nb = min(2, s.batch)
    got = p.attend(p.q_abs[:nb], p.x[:nb], scale=p.scale, precise=p.precise)
    ref, _ = absorbed_attention(p.q_abs[:nb].float(), p.x[:nb], scale=p.scale)
    err_kernel = ((got - ref).abs().max() / ref.abs().max()).item()

    x = p.x[:nb]
    k = (x.float() @ p.w_k.float()).view(nb, s.seq, s.heads, s.head_dim).transpose(1, 2)  # (nb, h, n, dk)
    v = (x.float() @ p.w_v.float()).view(nb, s.seq, s.heads, s.head_dim).transpose(1, 2)
    ref_out = F.scaled_dot_product_attention(p.q[:nb].float(), k, v, scale=p.scale)  # (nb, h, t, dk) fp32
    mixed = p.attend(p.absorb()[:nb], x, scale=p.scale, precise=p.precise)
    slim_out = torch.matmul(mixed.to(p.dtype), p.wv_heads).float()
    err_step = ((slim_out - ref_out).abs().max() / ref_out.abs().max()).item()
    ok = err_kernel <= tol and err_step <= 4 * tol and bool(torch.isfinite(got).all())
    print(
        f"  check {s.name} n={s.seq}: kernel vs reference {err_kernel:.2e}, slim step vs fp32 SDPA {err_step:.2e}"
        f" (max-normalised) {'ok' if ok else 'FAILED'}"
    )
    return ok


def tune(problem: Problem, do_bench, args) -> None:
    """Time launch-configuration variants of the kernel alone; the first line is the default."""
    from hf_slim.kernels.slim_decode import _cdiv, choose_config

    s = problem.shape
    base = choose_config(
        s.batch,
        s.heads * s.queries,
        s.seq,
        s.d_model,
        elem_size=problem.x.element_size(),
        precise=problem.precise,
        sms=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    variants = {"default": base}
    r = dataclasses.replace
    variants["two_pass flipped"] = r(base, two_pass=not base.two_pass)
    for bn in (16, 32, 64, 128):
        variants[f"block_n={bn}"] = r(base, block_n=bn)
    for bw in (128, 256, 1024):
        if bw != base.block_w and base.block_m * bw <= 32768:
            single = _cdiv(s.d_model, bw) == 1 and not base.two_pass
            variants[f"block_w={bw}"] = r(base, block_w=bw, block_d=bw if single else min(128, bw))
    for w in (4, 8, 16):
        variants[f"num_warps={w}"] = r(base, num_warps=w)
    for st in (1, 3, 4):
        variants[f"num_stages={st}"] = r(base, num_stages=st)
    for f in (0.5, 2, 4):
        variants[f"num_splits x{f}"] = r(base, num_splits=max(1, int(base.num_splits * f)))
    if base.two_pass:
        for sw in (4, 8):
            variants[f"score_warps={sw}"] = r(base, score_warps=sw)
        for sbn in (32, 128):
            variants[f"score_block_n={sbn}"] = r(base, score_block_n=sbn)
        variants["score_splits x2"] = r(base, score_splits=base.score_splits * 2)
    print(f"  tune {s.name} n={s.seq} default {base}")
    results = []
    for name, cfg in variants.items():
        try:
            ms = do_bench(lambda cfg=cfg: problem.kernel(cfg), warmup=args.warmup, rep=args.rep)
        except Exception as e:  # noqa: BLE001 - out of resources etc.: report and go on
            print(f"    {name:22s} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        results.append((ms, name))
        print(f"    {name:22s} {ms * 1e3:9.1f} us  {problem.slim_bytes() / (ms * 1e-3) / 1e9:7.0f} GB/s")
    ms, name = min(results)
    print(f"    best: {name} ({ms * 1e3:.1f} us)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify correctness on the GPU before timing")
    parser.add_argument("--graph", action="store_true", help="also time with CUDA graphs (no launch overhead)")
    parser.add_argument("--tune", action="store_true", help="time launch-config variants of the kernel")
    parser.add_argument("--precise", action="store_true", help="kernel with hi/lo operands (precise=True)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=16, help="batch of the llama-like shapes")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--whisper-batch", type=int, default=64, help="batch of the Whisper cross-attention shapes")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetitions (ms)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU: torch.cuda.is_available() is False.", file=sys.stderr)
        return 2
    import transformers
    import triton
    import triton.testing

    from hf_slim.kernels import triton_available

    if not triton_available(DEVICE):
        print("Triton cannot run on this CUDA device (or TRITON_INTERPRET=1 is set).", file=sys.stderr)
        return 2

    def do_bench(fn, warmup=args.warmup, rep=args.rep):
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    def do_bench_graph(fn):
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")

    props = torch.cuda.get_device_properties(0)
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# gpu: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    print(
        f"# torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, "
        f"transformers {transformers.__version__}, dtype {args.dtype}, precise={args.precise}"
    )
    copy_bw = measure_copy_bandwidth(do_bench)
    print(f"# device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    dtype = DTYPES[args.dtype]
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3

    header = (
        f"{'shape':34s} {'seq':>6s} {'vanilla':>9s} {'van+kv':>9s} {'slim':>9s} {'kernel':>9s} "
        f"{'slim/van':>8s} {'kern/van':>8s} {'kern GB/s':>9s} {'%copy':>6s} {'van GB/s':>8s} {'%copy':>6s}"
    )
    rows, failed = [], False
    for shape in shapes(args):
        problem = Problem(shape, dtype, args.precise)
        if args.check:
            failed |= not check(problem, tol)
        timings = {
            "vanilla": do_bench(problem.vanilla),
            "slim": do_bench(problem.slim),
            "kernel": do_bench(problem.kernel),
        }
        timings["van+kv"] = do_bench(problem.vanilla_kv) if shape.self_attention else float("nan")
        if args.graph:
            for key, fn in (("vanilla", problem.vanilla), ("slim", problem.slim), ("kernel", problem.kernel)):
                timings[key + " graph"] = do_bench_graph(fn)
        rows.append((shape, problem.slim_bytes(), problem.vanilla_bytes(), timings))
        if args.tune:
            tune(problem, do_bench, args)
        del problem
        torch.cuda.empty_cache()

    for suffix in ("",) + ((" graph",) if args.graph else ()):
        print(
            f"\n## times in us (median{', CUDA graph' if suffix else ', do_bench'}); bandwidth = logical cache "
            "bytes read once / time; %copy = of the device copy bandwidth"
        )
        print(header)
        for shape, slim_bytes, van_bytes, t in rows:
            van, slim, kern = t["vanilla" + suffix], t["slim" + suffix], t["kernel" + suffix]
            van_kv = t["van+kv"] if not suffix else float("nan")
            kern_bw, van_bw = slim_bytes / (kern * 1e-3), van_bytes / (van * 1e-3)
            print(
                f"{shape.name:34s} {shape.seq:6d} {van * 1e3:9.1f} {van_kv * 1e3:9.1f} {slim * 1e3:9.1f} "
                f"{kern * 1e3:9.1f} {slim / van:8.2f} {kern / van:8.2f} {kern_bw / 1e9:9.0f} "
                f"{100 * kern_bw / copy_bw:6.1f} {van_bw / 1e9:8.0f} {100 * van_bw / copy_bw:6.1f}"
            )
    if failed:
        print("\nCHECK FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
