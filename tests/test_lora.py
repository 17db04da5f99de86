"""lora.py against PEFT: adapters cross-loaded both ways with equal logits, merge/unmerge, QLoRA over NF4, bad files."""
import copy
import json
import warnings

import pytest
import torch

from conftest import save_tiny_llama
from lora import (AdapterError, LoRAConfig, LoRALinear, adapter_disabled, add_lora, count_trainable, load_adapter,
                  lora_layers, merge_lora, save_adapter, unmerge_lora)
from model import CONFIGS, Llama, load_model

peft = pytest.importorskip("peft")
PAPER = dict(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def tiny(directory, **overrides):
    """(transformers model, our model) of one random tiny checkpoint, both fp32, eval mode."""
    hf = save_tiny_llama(directory, **overrides)
    ours, _ = load_model(directory, dtype=torch.float32, device="cpu")
    return hf, ours


def tokens(vocab, T=24, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def randomize_B(named_weights, seed=0, std=0.05):
    """Give the zero-initialized B factors random values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in sorted(named_weights):
            w.copy_(torch.randn(w.shape, generator=g) * std)


def our_Bs(model):
    return [(n, m.lora_B.weight) for n, m in lora_layers(model).items()]


def peft_Bs(peft_model):
    return [(n, p) for n, p in peft_model.named_parameters() if "lora_B" in n]


@torch.no_grad()
def logits(model, x):
    out = model(x)
    return out if torch.is_tensor(out) else out.logits


# ----------------------------------------------------------------------------- config and layer
def test_config_defaults_are_the_papers_and_bad_values_fail():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.scale) == (16, 32, 0.05, 2.0)
    assert set(cfg.targets) == set(PAPER["target_modules"]) and "lm_head" not in cfg.targets
    for bad, field in [(dict(r=0), "rank"), (dict(r=-4), "rank"), (dict(r=1.5), "rank"), (dict(alpha=0), "alpha"),
                       (dict(alpha=-32), "alpha"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
                       (dict(targets=("lm_head",)), "targets"), (dict(targets=()), "targets")]:
        with pytest.raises(ValueError, match=field):
            LoRAConfig(**bad)


def test_layer_is_base_plus_scaled_low_rank_update():
    base = torch.nn.Linear(32, 24, bias=True)
    layer = LoRALinear(base, LoRAConfig(r=4, alpha=8, dropout=0.0))
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), base(x))                                   # B = 0 at the start
    assert layer.lora_A.weight.abs().max() <= 1 / 32 ** 0.5                  # kaiming-uniform(a=sqrt 5) bound
    randomize_B([("B", layer.lora_B.weight)])
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), base(x) + x @ A.T @ B.T * (8 / 4), atol=1e-6, rtol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_bf16_update_runs_in_bf16_with_fp32_master_weights():
    """In bf16 (QLoRA's compute dtype) the update runs in bf16, as autocast would run it: the output
    is bf16 and near the fp32 update, and A and B stay fp32 with fp32 gradients near the fp32 ones."""
    base = torch.nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, LoRAConfig(r=8, alpha=16, dropout=0.0))
    randomize_B([("B", layer.lora_B.weight)])
    x = torch.randn(4, 7, 64)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [layer.lora_A.weight, layer.lora_B.weight])
    layer.base.to(torch.bfloat16)
    out = layer(x.bfloat16())
    grads = torch.autograd.grad(out.float().square().sum(), [layer.lora_A.weight, layer.lora_B.weight])
    assert out.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)               # bf16: 8 bits of mantissa
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert (g - r).norm() <= 0.03 * r.norm()


def test_layers_reading_the_same_input_share_one_dropout_draw(tiny_dir):
    """q, k, v read one x: one dropout mask for the three (PEFT's statistics per layer: each element
    kept with probability 1 - p, scaled by 1 / (1 - p)); a new or modified input gets a new draw."""
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(r=4, dropout=0.5)).train()
    attn = model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.ones(8, q.in_features)
    (dq, sq), (dk, sk), (dv, sv) = q.dropped(x), k.dropped(x), v.dropped(x)  # (x zeroed where dropped, scale)
    assert dq is dk is dv and sq == sk == sv == 2.0                         # one draw for the three
    assert set((dq * sq).unique().tolist()) == {0.0, 2.0} and 0.35 < (dq == 0).float().mean() < 0.65
    assert not torch.equal(q.dropped(torch.ones_like(x))[0], dq)             # another tensor: a new draw
    x.mul_(1.0)                                                              # modified in place: a new draw
    assert not torch.equal(k.dropped(x)[0], dq)
    randomize_B(our_Bs(model))
    y = torch.randn(4, q.in_features)
    for layer in (q, k, v):            # training: the update of dropout(y), its scale folded into A
        kept, scale = layer.dropped(y)                                       # the mask the layer will reuse
        expected = layer.base(y) + (kept * scale) @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scale
        torch.testing.assert_close(layer(y), expected)
    model.eval()
    kept, scale = q.dropped(x)
    assert torch.equal(kept, x) and scale == 1.0                             # eval: no dropout
    for layer in (q, k, v):                                                  # and the layers' outputs still
        torch.testing.assert_close(layer(y), layer.base(y) + y @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scale)


@pytest.mark.parametrize("names", [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",)])
def test_layers_of_one_input_train_as_the_plain_low_rank_formula(tiny_dir, names):
    """LoRA layers of one input through fused_linears (their A's stacked, _LowRankUpdates' own backward) give
    base(x) + B A dropout(x) * alpha / r and autograd's gradients of that formula, for x, each A and each B."""
    from model import fused_linears
    torch.manual_seed(0)                                           # the same masks whatever ran before
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(r=4, dropout=0.3)).train()
    randomize_B(our_Bs(model))
    block = model.layers[1]
    layers = [getattr(block.self_attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, n) for n in names]
    gen = torch.Generator().manual_seed(len(names))
    x = torch.randn(2, 5, layers[0].in_features, generator=gen).requires_grad_()
    ups = [torch.randn(2, 5, m.out_features, generator=gen) for m in layers]
    outs = fused_linears(x, layers)
    kept, scale = layers[0].dropped(x)                             # the group's mask, memoized for x
    assert 0 < (kept == 0).float().mean() < 1                      # some dropped
    weights = [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
    got = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, ups)), [x, *weights], retain_graph=True)
    expected_outs = [m.base(x) + (kept * scale) @ m.lora_A.weight.T @ m.lora_B.weight.T * m.scale for m in layers]
    for o, e in zip(outs, expected_outs):
        torch.testing.assert_close(o, e)
    want = torch.autograd.grad(sum((o * u).sum() for o, u in zip(expected_outs, ups)), [x, *weights])
    for g, w in zip(got, want):          # fp32 sums in another order (x's: over the stacked A's at once)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer in unsigned Python integers (Appleby's reference C code)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_hashed_keep_is_murmur3s_finalizer_the_same_compiled_and_independent_between_seeds():
    """The dropout mask hash: every element against a plain-integer reference of fmix32(i * 0x9E3779B1 + seed)
    (seeds with the sign bit set too, where int32 >> would shift in ones); the same bits from a compiled
    graph; no correlation between neighbours, or between the masks of two seeds."""
    from lora import draw_seed, dropout_threshold, hashed_keep
    drop, _ = dropout_threshold(0.3)
    for seed in (0, 12345, 2 ** 31 - 1, -2 ** 31, -7):
        keep = hashed_keep((37, 29), torch.tensor(seed, dtype=torch.int32), drop)
        expected = [int((_fmix32((i * 0x9E3779B1 + seed) & 0xFFFFFFFF) & 0xFFFF) >= drop) for i in range(37 * 29)]
        assert keep.dtype == torch.int8 and keep.flatten().tolist() == expected, seed            # 1 = kept
    torch.manual_seed(0)
    seeds = [draw_seed() for _ in range(3)]
    assert seeds[0].dtype == torch.int32 and len({s.item() for s in seeds}) == 3
    compiled = torch.compile(hashed_keep, dynamic=True)
    for shape, seed in (((4, 512, 96), seeds[0]), ((3, 77, 50), seeds[1])):
        assert torch.equal(compiled(shape, seed, drop), hashed_keep(shape, seed, drop)), shape
    a = hashed_keep((1 << 20,), seeds[0], drop).float()
    b = hashed_keep((1 << 20,), seeds[1], drop).float()
    for x, y in ((a[:-1], a[1:]), (a, b), (a[:-64], a[64:])):                 # neighbours, seeds, a row apart
        assert abs(torch.corrcoef(torch.stack((x, y)))[0, 1].item()) < 5 / len(x) ** 0.5


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_cpu_dropout_unscaled_drops_at_rate_p_and_keeps_the_mean(p):
    from lora import cpu_dropout_unscaled
    torch.manual_seed(0)
    x = torch.ones(513, 1001)
    masked, scale = cpu_dropout_unscaled(x, p)                               # dropout(x) = masked * scale
    assert masked.dtype == x.dtype and set(masked.unique().tolist()) == {0.0, 1.0}
    y = masked * scale
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5           # within 4 standard errors
    kept = y[y != 0]
    assert y.unique().numel() == 2 and torch.allclose(kept, torch.tensor(65536 / (65536 - round(p * 65536))))
    assert abs(y.mean().item() - 1) < 0.01
    torch.manual_seed(0)
    assert torch.equal(cpu_dropout_unscaled(x, p)[0] * scale, y)             # the seed fixes the mask
    assert not torch.equal(cpu_dropout_unscaled(x, p)[0] * scale, y)
    kept16, _ = cpu_dropout_unscaled(x.bfloat16(), p)                        # the mask in x's dtype
    assert kept16.dtype == torch.bfloat16 and set(kept16.unique().tolist()) == {0.0, 1.0}
    rows = y.view(513, 1001)                                                 # no pattern along either axis
    assert rows.eq(0).float().mean(1).std() < 0.05 and rows.eq(0).float().mean(0).std() < 0.05


