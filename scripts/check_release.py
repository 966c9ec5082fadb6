"""Judge a transformers release: every supported model type, slim vs unpatched, one row each, in a few minutes.

For every model type ``hf_slim.supported_model_types()`` lists, a tiny random model of that type (random biases and
norms; the builders of the test suite) is slimified in its default mode and compared with an unpatched copy on the
installed transformers:

* greedy and 3-beam generate (2 returned sequences; greedy only where the family has no beam search): token ids
  identical, strictly;
* the bytes of the caches both generates return (every tensor they hold) and their ratio;
* or, where the release broke what hf_slim relies on, the clean refusal slimify gives (the model left untouched).

The last line says how many types passed; the exit status is 0 only if every row did. ``.ci/run`` runs it on the
transformers README's install resolves to. Supporting the next release starts with this command:

    python scripts/check_release.py [--types gpt2 llama ...]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hf_slim  # noqa: E402
from hf_slim import cache_nbytes, slim_record, slimify, supported_model_types  # noqa: E402
from hf_slim._compat import TransformersContractError, returned_cache, with_cache  # noqa: E402
from hf_slim.registry import UnsupportedModelError  # noqa: E402

#: generate() settings shared by every row: long enough to decode past the prompt, no special-token shortcuts
NEW_TOKENS = 12
BEAMS = dict(num_beams=3, num_return_sequences=2)


def generate(model, inputs: dict, **settings):
    """``model.generate(**inputs)`` with ``settings`` (and the generation options among ``inputs``, e.g.
    ``min_new_tokens``) on a copy of the model's generation config: a generate() may write its arguments into the config
    it is handed, the model's own by default (Pop2Piano's), where every later call would inherit them."""
    config = copy.deepcopy(model.generation_config)
    tensors = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    unused = config.update(**{**{k: v for k, v in inputs.items() if k not in tensors}, **settings})
    return model.generate(**tensors, **unused, generation_config=config)


def _text_batch(vocab: int, batch: int = 3, length: int = 8, low: int = 3) -> dict:
    """Different token ids per row, row 1 left-padded by 3 (decoder-only) — the padding the slim path must honour."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(low, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_only(name: str, build: Callable) -> Callable:
    def make():
        model = build(name)
        return model, _text_batch(model.config.vocab_size)

    return make


#: families transformers gives no SDPA path
EAGER_ONLY = ("pegasus_x", "bigbird_pegasus")


def _bart(model_type: str) -> Callable:
    def make():
        from tiny_encdec import source_batch, tiny_bart

        return tiny_bart(model_type, attn="eager" if model_type in EAGER_ONLY else "sdpa"), source_batch()

    return make


def _t5(variant: str) -> Callable:
    def make():
        from test_t5 import encoder_batch, tiny_t5

        return tiny_t5(variant), dict(encoder_batch())

    return make


def _whisper():
    from test_whisper import random_features, tiny_whisper

    return tiny_whisper(), {"input_features": random_features(3)}


def _moonshine():
    from tiny_encdec import audio_batch, tiny_moonshine

    return tiny_moonshine(), audio_batch()


def _composite(encoder: str, decoder: str) -> Callable:
    def make():
        from test_encoder_decoder import encoder_inputs, tiny_composite

        return tiny_composite(encoder, decoder), encoder_inputs(encoder)

    return make


def _encoder_decoder_type(model_type: str) -> Callable:
    """The types tests/test_encdec_types.py builds (Speech2Text, ...): its tiny model and padded batch."""

    def make():
        from test_encdec_types import TYPES, build

        return build(model_type), {**TYPES[model_type].batch(3, "right"), **TYPES[model_type].generate_kwargs}

    return make


def _trocr():
    from test_encoder_decoder import VOCAB, _decoder
    from tiny_models import randomize_biases

    decoder_class, config = _decoder("trocr")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomize_biases(decoder_class(config)).eval(), _text_batch(VOCAB)


def _florence2():
    from test_encoder_decoder import florence2_inputs, tiny_florence2

    return tiny_florence2(), florence2_inputs()


