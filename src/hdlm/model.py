"""The DiT backbone (paper §2.3, App. B, Fig. 5; DESIGN.md §4, §5, §9).

A diffusion transformer (Peebles & Xie, as used by SEDD and MDLM): token embedding with the
Eq. (12) keep weight, rotary positions, ``n_layers`` pre-LN blocks with adaLN-Zero modulation
conditioned *per cell* on the total noise σ̄ of the position that cell predicts, a final
adaLN + vocabulary head over the N real tokens. ALIGNED and SHIFTED (Fig. 5) are the same
network: the caller lays out cells (:mod:`hdlm.masks`) and passes rotary positions p + shift.

Attention runs over query cells × (cached cells ⁀ query cells), with a boolean mask through
``scaled_dot_product_attention`` (CPU and any device) or a FlexAttention ``BlockMask`` (CUDA).
A :class:`KVCache` keeps the keys/values of settled cells in preallocated buffers, so each
generation step only runs the active window (App. B.4).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import masks as masks_lib
from .conditioning import Conditioning
from .config import ModelConfig
from .errors import HDLMError
from .sparse_attention import BlockSparseMask, block_sparse_attention

#: ``forward(head_loss=...)``: features (B, K, h), head(features, *params) -> raw, params -> result
HeadLossFn = Callable[[Tensor, Callable[..., Tensor], tuple], Any]

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal width of the σ̄ embedding (DiT / SEDD)
ROTARY_BASE = 10000.0


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys/values of the settled (clean) cells, one preallocated buffer per layer (App. B.4).

    ``length`` cells are cached. In a forward with the cache, every layer's new keys/values are
    written at [length, length + L) and attention uses the buffer's first length + L entries
    (no ``torch.cat``); afterwards ``length`` advances by the forward's ``commit``, keeping the
    first ``commit`` new cells. Meant for inference (``torch.no_grad``). Inside ``with
    cache.subset(rows)`` a forward runs over those sequences only and reads the cache without
    writing it (it may commit nothing): the generation driver leaves out sequences that need no output.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.start = 0  # index of the first cached cell (cells before it were dropped)
        self.rows: Tensor | None = None  # the sequences of a read-only forward (see subset)

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self) -> None:
        """Forget every cached cell (the buffers are reused)."""
        self.length = 0
        self.start = 0

    def drop(self, n: int) -> None:
        """Forget the ``n`` oldest cached cells (a sliding context window): the others move to the front."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KVCache.drop({n}): must be in [0, length = {self.length}]")
        if n:
            for buf in (*self.k, *self.v):
                buf[:, :, : self.length - n] = buf[:, :, n: self.length].clone()
            self.length -= n
            self.start += n

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` cached cells."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KVCache.truncate({n}): must be in [0, length = {self.length}]")
        self.length = n

    @contextlib.contextmanager
    def subset(self, rows: Tensor | None):
        """Forwards inside run over the sequences ``rows`` (B,) bool only, reading the cache (None: all)."""
        self.rows = None if rows is None else rows.nonzero(as_tuple=True)[0]
        try:
            yield self
        finally:
            self.rows = None

    def check_room(self, batch: int, new: int, commit: int) -> None:
        expected = self.batch if self.rows is None else len(self.rows)
        if batch != expected:
            raise ValueError(f"KVCache: batch {batch} does not match the cache's batch {expected}")
        if self.rows is not None and commit:
            raise ValueError("KVCache: a forward over a subset of the sequences cannot commit cells")
        if not 0 <= commit <= new:
            raise ValueError(f"KVCache: commit = {commit} must be in [0, {new}] (the number of new cells)")
        if self.length + new > self.max_len:
            raise HDLMError(f"KV cache too short: {self.length} cached + {new} new cells > max_len = {self.max_len}")

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new k, v (B, H, L, D) after the cached ones; return cached ⁀ new."""
        if self.rows is not None:  # read-only: cached (those sequences) ⁀ new
            return (torch.cat([self.k[layer][self.rows, :, : self.length], k], dim=2),
                    torch.cat([self.v[layer][self.rows, :, : self.length], v], dim=2))
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, commit: int) -> None:
        self.length += commit


# --------------------------------------------------------------------------------------------
# building blocks


def weighted_embedding(weight: Tensor, tokens: Tensor, keep: Tensor | None, mask_id: int) -> Tensor:
    """Eq. (12): e^{-gamma sigma_bar} f(x) + (1 - e^{-gamma sigma_bar}) f(MASK).

    ``weight`` is the (V, h) embedding table, ``tokens`` (B, L) ids, ``keep`` (B, L) the
    per-token keep weight from :meth:`Process.embed_keep` (None: plain embedding).
    """
    emb = weight[tokens]
    if keep is None:
        return emb
    keep = keep.to(emb.dtype).unsqueeze(-1)
    return keep * emb + (1.0 - keep) * weight[mask_id]



def timestep_embedding(sigma: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of σ̄ (…,) -> (…, dim), as DiT/SEDD embed the timestep."""
    work = torch.float64 if sigma.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work, device=sigma.device) / half)
    args = sigma.to(work)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_inv_freq(head_dim: int) -> Tensor:
    """The float32 frequencies 1 / base^(2k / head_dim) that the official checkpoints store as a buffer."""
    return 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rotary_cos_sin(positions: Tensor, head_dim: int, dtype: torch.dtype,
                   inv_freq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles (Su et al.) for positions (L,) or (B, L) -> (B|1, 1, L, head_dim).

    Angles are computed in float32 at least (a bf16 angle at position 1000 is far off). With a
    stored ``inv_freq`` (official checkpoints) they are computed in that buffer's dtype, as there.
    """
    if inv_freq is None:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=work, device=positions.device) / head_dim)
    else:
        work = inv_freq.dtype if inv_freq.dtype in (torch.float32, torch.float64) else torch.float32
        inv_freq = inv_freq.to(work)
    angles = positions.to(work)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    angles = angles[None, None] if positions.dim() == 1 else angles[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head's features (GPT-NeoX / SEDD layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Any, explicit: bool = False) -> Tensor:
    """Attention with a boolean mask (SDPA), a block-sparse plan of one (:mod:`hdlm.sparse_attention`),
    a FlexAttention BlockMask, or no mask (dense).

    ``explicit`` (official checkpoints, boolean or no mask): the official computation written
    out, bitwise: scores q·kᵀ/√d, −inf where masked, a query row allowed no key scores 0
    everywhere (so it attends uniformly to all keys), softmax, times v. hdlm's own layouts never
    produce such rows (every cell sees itself).
    """
    if isinstance(mask, BlockSparseMask):  # the efficient training layout on CPU (hdlm.sparse_attention)
        if not explicit:
            return block_sparse_attention(q, k, v, mask)
        mask = mask.dense
    if explicit and (mask is None or isinstance(mask, Tensor)):
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(torch.isinf(scores).all(dim=-1, keepdim=True), torch.zeros_like(scores), scores)
        return torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), v)
    if mask is None or isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return masks_lib.flex_attention(q, k, v, mask)


class FP32LayerNorm(nn.Module):
    """Bias-free LayerNorm (eps 1e-5) computed in float32 whatever the input dtype, then times
    its weight: the official checkpoints' norm (a float64 model keeps float32 norm precision)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],)) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    return FP32LayerNorm(cfg.hidden) if cfg.norm_fp32 else nn.LayerNorm(cfg.hidden, bias=False)


class NoiseEmbedding(nn.Module):
    """σ̄ per cell -> conditioning vector: sinusoidal features + MLP (DiT's timestep embedder)."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(sigma).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero (shift/scale/gate per token), or plain pre-LN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.n_heads, self.head_dim = cfg.n_heads, h // cfg.n_heads
        self.norm1 = make_norm(cfg)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.norm2 = make_norm(cfg)
        self.mlp = nn.Sequential(nn.Linear(h, cfg.mlp_ratio * h), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * h, h))
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * h) if cfg.time_conditioning else None
        self.explicit_attention = cfg.attention == "explicit"

    def attention(self, x: Tensor, rotary: tuple[Tensor, Tensor], mask: Any,
                  cache: KVCache | None, layer: int) -> Tensor:
        B, L, h = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = attend(q, k, v, mask, self.explicit_attention)
        return self.proj(out.transpose(1, 2).reshape(B, L, h))

    def forward(self, x: Tensor, c: Conditioning | None, rotary: tuple[Tensor, Tensor], mask: Any,
                cache: KVCache | None, layer: int) -> Tensor:
        if self.adaLN is None:
            x = x + self.dropout(self.attention(self.norm1(x), rotary, mask, cache, layer))
            return x + self.dropout(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = c.rows(self.adaLN).chunk(6, dim=-1)
        x = x + gate1 * self.dropout(self.attention(modulate(self.norm1(x), shift1, scale1), rotary, mask,
                                                    cache, layer))
        return x + gate2 * self.dropout(self.mlp(modulate(self.norm2(x), shift2, scale2)))


# --------------------------------------------------------------------------------------------
# the model


def _select(x: Tensor | None, index: Tensor) -> Tensor | None:
    """x (B, L, …) at cells ``index`` (K,) or (B, K) -> (B, K, …)."""
    if x is None:
        return None
    if index.dim() == 1:
        return x[:, index]
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class HDLMTransformer(nn.Module):
    """DiT over cells (paper §2.3, App. B): ``forward(...) -> raw (B, K, N)`` over the N real tokens.

    Vocabulary: N real tokens, MASK = N, BOS = N + 1 (V = N + 2 embedding rows). The head is
    padded to a multiple of ``cfg.pad_vocab_to`` rows (speed, DESIGN.md §9) and sliced back to N;
    when tied, the embedding table itself is padded to that multiple and reused as the head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise HDLMError("config model.vocab_size = 0: set it (or take it from the tokenizer) "
                            "before building the model")
        self.cfg = cfg
        self.n_real = cfg.vocab_size
        self.mask_id, self.bos_id = cfg.vocab_size, cfg.vocab_size + 1
        self.n_layers, self.n_heads, self.head_dim = cfg.n_layers, cfg.n_heads, cfg.hidden // cfg.n_heads
        n_head_rows = round_up(self.n_real, cfg.pad_vocab_to)
        n_embed_rows = round_up(self.n_real + 2, cfg.pad_vocab_to) if cfg.tie_embeddings else self.n_real + 2
        if cfg.vocab_layout == "official":  # N + 1 rows each, MASK last, no BOS; the head scores MASK too
            n_head_rows = n_embed_rows = self.n_real + 1
        self.n_columns = self.n_real + 1 if cfg.vocab_layout == "official" else self.n_real

        # build on the meta device and initialise once, in place (PyTorch's default init of
        # 170M parameters would be thrown away by reset_parameters anyway)
        device = torch.get_default_device()
        with torch.device("meta"):
            self.token_embedding = nn.Parameter(torch.empty(n_embed_rows, cfg.hidden))
            self.noise_embedding = NoiseEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
            self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
            self.norm_final = make_norm(cfg)
            final_adaln = cfg.time_conditioning and cfg.final_adaln
            self.adaLN_final = nn.Linear(cfg.cond_dim, 2 * cfg.hidden) if final_adaln else None
            if cfg.tie_embeddings:
                self.head = None
                self.head_bias = nn.Parameter(torch.zeros(n_embed_rows))
            else:
                self.head = nn.Linear(cfg.hidden, n_head_rows)
                self.head_bias = None
        self.to_empty(device=device)
        if cfg.rotary_buffer:  # official checkpoints store the rotary frequencies (float32)
            self.register_buffer("rotary_inv_freq", rotary_inv_freq(self.head_dim).to(device))
        else:
            self.rotary_inv_freq = None
        self.reset_parameters()

    # ---- initialisation and bookkeeping

    def reset_parameters(self) -> None:
        """DiT init: normal(0, 0.02) weights, zero biases; adaLN modulation and output head zero
        (adaLN-Zero). A tied head shares the (normal) embedding table; only its bias starts at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, FP32LayerNorm)):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.token_embedding, std=0.02)
        zero = [block.adaLN for block in self.blocks] + [self.adaLN_final, self.head]
        for module in zero:
            if module is not None:
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        if self.head_bias is not None:
            nn.init.zeros_(self.head_bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (shared ones once); ``non_embedding`` leaves out the token
        embedding table and the output head's weight."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.numel()
            if self.head is not None:
                total -= self.head.weight.numel()
        return total

    # ---- Hub-native folders (hdlm.hub_files; hdlm.hub adds the tokenizer)

    @classmethod
    def from_pretrained(cls, source: Any, device: Any = "cpu", **hub: Any) -> "HDLMTransformer":
        """The model of any checkpoint :func:`hdlm.hub.load_pretrained` reads (a folder, a Hub id,
        an official checkpoint), in eval mode; ``hub``: revision, local_files_only, cache_dir."""
        from .hub_files import read_pretrained

        return cls.from_files(read_pretrained(source, **hub), device)

    @classmethod
    def from_files(cls, files: Any, device: Any = "cpu") -> "HDLMTransformer":
        """The model of a :class:`hdlm.hub_files.PretrainedFiles` (its config and weights), in eval mode;
        the weights must fit exactly (one HDLMError line naming the first misfit otherwise). Any
        backbone: :func:`hdlm.backbone.model_from_files`."""
        from .checkpoint import load_weights

        model = cls(files.config.model)
        load_weights(model, files.state, files.weights)
        return model.to(device).eval()

    def save_pretrained(self, out_dir: Any, config: Any = None, tokenizer: Any = None) -> Any:
        """Write a Hub-native folder (:func:`hdlm.hub_files.save_pretrained`): ``config`` is the whole
        :class:`~hdlm.config.Config` (default: this model section, defaults elsewhere) and
        ``tokenizer`` the :class:`~hdlm.tokenizers.Tokenizer` to save with it (None: none)."""
        import dataclasses

        from .config import Config
        from .hub_files import save_pretrained

        if config is None:
            config = Config.from_dict({"model": dataclasses.asdict(self.cfg)})
        return save_pretrained(self, config, tokenizer, out_dir)

    def push_to_hub(self, repo_id: str, config: Any = None, tokenizer: Any = None, **kwargs: Any) -> str:
        """:meth:`save_pretrained` into a temporary folder and upload it (``token``, ``private``, ...)."""
        import tempfile
        from pathlib import Path

        from .hub_files import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], config, tokenizer)
            return push_to_hub(folder, repo_id, **kwargs)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device: Any = None) -> KVCache:
        """An empty :class:`KVCache` sized for this model."""
        ref = self.token_embedding
        return KVCache(self.n_layers, batch, max_len, self.n_heads, self.head_dim,
                       dtype=dtype or ref.dtype, device=device if device is not None else ref.device)

    # ---- forward

    def _check_mask(self, mask: Any, L: int, n_keys: int) -> None:
        if mask is None:
            return
        if isinstance(mask, Tensor) and mask.dtype != torch.bool:
            raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}")
        if tuple(mask.shape[-2:]) != (L, n_keys):  # a bool tensor or a FlexAttention BlockMask
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}; expected (..., {L}, {n_keys}) "
                             f"= (new cells, cached + new cells)")

    def forward(self, tokens: Tensor, sigma: Tensor | None, positions: Tensor | None = None, mask: Any = None,
                keep: Tensor | None = None, out_index: Tensor | None = None, cache: KVCache | None = None,
                commit: int = 0, all_columns: bool = False, head_loss: HeadLossFn | None = None) -> Any:
        """Raw outputs (B, K, N) at the cells ``out_index`` (K,)/(B, K), or at all L cells.

        tokens (B, L) ids in [0, N+1]; sigma (B, L) σ̄ of the position each cell predicts (ignored
        without time conditioning; may be None then); positions (L,)/(B, L) rotary positions
        (= p + shift; default cache.length + arange(L)); mask bool (L, Lcache+L) or
        (B, 1, L, Lcache+L), a FlexAttention BlockMask, or None (dense); keep (B, L) Eq. (12) keep
        weights (used when cfg.weighted_embedding). With ``cache``, keys/values are
        cached ⁀ new and the first ``commit`` new cells are appended to the cache. ``all_columns``:
        also return the MASK column of a head that has one (``vocab_layout = official``).
        ``head_loss(features, head, params)``: instead of the raw outputs, return what it returns
        for the head's input features (B, K, h) and ``head(features, *params) -> raw`` (the
        objective's fused chunked head + loss, :mod:`hdlm.head_loss`; through ``forward`` so
        that DDP / FSDP wrappers see the call).
        """
        B, L = tokens.shape
        cached = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(B, L, commit)
        elif commit:
            raise ValueError("commit > 0 needs a KV cache")
        self._check_mask(mask, L, cached + L)
        if positions is None:
            positions = torch.arange(cached, cached + L, device=tokens.device)

        x = weighted_embedding(self.token_embedding, tokens, keep if self.cfg.weighted_embedding else None,
                               mask_id=self.mask_id)
        c = None
        if self.noise_embedding is not None:
            if sigma is None:
                raise ValueError("sigma is required when the model is time-conditioned")
            c = Conditioning.of(lambda levels: F.silu(self.noise_embedding(levels)), sigma)
        rotary = rotary_cos_sin(positions, self.head_dim, x.dtype, self.rotary_inv_freq)
        for layer, block in enumerate(self.blocks):
            x = block(x, c, rotary, mask, cache, layer)
        if cache is not None:
            cache.advance(commit)

        if out_index is not None:  # the head is most of the compute: run it only where needed (DESIGN §9)
            x, c = _select(x, out_index), (c.select(out_index) if c is not None else None)
        x = self.norm_final(x)
        if self.adaLN_final is not None:
            shift, scale = c.rows(self.adaLN_final).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        n = self.n_columns if all_columns else self.n_real
        if head_loss is not None:
            return head_loss(x, F.linear, self.head_params(n))
        if self.head is not None:
            raw = self.head(x)
        else:
            raw = F.linear(x, self.token_embedding, self.head_bias)
        return raw[..., :n]

    def head_params(self, n: int) -> tuple[Tensor, Tensor]:
        """The head's weight (n, h) and bias (n,) over its first n columns (views of the parameters)."""
        if self.head is not None:
            return self.head.weight[:n], self.head.bias[:n]
        return self.token_embedding[:n], self.head_bias[:n]
