"""loss.py: masks token by token, the joint loss, KLD, prompt prepending, and a loss that falls."""
import pytest
import torch

from loss import (IGNORE, build_samples, collate, joint_loss, kld_loss, lm_loss, pg_sample, sft_sample, token_ce)
from prompts import parse_prompt

PROMPT = parse_prompt("<USER>:\nYou shop. Answer with Action: click[x].\n<AGENT>:\nOk.\n<USER>:\n")
RECORD = {
    "id": 0, "input": "i need a red mug",
    "conversation": [{"role": "user", "content": "i need a red mug"},
                     {"role": "assistant", "content": "Action: search[red mug]"},
                     {"role": "user", "content": "Results: B01 red mug"},
                     {"role": "assistant", "content": "Action: click[B01]"}],
    "student_output": "Sure! Here are some mugs.", "teacher_output": "Action: search[red mug]",
    "reason": "The context asks for actions, so the output became an action.",
}


def trained_text(tok, sample):
    """The decoded runs of trained tokens."""
    runs, cur = [], []
    for i, l in zip(sample.ids, sample.labels):
        if l != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)); cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_sft_mask_covers_exactly_the_agent_turns(tiny_model):
    _, tok = tiny_model
    s = sft_sample(tok, RECORD)
    assert trained_text(tok, s) == ["Action: search[red mug]<|im_end|>", "Action: click[B01]<|im_end|>"]
    for i, l in zip(s.ids, s.labels):
        assert l == IGNORE or l == i
    # with the prompt prepended, the prompt's own shot ("Ok.") is not trained
    p = sft_sample(tok, RECORD, PROMPT)
    assert trained_text(tok, p) == trained_text(tok, s)
    assert len(p.ids) > len(s.ids)


def test_pg_mask_covers_exactly_context_and_reason(tiny_model):
    _, tok = tiny_model
    s = pg_sample(tok, RECORD, PROMPT, "prompt+reason")
    assert trained_text(tok, s) == [f"Context:\n{PROMPT.text}\n\nReason:\n{RECORD['reason']}<|im_end|>"]
    user = tok.decode([i for i, l in zip(s.ids, s.labels) if l == IGNORE])
    for part in (RECORD["input"], RECORD["student_output"], RECORD["teacher_output"]):
        assert part in user
    assert PROMPT.text not in user and RECORD["reason"] not in user
    given = pg_sample(tok, RECORD, PROMPT, "reason_given_prompt")
    assert trained_text(tok, given) == [f"Reason:\n{RECORD['reason']}<|im_end|>"]
    assert PROMPT.text in tok.decode(given.ids)
    with pytest.raises(ValueError, match="--pg-target"):
        pg_sample(tok, RECORD, PROMPT, "everything")


def test_joint_loss_is_the_weighted_sum(tiny_model):
    model, tok = tiny_model
    sft = collate([sft_sample(tok, RECORD)], 0)
    pg = collate([pg_sample(tok, RECORD, PROMPT)], 0)
    with torch.no_grad():
        l_sft, l_pg = lm_loss(model, *sft), lm_loss(model, *pg)
        manual_pg = torch.nn.functional.cross_entropy(model(pg[0])[0, :-1], pg[1][0, 1:], ignore_index=IGNORE)
    torch.testing.assert_close(l_pg, manual_pg)
    torch.testing.assert_close(joint_loss(l_pg, l_sft, 0.7), 0.3 * l_pg + 0.7 * l_sft)


def test_kld_is_zero_for_identical_models_and_positive_otherwise(tiny_model):
    model, tok = tiny_model
    student = collate([sft_sample(tok, RECORD)], 0)
    teacher = collate([sft_sample(tok, RECORD, PROMPT)], 0)
    with torch.no_grad():
        s_logits = model(student[0])
        t_logits = model(teacher[0])
    assert kld_loss(s_logits, student[1], s_logits, student[1]).item() == pytest.approx(0.0, abs=1e-6)
    assert kld_loss(s_logits, student[1], t_logits, teacher[1]).item() > 0     # the prompt changes the logits


def test_prepend50_prepends_about_half_the_time(tiny_model):
    _, tok = tiny_model
    records = [dict(RECORD, id=i) for i in range(400)]
    plain = len(sft_sample(tok, RECORD).ids)
    sft, _, _, _ = build_samples(tok, records, PROMPT, "prepend50", "prompt+reason", 10_000, seed=0)
    share = sum(len(s.ids) > plain for s in sft) / len(sft)
    assert 0.43 < share < 0.57
    again, _, _, _ = build_samples(tok, records, PROMPT, "prepend50", "prompt+reason", 10_000, seed=0)
    assert [s.ids for s in again] == [s.ids for s in sft]                  # the same under the same seed
    always, _, _, _ = build_samples(tok, records, PROMPT, "prepend", "prompt+reason", 10_000)
    assert all(len(s.ids) > plain for s in always)


