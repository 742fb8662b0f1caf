from scalesparse.model.gpt import GPT, active_params, count_flops_per_token

__all__ = ["GPT", "active_params", "count_flops_per_token"]
