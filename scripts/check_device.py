"""Device correctness of every supported model type with the model on a device: one row per type and mode.

For every model type ``hf_slim.supported_model_types()`` lists (the tiny models of ``scripts/check_release.py``), plus
the RoPE configurations whose K path keeps frequency regimes (``llama-dynamic``, ``phi3-longrope``), the model and
its inputs go to ``--device`` and, per mode (``auto``; ``k`` where ``auto`` is not already the K mode):

* ``slimify`` (the K-mode calibration on its default batch included);
* greedy ``generate`` and, with a static cache, greedy again: token ids identical to the unpatched model's;
* beam ``generate`` (where the family has beam search; it runs, tokens not compared: beams tie more often);
* ``save_pretrained`` and ``load_slim``, then greedy on the loaded model (last mode only): identical tokens.

A crash is a failed row with its message (``cuda:0 and cpu``: a tensor hf_slim made on the default device). The exit
status is 0 only if every row passed. Options:

* ``--meta-guard``: run each phase under the guards of ``tests/device_guard.py`` (no tensor factory without
  ``device=`` in hf_slim; meta as the default device where transformers' own code survives it) — on the CPU the same
  check as tests/test_device.py, on a GPU both at once;
* ``--syncs``: count the host round trips hf_slim's own lines make per decode step (``.item()``, ``bool(tensor)``,
  ``torch.equal``, ``.tolist()``, host-built tensors, ...; ``tests/device_guard.py``'s ``HostSyncs``), from two greedy
  generates of different lengths, and print the per-step ones (a GPU pays a sync for each);
* ``--types``: only these types.

Without Whisper's audio reader (soundfile), Whisper and the speech composite calibrate mode ``k`` on the check's own
inputs instead of the bundled sample (the row says so). Runs in about a minute on a GPU::

    PYTHONPATH=$PWD python scripts/check_device.py --device cuda
    PYTHONPATH=$PWD python scripts/check_device.py --device cpu --meta-guard
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import check_release  # noqa: E402

import hf_slim  # noqa: E402
from hf_slim import load_slim, slim_record, slimify, supported_model_types  # noqa: E402
from hf_slim.registry import architecture_for  # noqa: E402

#: new tokens per generate (RoPE variants: past their original context of 32, where the frequencies switch)
NEW_TOKENS = 4
ROPE_VARIANTS = {"llama-dynamic": 26, "phi3-longrope": 26}
BEAMS = dict(num_beams=2, num_return_sequences=2)
NO_BEAMS = ("musicgen", *check_release.STEPWISE)
#: decode steps compared by --syncs: counts at SYNC_STEPS[1] minus counts at SYNC_STEPS[0], per step
SYNC_STEPS = (4, 12)


def builders() -> dict[str, Callable]:
    """``check_release.builders()`` plus the RoPE variants."""
    from tiny_models import tiny_rope

    table = dict(check_release.builders())
    table |= {name: check_release._decoder_only(name, tiny_rope) for name in ROPE_VARIANTS}
    return table


def _on(inputs: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def calibration_inputs(model_type: str, model, inputs: dict) -> tuple[dict | None, str]:
    """The calibration batch for mode ``k`` (None: the family's default) and a note for the row.

    MusicGen has no default batch; Whisper and the speech composite read the bundled sample with soundfile, which a
    machine may lack: they then calibrate on the check's own encoder inputs and random decoder ids.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    if model_type == "musicgen":
        codebooks = model.config.decoder.num_codebooks
        return {
            "input_ids": torch.randint(2, 90, (2, 7), generator=generator, device="cpu").to(device),
            "decoder_input_ids": torch.randint(0, 64, (2 * codebooks, 8), generator=generator, device="cpu").to(device),
        }, ""
    if model_type in ("whisper", "speech-encoder-decoder") and importlib.util.find_spec("soundfile") is None:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        encoder = {key: value for key, value in inputs.items() if key in ("input_features", "input_values")}
        rows = next(iter(encoder.values())).shape[0]
        ids = torch.randint(0, vocab, (rows, 8), generator=generator, device="cpu").to(device)
        return {**encoder, "decoder_input_ids": ids}, " (no soundfile: own calibration batch)"
    return None, ""


def generate(model_type: str, model, inputs: dict, new_tokens: int | None = None, **kwargs) -> torch.Tensor:
    """Greedy token ids (``kwargs``: beams, a static cache); the step-wise types decode by forward steps."""
    new_tokens = new_tokens or ROPE_VARIANTS.get(model_type, NEW_TOKENS)
    if model_type in check_release.STEPWISE:
        return check_release._greedy_steps(model, inputs["input_ids"], new_tokens).sequences
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return check_release.generate(model, inputs, **settings, **kwargs, return_dict_in_generate=True).sequences


def _guard(enabled: bool, model_type: str, phase: str):
    """The tests' guards around one phase (--meta-guard), or nothing. Loading never runs under meta: from_pretrained
    builds the model on the default device by design."""
    if not enabled:
        return contextlib.nullcontext()
    from device_guard import device_guard, meta_applies

    return device_guard(meta=phase != "load" and meta_applies(model_type, phase))


def _same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.equal(actual.cpu(), expected.cpu())


@torch.no_grad()
def check(model_type: str, make: Callable, device: torch.device, guard: bool) -> list[tuple[bool, str]]:
    """The rows of one type: ``(passed, markdown cells after the type)`` per mode."""
    vanilla, inputs = make()
    vanilla, inputs = vanilla.to(device), _on(inputs, device)
    expected = generate(model_type, vanilla, inputs)
    modes = ["auto"] if architecture_for(vanilla.config, "auto").positions == "rope" else ["auto", "k"]
    rows, slim = [], None
    for mode in modes:
        failures = []
        calibration, note = calibration_inputs(model_type, vanilla, inputs) if mode == "k" else (None, "")
        started = time.perf_counter()
        with warnings.catch_warnings(), _guard(guard, model_type, "slimify"):
            warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
            slim = slimify(copy.deepcopy(vanilla), mode, calibration_inputs=calibration)
        seconds = time.perf_counter() - started
        layer_modes = "/".join(sorted(set(slim_record(slim).layer_modes.values())))
        cells = {}
        for variant, kwargs in (("greedy", {}), ("static", dict(cache_implementation="static")), ("beams", BEAMS)):
            stepwise = model_type in check_release.STEPWISE
            if (variant == "beams" and model_type in NO_BEAMS) or (variant != "greedy" and stepwise):
                cells[variant] = "–"
                continue
            if variant == "static" and slim_record(slim).static_cache_refusal:  # the family's clean refusal
                cells[variant] = "refused"
                continue
            with _guard(guard, model_type, variant):
                tokens = generate(model_type, slim, inputs, **kwargs)
            same = variant == "beams" or _same(tokens, expected)
            cells[variant] = "ok" if same else "tokens differ"
            if not same:
                failures.append(variant)
        cells["save/load"] = "–"
        if mode == modes[-1]:
            with tempfile.TemporaryDirectory() as folder:
                with _guard(guard, model_type, "save"):
                    slim.save_pretrained(folder)
                eager = dict(attn_implementation="eager") if vanilla.config._attn_implementation == "eager" else {}
                # as users load onto a GPU (device_map: the K-mode sidecar is checked and installed on the device)
                placed = dict(device_map=str(device)) if importlib.util.find_spec("accelerate") else {}
                with _guard(guard, model_type, "load"):
                    loaded = load_slim(folder, **eager, **placed).to(device)
            with _guard(guard, model_type, "greedy"):
                same = _same(generate(model_type, loaded, inputs), expected)
            cells["save/load"] = "ok" if same else "tokens differ"
            if not same:
                failures.append("save/load")
        result = "ok" if not failures else "FAILED"
        rows.append(
            (
                not failures,
                f"{mode} | {result} | {cells['greedy']} | {cells['static']} | {cells['beams']} | {cells['save/load']} "
                f"| {seconds:.2f} | {layer_modes}{note}",
            )
        )
    return rows


@torch.no_grad()
def host_syncs(model_type: str, make: Callable, device: torch.device) -> dict[tuple[str, str], float]:
    """Per decode step host round trips of hf_slim's lines in a greedy generate of the default slim model, with the
    dynamic and the static cache: ``{(where, what): per step}``."""
    from device_guard import HostSyncs

    vanilla, inputs = make()
    slim = slimify(vanilla.to(device))
    inputs = _on(inputs, device)
    per_step: dict[tuple[str, str], float] = {}
    for kwargs in ({}, dict(cache_implementation="static")):
        if kwargs and (model_type in check_release.STEPWISE or slim_record(slim).static_cache_refusal):
            continue
        counts = []
        for steps in SYNC_STEPS:
            with HostSyncs() as counter:
                generate(model_type, slim, inputs, new_tokens=steps, **kwargs)
            counts.append(counter.counts)
        grown = counts[1] - counts[0]  # Counter subtraction keeps the positive differences
        for key, extra in grown.items():
            label = (key[0], key[1] + (" [static]" if kwargs else ""))
            per_step[label] = extra / (SYNC_STEPS[1] - SYNC_STEPS[0])
    return per_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--types", nargs="*", help="model types to check (default: every supported one and variants)")
    parser.add_argument("--meta-guard", action="store_true", help="run each phase under tests/device_guard.py")
    parser.add_argument("--syncs", action="store_true", help="count hf_slim's host round trips per decode step")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    table = builders()
    missing = sorted(set(supported_model_types()) - set(table))
    if missing:
        raise SystemExit(f"no tiny builder for supported model types {missing}: add one to scripts/check_release.py")
    types = arguments.types or sorted(table)
    print(f"# device {device}, transformers {transformers.__version__}, torch {torch.__version__}")
    print("| model type | mode | result | greedy | static | beams | save/load | slimify s | layer modes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    passed = total = 0
    syncs: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    started = time.perf_counter()
    for model_type in types:
        try:
            rows = check(model_type, table[model_type], device, arguments.meta_guard)
        except Exception as error:  # a crash is a failed row, with its message
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            rows = [(False, f"– | error | – | – | – | – | – | {message}")]
        for ok, cells in rows:
            passed, total = passed + ok, total + 1
            print(f"| {model_type} | {cells} |", flush=True)
        if arguments.syncs:
            try:
                for key, count in host_syncs(model_type, table[model_type], device).items():
                    syncs[key][model_type] = count
            except Exception as error:
                print(f"  (syncs of {model_type}: {type(error).__name__}: {error})", flush=True)
    if arguments.syncs:
        print("\n## host round trips per decode step in hf_slim's lines (greedy, default mode)")
        print("| where | what | per step | types |")
        print("| --- | --- | --- | --- |")
        for (where, what), by_type in sorted(syncs.items(), key=lambda item: -max(item[1].values())):
            counts = Counter(by_type.values())
            step = "/".join(f"{count:g}" for count in sorted(counts))
            names = ", ".join(sorted(by_type)) if len(by_type) <= 6 else f"{len(by_type)} types"
            print(f"| {where} | {what} | {step} | {names} |")
    print(f"\n{passed} of {total} rows passed ({time.perf_counter() - started:.0f} s)")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