def test_over_long_samples_are_dropped_and_counted_never_truncated(tiny_model):
    _, tok = tiny_model
    n_pg = len(pg_sample(tok, RECORD, PROMPT).ids)
    long = dict(RECORD, reason="because " * 200)
    sft, pg, _, report = build_samples(tok, [RECORD, long], PROMPT, "genpi", "prompt+reason", n_pg + 5)
    assert report["dropped_over_max_len"] == 1 and len(sft) == len(pg) == 1
    assert pg[0].ids == pg_sample(tok, RECORD, PROMPT).ids
    with pytest.raises(ValueError, match="--method"):
        build_samples(tok, [RECORD], PROMPT, "magic", "prompt+reason", 100)


@pytest.mark.parametrize("compiled", [False, True])  # True: each chunk's softmax and gradient through inductor
@pytest.mark.parametrize("scale", [1.0, 60.0])     # 60: some target probabilities underflow to 0 in fp32
def test_linear_cross_entropy_equals_full_logits_cross_entropy(scale, compiled):
    from loss import linear_cross_entropy
    from model import compiler_unavailable
    if compiled and compiler_unavailable("cpu"):
        pytest.skip(compiler_unavailable("cpu"))
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 32, generator=g) * scale).requires_grad_()
    w, t = torch.randn(500, 32, generator=g), torch.randint(0, 500, (300,), generator=g)
    ours = linear_cross_entropy(h, w, t, chunk=64, compiled=compiled)         # 300 rows: chunks of 64 and 44
    (2 * ours).backward()
    grad, h.grad = h.grad.clone(), None
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    (2 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    # compiled, the gradient is exp(logit - logsumexp) where the reference takes its softmax: apart by the fp32
    # spacing of the largest logits (~1,500 at scale 60: 1.8e-4 of the gradient)
    spacing = torch.finfo(torch.float32).eps * float((h @ w.T).abs().max()) if compiled else 0.0
    torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-7 + 2 * spacing * float(h.grad.abs().max()))
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(h, w.requires_grad_(), t)


def test_lm_loss_equals_token_ce_of_the_logits(tiny_dir):
    from model import load_model
    model, tok = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    tokens, labels = collate([sft_sample(tok, RECORD), pg_sample(tok, RECORD, PROMPT)], 0)   # padded batch
    torch.testing.assert_close(lm_loss(model, tokens, labels), token_ce(model(tokens), labels), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not __import__("model").ONEDNN_KERNELS, reason="this PyTorch build has no oneDNN")
def test_bf16_lm_loss_reads_the_heads_onednn_copies_with_the_same_loss_and_gradient(tiny_dir, monkeypatch):
    """lm_loss of a bf16 model on a CPU: the LM head's two products per chunk read its weight and transpose
    reordered for oneDNN once (Linear.onednn_weight, onednn_weight_t); loss and gradient for the hidden states
    equal the plain products'. The copies follow the weight when it changes."""
    import loss as loss_module
    from model import load_model
    model, tok = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu")
    model.norm.weight.requires_grad_()                      # so the hidden states get a gradient (the head is frozen)
    tokens, labels = collate([sft_sample(tok, RECORD), pg_sample(tok, RECORD, PROMPT)], 0)   # padded batch
    seen = []
    real = loss_module.packed_product
    monkeypatch.setattr(loss_module, "packed_product", lambda x, p: seen.append(p) or real(x, p))

    def loss_and_grad():
        hidden = []
        model.norm.register_forward_hook(lambda m, i, out: hidden.append(out.retain_grad() or out))
        value = lm_loss(model, tokens, labels)
        value.backward()
        model.norm._forward_hooks.clear()
        return value.detach(), hidden[0].grad
    with torch.enable_grad():
        packed_loss, packed_grad = loss_and_grad()
        assert len(seen) == 2 * -(-int((labels[:, 1:] != -100).sum()) // 512)          # both products of each chunk
        seen.clear()
        monkeypatch.setattr(loss_module, "ONEDNN_KERNELS", False)                     # the plain products
        plain_loss, plain_grad = loss_and_grad()
    assert not seen
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(packed_grad.float(), plain_grad.float(), rtol=2e-2, atol=1e-4)
    with torch.no_grad():                                   # a changed head: packed again from its new weight
        model.lm_head.weight.mul_(2)
    x = torch.randn(3, model.lm_head.out_features, dtype=torch.bfloat16)
    torch.testing.assert_close(real(x, model.lm_head.onednn_weight_t()).float(), (x @ model.lm_head.weight).float(),
                               rtol=1e-2, atol=1e-2)


def test_tiny_model_loss_falls_on_a_fixed_batch(tiny_dir):
    from lora import LoRAConfig, add_lora
    from model import load_model
    model, tok = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0))
    sft = collate([sft_sample(tok, RECORD)], 0)
    pg = collate([pg_sample(tok, RECORD, PROMPT)], 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = joint_loss(lm_loss(model, *pg), lm_loss(model, *sft), 0.7)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    # a random tiny model starts near ln(vocab); only the adapter trains, so the fall is steady, not steep
    assert losses[-1] < 0.92 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert token_ce(model(sft[0]), sft[1]).item() < losses[0]
