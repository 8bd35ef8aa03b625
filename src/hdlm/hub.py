"""Hub-native checkpoints: one loader for every folder hdlm understands, local or on the Hugging Face Hub.

    pre = load_pretrained("hdlm-group/hdlm-base-gamma-0.01")   # an official checkpoint (hdlm.official)
    pre = load_pretrained("runs/ptb")                           # a run folder (its latest checkpoint)
    save_pretrained(pre.model, pre.config, pre.tokenizer, "export/ptb")
    push_to_hub("export/ptb", "me/hdlm-ptb")

A *source* is a local folder (a pretrained export, a training checkpoint, a run folder, or a
downloaded official repository) or a Hub repository id ``org/name``. Hub ids are resolved with
``huggingface_hub``: its cache is used, ``HF_HUB_OFFLINE=1`` and ``local_files_only`` are
honoured, and only the files a loader reads are fetched (``model.safetensors`` in preference to
``pytorch_model.bin``). An hdlm folder holds ``config.json`` (``{"hdlm_format", "hdlm_version",
"config", "tokenizer"}``), ``config.yaml`` (the same config; it wins when both exist), the weights
and the whole tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, which
``transformers.AutoTokenizer`` loads), so that the folder alone samples on any machine.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__
from .checkpoint import (EMA_FILE, HUB_CONFIG_FILE, HUB_FORMAT, META_FILE, MODEL_FILE, TOKENIZER_FILE,
                         Checkpoint, _is_identity, _load_safetensors, _read_meta, _read_tokenizer_json,
                         _verified, _write_file, load_checkpoint, load_weights, read_config, read_tokenizer_identity,
                         resolve_checkpoint, sha256_file)
from .config import Config
from .errors import HDLMError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
#: the files a loader may read from a Hub repository, by folder kind (the first list is required)
_HDLM_FILES = ((MODEL_FILE,), ("config.yaml", META_FILE, EMA_FILE, *TOKENIZER_FILES))
_OFFICIAL_FILES = ((), TOKENIZER_FILES)


@dataclass
class Pretrained:
    """A loaded checkpoint: the model (eval mode), its config, its tokenizer (None when not asked
    for), the folder it came from, the weights file read and its format ("hdlm" or "official")."""

    model: nn.Module
    config: Config
    tokenizer: Any
    path: Path
    weights: Path
    format: str


# --------------------------------------------------------------------------------------------
# the files of an hdlm folder


def hub_config(cfg: Config, identity: dict | None) -> dict:
    """The ``config.json`` of an hdlm folder: the whole config, for the Hub and for readers without YAML."""
    return {"hdlm_format": HUB_FORMAT, "hdlm_version": __version__, "config": cfg.to_dict(), "tokenizer": identity}


def read_hub_config(path: Path) -> dict | None:
    """The parsed ``config.json`` of a folder, or None when it has none."""
    f = Path(path) / HUB_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HDLMError(f"checkpoint file {f} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise HDLMError(f"checkpoint file {f}: expected a JSON object")
    return d


def write_tokenizer(folder: Path, tokenizer: Any, cfg: Config) -> dict | None:
    """Write a folder's tokenizer files; returns the tokenizer identity.

    A :class:`~hdlm.tokenizers.Tokenizer` is written whole (:meth:`~hdlm.tokenizers.Tokenizer.save`);
    a bare identity dict (older callers) as an identity-only ``tokenizer.json``; None writes nothing.
    """
    if tokenizer is None:
        return None
    if isinstance(tokenizer, dict):
        _write_file(folder / TOKENIZER_FILE, lambda f: json.dump(tokenizer, f, indent=1, sort_keys=True),
                    binary=False)
        return tokenizer
    for path in tokenizer.save(folder, model_max_length=cfg.model.length):
        fd = os.open(path, os.O_RDONLY)  # fsynced like every other file before the folder is published
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return tokenizer.identity()


def recorded_identity(path: Path) -> dict | None:
    """The tokenizer identity that meta.json or config.json records, if any."""
    for name in (META_FILE, HUB_CONFIG_FILE):
        f = Path(path) / name
        if f.is_file():
            try:
                recorded = json.loads(f.read_text(encoding="utf-8")).get("tokenizer")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                recorded = None
            if isinstance(recorded, dict) and "vocab_hash" in recorded:
                return recorded
    return None


def load_folder_tokenizer(path: Path, cfg: Config | None):
    """The tokenizer of an hdlm folder, checked against its recorded identity.

    A whole ``tokenizer.json`` is loaded from the folder itself (nothing else needed); an
    identity-only one (older checkpoints) means "load ``cfg.data.tokenizer`` by name and check it".
    """
    from .tokenizers import from_path, load_tokenizer

    if _is_identity(_read_tokenizer_json(path)):
        if cfg is None:
            raise HDLMError(f"checkpoint {path}: {TOKENIZER_FILE} holds only an identity; the config names the tokenizer")
        tok = load_tokenizer(cfg.data.tokenizer)
        tok.check_matches(read_tokenizer_identity(path))
        return tok
    tok = from_path(path)
    identity = recorded_identity(path)
    if identity is not None:
        tok.check_matches(identity)
        tok.name = identity.get("name", tok.name)
    return tok


def load_model(path: Path, device: Any = "cpu") -> tuple[nn.Module, Config, Path]:
    """The model of an hdlm folder (EMA weights when present) in eval mode, its config and weights file.

    ``meta.json`` is optional here (a folder assembled on the Hub may lack it); when present,
    the weights are checked against its sha256.
    """
    from .model import HDLMTransformer

    meta = _read_meta(path) if (path / META_FILE).exists() else {}
    cfg = read_config(path)
    name = EMA_FILE if (EMA_FILE in meta.get("sha256", {}) or (path / EMA_FILE).exists()) else MODEL_FILE
    state = _load_safetensors(_verified(path, name, meta), "cpu")
    model = HDLMTransformer(cfg.model)
    load_weights(model, state, path / name)
    return model.to(device).eval(), cfg, path / name


# --------------------------------------------------------------------------------------------
# sources: local folders and Hub ids


def is_repo_id(source: str | Path) -> bool:
    """``org/name`` that is not an existing local path."""
    text = str(source)
    return not Path(text).expanduser().exists() and bool(_REPO_ID.match(text))


def _hub_error(repo_id: str, filename: str, e: Exception) -> HDLMError:
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(e, LocalEntryNotFoundError):
        return HDLMError(f"checkpoint '{repo_id}' is no local folder, and as a Hub id its {filename} is not in the "
                         f"Hugging Face cache while the Hub is out of reach (HF_HUB_OFFLINE or local_files_only): "
                         f"download it once with network access, or pass a local folder")
    if isinstance(e, RepositoryNotFoundError):
        return HDLMError(f"checkpoint '{repo_id}': no such Hugging Face repository (nor a local folder)")
    if isinstance(e, RevisionNotFoundError):
        return HDLMError(f"checkpoint '{repo_id}': revision not found")
    if isinstance(e, EntryNotFoundError):
        return HDLMError(f"checkpoint '{repo_id}': the repository has no {filename}")
    return HDLMError(f"checkpoint '{repo_id}': could not fetch {filename} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _fetch(repo_id: str, filename: str, required: bool, hub: dict) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, **hub))
    except EntryNotFoundError as e:  # also LocalEntryNotFoundError: absent from the cache when offline
        if required:
            raise _hub_error(repo_id, filename, e) from None
        return None
    except Exception as e:  # network and HTTP errors: one line, never a traceback
        raise _hub_error(repo_id, filename, e) from None


def download(repo_id: str, *, revision: str | None = None, local_files_only: bool | None = None,
             cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of a Hub repository, with the files its loader reads."""
    from .official import is_official_config

    hub = {"revision": revision, "local_files_only": bool(local_files_only), "cache_dir": cache_dir}
    config = _fetch(repo_id, HUB_CONFIG_FILE, True, hub)
    official = is_official_config(read_hub_config(config.parent))
    required, optional = _OFFICIAL_FILES if official else _HDLM_FILES
    for name in required:
        _fetch(repo_id, name, True, hub)
    for name in optional:
        _fetch(repo_id, name, False, hub)
    if official and _fetch(repo_id, MODEL_FILE, False, hub) is None:  # safetensors preferred, else the pickle
        if _fetch(repo_id, "pytorch_model.bin", False, hub) is None:
            raise HDLMError(f"checkpoint '{repo_id}': the repository has neither model.safetensors nor pytorch_model.bin")
    return config.parent


