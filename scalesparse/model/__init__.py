from scalesparse.model.gpt import GPT, count_flops_per_token

__all__ = ["GPT", "count_flops_per_token"]