def test_initialization_matches_peft(tmp_path):
    hf, ours = tiny(tmp_path)
    torch.manual_seed(7)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**PAPER))
    torch.manual_seed(7)
    add_lora(ours, LoRAConfig())
    theirs = {n.removeprefix("base_model.model.model.").replace(".default", ""): p for n, p in pm.named_parameters()
              if "lora_" in n}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys() and len(mine) == 2 * 7 * 2
    assert all(torch.equal(theirs[n], mine[n]) for n in mine)


def test_count_trainable_llama3_8b_and_smollm2():
    for name, lora, total in [("llama3-8b", 41_943_040, 8_030_261_248), ("smollm2-135m", 4_884_480, 134_515_008)]:
        with torch.device("meta"):
            model = add_lora(Llama(CONFIGS[name]), LoRAConfig())
        assert count_trainable(model) == (lora, total + lora)
    assert abs(41_943_040 / (8_030_261_248 + 41_943_040) - 0.0052) < 1e-4   # the paper's "0.5%"


# ----------------------------------------------------------------------------- cross-loading with PEFT
def check_peft_loads_ours(directory, hf, ours, vocab, T=24, atol=2e-4):
    add_lora(ours, LoRAConfig())
    randomize_B(our_Bs(ours))
    save_adapter(ours, directory / "adapter", LoRAConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "Unexpected keyword arguments"
        pm = peft.PeftModel.from_pretrained(hf, directory / "adapter").eval()
    x = tokens(vocab, T)
    expected, got = logits(pm, x), logits(ours, x)
    with pm.disable_adapter():
        base = logits(pm, x)
    assert (expected - base).abs().max() > 1e-2                              # the adapter matters
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_peft_loads_our_adapter(tmp_path):
    hf, ours = tiny(tmp_path / "base")
    check_peft_loads_ours(tmp_path, hf, ours, hf.config.vocab_size)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["peft_type"]) == (16, 32, 0.05, "LORA")


