"""A pretrained Hugging Face causal LM as the hdlm backbone (the paper's §5 plan; docs/conversion.md).

:class:`HFBackbone` has exactly the forward interface of :class:`hdlm.model.HDLMTransformer`
(``forward(tokens, sigma, positions, mask, keep, out_index, cache, commit) -> raw (B, K, N)``), so
the cells and masks of :mod:`hdlm.masks`/:mod:`hdlm.layout`, the objective, every sampler, the KV
cache and the bounds run on it unchanged. It drives the HF model's own parts — token embedding,
decoder layers, final norm, vocabulary head, rotary tables — and supplies what a causal LM does
not have:

- the positions of each cell (``positions`` = p + shift, fed to the model's own rotary embedding:
  in SHIFTED the cell whose input is y_j sits at position j + 1, exactly where the AR model puts
  it behind its document-start token);
- the boolean attention mask of the cells (SDPA; a FlexAttention ``BlockMask`` on CUDA), through
  an attention function registered with transformers as ``"hdlm"`` (the model's own forward, e.g.
  ``generate``, still gets plain SDPA through it);
- hdlm's preallocated :class:`~hdlm.model.KVCache` (one buffer per layer, key/value heads only);
- two input vectors that a causal LM lacks: MASK (id N) and BOS (id N + 1, SHIFTED's x⁻¹). They
  are a separate (2, hidden) parameter rather than new rows of the HF embedding, so the HF head
  (often tied to that embedding) keeps predicting exactly the N real tokens.
  :meth:`HFBackbone.init_special_rows` sets BOS to the model's own document-start token (so
  Quench + SHIFTED *is* the pretrained AR model, bit for bit) and MASK to the mean real-token
  embedding (a neutral "some token" input; the model learns it during fine-tuning).

Noise conditioning. The ε-hybrid needs none (the paper's ε models have no time conditioning). With
``model.time_conditioning`` an adaLN-free variant of the DiT's conditioning is added: the
sinusoidal σ̄ embedding of each cell, through an MLP and a zero-initialised projection, is added to
the cell's input vector — zero at conversion, so the converted model starts as the AR model. The
Eq. (12) weighted embedding (``model.weighted_embedding``) works as for the DiT, with f(MASK) the
MASK vector above.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import masks as masks_lib
from .config import ModelConfig
from .errors import HDLMError
from .head_loss import LinearHead
from .model import KVCache, NoiseEmbedding, _select
from .sparse_attention import BlockSparseMask, block_sparse_attention

ATTENTION = "hdlm"  # the name under which the cell attention is registered with transformers
_REGISTERED = False


# --------------------------------------------------------------------------------------------
# attention and KV cache, as the HF layers call them


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, L, D) -> (B, H_kv · n_rep, L, D): grouped-query keys/values for every query head."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def cell_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                   dropout: float = 0.0, scaling: float | None = None, hdlm_cells: bool = False,
                   **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function of an HF layer run by :class:`HFBackbone` (registered as ``"hdlm"``).

    With ``hdlm_cells`` (set by :meth:`HFBackbone.forward`) ``attention_mask`` is hdlm's mask over
    (query cells) × (cached ⁀ new cells): a bool tensor (SDPA) or a FlexAttention BlockMask. Called
    by the HF model's own forward instead, it is plain SDPA with HF's causal mask.
    """
    if not hdlm_cells:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise HDLMError("attention logit soft-capping (Gemma 2) is not supported by the hdlm backbone")
    n_rep = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or isinstance(attention_mask, Tensor):
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
    elif isinstance(attention_mask, BlockSparseMask):  # hdlm.layout.attention_mask on CPU, long layouts
        out = block_sparse_attention(query, key, value, attention_mask, scale=scaling, enable_gqa=n_rep > 1)
    else:
        out = masks_lib.flex_attention(query, key, value, attention_mask, scale=scaling, enable_gqa=n_rep > 1)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register :func:`cell_attention` (and SDPA's mask builder) with transformers as ``"hdlm"``."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, cell_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _REGISTERED = True


class _CacheView:
    """The one method an HF attention layer calls on its cache, backed by hdlm's :class:`KVCache`."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        k, v = self.cache.extend(layer_idx, key_states, value_states)
        return k.to(key_states.dtype), v.to(value_states.dtype)


# --------------------------------------------------------------------------------------------
# building the HF model


def hf_config_dict(config: Any) -> dict:
    """The HF config as a plain JSON-safe dict (stored in ``model.hf_config`` of hdlm's config)."""
    import json

    d = config.to_diff_dict()  # what differs from the architecture's defaults, model_type included
    drop = {"transformers_version", "dtype", "torch_dtype", "architectures", "quantization_config"}
    d = {k: v for k, v in d.items() if k not in drop and not k.startswith("_")}
    return json.loads(json.dumps(d))


def build_hf_lm(hf_config: dict) -> nn.Module:
    """A randomly initialised HF causal LM of the architecture ``hf_config`` describes (float32)."""
    try:
        import transformers
    except ImportError:
        raise HDLMError("model.backbone = hf needs 'transformers' (pip install transformers)") from None
    register_attention()
    d = dict(hf_config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise HDLMError("config model.hf_config has no model_type: it must be an HF config.json")
    try:
        config = transformers.AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise HDLMError(f"config model.hf_config: transformers cannot build model_type {model_type!r} ({e})") from None
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=ATTENTION)


def _part(obj: Any, name: str, what: str) -> Any:
    part = getattr(obj, name, None)
    if part is None:
        raise HDLMError(f"HF model {type(obj).__name__} has no {name}: hdlm converts decoder-only LMs of the "
                        f"Llama family (embed_tokens, layers, norm, rotary_emb, lm_head), {what}")
    return part


# --------------------------------------------------------------------------------------------
# the backbone


class HFBackbone(nn.Module):
    """An HF causal LM over hdlm's cells: ``forward(...) -> raw (B, K, N)`` (see the module doc).

    ``cfg`` is hdlm's :class:`~hdlm.config.ModelConfig` with ``backbone = "hf"`` and ``hf_config``
    set; ``lm`` an already loaded HF model of that architecture (the converter passes it), else a
    randomly initialised one is built (its weights are then loaded from a checkpoint).
    """

    def __init__(self, cfg: ModelConfig, lm: nn.Module | None = None) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise HDLMError("config model.vocab_size = 0: set it (or take it from the tokenizer) before building")
        if lm is None:
            if not cfg.hf_config:
                raise HDLMError("config model.backbone = hf needs model.hf_config (run `hdlm convert`)")
            lm = build_hf_lm(cfg.hf_config)
        register_attention()
        lm.config._attn_implementation = ATTENTION
        self.cfg = cfg
        self.lm = lm
        self.n_real = cfg.vocab_size
        self.mask_id, self.bos_id = cfg.vocab_size, cfg.vocab_size + 1
        conf = lm.config
        decoder = _part(lm, "model", "found no .model")
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            _part(decoder, name, f"{type(decoder).__name__} lacks it")
        _part(lm, "lm_head", "found no lm_head")
        rows = min(self.decoder.embed_tokens.num_embeddings, self.head.out_features)
        if self.n_real > rows:
            raise HDLMError(f"tokenizer has N = {self.n_real} tokens but the HF model has only {rows} "
                            f"embedding/head rows: use the model's own tokenizer")
        if cfg.length > (getattr(conf, "max_position_embeddings", None) or cfg.length):
            raise HDLMError(f"config model.length = {cfg.length} exceeds the HF model's "
                            f"max_position_embeddings = {conf.max_position_embeddings}")
        window = getattr(conf, "sliding_window", None)
        types = list(getattr(conf, "layer_types", None) or [])
        if window and "sliding_attention" in types and cfg.length >= window:
            raise HDLMError(f"config model.length = {cfg.length}: must be < the HF model's sliding window "
                            f"{window} (hdlm's masks do not add the sliding-window constraint)")
        self.layer_types = types or [None] * len(self.decoder.layers)
        self.per_type_rotary = hasattr(self.decoder.rotary_emb, "layer_types")
        self.n_layers = len(self.decoder.layers)
        self.n_kv_heads = conf.num_key_value_heads or conf.num_attention_heads
        self.head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        self.softcap = getattr(conf, "final_logit_softcapping", None)
        self._head = LinearHead(self._softcap if self.softcap is not None else None)
        hidden = conf.hidden_size
        self.special_embedding = nn.Parameter(torch.zeros(2, hidden))  # input vectors of MASK and BOS
        self.noise_embedding = NoiseEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.noise_proj = nn.Linear(cfg.cond_dim, hidden) if cfg.time_conditioning else None
        if self.noise_proj is not None:  # zero: the converted model starts as the AR model
            nn.init.zeros_(self.noise_proj.weight)
            nn.init.zeros_(self.noise_proj.bias)

    # ---- conversion and bookkeeping

    @torch.no_grad()
    def init_special_rows(self, bos_token_id: int | None) -> None:
        """BOS ← the model's own document-start token; MASK ← the mean input vector of the N real tokens."""
        ref, embed = self.special_embedding, self.decoder.embed_tokens
        real = embed(torch.arange(self.n_real, device=ref.device))
        self.special_embedding[0] = real.mean(0).to(ref.dtype)
        if bos_token_id is None:
            self.special_embedding[1] = self.special_embedding[0]
            return
        if not 0 <= bos_token_id < embed.num_embeddings:
            raise HDLMError(f"document-start token id {bos_token_id} is outside the HF model's "
                            f"{embed.num_embeddings} embedding rows")
        self.special_embedding[1] = embed(torch.tensor(bos_token_id, device=ref.device)).to(ref.dtype)

    @property
    def decoder(self) -> nn.Module:
        """The HF decoder (embedding, layers, final norm, rotary tables): ``lm.model``."""
        return self.lm.model

    @property
    def head(self) -> nn.Linear:
        """The HF vocabulary head ``lm.lm_head`` (often tied to the embedding)."""
        return self.lm.lm_head

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (FSDP shards one per layer, as for the DiT's blocks)."""
        return self.decoder.layers

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.decoder.embed_tokens.weight.numel()
            if self.head.weight is not self.decoder.embed_tokens.weight:
                total -= self.head.weight.numel()
        return total

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device: Any = None) -> KVCache:
        """An empty :class:`KVCache` sized for this model (key/value heads of grouped-query attention)."""
        ref = self.special_embedding
        return KVCache(self.n_layers, batch, max_len, self.n_kv_heads, self.head_dim,
                       dtype=dtype or ref.dtype, device=device if device is not None else ref.device)

    # ---- forward

    def embed(self, tokens: Tensor, keep: Tensor | None) -> Tensor:
        """Input vectors: the HF embedding for real tokens, the special rows for MASK and BOS, then Eq. (12)."""
        x = self.decoder.embed_tokens(tokens.clamp(max=self.n_real - 1))
        special = self.special_embedding.to(x.dtype)
        extra = special[(tokens - self.n_real).clamp(0, 1)]
        x = torch.where((tokens >= self.n_real).unsqueeze(-1), extra, x)
        if keep is not None and self.cfg.weighted_embedding:
            w = keep.to(x.dtype).unsqueeze(-1)
            x = w * x + (1.0 - w) * special[0]
        return x

    def _rotary(self, x: Tensor, position_ids: Tensor) -> dict:
        rot = self.decoder.rotary_emb
        if self.per_type_rotary:
            return {t: rot(x, position_ids, t) for t in set(self.layer_types)}
        shared = rot(x, position_ids)
        return {t: shared for t in set(self.layer_types)}

    def forward(self, tokens: Tensor, sigma: Tensor | None, positions: Tensor | None = None, mask: Any = None,
                keep: Tensor | None = None, out_index: Tensor | None = None, cache: KVCache | None = None,
                commit: int = 0, head_loss: Any = None) -> Any:
        """Raw outputs (B, K, N): the HF model's logits over the N real tokens (see HDLMTransformer.forward;
        ``head_loss`` as there)."""
        B, L = tokens.shape
        cached = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(B, L, commit)
        elif commit:
            raise ValueError("commit > 0 needs a KV cache")
        if isinstance(mask, Tensor) and (mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (L, cached + L)):
            raise ValueError(f"attention mask must be bool of shape (..., {L}, {cached + L}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if positions is None:
            positions = torch.arange(cached, cached + L, device=tokens.device)
        x = self.embed(tokens, keep)
        if self.noise_embedding is not None:
            if sigma is None:
                raise ValueError("sigma is required when the model is time-conditioned")
            x = x + self.noise_proj(F.silu(self.noise_embedding(sigma))).to(x.dtype)
        position_ids = positions.unsqueeze(0) if positions.dim() == 1 else positions
        rotary = self._rotary(x, position_ids)
        view = _CacheView(cache) if cache is not None else None
        for layer, kind in zip(self.decoder.layers, self.layer_types):
            x = layer(x, attention_mask=mask, position_embeddings=rotary[kind], position_ids=position_ids,
                      cache=view, hdlm_cells=True)
        if cache is not None:
            cache.advance(commit)
        if out_index is not None:  # the head is most of the compute: only where needed (DESIGN §9)
            x = _select(x, out_index)
        x = self.decoder.norm(x)
        bias = self.head.bias[: self.n_real] if self.head.bias is not None else None
        params = (self.head.weight[: self.n_real],) + ((bias,) if bias is not None else ())
        if head_loss is not None:
            return head_loss(x, self._head, params)
        return self._logits(x, *params)

    def _logits(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The head: logits over the N real tokens, soft-capped like the HF model when it is."""
        return self._head(x, weight, bias)

    def _softcap(self, raw: Tensor) -> Tensor:
        return torch.tanh(raw / self.softcap) * self.softcap
