"""DiffusionGemma (transformers' `DiffusionGemmaForBlockDiffusion`) behind the protocol of `models.base`.

DiffusionGemma is a block-diffusion model of another kind than the masked-diffusion LMs the engine was written
for (LLaDA arXiv 2502.09992, MDLM arXiv 2406.07524): a causal encoder reads the prompt into a KV cache, and a
bidirectional decoder denoises a canvas of `config.canvas_length` tokens that reads that cache. Its noise is
*uniform* (no [MASK]: an undecided canvas position holds a random vocabulary token), its decoder is
self-conditioned on the previous step's logits, and its logits cover the canvas only (soft-capped).
`DiffusionGemmaLM(model)` maps it onto the engine's masked-diffusion interface:

- **Sentinel.** The engine writes `config.mask_token_id` at undecided positions. The adapter sets it to
  `text_config.vocab_size`, an id *outside* the vocabulary, so it can never collide with a real token; the
  returned logits get one extra column for it, at -inf, so the model's distribution over its real vocabulary
  is exactly its own and the sentinel is never sampled or scored.
- **Noise.** Before the model runs, sentinel positions get uniform noise tokens, as DiffusionGemma was
  trained. The noise is a hash of the row's content (its real prompt and canvas tokens, sentinels included,
  with their positions) and of the position: a forward is a function of its input (the trajectory estimator
  replays rollout views exactly, old and new log-probs see the same noise), and it does not depend on the
  batch or on padding (rollouts stay batch-invariant). It changes whenever the canvas changes, so undecided
  positions are renoised at every step, as in DiffusionGemma's sampler.
- **Layout.** Our `[left-padded prompt | completion]` is split at `logits_range[0]`: the prompt goes to the
  encoder (left padding masked), the completion is the decoder canvas. `logits_range` must run to the end of
  the input (one canvas: the engine's `rollout.block_length` equal to the completion length); logits of prompt
  positions do not exist and are refused. A completion shorter than `canvas_length` is padded with extra noise
  positions, so the decoder always sees the full canvas it was trained on (those positions are renoised at
  every step and never decoded; their logits are dropped); longer completions (several
  canvases, each encoded into the cache before the next is denoised) are refused: the engine and estimators
  would have to treat the model as block-causal with a two-stream layout, which this adapter does not do.
- **Positions** follow the padding (the first real prompt token is position 0) so a row's logits do not
  depend on its padding; DiffusionGemma's own `generate` counts padding in its positions.
- **No KV cache** for the engine (`new_cache` is absent: `rollout.cache` must be `none`), and only padding
  masks: a 4-D mask must reduce to key padding (bidirectional), block-causal / two-stream masks are refused.

Departures from DiffusionGemma's own sampler (`DiffusionGemmaGenerationMixin.generate`), all forced by the
masked-diffusion engine, which commits tokens for good and forwards a function of the canvas only:

- committed tokens are never renoised (DiffusionGemma re-decides its accepted set every step and renoises
  the rest, so an accepted token can be taken back); the engine's `rollout.self_correction` is the only way
  back;
- commit rules are the engine's (top-k count, threshold, ...) in place of the entropy-bound acceptance, and the
  output is the committed canvas, not the argmax of the last step; there is no linear temperature schedule,
  no stable-and-confident early stop, and no canvas-by-canvas loop;
- self-conditioning: the engine keeps no state between steps, so by default (`self_conditioning="none"`) the
  decoder gets no previous logits, which DiffusionGemma treats as a zero signal (its first step, and the
  examples its training drops self-conditioning for). Every step is then predicted as if it were the first:
  the model loses the refinement signal it was trained to use, and RL never trains the self-conditioning
  block (its gradients are exactly zero). `self_conditioning="two_pass"` runs the decoder twice per forward,
  the second time conditioned on the first pass's (detached) logits, as self-conditioning is trained: a
  function of the input again, at twice the decoder cost;
- uniform noise is deterministic per canvas (see above), not drawn from a global generator;
- prompt positions an estimator masks (one_step's `estimator.p_mask_prompt`) get noise tokens too, although
  DiffusionGemma's causal encoder never saw noise in training; set `estimator.p_mask_prompt=0` to keep the
  prompt clean.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from ..counter_rng import mix
from ..errors import DllmRlError, lookup
from .base import unwrap
from .hf import ProtocolWrapper, padding_from_mask
from .masks import padding_positions

MODEL_TYPE = "diffusion_gemma"
HEAD_CLASS = "DiffusionGemmaForBlockDiffusion"
SELF_CONDITIONING = ("none", "two_pass")
_M32 = 0xFFFFFFFF


def is_diffusion_gemma(model_or_config) -> bool:
    """Whether a model (or a config) is a DiffusionGemma."""
    cfg = (
        getattr(unwrap(model_or_config), "config", None) if isinstance(model_or_config, nn.Module) else model_or_config
    )
    return getattr(cfg, "model_type", None) == MODEL_TYPE


def sentinel_id(config) -> int:
    """The id the engine writes at undecided positions: one past the vocabulary."""
    return int(config.get_text_config().vocab_size)


def model_class(model_dir: str, trust_remote_code: bool = False):
    """The transformers class `models.load` should load `model_dir` with: the block-diffusion head for a
    DiffusionGemma checkpoint (AutoModel would give the headless `DiffusionGemmaModel`), else AutoModel."""
    from transformers import AutoConfig, AutoModel

    if is_diffusion_gemma(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)):
        import transformers

        return getattr(transformers, HEAD_CLASS)
    return AutoModel


def noise_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    query_positions: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """Deterministic uniform-noise tokens: [B, Q] ids in [0, vocab_size) for the positions `query_positions`.

    input_ids / attention_mask / position_ids: [B, L] (the row's content, sentinels included). The row key
    hashes every real token with its position, so it ignores padding and the rest of the batch.
    """
    per = mix(mix(input_ids.long() + 0x9E3779B9) ^ mix(position_ids.long() * 0x85EBCA6B + 0x27D4EB2F))  # [B, L]
    key = mix((per * attention_mask.long()).sum(-1) & _M32)  # [B]
    h = mix(key[:, None] ^ mix(query_positions.long() + 0x632BE5AB))  # [B, Q]
    return h % vocab_size


class DiffusionGemmaLM(ProtocolWrapper):
    """A `DiffusionGemmaForBlockDiffusion` (or a peft model around one) behind the protocol forward.

    Args:
        model: the transformers model.
        self_conditioning: "none" (no previous logits: a zero signal) or "two_pass" (condition on a first
            decoder pass over the same canvas; twice the decoder cost). See the module docstring.
    """

    def __init__(self, model: nn.Module, self_conditioning: str = "none"):
        super().__init__()
        base = unwrap(model)
        if not is_diffusion_gemma(base):
            raise DllmRlError(f"{type(base).__name__} is not a DiffusionGemma model; use models.load.wrap_if_needed")
        if type(base).__name__ != HEAD_CLASS:
            raise DllmRlError(
                f"{type(base).__name__} has no LM head; load the checkpoint as {HEAD_CLASS} "
                "(models.load.load_model does)"
            )
        self.model = model
        self.self_conditioning = lookup(
            {k: k for k in SELF_CONDITIONING}, self_conditioning, "DiffusionGemma self_conditioning"
        )
        self.vocab_size = base.config.get_text_config().vocab_size
        self.canvas_length = int(base.config.canvas_length)
        base.config.mask_token_id = sentinel_id(base.config)  # what traits() reports to the engine

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache=None,
        cache_start: int = 0,
        kv_len: int | None = None,
        cache_rows: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids [B, L] = [prompt (left-padded) | completion with sentinels]; logits_range = (P, L).
        Returns logits [B, L - P, V + 1] (the sentinel column is -inf) and, when asked, hidden states [B, L, D]
        of the decoder (zeros at prompt positions, which the decoder does not compute)."""
        B, L = input_ids.shape
        self._check_call(L, kv_cache, cache_start, kv_len, cache_rows, logits_range)
        P = logits_range[0]
        attn = self._padding_mask(attention_mask, B, L, input_ids.device)  # [B, L]
        pos = padding_positions(attn) if position_ids is None else position_ids  # [B, L]
        inputs = self.model_inputs(input_ids, attn, pos, P)
        out = self.model(**inputs, output_hidden_states=output_hidden_states, **kwargs)
        if self.self_conditioning == "two_pass":
            first = out.logits.detach()
            inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
            out = self.model(
                **inputs,
                past_key_values=out.past_key_values,
                self_conditioning_logits=first,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
        logits = out.logits[:, : L - P]  # [B, Lc, V]: the padding positions of the canvas are dropped
        sentinel = torch.full((*logits.shape[:2], 1), float("-inf"), dtype=logits.dtype, device=logits.device)
        hidden = None
        if output_hidden_states:
            hidden = tuple(torch.cat([h.new_zeros(B, P, h.shape[-1]), h[:, : L - P]], 1) for h in out.hidden_states)
        return MaskedLMOutput(logits=torch.cat([logits, sentinel], -1), hidden_states=hidden)

    def model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, prompt_len: int
    ) -> dict:
        """The transformers forward's keyword arguments for [prompt | completion]: encoder ids, mask and positions,
        the decoder canvas (sentinels and the padding up to canvas_length replaced by noise), its mask and
        positions. All [B, *] tensors on the input's device."""
        B, L = input_ids.shape
        P, C, sentinel = prompt_len, self.canvas_length, self.config.mask_token_id
        extra = C - (L - P)
        canvas_pos = position_ids[:, P : P + 1] + torch.arange(C, device=input_ids.device)  # [B, C]
        all_pos = torch.cat([position_ids[:, :P], canvas_pos], 1)  # [B, P + C]
        noise = noise_tokens(input_ids, attention_mask, position_ids, all_pos, self.vocab_size)  # [B, P + C]
        ids = torch.cat([input_ids, input_ids.new_full((B, extra), sentinel)], 1)  # [B, P + C]
        ids = torch.where(ids == sentinel, noise, ids)
        enc_mask = attention_mask[:, :P]
        return {
            "input_ids": ids[:, :P],
            "attention_mask": enc_mask,
            "position_ids": position_ids[:, :P],
            "decoder_input_ids": ids[:, P:],
            "decoder_attention_mask": torch.cat([enc_mask, enc_mask.new_ones(B, C)], 1),
            "decoder_position_ids": canvas_pos,
        }

    def _check_call(self, L, kv_cache, cache_start, kv_len, cache_rows, logits_range) -> None:
        name = type(unwrap(self.model)).__name__
        if kv_cache is not None or cache_start or cache_rows is not None or (kv_len is not None and kv_len != L):
            raise DllmRlError(
                f"{name} runs through its own forward and has no KV cache for the engine; set rollout.cache=none"
            )
        if logits_range is None or logits_range[0] <= 0:
            raise DllmRlError(
                f"{name} gives logits for its decoder canvas only, not for prompt positions; call it "
                "with logits_range=(prompt length, input length)"
            )
        if logits_range[1] != L:
            raise DllmRlError(
                f"{name} decodes the whole completion as one canvas, but logits were asked for "
                f"positions {tuple(logits_range)} of {L} (a semi-autoregressive block); set "
                "rollout.block_length to rollout.max_completion_length (or leave it empty)"
            )
        if L - logits_range[0] > self.canvas_length:
            raise DllmRlError(
                f"a completion of {L - logits_range[0]} tokens does not fit {name}'s canvas of "
                f"{self.canvas_length}; set rollout.max_completion_length <= {self.canvas_length} "
                "(several canvases are not supported)"
            )

    def _padding_mask(self, mask, B, L, device) -> torch.Tensor:
        if mask is None:
            return torch.ones(B, L, dtype=torch.long, device=device)
        if mask.dim() == 4:
            try:
                return padding_from_mask(mask.bool())
            except DllmRlError:
                raise DllmRlError(
                    "DiffusionGemma's decoder attends bidirectionally over the prompt and its canvas; "
                    "a block-causal or two-stream mask cannot be expressed. Keep the model "
                    "bidirectional (no config.attention / block_size)"
                ) from None
        return mask.long()