@pytest.mark.slow
def test_peft_loads_our_adapter_smollm2(tmp_path, smollm, smollm_hf):
    ours, hf = copy.deepcopy(smollm[0]), copy.deepcopy(smollm_hf[0])  # the session fixtures stay unadapted
    check_peft_loads_ours(tmp_path, hf, ours, hf.config.vocab_size, T=16, atol=2e-3)  # as test_model


def test_we_load_peft_adapter(tmp_path):
    hf, ours = tiny(tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(**PAPER))
    randomize_B(peft_Bs(pm), seed=3)
    pm.save_pretrained(tmp_path / "peft_adapter")
    pm.eval()
    cfg = load_adapter(ours, tmp_path / "peft_adapter")
    assert cfg == LoRAConfig()
    x = tokens(hf.config.vocab_size)
    torch.testing.assert_close(logits(ours, x), logits(pm, x), atol=2e-4, rtol=0)
    assert count_trainable(ours)[0] == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_save_load_roundtrip_into_a_fresh_model(tmp_path):
    _, ours = tiny(tmp_path / "base")
    add_lora(ours, LoRAConfig(r=4, alpha=16, dropout=0.1, targets=("q_proj", "v_proj")))
    randomize_B(our_Bs(ours))
    save_adapter(ours, tmp_path / "a", LoRAConfig(r=4, alpha=16, dropout=0.1, targets=("q_proj", "v_proj")))
    fresh, _ = load_model(tmp_path / "base", dtype=torch.float32, device="cpu")
    cfg = load_adapter(fresh, tmp_path / "a")
    assert (cfg.r, cfg.alpha, cfg.dropout, set(cfg.targets)) == (4, 16, 0.1, {"q_proj", "v_proj"})
    assert len(lora_layers(fresh)) == 2 * 2
    x = tokens(ours.args.vocab_size)
    assert torch.equal(logits(fresh, x), logits(ours, x))


