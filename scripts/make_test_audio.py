"""Regenerate the synthetic speech WAVs used by ``hf_slim`` and its tests.

Why: the bundled Whisper tests need real speech with a known transcript, and we cannot ship recordings of people.
Synthetic speech from espeak-ng is deterministic, license-free and small.

For every sentence this runs exactly::

    espeak-ng -v en-us -s 150 -g 3 -w <tmp>.wav "<sentence>"         # 22.05 kHz mono 16-bit, 30 ms word gaps
    sox -D <tmp>.wav -r 16000 -c 1 -b 16 -e signed-integer <out>.wav  # 16 kHz mono 16-bit PCM, no dither

Outputs ``hf_slim/data/sample.wav`` and ``tests/data/*.wav`` plus ``tests/data/sentences.json`` (file name -> text).
Requires the ``espeak-ng`` and ``sox`` executables (``apt-get install -y espeak-ng sox``).

Usage: ``python scripts/make_test_audio.py``
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TEXT = "Thank you very much for your help yesterday."
# chosen so that Whisper tiny.en greedy decoding gets every word right with a clear margin (fp32, fp16 and bf16);
# e.g. "The quick brown fox jumps over the lazy dog." comes out as "The quick round-fark jump over the lazy argh."
TEST_SENTENCES = {
    "finish_report.wav": "We need to finish the report before the end of the week.",
    "train_station.wav": "Can you tell me where the train station is?",
    "send_document.wav": "Please send me the document by email.",
    "reading_garden.wav": "My friend is reading a book in the garden.",
}


def synthesize(text: str, out_path: Path) -> None:
    """Speak ``text`` with espeak-ng and convert it to 16 kHz mono 16-bit PCM at ``out_path``.

    Parameters
    ----------
    text : str
        Sentence to speak.
    out_path : pathlib.Path
        Destination WAV file; parent folders are created.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-g", "3", "-w", str(raw), text], check=True)
        cmd = ["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(out_path)]
        subprocess.run(cmd, check=True)


def main() -> None:
    """Regenerate all WAV files and the transcript index."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y espeak-ng sox")
    synthesize(SAMPLE_TEXT, ROOT / "hf_slim" / "data" / "sample.wav")
    test_dir = ROOT / "tests" / "data"
    for name, text in TEST_SENTENCES.items():
        synthesize(text, test_dir / name)
    (test_dir / "sentences.json").write_text(json.dumps(TEST_SENTENCES, indent=2) + "\n", encoding="utf-8")
    total = sum(
        p.stat().st_size for p in [ROOT / "hf_slim" / "data" / "sample.wav", *(test_dir / n for n in TEST_SENTENCES)]
    )
    print(f"wrote {len(TEST_SENTENCES) + 1} WAV files, {total / 1024:.0f} KiB in total")


if __name__ == "__main__":
    main()
