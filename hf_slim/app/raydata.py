"""The bulk jobs of :mod:`hf_slim.app.bulk` as Ray Data pipelines, for more than one process or machine.

Why Ray Data: it is the engine people already run batch inference on (``map_batches`` with a model per actor,
streaming, backpressure, retries); hf_slim adds only what a slim bulk job needs. The pipeline is:

    from_items(planned batches) -> map(read and decode the batch's files) -> map_batches(one slim model per actor)
    -> the driver writes each batch's outputs as it arrives (atomically, as in one process)

The batches are planned on the driver exactly as :func:`hf_slim.app.bulk.transcribe_tasks` plans them (input order,
``batch_size`` files each) and each actor runs the same :func:`hf_slim.app.transcription.transcribe_batch` on them, so
the outputs are those of the single-process run. Inputs and the model folder must be readable at the same path on
every node (a shared filesystem); outputs are written by the driver only.

Ray is optional (``pip install "hf-slim[ray]"``); nothing else in hf_slim imports this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .bulk import AudioTask, JobReport, append_lines, batches, finish_batch, generate_batch
from .transcription import Segment, Transcription, WhisperOptions, Word, transcribe_batch


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError(f'--ray needs Ray Data: pip install "hf-slim[ray]" ({error})') from error
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[object]:
    """Connect to the Ray cluster at ``address``, or start a local one with ``workers`` CPUs when it is None, and
    shut it down afterwards (a local one with all its processes). A local Ray listens on 127.0.0.1 only, with no
    dashboard and no usage reporting."""
    ray = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if ray.is_initialized():  # a caller's own session (e.g. in a notebook): use it, leave it running
        yield ray
        return
    temp_dir = None
    if address is None:
        # short temporary folder: Ray's Unix socket paths must stay under 108 characters
        temp_dir = tempfile.mkdtemp(prefix="hfslim-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir, **quiet)
    else:
        ray.init(address=address, **quiet)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # hf_slim draws its own bar on the driver
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp_dir is not None:  # the local session's sockets and logs
            shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_resources(ray) -> dict:
    """One GPU per actor where the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


def _on_actors(ray, dataset, actor: type, workers: int, **constructor_kwargs):
    """``dataset.map_batches`` through a pool of ``workers`` ``actor`` s (each built once with
    ``constructor_kwargs``), one planned batch per call.

    An actor whose process dies (killed, pre-empted, out of memory) is restarted, its model loaded again, and the
    batches it had not returned are run again: Ray Data's defaults for actor pools (``max_restarts=-1``,
    ``max_task_retries=-1``). The driver receives each batch once, so a worker lost mid-job changes no output
    (``tests/test_bulk.py`` kills one). They are not set here: remote arguments the decoding step does not share
    would stop Ray Data from fusing that step into the actors, and its tasks would then wait for CPUs the actors
    hold."""
    return dataset.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        **_actor_resources(ray),
    )


def _decode_row(row: dict) -> dict:
    """Ray ``map``: read and decode the files of one planned batch; float32 bytes per file, or the reason."""
    from .audio import load_audio

    audio, errors = [], []
    for path in row["paths"]:
        try:
            audio.append(load_audio(path)[0].tobytes())
            errors.append("")
        except ValueError as error:
            audio.append(b"")
            errors.append(str(error))
    return {"index": row["index"], "audio": audio, "errors": errors}


class _Transcriber:
    """Ray ``map_batches`` actor: one slim Whisper per actor, loaded once (by ``load``, which the command line hands
    over: ``(model, dtype, mode, device) -> (slim model, processor)``); one planned batch per call."""

    def __init__(
        self, load: Callable, model: str | None, dtype: str, mode: str | None, device: str, options: WhisperOptions,
        encoder_batch: int | None,
    ):  # fmt: skip
        self.model, self.processor = load(model, dtype, mode, device)
        self.options, self.encoder_batch = options, encoder_batch

    def __call__(self, batch: dict) -> dict:
        results = []
        for audio, errors in zip(batch["audio"], batch["errors"], strict=True):
            clips = [np.frombuffer(data, np.float32) for data, error in zip(audio, errors, strict=True) if not error]
            transcripts = transcribe_batch(
                self.model, self.processor, clips, self.options, encoder_batch=self.encoder_batch
            )
            results.append(json.dumps([asdict(transcript) for transcript in transcripts]))
        return {"index": batch["index"], "results": np.array(results, dtype=object), "errors": batch["errors"]}