# ----------------------------------------------------------------------------- merge, disable
def test_merge_unmerge_and_disable(tmp_path):
    _, model = tiny(tmp_path)
    x = tokens(model.args.vocab_size)
    base_logits = logits(model, x)
    add_lora(model, LoRAConfig())
    randomize_B(our_Bs(model))
    adapted = logits(model, x)
    assert (adapted - base_logits).abs().max() > 1e-2
    with adapter_disabled(model):
        assert torch.equal(logits(model, x), base_logits)                    # the teacher: exactly the base
    assert torch.equal(logits(model, x), adapted)                            # back on after the block
    weights = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    merge_lora(model)
    assert all(not torch.equal(m.base.weight, weights[n]) for n, m in lora_layers(model).items())
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unmerge"):
        with adapter_disabled(model):
            pass
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base.weight, weights[n], atol=1e-7, rtol=1e-6)
    with adapter_disabled(model):                                            # W + d - d: rounding only
        torch.testing.assert_close(logits(model, x), base_logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- QLoRA: NF4 base
def test_qlora_over_nf4_trains_only_lora(tmp_path):
    save_tiny_llama(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", quantize="nf4")
    add_lora(model, LoRAConfig()).train()
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    x = tokens(model.args.vocab_size)
    for step in range(2):  # step 0: B = 0 so only B gets gradient; step 1: both
        model.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        for name, p in model.named_parameters():
            if "lora_" in name:
                assert p.grad is not None and (p.grad.abs().sum() > 0) == ("lora_B" in name or step == 1), name
            else:
                assert not p.requires_grad and p.grad is None, name
        randomize_B(our_Bs(model))
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())
    trainable, total = count_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) and total > trainable
    with pytest.raises(ValueError, match="NF4"):
        merge_lora(model)
    save_adapter(model, tmp_path / "adapter", LoRAConfig())                  # a QLoRA adapter serves the dense model
    dense, _ = load_model(tmp_path, dtype=torch.float32, device="cpu")
    load_adapter(dense, tmp_path / "adapter")


