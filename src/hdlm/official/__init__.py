"""The paper's published checkpoints (``hdlm-group/hdlm-base-{epsilon|gamma}-*``, made by the
official ServiceNow/hdlm code) loaded into hdlm, exactly (docs/checkpoints.md).

- :mod:`.convert`: the official ``config.json`` → hdlm :class:`~hdlm.config.Config`, the official
  weight names → hdlm's, strict (a missing or unexpected key is an error), and the repo's tokenizer.
- :mod:`.compat`: the official forward outputs and training losses, re-derived from what that code
  computes, so tests can hold hdlm to the official reference tensors and the documented deviations
  (docs/checkpoints.md, "Official defects hdlm does not copy") stay visible.

Loading goes through :func:`hdlm.hub.load_pretrained` (:func:`hdlm.hub.load_official` for a folder
known to be official), which recognises an official folder or Hub repository by its ``config.json``
(``model_type`` ``epsilon_hybrid`` / ``gamma_hybrid``). This package builds no model: it sits
below :mod:`hdlm.model`, whose ``from_pretrained`` reads official checkpoints through it.
"""

from .convert import (
    FAMILIES,
    config_from_official,
    convert_state_dict,
    is_official_config,
    official_tokenizer,
    read_official,
    read_official_config,
    read_official_weights,
)

__all__ = ["FAMILIES", "config_from_official", "convert_state_dict", "is_official_config", "official_tokenizer",
           "read_official", "read_official_config", "read_official_weights"]
