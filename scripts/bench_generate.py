"""``generate()`` end to end, slim vs unpatched, measured in the same run: wall time, peak memory, identical tokens,
and tokens/s when each side runs the largest batch that fits the same memory (what slim buys).

Random weights at real shapes (issue 26's table), ``min_new_tokens = max_new_tokens``, one warm-up generate per
model, then the timed runs alternate unpatched / slim (``--repeats`` each, the fastest kept; the caching allocator is
left warm between them). Peak memory is
``torch.cuda.max_memory_allocated()`` over what was allocated before the call (weights, inputs); on the CPU the
bytes of the cache each ``generate()`` returns stand in for it.

    python scripts/bench_generate.py                          # every GPU case (needs CUDA)
    python scripts/bench_generate.py --cases llama-7b --equal-memory
    python scripts/bench_generate.py --small --device cpu     # the same cases at small shapes, on the CPU

Cases (``--cases``): ``whisper-lv3-b64`` (fp16, batch 64 greedy, 128 tokens), ``whisper-lv3-beams`` (fp16, 16
inputs x 5 beams, 128 tokens), ``whisper-lv3-fp32`` (batch 16 greedy, 64 tokens), ``gpt2-xl`` (fp16, batch 32,
prompt 1024, 128 tokens), ``llama-7b`` (Llama-2-7B shape, MHA + RoPE, bf16, batch 8, prompt 2048, 64 tokens).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import hf_slim
from hf_slim import cache_nbytes, slim_record, slimify
from hf_slim._compat import returned_cache, with_cache


@dataclass(frozen=True)
class Case:
    """One row: a model shape, dtype and ``generate()`` call."""

    family: str  # "whisper", "gpt2" or "llama"
    shape: dict = field(hash=False)
    dtype: torch.dtype
    batch: int
    new_tokens: int
    prompt: int = 0  # text prompt length (decoder-only)
    beams: int = 1
    mode: str = "auto"


WHISPER_LV3 = dict(
    d_model=1280,
    encoder_layers=32,
    decoder_layers=32,
    encoder_attention_heads=20,
    decoder_attention_heads=20,
    encoder_ffn_dim=5120,
    decoder_ffn_dim=5120,
    num_mel_bins=128,
    vocab_size=51866,
)
GPT2_XL = dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=2048)
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)

CASES = {
    "whisper-lv3-b1": Case("whisper", WHISPER_LV3, torch.float16, batch=1, new_tokens=128),
    "whisper-lv3-b64": Case("whisper", WHISPER_LV3, torch.float16, batch=64, new_tokens=128),
    "whisper-lv3-beams": Case("whisper", WHISPER_LV3, torch.float16, batch=16, new_tokens=128, beams=5),
    "whisper-lv3-fp32": Case("whisper", WHISPER_LV3, torch.float32, batch=16, new_tokens=64),
    "gpt2-xl": Case("gpt2", GPT2_XL, torch.float16, batch=32, new_tokens=128, prompt=1024),
    "llama-7b": Case("llama", LLAMA_7B, torch.bfloat16, batch=8, new_tokens=64, prompt=2048),
    "llama-7b-b1": Case("llama", LLAMA_7B, torch.bfloat16, batch=1, new_tokens=64, prompt=128),
}

#: ``--small``: the same cases at shapes a CPU runs in seconds (the GPU shapes' ratios are not the CPU's).
SMALL = {
    "whisper": dict(
        d_model=256,
        encoder_layers=2,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        num_mel_bins=80,
        vocab_size=2000,
    ),
    "gpt2": dict(n_layer=6, n_embd=512, n_head=8, vocab_size=2000, n_positions=1024),
    "llama": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2000,
        max_position_embeddings=2048,
    ),
}


def small(case: Case) -> Case:
    """The CPU version of a case: small shape, batch 4, 16-32 tokens, prompt 256, float32 except where the case is
    about half precision on a GPU (kept: bf16 runs on the CPU too)."""
    dtype = torch.float32 if case.dtype == torch.float16 else case.dtype
    return replace(
        case,
        shape=SMALL[case.family],
        dtype=dtype,
        batch=min(case.batch, 4),
        new_tokens=min(case.new_tokens, 32),
        prompt=min(case.prompt, 256),
    )


def build(case: Case, device: str) -> torch.nn.Module:
    """A randomly initialised model of the case's shape, built directly on ``device``, in the case's dtype."""
    torch.manual_seed(0)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        if case.family == "whisper":
            config = WhisperConfig(**case.shape, **special, decoder_start_token_id=1, max_source_positions=1500)
            config.begin_suppress_tokens = config.suppress_tokens = None
            model = WhisperForConditionalGeneration(config)
        elif case.family == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(**case.shape, **special))
        else:
            model = LlamaForCausalLM(LlamaConfig(**case.shape, **special))
    model.config._attn_implementation = "sdpa"
    return model.eval().to(case.dtype)


def inputs(case: Case, model: torch.nn.Module, batch: int, device: str) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(1)
    if case.family == "whisper":
        features = torch.randn(batch, model.config.num_mel_bins, 3000, generator=generator, device="cpu")
        return {"input_features": features.to(device=device, dtype=case.dtype)}
    ids = torch.randint(3, model.config.vocab_size, (batch, case.prompt), generator=generator, device="cpu")
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_generate(model, case: Case, batch: int, new_tokens: int, device: str) -> dict:
    """One ``generate()``: seconds, peak bytes over what was allocated before it (CUDA) and the returned cache's
    bytes, and the sequences."""
    kwargs = inputs(case, model, batch, device)
    gc.collect()
    synchronize(device)
    if device == "cuda":  # the allocator stays warm (as in a server): only the peak is reset
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    out = model.generate(
        **kwargs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=case.beams,
        return_dict_in_generate=True,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
    cache = cache_nbytes(out.past_key_values)
    return {"seconds": seconds, "peak": peak, "cache": cache, "sequences": out.sequences.cpu()}


def run_case(
    name: str,
    case: Case,
    device: str,
    repeats: int,
    equal_memory: bool,
    profile_dir: str | None,
    accuracy_check: bool,
    kernel: bool = False,
) -> dict:
    vanilla = build(case, device)
    start = time.perf_counter()
    slim = slimify(copy.deepcopy(vanilla), mode=case.mode)
    synchronize(device)
    slimify_seconds = time.perf_counter() - start
    modes = sorted(set(slim_record(slim).layer_modes.values()))
    for model in (vanilla, slim):  # warm-up: kernels, allocator, cuBLAS handles
        timed_generate(model, case, case.batch, 2, device)
    sides = [("vanilla", vanilla, "0"), ("slim", slim, "0")] + ([("kernel", slim, "1")] if kernel else [])
    best = {side: None for side, _, _ in sides}
    for _ in range(repeats):
        for side, model, kernel_setting in sides:  # HF_SLIM_KERNEL is read at every decode step
            os.environ["HF_SLIM_KERNEL"] = kernel_setting
            result = timed_generate(model, case, case.batch, case.new_tokens, device)
            if best[side] is None or result["seconds"] < best[side]["seconds"]:
                best[side] = result
    os.environ.pop("HF_SLIM_KERNEL")
    v, s = best["vanilla"], best["slim"]
    same = int((v["sequences"] == s["sequences"]).all(dim=-1).sum())
    row = {
        "case": name,
        "dtype": str(case.dtype).removeprefix("torch."),
        "batch": f"{case.batch}x{case.beams}" if case.beams > 1 else str(case.batch),
        "tokens": case.new_tokens,
        "vanilla_s": v["seconds"],
        "slim_s": s["seconds"],
        "speed": v["seconds"] / s["seconds"],
        "vanilla_peak": v["peak"],
        "slim_peak": s["peak"],
        "vanilla_cache": v["cache"],
        "slim_cache": s["cache"],
        "same_rows": f"{same}/{v['sequences'].shape[0]}",
        "slimify_s": slimify_seconds,
        "modes": "+".join(modes),
    }
    if kernel:
        row["kernel_s"] = best["kernel"]["seconds"]
        same_kernel = int((v["sequences"] == best["kernel"]["sequences"]).all(dim=-1).sum())
        print(
            f"# {name} through the Triton kernel: {row['kernel_s']:.2f} s ({v['seconds'] / row['kernel_s']:.2f}x "
            f"the unpatched model, {s['seconds'] / row['kernel_s']:.2f}x the PyTorch path), {same_kernel} rows same",
            flush=True,
        )
    if equal_memory and device == "cuda":
        row.update(equal_memory_throughput(case, vanilla, slim, v["peak"], s["peak"], device))
        print(
            f"# {name} at equal memory ({gib(row['budget'])} GiB): unpatched batch {case.batch} "
            f"{row['vanilla_tok_s']:.0f} tok/s, slim batch {row['slim_batch']} {row['slim_tok_s']:.0f} tok/s, "
            f"{row['throughput']:.2f}x",
            flush=True,
        )
    if profile_dir is not None:
        profile(name, case, vanilla, slim, device, profile_dir)
    if accuracy_check and case.dtype != torch.float32:
        row["vanilla_error"], row["slim_error"] = accuracy(case, device)
    del vanilla, slim
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def equal_memory_throughput(case: Case, vanilla, slim, vanilla_peak: int, slim_peak: int, device: str) -> dict:
    """Tokens/s of each side in the memory the unpatched model needs at the case's batch: the unpatched model at that
    batch, the slim one at the largest batch whose measured peak fits it (first guessed from its peak per row, then
    shrunk by an eighth until it fits)."""
    tokens = min(case.new_tokens, 64)
    base = timed_generate(vanilla, case, case.batch, tokens, device)
    batch = max(case.batch, int(case.batch * vanilla_peak / max(slim_peak, 1)))
    while batch > case.batch:
        try:
            result = timed_generate(slim, case, batch, tokens, device)
        except torch.OutOfMemoryError:
            result = None
        if result is not None and result["peak"] <= vanilla_peak:
            break
        batch = max(case.batch, batch - max(1, batch // 8))
    else:
        result = timed_generate(slim, case, batch, tokens, device)
    rows = case.beams  # tokens per sequence row: every beam decodes
    vanilla_rate = case.batch * rows * tokens / base["seconds"]
    slim_rate = batch * rows * tokens / result["seconds"]
    return {
        "budget": vanilla_peak,
        "slim_batch": batch,
        "slim_batch_peak": result["peak"],
        "vanilla_tok_s": vanilla_rate,
        "slim_tok_s": slim_rate,
        "throughput": slim_rate / vanilla_rate,
    }


@torch.no_grad()
def profile(name: str, case: Case, vanilla, slim, device: str, folder: str, tokens: int = 6) -> dict:
    """Where a short ``generate()`` spends its time on each side: wall seconds, summed CUDA kernel time and the
    number of kernels launched (a host-bound step has kernel time far below wall time), and the top operators by
    device and by host time, appended to ``folder/profiles.txt``."""
    import os

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.makedirs(folder, exist_ok=True)
    summary = {}
    for side, model in (("vanilla", vanilla), ("slim", slim)):
        kwargs = inputs(case, model, case.batch, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        synchronize(device)
        start = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            model.generate(
                **kwargs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=case.beams
            )
            synchronize(device)
        wall = time.perf_counter() - start
        events = prof.key_averages()
        device_us = sum(event.self_device_time_total for event in events)
        launches = sum(
            event.count for event in events if event.self_device_time_total > 0 and event.device_type.name == "CUDA"
        )
        sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        with open(f"{folder}/profiles.txt", "a") as handle:
            handle.write(f"\n## {name} {side}: wall {wall:.3f} s, {tokens} new tokens\n")
            handle.write(events.table(sort_by=sort, row_limit=30))
            handle.write(events.table(sort_by="cpu_time_total", row_limit=30))
        summary[side] = (wall, device_us / 1e6, launches)
    for side, (wall, kernel_s, launches) in summary.items():
        print(
            f"# profile {name} {side}: wall {wall:.3f} s, kernels {kernel_s:.3f} s, {launches} launches ({tokens} tok)"
        )
    return summary


LAYER_KEYS = {"whisper": ("encoder_layers", "decoder_layers"), "gpt2": ("n_layer",), "llama": ("num_hidden_layers",)}


@torch.no_grad()
def accuracy(case: Case, device: str, layers: int = 4, steps: int = 16) -> tuple[float, float]:
    """How far the unpatched and the slim model in the case's dtype are from the float32 model, on the same
    teacher-forced decode (``layers`` layers of the case's shape, random next tokens): the largest relative logit
    error over ``steps`` decode steps, ``(unpatched, slim)``. Slim should be about as close as the unpatched model."""
    shape = {**case.shape, **{key: layers for key in LAYER_KEYS[case.family]}}
    reference = build(replace(case, shape=shape, dtype=torch.float32, batch=4), device)
    half = copy.deepcopy(reference).to(case.dtype)
    slim = slimify(copy.deepcopy(half), mode=case.mode)
    generator = torch.Generator(device="cpu").manual_seed(3)
    tokens = torch.randint(3, reference.config.vocab_size, (4, steps + 1), generator=generator).to(device)
    logits = {}
    for side, model in (("reference", reference), ("vanilla", half), ("slim", slim)):
        first = inputs(replace(case, dtype=model.dtype, prompt=min(case.prompt, 256)), model, 4, device)
        if case.family == "whisper":
            out = model(**first, decoder_input_ids=tokens[:, :1], use_cache=True)
            extra = {"encoder_outputs": (out.encoder_last_hidden_state,)}
            ids = "decoder_input_ids"
        else:
            out, extra, ids = model(**first, use_cache=True), {}, "input_ids"
        cache, rows = returned_cache(out), []
        for step in range(1, steps + 1):
            out = model(**{ids: tokens[:, step : step + 1]}, **with_cache(cache), use_cache=True, **extra)
            cache = returned_cache(out)
            rows.append(out.logits[:, -1].float())
        logits[side] = torch.stack(rows)  # (steps, 4, vocab)

    def error(side: str) -> float:
        diff = (logits[side] - logits["reference"]).norm(dim=-1) / logits["reference"].norm(dim=-1)
        return float(diff.max())

    return error("vanilla"), error("slim")


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (the CPU version of each case)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generate()s per side, the fastest kept")
    parser.add_argument(
        "--equal-memory", nargs="*", metavar="CASE", help="also tokens/s at equal memory (CUDA) for these cases (all)"
    )
    parser.add_argument("--profile", metavar="DIR", help="profile a short generate() per side into DIR")
    parser.add_argument("--accuracy", action="store_true", help="half-precision cases: logit error vs float32")
    parser.add_argument("--kernel", nargs="*", metavar="CASE", help="also time slim through the Triton kernel")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()  # its per-generate() notes on these configs, not results
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_generate.py: no CUDA GPU here; run the small shapes on the CPU: --small --device cpu")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# python {' '.join(sys.argv)}")
    print(
        f"# {machine}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_slim {hf_slim.__version__}, {datetime.date.today()}; random weights"
    )
    header = (
        f"{'case':<18} {'dtype':<8} {'batch':>6} {'tok':>4} {'unpatched s':>11} {'slim s':>7} {'speed':>6} "
        f"{'peak GiB':>13} {'cache GiB':>13} {'same':>6} {'slimify s':>9} modes"
    )
    print(header, flush=True)
    rows = []
    for name in args.cases:
        case = small(CASES[name]) if args.small else CASES[name]
        equal = args.equal_memory is not None and (not args.equal_memory or name in args.equal_memory)
        kernel = args.kernel is not None and (not args.kernel or name in args.kernel)
        row = run_case(name, case, args.device, args.repeats, equal, args.profile, args.accuracy, kernel)
        rows.append(row)
        print(
            f"{row['case']:<18} {row['dtype']:<8} {row['batch']:>6} {row['tokens']:>4} {row['vanilla_s']:>11.2f} "
            f"{row['slim_s']:>7.2f} {row['speed']:>5.2f}x {gib(row['vanilla_peak']):>6}>{gib(row['slim_peak']):<6} "
            f"{gib(row['vanilla_cache']):>6}>{gib(row['slim_cache']):<6} {row['same_rows']:>6} "
            f"{row['slimify_s']:>9.1f} {row['modes']}",
            flush=True,
        )
    if any("slim_error" in row for row in rows):
        print(f"\n{'accuracy':<18} {'unpatched vs fp32':>17} {'slim vs fp32':>12}  (max relative logit error)")
        for row in rows:
            if "slim_error" in row:
                print(f"{row['case']:<18} {row['vanilla_error']:>17.2e} {row['slim_error']:>12.2e}")
    if any("throughput" in row for row in rows):
        header = (
            f"{'equal memory':<18} {'budget GiB':>10} {'unpatched tok/s':>16} {'slim batch':>10} {'slim tok/s':>10}"
        )
        print(f"\n{header} ratio")
        for row in rows:
            if "throughput" in row:
                print(
                    f"{row['case']:<18} {gib(row['budget']):>10} {row['vanilla_tok_s']:>16.0f} "
                    f"{row['slim_batch']:>10} {row['slim_tok_s']:>10.0f} {row['throughput']:.2f}x"
                )


if __name__ == "__main__":
    main()