@pytest.mark.slow                                                            # inductor: ~25 s cold, ~4 s cached
def test_compiled_training_blocks_equal_the_eager_ones_with_the_same_dropout(tmp_path):
    """compile_for_training: with one seed (so the same dropout masks), the compiled blocks give the eager
    loss and LoRA gradients, over an NF4 base with kept weights, at two sequence lengths; without the
    seed the masks differ; inference (no grad, a KV cache) stays eager; unkept NF4 weights are refused;
    LoRA on some linears only (the others NF4 alone) gives the eager loss too."""
    from loss import lm_loss
    from lora import compile_for_training
    from model import generate
    from quant import keep_dequantized
    save_tiny_llama(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", quantize="nf4")
    add_lora(model, LoRAConfig(dropout=0.3)).train()
    with pytest.raises(ValueError, match="kept dequantized"):
        compile_for_training(model)
    keep_dequantized(model)
    randomize_B(our_Bs(model))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grads(x, seed):
        torch.manual_seed(seed)
        loss = lm_loss(model, x, x)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads
    xs = [tokens(model.args.vocab_size, T=24), tokens(model.args.vocab_size, T=17, seed=2)]
    eager = [loss_and_grads(x, 0) for x in xs]
    model.eval()
    prompt = xs[0][0, :8].tolist()
    before = generate(model, [prompt], 6)
    model.train()
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()                              # graphs that earlier tests compiled are counted again
    counters.clear()
    assert compile_for_training(model, dynamic=True) == model.args.n_layers - 1   # all but the first
    for x, (loss, grads) in zip(xs, eager):
        c_loss, c_grads = loss_and_grads(x, 0)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(c_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # one whole graph for all the blocks and lengths, one for lm_loss's cross-entropy chunks of either length
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert not torch.allclose(loss_and_grads(xs[1], 1)[0], eager[1][0])       # another seed: other masks
    model.eval()
    assert generate(model, [prompt], 6) == before                            # inference: the eager blocks
    subset, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", quantize="nf4")   # NF4 layers without LoRA
    keep_dequantized(subset)
    add_lora(subset, LoRAConfig(dropout=0.3, targets=("v_proj", "down_proj"))).train()
    randomize_B(our_Bs(subset))
    torch.manual_seed(0)
    expected = lm_loss(subset, xs[0], xs[0])
    keep_dequantized(subset, False), keep_dequantized(subset)               # no copy kept yet, as after loading
    compile_for_training(subset)
    counters.clear()
    torch.manual_seed(0)
    torch.testing.assert_close(lm_loss(subset, xs[0], xs[0]), expected, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


# ----------------------------------------------------------------------------- bad inputs, atomic save
@pytest.fixture
def saved(tmp_path):
    """A tiny model with a saved adapter: (model dir, adapter dir)."""
    _, model = tiny(tmp_path / "base")
    add_lora(model, LoRAConfig())
    randomize_B(our_Bs(model))
    return tmp_path / "base", save_adapter(model, tmp_path / "adapter", LoRAConfig())


def test_adapter_for_another_base_is_refused(tmp_path, saved):
    _, adapter = saved
    _, same_shape = tiny(tmp_path / "other", seed=5)                         # another model of the same shape
    with pytest.raises(AdapterError, match="adapter for base model") as e:
        load_adapter(same_shape, adapter)
    assert str(adapter / "adapter_model.safetensors") in str(e.value) and not lora_layers(same_shape)
    load_adapter(same_shape, adapter, check_base=False)                      # shapes fit: allowed when asked
    _, wider = tiny(tmp_path / "wider", intermediate_size=96)
    with pytest.raises(AdapterError, match="hidden_dim"):
        load_adapter(wider, adapter)


def test_peft_adapter_with_wrong_shapes_or_missing_keys_is_refused(tmp_path):
    hf, _ = tiny(tmp_path / "base", intermediate_size=96)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**PAPER))
    pm.save_pretrained(tmp_path / "peft_adapter")
    _, ours = tiny(tmp_path / "other")                                       # intermediate_size 128
    weights = tmp_path / "peft_adapter" / "adapter_model.safetensors"
    with pytest.raises(AdapterError, match="has shape") as e:
        load_adapter(ours, tmp_path / "peft_adapter")
    assert str(weights) in str(e.value) and not lora_layers(ours)
    from safetensors.torch import load_file, save_file
    tensors = load_file(weights)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match="1 missing"):
        load_adapter(ours, tmp_path / "peft_adapter")


def test_corrupt_files_and_bad_config_are_refused(tmp_path, saved):
    base, adapter = saved
    model, _ = load_model(base, dtype=torch.float32, device="cpu")
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    good_config = config.read_text()
    for change, pattern in [(dict(r=0), "rank"), (dict(lora_alpha=-32), "alpha"), (dict(use_dora=True), "use_dora"),
                            (dict(target_modules="all-linear"), "target_modules")]:
        config.write_text(json.dumps({**json.loads(good_config), **change}))
        with pytest.raises(AdapterError, match=pattern) as e:
            load_adapter(model, adapter)
        assert str(config) in str(e.value)
    config.write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(model, adapter)
    config.write_text(good_config)
    weights.write_bytes(weights.read_bytes()[:1000])                         # truncated
    with pytest.raises(AdapterError, match="not a readable safetensors") as e:
        load_adapter(model, adapter)
    assert str(weights) in str(e.value) and not lora_layers(model)


def test_interrupted_save_keeps_the_old_adapter(tmp_path, saved, monkeypatch):
    import lora
    base, adapter = saved
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    model, _ = load_model(base, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(r=8))

    def crash(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, adapter, LoRAConfig(r=8))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new", LoRAConfig(r=8))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no partial dir, no temp left
    monkeypatch.undo()
    save_adapter(model, adapter, LoRAConfig(r=8))                            # a complete save replaces it
    assert load_adapter(load_model(base, dtype=torch.float32, device="cpu")[0], adapter).r == 8
    with pytest.raises(AdapterError, match="not an adapter directory"):       # never wipes a model dir
        save_adapter(model, base, LoRAConfig(r=8))
