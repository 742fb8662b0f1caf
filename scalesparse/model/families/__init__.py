"""One adapter per transformers family (config ↔ ModelConfig, names ↔ ours, tensors ↔ ours).

Importing the package registers every family; `FAMILIES.get(model_type)` picks one.
"""

from scalesparse.model.families import llama, mistral, mixtral, qwen2  # noqa: F401  (registration)
from scalesparse.model.families.base import Family
from scalesparse.model.families.registry import FAMILIES

__all__ = ["FAMILIES", "Family", "family_named", "supported"]


def supported() -> list[str]:
    return sorted(FAMILIES._items)


def family_named(model_type: str) -> Family:
    return FAMILIES.get(model_type)()