def transcribe_tasks_on_ray(
    tasks: list[AudioTask],
    *,
    load: Callable,
    address: str | None,
    workers: int,
    model: str | None,
    dtype: str,
    mode: str | None,
    device: str,
    batch_size: int,
    fmt: str,
    options: WhisperOptions | None = None,
    encoder_batch: int | None = None,
    report: JobReport | None = None,
    on_failure: Callable[[Path, str], None] = lambda path, reason: None,
    progress: Callable[[int, float], None] = lambda files, seconds: None,
) -> JobReport:
    """:func:`hf_slim.app.bulk.transcribe_tasks` on Ray: ``workers`` actors, each with its own slim model loaded by
    ``load(model, dtype, mode, device) -> (model, processor)`` (a module-level function: Ray ships it by name).
    ``progress(files, seconds)`` is called as each batch's outputs are written."""
    report = report or JobReport()
    planned = batches(tasks, batch_size)
    options = (options or WhisperOptions()).for_format(fmt)
    with ray_session(address, workers) as ray:
        items = [{"index": i, "paths": [str(task.path) for task in batch]} for i, batch in enumerate(planned)]
        decoded = ray.data.from_items(items, override_num_blocks=len(items)).map(_decode_row)
        dataset = _on_actors(
            ray, decoded, _Transcriber, workers, load=load, model=model, dtype=dtype, mode=mode, device=device,
            options=options, encoder_batch=encoder_batch,
        )  # fmt: skip
        for row in dataset.iter_rows():
            batch = planned[int(row["index"])]
            decoded = [reason if reason else np.empty(0) for reason in row["errors"]]
            transcripts = [_transcription(item) for item in json.loads(row["results"])]
            finish_batch(batch, decoded, transcripts, fmt, report, on_failure)
            progress(len(batch), sum(task.duration for task in batch))
    return report


def _transcription(item: dict) -> Transcription:
    """A :class:`Transcription` back from its ``asdict`` JSON (how results travel from the actors)."""
    segments = [Segment(**(segment | {"words": [Word(**word) for word in segment["words"]]}))
                for segment in item["segments"]]  # fmt: skip
    return Transcription(**(item | {"segments": segments}))


class _Generator:
    """Ray ``map_batches`` actor for text: one slim model and tokenizer per actor (``load``, as for
    :class:`_Transcriber`, returns the model and its tokenizer); one planned batch per call."""

    def __init__(self, load: Callable, model: str, dtype: str, mode: str | None, device: str, settings: dict):
        self.model, self.tokenizer = load(model, dtype, mode, device)
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        outputs = [
            json.dumps(generate_batch(self.model, self.tokenizer, list(texts), **self.settings))
            for texts in batch["texts"]
        ]
        return {"index": batch["index"], "outputs": np.array(outputs, dtype=object)}


def generate_on_ray(
    prompts: list,
    output: Path,
    *,
    load: Callable,
    address: str | None,
    workers: int,
    model: str,
    dtype: str,
    mode: str | None,
    device: str,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int = 1,
    progress: Callable[[int], None] = lambda count: None,
) -> int:
    """``hf-slim generate --input`` (:mod:`hf_slim.app.cli.generate`) on Ray: planned batches of prompts,
    ``workers`` actors (each loading its model and tokenizer with ``load(model, dtype, mode, device)``); the driver
    appends each batch's lines to ``output`` as it arrives. Returns the number of prompts done."""
    planned = batches(prompts, batch_size)
    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)
    done = 0
    with ray_session(address, workers) as ray:
        items = [{"index": i, "texts": [prompt.text for prompt in batch]} for i, batch in enumerate(planned)]
        dataset = _on_actors(
            ray, ray.data.from_items(items, override_num_blocks=len(items)), _Generator, workers, load=load,
            model=model, dtype=dtype, mode=mode, device=device, settings=settings,
        )  # fmt: skip
        for row in dataset.iter_rows():
            batch = planned[int(row["index"])]
            results = json.loads(row["outputs"])
            append_lines(output, [{"id": prompt.id} | result for prompt, result in zip(batch, results, strict=True)])
            done += len(batch)
            progress(len(batch))
    return done
