"""Tiny random models and an offline tokenizer, built in code (no hub access in tests)."""

from __future__ import annotations

import functools
import inspect

import torch
from helpers import bf16_steps
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "slim attention keeps one tensor per token instead of keys and values",
    "a model that remembers less can read longer texts and serve larger batches",
    "whisper listens, t5 translates, and gpt two keeps on writing stories",
    "memory is the bottleneck of long context decoding on every accelerator",
] * 4


@functools.cache
def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; pad token = eos token, left padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar goes to stdout, as blank lines where that is not a terminal (check_release)
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.padding_side = "left"
    return fast


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "sdpa", **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (d=64, 4 heads) whose vocabulary matches :func:`tiny_tokenizer`.

    ``initializer_range`` is raised from 0.02 so logits are peaked like a trained model's: near-ties between the top
    two tokens (which any rounding flips) are then rare, and token-identity tests test the attention, not luck.
    """
    tokenizer = tiny_tokenizer()
    settings = dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=256,
        vocab_size=len(tokenizer),
        initializer_range=0.1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    config = GPT2Config(**settings)
    config._attn_implementation = attn
    model = randomize_biases(GPT2LMHeadModel(config)).eval().to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give every bias and norm parameter random values: transformers initialises them to 0/1, which would hide a
    forgotten K or V bias from every equivalence test."""
    generator = torch.Generator().manual_seed(1234)
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        elif "ln" in name or "norm" in name:
            parameter.copy_(1 + torch.randn(parameter.shape, generator=generator) * std)
    return model


T5_TASK_SENTENCES = [
    "summarize: slim attention keeps one tensor per token instead of keys and values",
    "translate English to German: the quick brown fox jumps over the lazy dog",
    "translate English to German: memory is the bottleneck of long context decoding",
    "summarize: a model that remembers less can read longer texts and serve larger batches",
]
T5_CORPUS = CORPUS + T5_TASK_SENTENCES * 4


@functools.cache
def tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A Unigram tokenizer over the words and characters of a few sentences, with T5's special tokens (``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2) and T5's post-processing (``</s>`` appended); right padding, as T5 tokenizers pad.

    The pieces and their log-frequency scores are counted here rather than trained: the tokenizers Unigram trainer
    orders its vocabulary differently from one process to the next, which would change every tiny model's token ids.
    """
    import collections
    import math

    from tokenizers import processors

    counts = collections.Counter()
    for sentence in T5_CORPUS:
        for word in sentence.split():
            counts["\u2581" + word] += 1
            counts.update(word)
            counts["\u2581"] += 1
    total = sum(counts.values())
    pieces = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, math.log(c / total)) for p, c in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


#: tiny random configs of the decoder-only MHA families (2 layers, d=64, 4 heads), keyword arguments for the config
#: class named by ``model_type``; ``*_init`` raises the init std so logits are peaked (see :func:`tiny_gpt2`).
DECODER_CONFIGS: dict[str, tuple[str, dict]] = {
    "opt": ("opt", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128, init_std=0.1)),
    # OPT-350m layout: project_in/project_out (word_embed_proj_dim != hidden_size) and post-layer-norm. (With a
    # 32-wide projection the tiny model's bf16 greedy path is decided by rounding ties even without hf_slim.)
    "opt-350m": (
        "opt",
        dict(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128, init_std=0.1,
            word_embed_proj_dim=48, do_layer_norm_before=False,
        ),
    ),
    "xglm": ("xglm", dict(d_model=64, attention_heads=4, num_layers=2, ffn_dim=128, init_std=0.1)),
    "biogpt": (
        "biogpt", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                       initializer_range=0.1),
    ),
    # one global and one local layer; a window of 8 is crossed by every prompt plus 20 decode steps
    "gpt_neo": (
        "gpt_neo", dict(hidden_size=64, num_heads=4, num_layers=2, attention_types=[[["global", "local"], 1]],
                        window_size=8, initializer_range=0.1),
    ),
    "bloom": ("bloom", dict(hidden_size=64, n_head=4, n_layer=2, initializer_range=0.1)),
    # 6 heads: not a power of two, so the ALiBi slopes take their interleaved second series
    "bloom-6-heads": ("bloom", dict(hidden_size=96, n_head=6, n_layer=2, initializer_range=0.1)),
    # MptConfig defaults to use_cache=False (generate would then run without any cache): switch it on
    "mpt": ("mpt", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, initializer_range=0.1, use_cache=True)),
    # Falcon-RW layout: MHA with ALiBi, sequential attention/MLP, biases
    "falcon": (
        "falcon", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=True, multi_query=False,
                       new_decoder_architecture=False, parallel_attn=False, bias=True, initializer_range=0.1),
    ),
    # SantaCoder/StarCoder layout with multi-head attention: fused c_attn split per head as [q_i | k_i | v_i]
    "gpt_bigcode": (
        "gpt_bigcode", dict(n_embd=64, n_head=4, n_layer=2, multi_query=False, initializer_range=0.1),
    ),
    # sinusoidal positions added to the scaled embeddings; MultiHeadAttention with Wq/Wk/Wv/dense (biases)
    "ctrl": ("ctrl", dict(n_embd=64, n_head=4, n_layer=2, dff=128, initializer_range=0.1)),
}  # fmt: skip


def tiny_decoder(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "eager", **overrides):
    """A 2-layer causal LM of the family ``name`` (a key of :data:`DECODER_CONFIGS`) with random biases and norms,
    whose vocabulary matches :func:`tiny_tokenizer` (pad = bos = eos)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    model_type, settings = DECODER_CONFIGS[name]
    special = dict(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), max_position_embeddings=256, **special, **{**settings, **overrides}
    )
    if model_type == "mpt":
        config.max_seq_len = 256
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = randomize_biases(model).eval().to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


