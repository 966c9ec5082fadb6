"""Tiny random encoder-decoders of the BART family, built in code (no hub access), and their input batches."""

from __future__ import annotations

import torch
from tiny_models import randomize_biases
from transformers import (
    BartConfig,
    BartForCausalLM,
    BartForConditionalGeneration,
    BigBirdPegasusConfig,
    BigBirdPegasusForCausalLM,
    BigBirdPegasusForConditionalGeneration,
    BlenderbotConfig,
    BlenderbotForCausalLM,
    BlenderbotForConditionalGeneration,
    BlenderbotSmallConfig,
    BlenderbotSmallForCausalLM,
    BlenderbotSmallForConditionalGeneration,
    M2M100Config,
    M2M100ForConditionalGeneration,
    MarianConfig,
    MarianForCausalLM,
    MarianMTModel,
    MBartConfig,
    MBartForCausalLM,
    MBartForConditionalGeneration,
    PegasusConfig,
    PegasusForCausalLM,
    PegasusForConditionalGeneration,
    PegasusXConfig,
    PegasusXForConditionalGeneration,
    PLBartConfig,
    PLBartForCausalLM,
    PLBartForConditionalGeneration,
)

#: model_type -> (config class, seq2seq class, decoder-only class or None, config settings that differ per family).
#: The settings cover what distinguishes the families around attention: pre-norm (mBART, M2M100, Pegasus,
#: Blenderbot) vs post-norm, scaled embeddings, sinusoidal vs learned positions (fixed by the class), PEGASUS-X's
#: block-local encoder, BigBird-Pegasus's full-attention encoder setting.
BART_FAMILY = {
    "bart": (BartConfig, BartForConditionalGeneration, BartForCausalLM, {}),
    "mbart": (MBartConfig, MBartForConditionalGeneration, MBartForCausalLM, dict(scale_embedding=True)),
    "marian": (MarianConfig, MarianMTModel, MarianForCausalLM, dict(scale_embedding=True)),
    "m2m_100": (M2M100Config, M2M100ForConditionalGeneration, None, dict(scale_embedding=True)),
    "pegasus": (PegasusConfig, PegasusForConditionalGeneration, PegasusForCausalLM, dict(scale_embedding=True)),
    "pegasus_x": (PegasusXConfig, PegasusXForConditionalGeneration, None, dict(block_size=4, num_global_tokens=4)),
    "bigbird_pegasus": (
        BigBirdPegasusConfig,
        BigBirdPegasusForConditionalGeneration,
        BigBirdPegasusForCausalLM,
        dict(attention_type="original_full", scale_embedding=True),  # block-sparse needs long inputs; encoder only
    ),
    "blenderbot": (BlenderbotConfig, BlenderbotForConditionalGeneration, BlenderbotForCausalLM, {}),
    "blenderbot-small": (
        BlenderbotSmallConfig,
        BlenderbotSmallForConditionalGeneration,
        BlenderbotSmallForCausalLM,
        {},
    ),
    "plbart": (PLBartConfig, PLBartForConditionalGeneration, PLBartForCausalLM, dict(scale_embedding=True)),
}
VOCAB, PAD, BOS, EOS = 96, 1, 0, 2


def tiny_config(model_type: str, attn: str = "sdpa", **overrides):
    """A 2+2-layer config (d=64, 4 heads of 16, 96 tokens, 128 positions) of ``model_type``.

    ``init_std`` is raised so logits are peaked like a trained model's (token ties are rare); forced BOS/EOS tokens
    are off so generated paths are long and varied.
    """
    config_class, _, _, family = BART_FAMILY[model_type]
    settings = dict(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        init_std=0.1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    settings.update(family)
    settings.update(overrides)
    config = config_class(**settings)
    config._attn_implementation = attn
    return config


def tiny_bart(
    model_type: str = "bart",
    attn: str = "sdpa",
    seed: int = 0,
    causal_lm: bool = False,
    well_conditioned_keys: bool = False,
    **overrides,
) -> torch.nn.Module:
    """A random tiny model of ``model_type`` (seq2seq, or its ``*ForCausalLM`` decoder) with random biases and norms.

    ``well_conditioned_keys``: make every ``k_proj`` orthogonal times 0.5, so that the K mode is exact in float32 on
    these weights and the K-mode tests test the K path.
    """
    _, seq2seq_class, causal_class, _ = BART_FAMILY[model_type]
    config = tiny_config(model_type, attn, **overrides)
    if causal_lm:
        config.is_decoder, config.is_encoder_decoder = True, False
    torch.manual_seed(seed)
    model = randomize_biases((causal_class if causal_lm else seq2seq_class)(config)).eval()
    if well_conditioned_keys:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("k_proj"):
                    gaussian = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
                    module.weight.copy_(torch.linalg.qr(gaussian)[0] * 0.5)
    return model


def source_batch(batch: int = 3, length: int = 10, padding_side: str = "right", seed: int = 5) -> dict:
    """Different source token ids per row (no special ids), with rows 1 and 2 padded by 3 and 6 tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, pad in ((1, 3), (2, 6)):
        if row < batch:
            if padding_side == "right":
                mask[row, length - pad :] = 0
            else:
                mask[row, :pad] = 0
    input_ids = input_ids.masked_fill(mask == 0, PAD)
    return {"input_ids": input_ids, "attention_mask": mask}


def tiny_moonshine(seed: int = 0, attn: str = "sdpa", **overrides):
    """A 2+2-layer Moonshine (d=64, 4 MHA heads, interleaved partial RoPE, q/k/v biases) with random biases and
    norms; ``seed`` 0: the fp32 calibration accepts the K cache on both decoder layers."""
    from transformers import MoonshineConfig, MoonshineForConditionalGeneration

    settings = dict(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=128,
        encoder_num_hidden_layers=2,
        decoder_num_hidden_layers=2,
        encoder_num_attention_heads=4,
        decoder_num_attention_heads=4,
        max_position_embeddings=128,
        attention_bias=True,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = MoonshineConfig(**{**settings, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomize_biases(MoonshineForConditionalGeneration(config)).eval()


def audio_batch(batch: int = 2, samples: int = 8000, seed: int = 1) -> dict:
    """Random 16 kHz audio ``input_values: (batch, samples)``, row 1 padded at its end (``attention_mask`` zeros)."""
    audio = 0.1 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, samples, dtype=torch.long)
    mask[1, 3 * samples // 4 :] = 0
    return {"input_values": audio, "attention_mask": mask}
