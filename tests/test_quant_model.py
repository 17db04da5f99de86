"""load_model(quantize="nf4"): every block linear becomes 4-bit while loading, and the model still answers."""
import pytest
import torch

from model import generate, load_model
from quant import Linear4bit, dequantize_nf4, quantized_footprint


def test_nf4_load_swaps_block_linears_and_matches_dequantized_weights(tiny_dir):
    dense, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    q4, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu", quantize="nf4")
    swapped = [n for n, m in q4.named_modules() if isinstance(m, Linear4bit)]
    assert len(swapped) == 7 * q4.args.n_layers                       # q k v o gate up down, every block
    assert not isinstance(q4.lm_head, Linear4bit) and isinstance(q4.embed_tokens, torch.nn.Embedding)
    # put the 4-bit weights back into the dense model: the logits must then be identical
    for name, m in q4.named_modules():
        if isinstance(m, Linear4bit):
            dense.get_submodule(name).weight.data = dequantize_nf4(m.state, torch.float32)
    x = torch.randint(0, q4.args.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(q4(x), dense(x))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_smollm2_agrees_with_full_precision_and_is_small(smollm_path, dtype):
    """Reports next-token agreement of NF4 SmolLM2 with the unquantized model of the same compute dtype
    (fp32, and bf16 as QLoRA computes) on a chat, and the bytes per parameter of the quantized linear
    weights (QLoRA, paper section 4)."""
    full, tok = load_model(smollm_path, dtype=dtype, device="cpu")
    q4, _ = load_model(smollm_path, dtype=dtype, device="cpu", quantize="nf4")
    chat = [{"role": "user", "content": "Explain in two sentences why the sky is blue, then give one "
                                        "example of a shell command that counts the files in /etc."}]
    ids = tok.apply_chat(chat)
    reply = generate(full, [ids], max_new_tokens=32, stop_ids=tok.stop_ids)[0]
    x = torch.tensor([ids + reply])
    with torch.no_grad():                                  # one forward each: no slow 4-bit decode loop
        same = full(x).argmax(-1) == q4(x).argmax(-1)                  # (1, T)
    agree = same[0, len(ids) - 1:-1].float().mean().item()                 # on the positions of the reply
    nbytes, nparams = quantized_footprint(q4)
    print(f"\nNF4 next-token agreement with {dtype} over the {len(reply)} reply tokens: {agree:.1%}; "
          f"{nbytes / nparams:.3f} bytes/parameter over {nparams / 1e6:.1f}M quantized parameters")
    assert agree >= 0.6   # measured: 78% (fp32, 2026-11-25); a 135M model re-quantized from Q4_1 is fragile
    assert nbytes / nparams <= 0.6
    paris = tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}]) + tok.encode("The capital of France is")
    with torch.no_grad():
        assert tok.decode([int(q4(torch.tensor([paris]))[0, -1].argmax())]).strip() == "Paris"
