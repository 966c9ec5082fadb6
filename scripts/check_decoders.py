"""Decoder-only MHA families: measured agreement and cache bytes of the slim vs the unpatched model, in one run.

For every tiny random config of ``tests/tiny_models.DECODER_CONFIGS`` (random biases and norms), attention
implementation and cache mode: the worst relative logit difference over a left-padded prefill and 24 decode steps
(fp32), whether 3-beam search with 2 returned sequences gives identical tokens, and the cache bytes both models hold
after the prefill (counted on the cache objects). Then ``cache_report`` on the real OPT-6.7B, BLOOM-7b1 and
GPT-Neo-2.7B configs (``tests/data/configs``, meta device, 2048 fp16 tokens, batch 1).

    python scripts/check_decoders.py
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import relative_difference  # noqa: E402
from tiny_models import DECODER_CONFIGS, tiny_decoder, tiny_tokenizer  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

import hf_slim  # noqa: E402
from hf_slim import SlimCache, cache_nbytes, cache_report, slim_record, slimify  # noqa: E402
from hf_slim._compat import with_cache  # noqa: E402

PROMPTS = ["the quick brown fox", "slim attention keeps one tensor per token instead of", "memory"]
STEPS = 24


@torch.no_grad()
def compare(name: str, attn: str, mode: str) -> str:
    vanilla = tiny_decoder(name, attn=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
        slim = slimify(copy.deepcopy(vanilla), mode)
    modes = "/".join(sorted(set(slim_record(slim).layer_modes.values())))
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = DynamicCache(), SlimCache()
    generator = torch.Generator().manual_seed(1)
    worst, nbytes = 0.0, None
    for step in range(STEPS + 1):
        expected = vanilla(input_ids=ids, attention_mask=mask, **with_cache(caches[0])).logits
        actual = slim(input_ids=ids, attention_mask=mask, **with_cache(caches[1])).logits
        worst = max(worst, relative_difference(actual, expected))
        if step == 0:
            nbytes = cache_nbytes(caches[0]), cache_nbytes(caches[1])
        ids = torch.randint(0, vanilla.config.vocab_size, (ids.shape[0], 1), generator=generator)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    beams = dict(max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2)
    same = torch.equal(vanilla.generate(**batch, **beams), slim.generate(**batch, **beams))
    return (
        f"| {name} | {attn} | {mode} ({modes}) | {worst:.1e} | {'yes' if same else 'NO'} | {nbytes[0]} | {nbytes[1]} "
        f"| {nbytes[0] / nbytes[1]:.2f}x |"
    )


def main() -> None:
    torch.set_num_threads(1)
    print(f"# {platform.machine()} {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, hf_slim {hf_slim.__version__}")  # fmt: skip
    print("| config | attention | mode (layers) | max rel. logit diff, prefill + 24 steps | beams identical | "
          "vanilla B | slim B | ratio |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in DECODER_CONFIGS:
        for attn in ("eager", "sdpa"):
            for mode in ("input", "k"):
                try:
                    print(compare(name, attn, mode))
                except ValueError as error:  # the family has no SDPA in transformers
                    if "does not support an attention implementation" not in str(error):
                        raise
                    break
    print(
        "\n| checkpoint config | layers | vanilla (2048 fp16 tokens) | slim | ratio |\n| --- | --- | --- | --- | --- |"
    )
    for path in sorted((ROOT / "tests" / "data" / "configs").glob("*.json")):
        config = AutoConfig.for_model(**json.loads(path.read_text()))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        report = cache_report(model, batch_size=1, seq_len=2048, verbose=False)
        size = hf_slim.memory.format_bytes
        print(f"| {path.stem} | {len(report.layers)} | {size(report.vanilla_bytes)} | {size(report.slim_bytes)} "
              f"| {report.ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