def resolve(source: str | Path, **hub) -> Path:
    """A local checkpoint folder for ``source`` (run folders resolve to their latest checkpoint)."""
    if is_repo_id(source):
        return download(str(source), **hub)
    return resolve_checkpoint(Path(source).expanduser())


# --------------------------------------------------------------------------------------------
# loading and saving


def load_pretrained(source: str | Path, device: Any = "cpu", *, tokenizer: bool = True, revision: str | None = None,
                    local_files_only: bool | None = None, cache_dir: str | Path | None = None) -> Pretrained:
    """Load an hdlm or official checkpoint from a folder or a Hub id (docs/checkpoints.md).

    The official format is recognised by its ``config.json`` and converted exactly
    (:mod:`hdlm.official`); anything it cannot represent is one :class:`HDLMError` line.
    ``tokenizer=False`` skips the tokenizer (the model alone).
    """
    from .official import is_official_config, load_official, official_tokenizer

    path = resolve(source, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    hub = read_hub_config(path)
    if hub is not None and is_official_config(hub):
        model, cfg, weights = load_official(path, device)
        tok = official_tokenizer(path, cfg) if tokenizer else None
        return Pretrained(model, cfg, tok, path, weights, "official")
    if hub is not None and "hdlm_format" not in hub and not (path / "config.yaml").exists():
        raise HDLMError(f"checkpoint {path}: config.json is neither an hdlm folder's nor an official hdlm "
                        f"checkpoint's (model_type {hub.get('model_type')!r})")
    model, cfg, weights = load_model(path, device)
    tok = load_folder_tokenizer(path, cfg) if tokenizer else None
    if tok is not None and tok.vocab_size != cfg.model.vocab_size:
        raise HDLMError(f"tokenizer mismatch: {path} has a tokenizer of N = {tok.vocab_size} tokens but the model "
                        f"predicts {cfg.model.vocab_size}")
    return Pretrained(model, cfg, tok, path, weights, "hdlm")


def weights_sha256(pre: Pretrained) -> str:
    """The sha256 of the weights a Pretrained was loaded from (meta.json's when it records it)."""
    meta_file = pre.path / META_FILE
    if meta_file.is_file():
        recorded = json.loads(meta_file.read_text()).get("sha256", {}).get(pre.weights.name)
        if recorded:
            return recorded
    return sha256_file(pre.weights)


def init_checkpoint(source: str | Path) -> Checkpoint:
    """Stage 2's starting point (``train.init_from``): an hdlm training checkpoint (with its EMA
    weights), or any checkpoint :func:`load_pretrained` reads, official ones included."""
    if not is_repo_id(source):
        path = resolve_checkpoint(Path(source).expanduser())
        if (path / META_FILE).exists() and (path / "config.yaml").exists():
            return load_checkpoint(path)
    pre = load_pretrained(source)
    return Checkpoint(path=pre.path, step=0, config=pre.config, tokenizer=pre.tokenizer.identity(),
                      model_state={k: v.detach() for k, v in pre.model.state_dict().items()})


def read_pretrained_config(source: str | Path) -> Config:
    """The config of any checkpoint :func:`load_pretrained` reads (without building the model)."""
    from .official import config_from_official, is_official_config

    path = resolve(source)
    hub = read_hub_config(path)
    if hub is not None and is_official_config(hub):
        return config_from_official(hub, source=str(path / HUB_CONFIG_FILE))
    return read_config(path)


MODEL_CARD = """---
library_name: hdlm
tags:
- diffusion-language-model
- hdlm
---

# {name}

A hybrid diffusion language model saved by hdlm {version}: {kind} process, {configuration},
{n_layers} layers x {hidden}, d = {length}, N = {vocab_size}. The folder holds everything needed
to sample (config.json, model.safetensors, the tokenizer).

```python
from hdlm.sampling import HDLMPipeline
pipe = HDLMPipeline.from_pretrained("{name}")
print(pipe.generate(1))
```
"""


def save_pretrained(model: nn.Module, cfg: Config, tokenizer: Any, out_dir: str | Path, *,
                    ema: dict | None = None, card: bool = True) -> Path:
    """Write a Hub-native hdlm folder (atomically): config.json + config.yaml + model.safetensors +
    the whole tokenizer + meta.json (+ a README.md model card). The EMA weights are saved when given."""
    from .checkpoint import save_pretrained as write_folder

    out = write_folder(model, cfg, tokenizer, out_dir, ema=ema)
    if card:
        m = cfg.model
        text = MODEL_CARD.format(name=out.name, version=__version__, kind=cfg.process.kind, configuration=m.configuration.upper(),
                                 n_layers=m.n_layers, hidden=m.hidden, length=m.length, vocab_size=m.vocab_size)
        (out / "README.md").write_text(text, encoding="utf-8")
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload hdlm checkpoint") -> str:
    """Upload a folder written by :func:`save_pretrained` to the Hub (creates the repo); returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / HUB_CONFIG_FILE).is_file():
        raise HDLMError(f"push_to_hub: {folder} has no {HUB_CONFIG_FILE}; write it with save_pretrained first")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
    except Exception as e:
        raise HDLMError(f"push_to_hub '{repo_id}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return str(url)


def push_pretrained(model: nn.Module, cfg: Config, tokenizer: Any, repo_id: str, **kwargs) -> str:
    """:func:`save_pretrained` into a temporary folder, then :func:`push_to_hub`."""
    with tempfile.TemporaryDirectory() as tmp:
        return push_to_hub(save_pretrained(model, cfg, tokenizer, Path(tmp) / repo_id.split("/")[-1]), repo_id,
                           **kwargs)


__all__ = ["Pretrained", "download", "hub_config", "init_checkpoint", "is_repo_id", "load_folder_tokenizer",
           "load_model", "load_pretrained", "push_pretrained", "push_to_hub", "read_hub_config",
           "read_pretrained_config", "recorded_identity", "resolve", "save_pretrained", "weights_sha256",
           "write_tokenizer"]
