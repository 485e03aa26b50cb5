"""axolotl: ``plugins: [foam_hf.integration.axolotl.FoamPlugin]`` and ``optimizer: foam`` in a config.

axolotl imports each dotted path in ``plugins:`` and calls the plugin's ``register(cfg)`` with the unparsed
config, before the config is validated and long before ``TrainingArguments`` is built. axolotl passes
``optimizer`` to ``TrainingArguments`` as ``optim`` (any name it does not implement itself) and ``optim_args``
as ``optim_args`` (a mapping is joined to ``k=v,k=v``), and its trainer builds the optimizer through
``Trainer.create_optimizer``: the same seam as ``optim="foam"`` anywhere else. So the plugin has two jobs:

* register ``optim="foam"`` and ``optim="foam_layerwise"`` with transformers in this process (axolotl's
  ``accelerate launch`` child loads the config and its plugins again, so it registers there too);
* check ``optim_args`` at once, so a bad value fails while the config is read, not after the model has
  loaded.

This module imports axolotl; only axolotl imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from axolotl.integrations.base import BasePlugin

from . import register

__all__ = ["FoamPlugin", "axolotl_optim_args"]


def axolotl_optim_args(optim_args: Any) -> str | None:
    """``optim_args`` as axolotl hands it to ``TrainingArguments``: a mapping becomes ``"k=v,k=v"``."""
    if isinstance(optim_args, Mapping):
        return ",".join(f"{key}={value}" for key, value in optim_args.items())
    return optim_args


class FoamPlugin(BasePlugin):
    """Registers FOAM with transformers and checks a FOAM config's ``optim_args`` when axolotl loads it."""

    def register(self, cfg: Mapping[str, Any]) -> None:
        register()
        from .transformers import foam_config_from_args, is_foam_optim

        if not is_foam_optim(cfg.get("optimizer")):
            return
        # Raises FoamConfigError naming the value, the rule and the fix; optim_args is the one field it reads.
        foam_config_from_args(SimpleNamespace(optim_args=axolotl_optim_args(cfg.get("optim_args"))))