#: Tiny RoPE configs, one per model type / rope scaling / layout that slimify's K cache must match. Small context
#: windows (``max_position_embeddings`` / ``original_max_position_embeddings`` 32) so that generation runs past the
#: original context of the dynamic and longrope configs (their frequency switch) within a few dozen tokens.
ROPE_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", attention_bias=True, seed=5),  # fp32 logits 5e-6 from vanilla (seed 0: 1.1e-5)
    "llama-theta1e6": dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "llama-linear": dict(model_type="llama", rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "llama-dynamic": dict(model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "llama-llama3": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        max_position_embeddings=256,
    ),
    "llama-yarn": dict(
        model_type="llama",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        max_position_embeddings=128,
    ),
    "qwen2": dict(model_type="qwen2", seed=1),
    "phi3": dict(model_type="phi3", seed=3),
    "phi3-longrope": dict(
        model_type="phi3",
        seed=3,
        max_position_embeddings=128,
        original_max_position_embeddings=32,
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
            "original_max_position_embeddings": 32,
        },
    ),
    "phi3-sliding": dict(model_type="phi3", sliding_window=20, seed=3),
    "phi": dict(model_type="phi", seed=3, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.4}),
    "stablelm": dict(model_type="stablelm", use_qkv_bias=True, seed=3),
    "gpt_neox": dict(model_type="gpt_neox"),
    # GPT-NeoX's per-head fused query_key_value and partial RoPE (qk_layernorm=True is refused)
    "persimmon": dict(model_type="persimmon", qk_layernorm=False),
    "gptj": dict(model_type="gptj", max_position_embeddings=128, rotary_dim=8, attn="eager"),
    # GPT-J's rotary layout behind a fused qkv_proj in 4 model-parallel shards of [q | v | k]
    "codegen": dict(model_type="codegen", max_position_embeddings=128, rotary_dim=8),
    "olmo": dict(model_type="olmo"),
    "olmo2": dict(model_type="olmo2"),  # k_norm: the K cache keeps each token's key scale (e + r + 1 columns)
}


