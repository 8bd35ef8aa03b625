"""Checkpoint sources and the files of Hub-native folders, read and written without building a model.

    files = read_pretrained("hdlm-group/hdlm-base-gamma-0.01")  # an official checkpoint (hdlm.official)
    files = read_pretrained("runs/ptb")                          # a run folder (its latest checkpoint)
    save_pretrained(model, cfg, tokenizer, "export/ptb")
    push_to_hub("export/ptb", "me/hdlm-ptb")

A *source* is a local folder (a pretrained export, a training checkpoint, a run folder, or a
downloaded official repository) or a Hub repository id ``org/name``. Hub ids are resolved with
``huggingface_hub``: its cache is used, ``HF_HUB_OFFLINE=1`` and ``local_files_only`` are
honoured, and only the files a loader reads are fetched (``model.safetensors`` in preference to
``pytorch_model.bin``). An hdlm folder holds ``config.json`` (``{"hdlm_format", "hdlm_version",
"config", "tokenizer"}``), ``config.yaml`` (the same config; it wins when both exist), the weights
and the whole tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, which
``transformers.AutoTokenizer`` loads), so that the folder alone samples on any machine.

This module sits below :mod:`hdlm.model` (whose ``from_pretrained`` / ``save_pretrained`` use it);
:mod:`hdlm.hub` builds the model and the tokenizer on top of it.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ._version import __version__
from .checkpoint import (EMA_FILE, HUB_CONFIG_FILE, META_FILE, MODEL_FILE, TOKENIZER_FILE, _is_identity,
                         _read_tokenizer_json, read_config, read_hub_config, read_tokenizer_identity, read_weights,
                         recorded_identity, resolve_checkpoint, sha256_file)
from .checkpoint import save_pretrained as write_folder
from .config import Config
from .errors import HDLMError
from .official import config_from_official, is_official_config, official_tokenizer, read_official
from .tokenizers import from_path, load_tokenizer

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
#: the files a loader may read from a Hub repository, by folder kind (the first list is required)
_HDLM_FILES = ((MODEL_FILE,), ("config.yaml", META_FILE, EMA_FILE, *TOKENIZER_FILES))
_OFFICIAL_FILES = ((), TOKENIZER_FILES)


@dataclass
class PretrainedFiles:
    """What a checkpoint source holds: its config, the weights to use (a state dict with hdlm's
    names), the folder, the weights file read and the format ("hdlm" or "official")."""

    config: Config
    state: dict[str, Tensor]
    path: Path
    weights: Path
    format: str


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
# reading


def read_pretrained(source: str | Path, *, revision: str | None = None, local_files_only: bool | None = None,
                    cache_dir: str | Path | None = None) -> PretrainedFiles:
    """The config and weights of an hdlm or official checkpoint, from a folder or a Hub id.

    The official format is recognised by its ``config.json`` and converted exactly
    (:mod:`hdlm.official`); anything it cannot represent is one :class:`HDLMError` line.
    """
    path = resolve(source, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    hub = read_hub_config(path)
    if hub is not None and is_official_config(hub):
        cfg, state, weights = read_official(path)
        return PretrainedFiles(cfg, state, path, weights, "official")
    if hub is not None and "hdlm_format" not in hub and not (path / "config.yaml").exists():
        raise HDLMError(f"checkpoint {path}: config.json is neither an hdlm folder's nor an official hdlm "
                        f"checkpoint's (model_type {hub.get('model_type')!r})")
    cfg = read_config(path)
    state, weights = read_weights(path)
    return PretrainedFiles(cfg, state, path, weights, "hdlm")


def load_folder_tokenizer(path: Path, cfg: Config | None):
    """The tokenizer of an hdlm folder, checked against its recorded identity.

    A whole ``tokenizer.json`` is loaded from the folder itself (nothing else needed); an
    identity-only one (older checkpoints) means "load ``cfg.data.tokenizer`` by name and check it".
    """
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


def pretrained_tokenizer(files: PretrainedFiles):
    """The tokenizer a checkpoint is used with: the official repo's (else hdlm's bundled GPT-2), or
    the one an hdlm folder holds; its vocabulary must be the model's."""
    if files.format == "official":
        return official_tokenizer(files.path, files.config)
    tok = load_folder_tokenizer(files.path, files.config)
    if tok.vocab_size != files.config.model.vocab_size:
        raise HDLMError(f"tokenizer mismatch: {files.path} has a tokenizer of N = {tok.vocab_size} tokens but the "
                        f"model predicts {files.config.model.vocab_size}")
    return tok


def weights_sha256(files: Any) -> str:
    """The sha256 of the weights file a checkpoint was loaded from (meta.json's when it records it);
    ``files`` is anything with ``path`` and ``weights`` (:class:`PretrainedFiles`, :class:`hdlm.hub.Pretrained`)."""
    meta_file = files.path / META_FILE
    if meta_file.is_file():
        recorded = json.loads(meta_file.read_text()).get("sha256", {}).get(files.weights.name)
        if recorded:
            return recorded
    return sha256_file(files.weights)


def read_pretrained_config(source: str | Path) -> Config:
    """The config of any checkpoint :func:`read_pretrained` reads (without reading its weights)."""
    path = resolve(source)
    hub = read_hub_config(path)
    if hub is not None and is_official_config(hub):
        return config_from_official(hub, source=str(path / HUB_CONFIG_FILE))
    return read_config(path)


# --------------------------------------------------------------------------------------------
# writing and uploading


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


__all__ = ["PretrainedFiles", "download", "is_repo_id", "load_folder_tokenizer", "pretrained_tokenizer",
           "push_pretrained", "push_to_hub", "read_pretrained", "read_pretrained_config", "resolve",
           "save_pretrained", "weights_sha256"]
