"""Regenerate the synthetic speech WAVs used by ``hf_slim`` and its tests.

Why: the bundled Whisper tests need real speech with a known transcript, and we cannot ship recordings of people.
Synthetic speech from espeak-ng is deterministic, license-free and small.

For every sentence this runs exactly::

    espeak-ng -v en-us -s 150 -g 3 -w <tmp>.wav "<sentence>"         # 22.05 kHz mono 16-bit, 30 ms word gaps
    sox -D <tmp>.wav -r 16000 -c 1 -b 16 -e signed-integer <out>.wav  # 16 kHz mono 16-bit PCM, no dither

Outputs ``hf_slim/data/sample.wav`` and ``tests/data/*.wav`` plus ``tests/data/sentences.json`` (file name -> text),
and, with ffmpeg, the compressed copies ``tests/data/*.{flac,mp3,ogg,m4a}`` that the bulk tests decode (see
:data:`COMPRESSED`). Requires the ``espeak-ng`` and ``sox`` executables (``apt-get install -y espeak-ng sox ffmpeg``).

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


#: compressed copies for tests/test_bulk.py, name -> (source, ffmpeg options): lossless FLAC, 44.1 kHz stereo
#: MP3, 22.05 kHz Vorbis, AAC in M4A; ~140 KiB in all
COMPRESSED = {
    "finish_report.flac": ("finish_report.wav", []),
    "train_station.mp3": ("train_station.wav", ["-ar", "44100", "-ac", "2", "-b:a", "64k"]),
    "send_document.ogg": ("send_document.wav", ["-ar", "22050", "-c:a", "libvorbis", "-q:a", "3"]),
    "reading_garden.m4a": ("reading_garden.wav", ["-c:a", "aac", "-b:a", "48k"]),
}


def compress(test_dir: Path) -> None:
    """The :data:`COMPRESSED` copies, with ffmpeg (skipped with a note when it is missing)."""
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found: the compressed copies are not regenerated")
        return
    for name, (source, options) in COMPRESSED.items():
        command = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(test_dir / source), *options, str(test_dir / name)]
        subprocess.run(command, check=True)


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
    compress(test_dir)
    total = sum(
        p.stat().st_size for p in [ROOT / "hf_slim" / "data" / "sample.wav", *(test_dir / n for n in TEST_SENTENCES)]
    )
    print(f"wrote {len(TEST_SENTENCES) + 1} WAV files, {total / 1024:.0f} KiB in total")


if __name__ == "__main__":
    main()
