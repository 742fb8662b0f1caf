"""model_type (config.json) → family adapter."""

from scalesparse.registry import Registry

FAMILIES: Registry[type] = Registry("model family")
