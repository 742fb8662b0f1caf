"""Llama (Llama 2/3/3.1 incl. rope scaling, SmolLM2, TinyLlama…): the base layout as it is."""

from scalesparse.model.families.base import Family
from scalesparse.model.families.registry import FAMILIES


@FAMILIES.register("llama")
class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