def tiny_rope(
    name: str, seed: int | None = None, dtype: torch.dtype = torch.float32, attn: str | None = None, **overrides
):
    """A 2-layer causal LM (d=64, 4 MHA heads) of :data:`ROPE_CONFIGS` ``[name]`` with random biases and norms,
    whose vocabulary matches :func:`tiny_tokenizer`. ``seed`` defaults to the table's (one whose random W_K the
    fp32 calibration accepts on every layer, so the K path is what the tests exercise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        initializer_range=0.1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    settings.update(ROPE_CONFIGS[name])
    settings.update(overrides)
    model_type, table_seed = settings.pop("model_type"), settings.pop("seed", 0)
    attn = attn or settings.pop("attn", "sdpa")  # GPT-J: eager only
    settings.pop("attn", None)
    torch.manual_seed(table_seed if seed is None else seed)
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = attn
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:  # a release whose class has no SDPA yet (CodeGen before 5.24): its eager attention
        if attn != "sdpa" or "does not support an attention implementation" not in str(error):
            raise
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config)
    model = randomize_biases(model).eval().to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


#: The final norm of each RoPE family's base model (its input is the residual stream the unembedding reads).
FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


@torch.no_grad()
def peak_logits(model: torch.nn.Module, embedding_ratio: float = 2.0, seed: int = 11) -> torch.nn.Module:
    """Give a random causal LM next-token logits with a clear winner at every step, like a trained model's.

    Why: a random model's greedy choice is the top of ~300 Gaussian logits, whose top two are often less than a bf16
    step apart (0 to 1 step at the closest of the 108 greedy decisions of each tiny RoPE config): any rounding decides
    such a step, so bf16 token-identity tests would test luck. Scaling weights does not help (the top-1 margin in bf16
    steps is scale invariant), so the winner is built into the weights instead:

    * the unembedding becomes a successor table: tokens, eos left out, are put in one random cycle and the output row
      of each token's successor is that token's unit embedding (eos gets a zero row, so generation never stops early);
    * the token embeddings are scaled to ``embedding_ratio`` times the RMS norm of what the layers add to the
      residual stream (measured here, on random tokens), so the current token's own embedding decides the argmax
      with a margin of 76 to 117 bf16 steps at the closest decision of each tiny RoPE config (2.0), while attention
      and MLPs still move every logit (dropping K+R's residual Z makes bf16 logits 9-22x less accurate).

    Weights other than the two embeddings (W_K, W_V, biases, norms) are untouched. Returns ``model`` (float32 in,
    changed in place).
    """
    embedding = model.get_input_embeddings().weight  # (vocab, d)
    unembedding = model.get_output_embeddings().weight  # (vocab, d)
    final_norm = next(getattr(model.base_model, name) for name in FINAL_NORMS if hasattr(model.base_model, name))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embedding.shape[0], (2, 48), generator=generator)
    captured = []
    hook = final_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(input_ids=ids)
    finally:
        hook.remove()
    added = captured[0] - embedding[ids]  # (2, 48, d): everything the layers wrote into the residual stream
    scale = embedding_ratio * added.norm(dim=-1).square().mean().sqrt() / embedding.norm(dim=-1).square().mean().sqrt()
    embedding.mul_(scale)
    eos = model.config.eos_token_id
    cycle = torch.tensor([t for t in torch.randperm(embedding.shape[0], generator=generator).tolist() if t != eos])
    unembedding.zero_()
    unembedding[cycle.roll(-1)] = embedding[cycle] / embedding[cycle].norm(dim=-1, keepdim=True)  # successor rows
    return model


def _teacher_forced(model: torch.nn.Module, inputs: dict, path: torch.Tensor) -> tuple[dict, int]:
    """The forward arguments that score ``path`` (generate()'s output for ``inputs``) in one teacher-forced pass,
    and ``first``: the index in ``path`` of the first generated token (logits ``[:, first - 1:]`` predict
    ``path[:, first:]``).

    An encoder-decoder's path is the decoder start token, then the new tokens: the decoder reads ``path[:, :-1]``
    beside the encoder ``inputs``. A decoder-only path is the (left-padded) prompt, then the new tokens: the model
    reads ``path[:, :-1]`` with the prompt's mask extended by ones and, where its forward takes them, the position
    ids generate() derives from that mask (so left-padded rows are scored at the positions they are generated at).
    """
    if model.config.is_encoder_decoder:
        return {**inputs, "decoder_input_ids": path[:, :-1]}, 1
    first = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(path[:, first:])], dim=1)  # (batch, len(path))
    forced = {"input_ids": path[:, :-1], "attention_mask": mask[:, :-1]}
    if "position_ids" in inspect.signature(model.forward).parameters:
        forced["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)[:, :-1]  # padding slots: 0, as generate()
    return forced, first


def sharpen_greedy(
    model: torch.nn.Module,
    inputs: dict,
    generate_kwargs: dict,
    *,
    target: float = 32.0,
    max_steps: int = 200,
    lr: float = 3e-3,
) -> tuple[torch.Tensor, float]:
    """Make ``model``'s own greedy continuation of ``inputs`` confident by training it (in place, float32) on it.

    Why: random tiny models have flat output distributions. On a long greedy path their top two scores often sit
    within one bf16 step of each other, where any rounding picks either token, so strict bf16 token identity would
    test luck; no init scale helps, because the gap is small relative to the logits themselves. A trained model's
    top-1 stands far above the rest, and this makes the tiny model trained on its own path: generate it once
    (``generate_kwargs``: greedy, with the logits processors of the test), then take Adam steps of teacher-forced
    cross-entropy on it until every path token leads every other token by ``target`` bf16 steps
    (:func:`helpers.bf16_steps`). Then greedy decoding follows the same path, each step by that margin (logits
    processors only lower other tokens). Every weight moves a little; biases and norms stay random and non-zero,
    and attention still decides the tokens (the path depends on the prompt and on what came before).

    ``inputs``: a decoder-only model's ``input_ids`` and ``attention_mask`` (left-padded), or an encoder-decoder's
    encoder inputs (``input_ids``, ``attention_mask``; ``pixel_values`` or ``input_values`` of a composite).
    Returns the path (generate()'s sequences: ``(batch, 1 + new)`` for an encoder-decoder, ``(batch, prompt + new)``
    for a decoder-only model) and the smallest margin reached (below ``target`` when ``max_steps`` did not reach it).
    """
    with torch.no_grad():
        path = model.generate(**inputs, **generate_kwargs)
    path = getattr(path, "sequences", path)
    forced, first = _teacher_forced(model, inputs, path)
    labels = path[:, first:, None]  # (batch, new, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(max_steps + 1):
            logits = model(**forced).logits[:, first - 1 :]  # (batch, new, vocab)
            chosen = logits.detach().gather(-1, labels)[..., 0]  # (batch, new)
            others = logits.detach().scatter(-1, labels, float("-inf")).amax(-1)  # (batch, new)
            margin = float(bf16_steps(chosen, others).min())
            if margin >= target:
                break
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return path, margin
