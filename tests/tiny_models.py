"""Tiny random models and an offline tokenizer, built in code (no hub access in tests)."""

from __future__ import annotations

import functools

import torch
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