def _musicgen():
    from test_encoder_decoder import tiny_musicgen

    ids = torch.randint(2, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return tiny_musicgen(), {"input_ids": ids, "attention_mask": mask}


def _musicgen_decoder():
    model = _musicgen()[0].decoder  # MusicgenForCausalLM: (batch * codebooks, tokens) decoder ids
    ids = torch.randint(0, 64, (2 * model.config.num_codebooks, 4), generator=torch.Generator().manual_seed(3))
    return model, {"input_ids": ids}


#: types whose generate() needs more than a tiny config gives (MusicgenForCausalLM: the composite's audio settings):
#: their row decodes greedily step by step through forward() and the cache it returns instead
STEPWISE = ("musicgen_decoder",)


class _Sequences(dict):
    """What :func:`_greedy_steps` returns: ``sequences`` and the final cache, like a generate() output."""

    @property
    def sequences(self) -> torch.Tensor:
        return self["sequences"]


def _greedy_steps(model, input_ids: torch.Tensor, new_tokens: int) -> _Sequences:
    """Greedy decoding by forward calls, each fed the cache the previous one returned."""
    output = model(input_ids=input_ids, use_cache=True)
    tokens = [input_ids]
    for _ in range(new_tokens):
        token = output.logits[:, -1:].argmax(-1)  # (rows, 1)
        tokens.append(token)
        output = model(input_ids=token, use_cache=True, **with_cache(returned_cache(output)))
    return _Sequences(sequences=torch.cat(tokens, dim=1), cache=returned_cache(output))


def builders() -> dict[str, Callable]:
    """``model_type -> () -> (tiny model, generate inputs)`` for every supported type."""
    from test_encdec_types import TYPES as ENCODER_DECODER_TYPES
    from tiny_encdec import BART_FAMILY
    from tiny_models import DECODER_CONFIGS, ROPE_CONFIGS, tiny_decoder, tiny_gpt2, tiny_rope

    table: dict[str, Callable] = {"gpt2": lambda: (tiny_gpt2(), _text_batch(tiny_gpt2().config.vocab_size))}
    table |= {name: _decoder_only(name, tiny_decoder) for name in DECODER_CONFIGS if name in supported_model_types()}
    table |= {name: _decoder_only(name, tiny_rope) for name in ROPE_CONFIGS if name in supported_model_types()}
    table |= {model_type: _bart(model_type) for model_type in BART_FAMILY}
    table |= {"t5": _t5("t5-v1.1"), "mt5": _t5("mt5"), "umt5": _t5("umt5"), "whisper": _whisper}
    table |= {"moonshine": _moonshine}
    table |= {"trocr": _trocr, "florence2": _florence2, "musicgen": _musicgen, "musicgen_decoder": _musicgen_decoder}
    table |= {model_type: _encoder_decoder_type(model_type) for model_type in ENCODER_DECODER_TYPES}
    table |= {
        "vision-encoder-decoder": _composite("vision", "trocr"),
        "speech-encoder-decoder": _composite("speech", "bart"),
    }
    return table


#: how much of a refusal or an error the table cell shows; the whole message follows the table
CELL_CHARACTERS = 80


def _cell(text: str) -> str:
    """The start of ``text`` on one line, cut at a word, for a table cell (the whole text is printed below it)."""
    line = " ".join(text.split()).replace("|", "/")
    if len(line) <= CELL_CHARACTERS:
        return line
    return line[:CELL_CHARACTERS].rsplit(" ", 1)[0] + " … (below)"


@torch.no_grad()
def check(model_type: str, make: Callable) -> tuple[bool, str, str | None]:
    """One row: ``(passed, markdown cells after the type, the whole refusal or error message or None)``."""
    vanilla, inputs = make()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
            slim = slimify(copy.deepcopy(vanilla))
    except (TransformersContractError, UnsupportedModelError) as error:
        reason = f"{type(error).__name__}: {error}"
        return False, f"refused | – | – | – | {_cell(reason)}", reason
    modes = "/".join(sorted(set(slim_record(slim).layer_modes.values())))
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    models = (("vanilla", vanilla), ("slim", slim))
    if model_type in STEPWISE:
        outputs = {name: _greedy_steps(model, inputs["input_ids"], NEW_TOKENS) for name, model in models}
    else:
        outputs = {name: generate(model, inputs, **settings) for name, model in models}
    greedy = torch.equal(outputs["slim"].sequences, outputs["vanilla"].sequences)
    beams = "–"
    if model_type not in ("musicgen", *STEPWISE):  # MusicGen has no beam search
        expected = generate(vanilla, inputs, **settings, **BEAMS).sequences
        beams = "yes" if torch.equal(generate(slim, inputs, **settings, **BEAMS).sequences, expected) else "NO"
    vanilla_bytes, slim_bytes = (cache_nbytes(returned_cache(outputs[name])) for name in ("vanilla", "slim"))
    ratio = f"{vanilla_bytes / slim_bytes:.2f}x" if slim_bytes else "–"
    passed = greedy and beams != "NO" and slim_bytes < vanilla_bytes
    return passed, f"{'ok' if passed else 'FAILED'} | {'yes' if greedy else 'NO'} | {beams} | {ratio} | {modes}", None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", help="model types to check (default: every supported one)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()  # its generation-config notes on tiny configs, not results
    transformers.utils.logging.disable_progress_bar()  # the K-mode calibration bar of the RoPE rows
    table = builders()
    missing = sorted(set(supported_model_types()) - set(table))
    if missing:
        raise SystemExit(f"no tiny builder for supported model types {missing}: add one to scripts/check_release.py")
    types = arguments.types or supported_model_types()
    print(
        f"# transformers {transformers.__version__}, torch {torch.__version__}, hf_slim {hf_slim.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}"
    )
    print("| model type | result | greedy identical | beams identical | cache ratio | layer modes / reason |")
    print("| --- | --- | --- | --- | --- | --- |")
    passed, started, reasons = 0, time.perf_counter(), {}
    for model_type in types:
        try:
            ok, cells, reason = check(model_type, table[model_type])
        except Exception as error:  # an unexpected crash is a failed row, with its message, not a stopped check
            reason = f"{type(error).__name__}: {error}"
            ok, cells = False, f"error | – | – | – | {_cell(reason)}"
        passed += ok
        if reason is not None:
            reasons[model_type] = reason
        print(f"| {model_type} | {cells} |", flush=True)
    for model_type, reason in reasons.items():  # whole, not cut: what to fix on this release
        print(f"\n{model_type}: {reason}")
    print(f"\n{passed} passed, {len(types) - passed} failed ({time.perf_counter() - started:.0f} s)")
    return 0 if passed == len(types) else 1


if __name__ == "__main__":
    sys.exit(main())
