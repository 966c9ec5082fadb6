"""BART-family cache memory at a translation shape: unpatched vs slim, for NLLB-200-distilled-600M, mBART-large-50,
opus-mt-en-de and BART-large.

* measured: random weights with each checkpoint's attention shape (d_model, heads) and ``--layers`` encoder and
  decoder layers (small feed-forward and vocabulary: they hold no cache), ``generate()`` with beams on a padded source
  batch; bytes are counted on the cache objects generate() returns (:func:`hf_slim.cache_nbytes`) plus the encoder
  output the cross-attention reads (captured by a hook: transformers repeats it per beam, slim keeps one per input).
  Token ids must be identical, and :func:`hf_slim.cache_report` for the same shape must give the same bytes.
* reported: the full configs in ``configs/`` built on the meta device (never allocated), through cache_report.

    python scripts/bench_memory_encdec.py
    python scripts/bench_memory_encdec.py --source-len 256 --new-tokens 64 --beams 1 5 --batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

import hf_slim
from hf_slim import cache_nbytes, cache_report, slimify
from hf_slim._compat import returned_cache
from hf_slim.memory import format_bytes

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CHECKPOINTS = ["nllb-200-distilled-600M", "mbart-large-50", "opus-mt-en-de", "bart-large"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="source sentences")
    parser.add_argument("--source-len", type=int, default=128, help="source tokens (no padding in row 0)")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens (min = max)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers of the measured models")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser.parse_args()


def load_config(name: str):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    return raw, AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})


def measured_model(raw: dict, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's attention shape with ``layers`` layers, a 512-token vocabulary and small feed-forwards."""
    settings = {k: v for k, v in raw.items() if not k.startswith("_")}
    settings.update(
        encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=512,
        decoder_vocab_size=512, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, init_std=0.1,
    )  # fmt: skip
    config = AutoConfig.for_model(**settings)
    model_class = getattr(transformers, raw["architectures"][0])
    if model_class is transformers.BartModel:
        model_class = transformers.BartForConditionalGeneration
    torch.manual_seed(0)
    return model_class(config).eval().to(dtype)


def measure(model, inputs: dict, beams: int, new_tokens: int) -> tuple[torch.Tensor, int, int]:
    """(token ids, cache bytes, bytes of the encoder output the cross-attention read) of one generate() call."""
    seen = {}
    cross = model.get_decoder().layers[0].encoder_attn
    handle = cross.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(encoder=kwargs["key_value_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                return_dict_in_generate=True, no_repeat_ngram_size=3,
            )  # fmt: skip
    finally:
        handle.remove()
    encoder = seen["encoder"]
    return out.sequences, cache_nbytes(returned_cache(out)), encoder.numel() * encoder.element_size()


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"{platform.machine()} {platform.python_version()} torch {torch.__version__} transformers "
        f"{transformers.__version__} hf_slim {hf_slim.__version__}; {args.dtype}; batch {args.batch}, source "
        f"{args.source_len} tokens, {args.new_tokens} new tokens"
    )
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 512, (args.batch, args.source_len), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1:, : args.source_len // 4] = 0  # left-padded rows after the first
    inputs = {"input_ids": input_ids.masked_fill(mask == 0, 1), "attention_mask": mask}

    print("\nmeasured (random weights, checkpoint attention shape, --layers layers):")
    print(f"{'checkpoint':<26} {'beams':>5} {'vanilla':>11} {'slim':>11} {'ratio':>7} {'+enc vanilla':>13} "
          f"{'+enc slim':>11} {'ratio':>7}  same tokens")  # fmt: skip
    for name in CHECKPOINTS:
        raw, _ = load_config(name)
        vanilla = measured_model(raw, args.layers, dtype)
        slim = slimify(measured_model(raw, args.layers, dtype))
        for beams in args.beams:
            ids_v, cache_v, enc_v = measure(vanilla, inputs, beams, args.new_tokens)
            ids_s, cache_s, enc_s = measure(slim, inputs, beams, args.new_tokens)
            report = cache_report(
                slim, args.batch, args.new_tokens, encoder_len=args.source_len, num_beams=beams, verbose=False
            )
            assert (report.vanilla_bytes, report.slim_bytes) == (cache_v, cache_s), (report, cache_v, cache_s)
            assert (report.encoder_bytes, report.slim_encoder_bytes) == (enc_v, enc_s)
            print(
                f"{name:<26} {beams:>5} {format_bytes(cache_v):>11} {format_bytes(cache_s):>11} "
                f"{cache_v / cache_s:>6.2f}x {format_bytes(cache_v + enc_v):>13} {format_bytes(cache_s + enc_s):>11} "
                f"{(cache_v + enc_v) / (cache_s + enc_s):>6.2f}x  {torch.equal(ids_v, ids_s)}"
            )

    print("\nreported (full configs on the meta device, cache_report):")
    for name in CHECKPOINTS:
        raw, config = load_config(name)
        with torch.device("meta"):
            model = getattr(transformers, raw["architectures"][0])._from_config(config, dtype=dtype)
        for beams in args.beams:
            report = cache_report(
                model, args.batch, args.new_tokens, encoder_len=args.source_len, num_beams=beams, verbose=False
            )
            print(
                f"{name:<26} {beams:>5} {format_bytes(report.vanilla_bytes):>11} {format_bytes(report.slim_bytes):>11} "
                f"{report.ratio:>6.2f}x {format_bytes(report.vanilla_bytes + report.encoder_bytes):>13} "
                f"{format_bytes(report.slim_bytes + report.slim_encoder_bytes):>11} {report.ratio_with_encoder:>6.2f}x"
            )


if __name__ == "__main__":
    main()
